"""Stage 3: linear probe of a frozen backbone (SPEC stage 3), and semi-supervised training on a
labelled subset: the probe on the subset, or fine-tuning of the whole network.

    torchrun --nproc_per_node=8 main_lincls.py --data_dir=DATA \
        --pretrained=runs/r18/checkpoint.pth --output_dir=runs/r18/lincls
    torchrun --nproc_per_node=8 main_lincls.py --protocol=finetune --train_subset=1percent.txt ...

The backbone comes from a distillation checkpoint (student weights, head dropped), its exported
student_backbone.pth, or any teacher checkpoint of stage 1; `--arch` defaults to the architecture
the checkpoint records. `--protocol=linear` trains a Linear classifier on the frozen backbone;
`--protocol=finetune` trains the whole network. Either trains on every training image, on those a
`--train_subset` list names, or on a class-balanced `--train_percent` draw. Defaults are SPEC's
probe recipe for ResNets (fine-tuning: see FINETUNE_DEFAULTS); `--batch_size` is global. The run
ends with one JSON line, also written to <output_dir>/result_linear.json (result_semi.json when
fine-tuning or training on a subset), for tools/collect_results.py.

The weighted kNN evaluation is its own program, eval_knn.py; `--eval=knn` here still runs it, with
a deprecation message. `run(args)` is the whole stage on this process (utils/args.py); the command
line is `main`.
"""
import os
import sys

import torch
import torch.nn.functional as F
from absl import app, flags

import eval_knn
from data.folder import ImageFolder, check_same_classes
from data.subsets import LabelledSubset, balanced_subset, load_subset, write_subset_list
from data.transforms import eval_transform, linear_train_transform
from models.linear import LinearClassifier
from models.pretrained import evaluated_backbone
from utils import atomic, checkpoint, dist, errors
from utils.args import Args
from utils.evaluation import accuracies, correct_per_image, finish
from utils.features import gather_by_index
from utils.logging import JsonlWriter, Progress
from utils.schedule import cosine_lr
from utils.training import epoch_batches, make_loader

FLAGS = flags.FlagValues()  # this script's own flags, read once in main() (utils/args.py)
# The data, the backbone and the processes: eval_knn.py's flags, one definition for stage 3's programs.
for _name in ('data_dir', 'arch', 'pretrained', 'pretrained_format', 'batch_size', 'workers', 'device'):
    FLAGS[_name] = eval_knn.FLAGS[_name]
flags.DEFINE_string('output_dir', None, 'Where checkpoints, metrics.jsonl and the result JSON go.', flag_values=FLAGS)
flags.DEFINE_enum('protocol', 'linear', ['linear', 'finetune'],
                  'linear: train a Linear classifier on the frozen backbone (SPEC stage 3; DisCo\'s '
                  'semi-supervised protocol); finetune: train the whole network, BatchNorm in train mode '
                  '(SPEC\'s semi-supervised table).', flag_values=FLAGS)
flags.DEFINE_string('train_subset', None,
                    'List of the labelled training images, one per line: a file name (SimCLR\'s 1 % / 10 % '
                    'ImageNet lists) or a path below train/ (the list --train_percent writes).', flag_values=FLAGS)
flags.DEFINE_float('train_percent', None,
                   'Train on this many % of the training images, the same number from every class, '
                   'drawn with --seed; the list is written to <output_dir>/train_subset.txt for reuse.',
                   flag_values=FLAGS)
flags.DEFINE_integer('epochs', None, 'Training epochs; default 120 (linear) or 20 (finetune).', flag_values=FLAGS)
flags.DEFINE_float('lr', None, 'Learning rate of the classifier; default 30 (linear; 3.0 for '
                   'EfficientNet-B0) or 0.2 (finetune).', flag_values=FLAGS)
flags.DEFINE_float('backbone_lr', None, 'Learning rate of the backbone (--protocol=finetune); default 0.01.',
                   flag_values=FLAGS)
flags.DEFINE_float('min_lr', None, 'Classifier learning rate the cosine ends at; default 0.01 (linear; '
                   '0.001 for EfficientNet-B0) or 0 (finetune). The backbone\'s ends at the same fraction '
                   'of --backbone_lr.', flag_values=FLAGS)
flags.DEFINE_float('weight_decay', 0.0, 'SGD weight decay.', flag_values=FLAGS)
flags.DEFINE_bool('normalise_features', False, 'L2-normalise the pooled features before the Linear: one --lr '
                  'then fits networks whose features differ in scale, an untrained one\'s too (the '
                  'Fashion-MNIST demo); off, as released.', flag_values=FLAGS)
flags.DEFINE_float('momentum', 0.9, 'SGD momentum.', flag_values=FLAGS)
flags.DEFINE_integer('image_size', 224, 'Crop size; validation resizes to size*256/224 first.', flag_values=FLAGS)
flags.DEFINE_integer('seed', 0, 'Seed; each epoch reseeds from (seed, epoch, rank).', flag_values=FLAGS)
flags.DEFINE_integer('report_freq', 10, 'Print and log progress every this many steps.', flag_values=FLAGS)
flags.DEFINE_integer('val_freq', 1, 'Validate every this many epochs, and after the last (DINO\'s eval_linear.py '
                     'flag): best_top1 is the best of those.', lower_bound=1, flag_values=FLAGS)
flags.DEFINE_string('resume', None,
                    "Probe checkpoint to continue from; 'auto' = output_dir/checkpoint.pth if present.",
                    flag_values=FLAGS)
flags.DEFINE_bool('evaluate', False,
                  'Only validate the saved probe of --resume (default output_dir/checkpoint.pth).', flag_values=FLAGS)
# Deprecated: --eval=knn runs eval_knn.py, with eval_knn.py's own flags for the vote.
flags.DEFINE_enum('eval', 'linear', ['linear', 'knn'],
                  'Deprecated: knn runs eval_knn.py (use it directly); linear: this program.', flag_values=FLAGS)
for _name in ('knn_k', 'knn_temperature', 'knn_backend'):
    FLAGS[_name] = eval_knn.FLAGS[_name]
flags.mark_flags_as_required(['data_dir', 'pretrained', 'output_dir'], flag_values=FLAGS)

LINEAR_DEFAULTS = {'epochs': 120, 'lr': 30.0, 'min_lr': 0.01}  # SPEC stage 3
# Not from the BINGO release (SPEC gives no fine-tuning recipe): SwAV's semi-supervised
# fine-tuning of a self-supervised ResNet at batch 256 (20 epochs, SGD 0.9, no weight decay,
# backbone lr 0.01 and classifier lr 0.2 on 10 % of the labels; 0.02 and 5.0 on 1 %, which
# scripts/semi passes), with a cosine schedule to 0 in place of SwAV's two steps.
FINETUNE_DEFAULTS = {'epochs': 20, 'lr': 0.2, 'backbone_lr': 0.01, 'min_lr': 0.0}


# ------------------------------------------------------------------ arguments

def checked(args, world_size):
    """`args` with the protocol's defaults for the flags left unset, after refusing what cannot run."""
    if args.batch_size % world_size:
        raise app.UsageError(f'--batch_size={args.batch_size} is not divisible by {world_size} processes')
    if args.train_subset and args.train_percent is not None:
        raise app.UsageError('--train_subset and --train_percent both choose the labelled images: pass one')
    if args.protocol == 'linear' and args.backbone_lr is not None:
        raise app.UsageError('--backbone_lr applies to --protocol=finetune; the linear probe\'s backbone '
                             'is frozen')
    defaults = FINETUNE_DEFAULTS if args.protocol == 'finetune' else LINEAR_DEFAULTS
    args = args.replace(**{name: value for name, value in defaults.items() if getattr(args, name) is None})
    for name in ('lr', 'backbone_lr') if args.protocol == 'finetune' else ('lr',):
        if getattr(args, name) <= 0:
            raise app.UsageError(f'--{name}={getattr(args, name)} must be positive')
    return args


def deprecated_knn_args(args):
    """eval_knn.py's arguments for a `main_lincls.py --eval=knn` command line, which trains nothing."""
    if args.evaluate or args.resume or args.backbone_lr is not None:
        raise app.UsageError('--eval=knn trains nothing: --evaluate, --resume and --backbone_lr do not apply')
    if args.protocol != 'linear' or args.train_subset or args.train_percent is not None:
        raise app.UsageError('--eval=knn votes with every training image and trains nothing: '
                             '--protocol, --train_subset and --train_percent do not apply')
    if os.environ.get('RANK', '0') == '0':  # once under torchrun: the process group is eval_knn's to start
        print('main_lincls.py: --eval=knn is deprecated: run eval_knn.py with the same flags, without --eval '
              '(the probe\'s training flags do not apply to it)', file=sys.stderr, flush=True)
    return Args(**{name: getattr(args, name) for name in eval_knn.FLAGS})


def is_semi_supervised(args):
    """Runs that belong in the semi-supervised table (result_semi.json), not the probe's."""
    return args.protocol == 'finetune' or bool(args.train_subset) or args.train_percent is not None


def subset_list_path(args):
    """The list naming the labelled images: --train_subset, the one written for --train_percent, or None."""
    if args.train_subset:
        return os.path.abspath(args.train_subset)
    if args.train_percent is not None:
        return os.path.abspath(os.path.join(args.output_dir, 'train_subset.txt'))
    return None


# ------------------------------------------------------------------ data and model

def labelled_split(args, folder):
    """The training images the classifier learns from: all of `folder`, those --train_subset
    lists, or a --train_percent draw (the same on every rank: it depends on --seed alone)."""
    if args.train_subset:
        return load_subset(folder, args.train_subset)
    if args.train_percent is None:
        return folder
    return LabelledSubset(folder, balanced_subset(folder, args.train_percent, args.seed))


def build_optimizer(args, classifier):
    """SGD over what the protocol trains. Each group's lr is its `lr_scale` times the classifier's,
    so one cosine (`set_epoch_lr`) schedules both."""
    groups = [{'params': list(classifier.linear.parameters()), 'lr_scale': 1.0}]
    if not classifier.frozen:
        groups.insert(0, {'params': list(classifier.backbone.parameters()),
                          'lr_scale': args.backbone_lr / args.lr})
    return torch.optim.SGD(groups, args.lr, momentum=args.momentum, weight_decay=args.weight_decay)


def set_epoch_lr(args, optimizer, epoch):
    """Cosine per epoch: the classifier's lr from --lr to --min_lr, the backbone's in proportion."""
    lr = cosine_lr(args.lr, epoch, args.epochs, args.min_lr)
    for group in optimizer.param_groups:
        group['lr'] = lr * group['lr_scale']
    return lr


@torch.no_grad()
def validate(classifier, loader, indices, device, header, report_freq):
    classifier.eval()
    progress = Progress(len(loader), report_freq)
    per_image, losses = [], []
    for step, (images, targets) in enumerate(loader):
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        logits = classifier(images)
        per_image.append(correct_per_image(logits.argsort(dim=1, descending=True, stable=True), targets))
        losses.append(F.cross_entropy(logits, targets, reduction='none'))
        progress.update(header, step, len(loader), images.shape[0] * dist.get_world_size())
    result = accuracies(torch.cat(per_image), indices, len(loader.dataset))
    result['loss'] = float(gather_by_index(torch.cat(losses), indices, len(loader.dataset)).mean())
    return result


# ------------------------------------------------------------------ the probe's checkpoint

def trained_part(classifier):
    """(checkpoint key, module) of what was trained: the Linear alone (linear) or the whole network."""
    return ('linear', classifier.linear) if classifier.frozen else ('model', classifier)


def save(args, classifier, optimizer, epoch, best_top1, digest, train_folder, name='checkpoint.pth'):
    """What was trained (the backbone it started from is --pretrained's, identified by its digest)."""
    key, trained = trained_part(classifier)
    state = {'arch': args.arch, 'protocol': args.protocol, 'epoch': epoch + 1, key: trained.state_dict(),
             'optimizer': optimizer.state_dict(), 'best_top1': best_top1, 'classes': train_folder.classes,
             'train_fingerprint': train_folder.fingerprint(),
             'pretrained': os.path.abspath(args.pretrained), 'backbone_digest': digest, 'flags': vars(args)}
    atomic.save_atomic(state, os.path.join(args.output_dir, name))


def saved_probe_path(args):
    """The probe to continue from or to evaluate, or None to start afresh."""
    path = args.resume
    if path == 'auto' or (args.evaluate and not path):
        path = os.path.join(args.output_dir, 'checkpoint.pth')
        if not os.path.exists(path) and not args.evaluate:
            return None
    if path and not os.path.exists(path):
        if args.evaluate:
            raise app.UsageError(f'--evaluate needs a saved probe, and {path} does not exist: train one '
                                 'first, or point --resume at a probe checkpoint')
        raise app.UsageError(f'--resume={path} does not exist')
    return path


def load_probe(args, path, classifier, optimizer, digest, train_folder):
    """Restore a saved probe after checking it was trained from this backbone, with this protocol,
    on these classes (and, when training goes on, on these training images)."""
    state = checkpoint.load(path)
    (key, trained), classes = trained_part(classifier), train_folder.classes
    if not isinstance(state, dict) or not ({'linear', 'model'} & set(state)):
        raise app.UsageError(f'{path} is not a probe checkpoint of main_lincls.py '
                             '(no "linear" or "model" key)')
    if key not in state:
        raise app.UsageError(f'{path} was trained with --protocol={state.get("protocol", "linear")}, '
                             f'not --protocol={args.protocol}')
    normalised = state.get('flags', {}).get('normalise_features', False)
    if normalised != args.normalise_features:
        raise app.UsageError(f'{path} was trained with --normalise_features={normalised}: pass the same')
    if state.get('arch') != args.arch or state.get('classes') != classes:
        raise app.UsageError(f'probe checkpoint {path} is a probe of a {state.get("arch")} over '
                             f'{len(state.get("classes") or [])} classes, not --arch={args.arch} over '
                             f'the {len(classes)} classes of {args.data_dir}')
    changed = [name for name, value in digest.items() if state['backbone_digest'].get(name) != value]
    if changed:
        raise app.UsageError(f'--pretrained={args.pretrained} is not the backbone the probe {path} was '
                             f'trained on ({state["pretrained"]}): {len(changed)} tensors differ, '
                             f'e.g. {", ".join(changed[:3])}')
    fingerprint = train_folder.fingerprint()
    if not args.evaluate and state.get('train_fingerprint', fingerprint) != fingerprint:
        raise app.UsageError(f'{path} was trained on other training images than the {len(train_folder)} of '
                             f'{train_folder.root} chosen now (--train_subset / --train_percent / --seed)')
    trained.load_state_dict(state[key])
    optimizer.load_state_dict(state['optimizer'])
    print(f'loaded probe {path} (epoch {state["epoch"]})', flush=True)
    return state['epoch'], state['best_top1']


# ------------------------------------------------------------------ training

def run(args):
    """main_lincls.py on this process (alone, or one of torchrun's); returns the result."""
    if args.eval == 'knn':
        return eval_knn.run(deprecated_knn_args(args))
    info = dist.init_distributed(args.device)
    args = checked(args, info.world_size)
    torch.manual_seed(args.seed)  # the same initial classifier on every rank
    all_train = ImageFolder(os.path.join(args.data_dir, 'train'), linear_train_transform(args.image_size))
    val_folder = ImageFolder(os.path.join(args.data_dir, 'val'), eval_transform(args.image_size))
    check_same_classes(all_train, val_folder)
    backbone, source = evaluated_backbone(args.pretrained, args.pretrained_format, args.arch)
    args = args.replace(arch=source['arch'])
    train_folder = labelled_split(args, all_train)
    classifier = LinearClassifier(backbone, len(train_folder.classes), frozen=args.protocol == 'linear',
                                  normalise=args.normalise_features)
    digest = classifier.backbone_digest()  # of the weights as loaded
    classifier.to(info.device)
    optimizer = build_optimizer(args, classifier)
    start_epoch, best_top1 = 0, 0.0
    path = saved_probe_path(args)
    if path:
        start_epoch, best_top1 = load_probe(args, path, classifier, optimizer, digest, train_folder)
    per_rank_batch = args.batch_size // info.world_size
    val_loader, val_sampler = make_loader(val_folder, per_rank_batch, args.workers, train=False)
    semi = {}  # what the semi-supervised table reads besides the accuracies
    if is_semi_supervised(args):
        semi = {'protocol': args.protocol, 'train_images': len(train_folder),
                'labelled_percent': 100.0 * len(train_folder) / len(all_train),
                'train_subset': subset_list_path(args)}
    if args.evaluate:
        result = validate(classifier, val_loader, list(val_sampler), info.device, {'validate': path},
                          args.report_freq)
        result = finish({**result, 'best_top1': best_top1, 'epochs': start_epoch, **semi}, None, source)
        dist.cleanup()
        return result

    # linear: DDP wraps the Linear alone: the frozen backbone has no gradients to reduce, and wrapping
    # it would broadcast its BatchNorm buffers from rank 0 before every forward pass for nothing.
    # finetune: DDP wraps the whole network, whose gradients all need reducing.
    _, trained = trained_part(classifier)
    if info.world_size > 1:
        trained = torch.nn.parallel.DistributedDataParallel(
            trained, device_ids=[info.local_rank] if info.device.type == 'cuda' else None)
    train_loader, _ = make_loader(train_folder, per_rank_batch, args.workers, train=True, seed=args.seed)
    if len(train_loader) == 0:
        raise app.UsageError(f'--batch_size={args.batch_size} exceeds the {len(train_folder)} training '
                             f'images of {train_folder.root}: no full batch to train on')
    metrics = JsonlWriter(os.path.join(args.output_dir, 'metrics.jsonl'))
    if dist.is_main():
        os.makedirs(args.output_dir, exist_ok=True)
        if args.train_percent is not None:  # written once a resumed run is known to match it
            write_subset_list(subset_list_path(args), train_folder)
        labelled = f' ({semi["labelled_percent"]:.3g} % of {len(all_train)})' if semi else ''
        print(f'{args.protocol}: {args.arch} from {args.pretrained}, {len(train_folder)} train'
              f'{labelled} / {len(val_folder)} val images of {len(train_folder.classes)} classes, '
              f'{len(train_loader)} steps/epoch of {args.batch_size} on {info.world_size} x '
              f'{info.device.type}', flush=True)
    progress = Progress(len(train_loader) * (args.epochs - start_epoch), args.report_freq, metrics)
    result = None
    for epoch in range(start_epoch, args.epochs):
        lr = set_epoch_lr(args, optimizer, epoch)
        classifier.train()  # linear: the backbone stays in eval mode
        for step, (images, targets) in epoch_batches(train_loader, args.seed, epoch, info.rank):
            images = images.to(info.device, non_blocking=True)
            targets = targets.to(info.device, non_blocking=True)
            logits = trained(classifier.features(images)) if classifier.frozen else trained(images)
            loss = F.cross_entropy(logits, targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            acc1 = (logits.detach().argmax(dim=1) == targets).float().mean() * 100
            progress.update({'epoch': epoch}, step, len(train_loader), args.batch_size,
                            loss=loss, acc1=acc1, lr=lr)
        if epoch == start_epoch and classifier.frozen:
            changed = [name for name, value in classifier.backbone_digest().items() if digest[name] != value]
            if changed:
                raise RuntimeError(f'{len(changed)} tensors of the frozen backbone changed during epoch '
                                   f'{epoch}, e.g. {", ".join(changed[:3])}; stopping')
        validated = (epoch + 1) % args.val_freq == 0 or epoch + 1 == args.epochs
        if validated:
            result = validate(classifier, val_loader, list(val_sampler), info.device,
                              {'epoch': epoch, 'validate': 'val'}, args.report_freq)
            best_top1 = max(best_top1, result['top1'])
            metrics.write({'epoch': epoch, 'phase': 'val', **result, 'best_top1': best_top1})
        if dist.is_main():
            if validated:
                print(f'epoch {epoch}: val top1 {result["top1"]:.2f} top5 {result["top5"]:.2f} '
                      f'loss {result["loss"]:.4f} (best top1 {best_top1:.2f})', flush=True)
            save(args, classifier, optimizer, epoch, best_top1, digest, train_folder)
            if validated and best_top1 == result['top1']:
                save(args, classifier, optimizer, epoch, best_top1, digest, train_folder, 'checkpoint_best.pth')
        dist.barrier()
    if result is None:  # resumed from a finished run
        result = validate(classifier, val_loader, list(val_sampler), info.device, {'validate': 'val'},
                          args.report_freq)
    name = 'result_semi.json' if semi else 'result_linear.json'
    result = finish({'top1': result['top1'], 'top5': result['top5'], 'best_top1': best_top1,
                     'epochs': args.epochs, **semi}, os.path.join(args.output_dir, name), source)
    dist.cleanup()
    return result


def main(argv):
    del argv
    run(Args.from_flags(FLAGS))


if __name__ == '__main__':
    errors.run(main, FLAGS)
