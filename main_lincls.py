"""Stage 3: linear probe of a frozen backbone (SPEC stage 3), its weighted kNN accuracy, and
semi-supervised training on a labelled subset.

    torchrun --nproc_per_node=8 main_lincls.py --data_dir=DATA --arch=resnet18 \
        --pretrained=runs/r18/checkpoint.pth --output_dir=runs/r18/lincls
    torchrun --nproc_per_node=8 main_lincls.py --eval=knn ...   # no training, k=20, T=0.07
    torchrun --nproc_per_node=8 main_lincls.py --protocol=finetune --train_subset=1percent.txt ...

The backbone comes from a distillation checkpoint (student weights, head dropped), its exported
student_backbone.pth, or any teacher checkpoint of stage 1. `--protocol=linear` trains a Linear
classifier on the frozen backbone; `--protocol=finetune` trains the whole network. Either trains
on every training image, on those a `--train_subset` list names, or on a class-balanced
`--train_percent` draw. Defaults are SPEC's probe recipe for ResNets (fine-tuning: see
FINETUNE_DEFAULTS); `--batch_size` is global. The run ends with one JSON line, also written to
<output_dir>/result_linear.json (result_knn.json for --eval=knn; result_semi.json when fine-tuning
or training on a subset), for tools/collect_results.py.
"""
import json
import os

import torch
import torch.nn.functional as F
from absl import app, flags

from data.folder import ImageFolder, check_same_classes
from data.subsets import LabelledSubset, balanced_subset, load_subset, write_subset_list
from data.transforms import eval_transform, linear_train_transform
from models import ARCHS, build_backbone, read_pretrained
from models.pretrained import FORMATS
from models.linear import FineTuned, LinearProbe
from utils import atomic, checkpoint, dist, errors, knn
from utils.features import embed, gather_by_index
from utils.knn_classifier import knn_classify
from utils.logging import JsonlWriter, Progress
from utils.schedule import cosine_lr
from utils.training import epoch_batches, make_loader

FLAGS = flags.FlagValues()  # this script's own flags (utils/args.py)
flags.DEFINE_string('data_dir', None, 'ImageFolder root holding train/ and val/ with the same classes.',
                    flag_values=FLAGS)
flags.DEFINE_string('output_dir', None, 'Where checkpoints, metrics.jsonl and the result JSON go.', flag_values=FLAGS)
flags.DEFINE_enum('arch', 'resnet18', ARCHS, 'Backbone of --pretrained.', flag_values=FLAGS)
flags.DEFINE_string('pretrained', None, 'Checkpoint holding the backbone (distillation run, exported '
                    "student_backbone.pth, or a teacher), or 'random': the untrained --arch, a baseline.",
                    flag_values=FLAGS)
flags.DEFINE_enum('pretrained_format', 'auto', FORMATS,
                  "Layout of --pretrained: 'bingo' a distillation checkpoint, 'torchvision' the exported "
                  'backbone, moco/swav a teacher.', flag_values=FLAGS)
flags.DEFINE_enum('eval', 'linear', ['linear', 'knn'],
                  'linear: train the probe; knn: weighted kNN vote, no training.', flag_values=FLAGS)
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
flags.DEFINE_integer('batch_size', 256, 'Global batch size, split evenly across processes.', flag_values=FLAGS)
flags.DEFINE_float('lr', None, 'Learning rate of the classifier; default 30 (linear; 3.0 for '
                   'EfficientNet-B0) or 0.2 (finetune).', flag_values=FLAGS)
flags.DEFINE_float('backbone_lr', None, 'Learning rate of the backbone (--protocol=finetune); default 0.01.',
                   flag_values=FLAGS)
flags.DEFINE_float('min_lr', None, 'Classifier learning rate the cosine ends at; default 0.01 (linear; '
                   '0.001 for EfficientNet-B0) or 0 (finetune). The backbone\'s ends at the same fraction '
                   'of --backbone_lr.', flag_values=FLAGS)
flags.DEFINE_float('weight_decay', 0.0, 'SGD weight decay.', flag_values=FLAGS)
flags.DEFINE_float('momentum', 0.9, 'SGD momentum.', flag_values=FLAGS)
flags.DEFINE_list('knn_k', ['20'], 'Neighbours voting (--eval=knn); the first is the headline result.',
                  flag_values=FLAGS)
flags.DEFINE_float('knn_temperature', 0.07, 'T of the vote weight exp(similarity / T).', flag_values=FLAGS)
flags.DEFINE_enum('knn_backend', 'auto', knn.BACKENDS, 'Exact search engine (--eval=knn).', flag_values=FLAGS)
flags.DEFINE_integer('image_size', 224, 'Crop size; validation resizes to size*256/224 first.', flag_values=FLAGS)
flags.DEFINE_integer('workers', 8, 'DataLoader workers per process.', flag_values=FLAGS)
flags.DEFINE_integer('seed', 0, 'Seed; each epoch reseeds from (seed, epoch, rank).', flag_values=FLAGS)
flags.DEFINE_integer('report_freq', 10, 'Print and log progress every this many steps.', flag_values=FLAGS)
flags.DEFINE_string('resume', None,
                    "Probe checkpoint to continue from; 'auto' = output_dir/checkpoint.pth if present.",
                    flag_values=FLAGS)
flags.DEFINE_bool('evaluate', False,
                  'Only validate the saved probe of --resume (default output_dir/checkpoint.pth).', flag_values=FLAGS)
flags.DEFINE_string('device', 'auto', "'auto' (CUDA when available), 'cuda' or 'cpu'.", flag_values=FLAGS)
flags.mark_flags_as_required(['data_dir', 'pretrained', 'output_dir'], flag_values=FLAGS)

LINEAR_DEFAULTS = {'epochs': 120, 'lr': 30.0, 'min_lr': 0.01}  # SPEC stage 3
# Not from the BINGO release (SPEC gives no fine-tuning recipe): SwAV's semi-supervised
# fine-tuning of a self-supervised ResNet at batch 256 (20 epochs, SGD 0.9, no weight decay,
# backbone lr 0.01 and classifier lr 0.2 on 10 % of the labels; 0.02 and 5.0 on 1 %, which
# scripts/semi passes), with a cosine schedule to 0 in place of SwAV's two steps.
FINETUNE_DEFAULTS = {'epochs': 20, 'lr': 0.2, 'backbone_lr': 0.01, 'min_lr': 0.0}


def check_flags(world_size):
    if FLAGS.batch_size % world_size:
        raise app.UsageError(f'--batch_size={FLAGS.batch_size} is not divisible by {world_size} processes')
    if FLAGS.train_subset and FLAGS.train_percent is not None:
        raise app.UsageError('--train_subset and --train_percent both choose the labelled images: pass one')
    if FLAGS.protocol == 'linear' and FLAGS.backbone_lr is not None:
        raise app.UsageError('--backbone_lr applies to --protocol=finetune; the linear probe\'s backbone '
                             'is frozen')
    if FLAGS.eval == 'knn':
        if not FLAGS.knn_k or not all(k.isdigit() and int(k) > 0 for k in FLAGS.knn_k):
            raise app.UsageError(f'--knn_k={",".join(FLAGS.knn_k)} must list positive integers')
        if FLAGS.evaluate or FLAGS.resume:
            raise app.UsageError('--eval=knn trains nothing: --evaluate and --resume do not apply')
        if FLAGS.protocol != 'linear' or FLAGS.train_subset or FLAGS.train_percent is not None:
            raise app.UsageError('--eval=knn votes with every training image and trains nothing: '
                                 '--protocol, --train_subset and --train_percent do not apply')
    for name, value in (FINETUNE_DEFAULTS if FLAGS.protocol == 'finetune' else LINEAR_DEFAULTS).items():
        if FLAGS[name].value is None:
            setattr(FLAGS, name, value)
    for name in ('lr', 'backbone_lr') if FLAGS.protocol == 'finetune' else ('lr',):
        if FLAGS[name].value <= 0:
            raise app.UsageError(f'--{name}={FLAGS[name].value} must be positive')


def is_semi_supervised():
    """Runs that belong in the semi-supervised table (result_semi.json), not the probe's."""
    return FLAGS.protocol == 'finetune' or bool(FLAGS.train_subset) or FLAGS.train_percent is not None


def labelled_split(folder):
    """The training images the classifier learns from: all of `folder`, those --train_subset
    lists, or a --train_percent draw (the same on every rank: it depends on --seed alone)."""
    if FLAGS.train_subset:
        return load_subset(folder, FLAGS.train_subset)
    if FLAGS.train_percent is None:
        return folder
    return LabelledSubset(folder, balanced_subset(folder, FLAGS.train_percent, FLAGS.seed))


def subset_list_path():
    """The list naming the labelled images: --train_subset, the one written for --train_percent, or None."""
    if FLAGS.train_subset:
        return os.path.abspath(FLAGS.train_subset)
    if FLAGS.train_percent is not None:
        return os.path.abspath(os.path.join(FLAGS.output_dir, 'train_subset.txt'))
    return None


def semi_record(train_folder, all_images):
    """What the semi-supervised table reads from the result file besides the accuracies."""
    return {'protocol': FLAGS.protocol, 'train_images': len(train_folder),
            'labelled_percent': 100.0 * len(train_folder) / all_images, 'train_subset': subset_list_path()}


def build_optimizer(probe):
    """SGD over what the protocol trains. Each group's lr is its `lr_scale` times the classifier's,
    so one cosine (`set_epoch_lr`) schedules both."""
    groups = [{'params': list(probe.linear.parameters()), 'lr_scale': 1.0}]
    if FLAGS.protocol == 'finetune':
        groups.insert(0, {'params': list(probe.backbone.parameters()),
                          'lr_scale': FLAGS.backbone_lr / FLAGS.lr})
    return torch.optim.SGD(groups, FLAGS.lr, momentum=FLAGS.momentum, weight_decay=FLAGS.weight_decay)


def set_epoch_lr(optimizer, epoch):
    """Cosine per epoch: the classifier's lr from --lr to --min_lr, the backbone's in proportion."""
    lr = cosine_lr(FLAGS.lr, epoch, FLAGS.epochs, FLAGS.min_lr)
    for group in optimizer.param_groups:
        group['lr'] = lr * group['lr_scale']
    return lr


def pretrained_source(weights):
    """Where the backbone comes from, for the result file: the distillation run's own record
    (method, teacher, epochs) when --pretrained is a main_distill.py checkpoint."""
    if weights is None:
        return {'arch': FLAGS.arch, 'pretrained': 'random', 'method': 'random init'}
    return {'arch': FLAGS.arch, 'pretrained': os.path.abspath(FLAGS.pretrained), **weights.origin}


def finish(result, name, source):
    """Print the result as one JSON line and write it to output_dir/<name> (rank 0)."""
    if dist.is_main():
        if name:
            atomic.write_json_atomic({**result, **source}, os.path.join(FLAGS.output_dir, name))
        print(json.dumps(result), flush=True)


@torch.no_grad()
def correct_per_image(ranked, targets):
    """(B, 2) float: 1 where the target is the top class / among the top 5."""
    hits = ranked[:, :5] == targets[:, None]
    return torch.stack([hits[:, 0], hits.any(dim=1)], dim=1).float()


def accuracies(per_image, indices, size):
    """top-1 and top-5 (%) over the whole dataset: counts summed over ranks, padding dropped."""
    counts = gather_by_index(per_image, indices, size).sum(dim=0)
    return {'top1': 100.0 * float(counts[0]) / size, 'top5': 100.0 * float(counts[1]) / size}


@torch.no_grad()
def validate(probe, loader, indices, device, header):
    probe.eval()
    progress = Progress(len(loader), FLAGS.report_freq)
    per_image, losses = [], []
    for step, (images, targets) in enumerate(loader):
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        logits = probe(images)
        per_image.append(correct_per_image(logits.argsort(dim=1, descending=True, stable=True), targets))
        losses.append(F.cross_entropy(logits, targets, reduction='none'))
        progress.update(header, step, len(loader), images.shape[0] * dist.get_world_size())
    result = accuracies(torch.cat(per_image), indices, len(loader.dataset))
    result['loss'] = float(gather_by_index(torch.cat(losses), indices, len(loader.dataset)).mean())
    return result


def knn_evaluation(backbone, train_folder, val_folder, device):
    """Weighted kNN top-1/top-5 of the val split against the whole train split."""
    ks = [int(k) for k in FLAGS.knn_k]
    if max(ks) > len(train_folder):
        raise app.UsageError(f'--knn_k={max(ks)} exceeds the {len(train_folder)} images of '
                             f'{train_folder.root}')
    backbone.to(device).eval()
    per_rank_batch = FLAGS.batch_size // dist.get_world_size()
    train_loader, train_sampler = make_loader(train_folder, per_rank_batch, FLAGS.workers, train=False)
    val_loader, val_sampler = make_loader(val_folder, per_rank_batch, FLAGS.workers, train=False)
    train_features, _ = embed(backbone, train_loader, device, {'embed': 'train'}, FLAGS.report_freq)
    database = gather_by_index(train_features, list(train_sampler), len(train_folder))  # (N, d)
    queries, targets = embed(backbone, val_loader, device, {'embed': 'val'}, FLAGS.report_freq)  # this rank's shard
    ranked = knn_classify(database, torch.as_tensor(train_folder.targets, device=device), queries, ks,
                          len(train_folder.classes), FLAGS.knn_temperature, FLAGS.knn_backend)
    by_k = {k: accuracies(correct_per_image(ranked[k], targets), list(val_sampler), len(val_folder))
            for k in ks}
    return {**by_k[ks[0]], 'k': ks[0], 'temperature': FLAGS.knn_temperature,
            'by_k': {str(k): value for k, value in by_k.items()}}


def trained_weights_key():
    """Where a checkpoint keeps what was trained: the Linear alone (linear) or the whole network."""
    return 'linear' if FLAGS.protocol == 'linear' else 'model'


def trained_module(probe):
    return probe.linear if FLAGS.protocol == 'linear' else probe


def save(probe, optimizer, epoch, best_top1, digest, train_folder, name='checkpoint.pth'):
    """What was trained (the backbone it started from is --pretrained's, identified by its digest)."""
    state = {'arch': FLAGS.arch, 'protocol': FLAGS.protocol, 'epoch': epoch + 1,
             trained_weights_key(): trained_module(probe).state_dict(),
             'optimizer': optimizer.state_dict(), 'best_top1': best_top1, 'classes': train_folder.classes,
             'train_fingerprint': train_folder.fingerprint(),
             'pretrained': os.path.abspath(FLAGS.pretrained), 'backbone_digest': digest,
             'flags': FLAGS.flag_values_dict()}
    atomic.save_atomic(state, os.path.join(FLAGS.output_dir, name))


def saved_probe_path():
    """The probe to continue from or to evaluate, or None to start afresh."""
    path = FLAGS.resume
    if path == 'auto' or (FLAGS.evaluate and not path):
        path = os.path.join(FLAGS.output_dir, 'checkpoint.pth')
        if not os.path.exists(path) and not FLAGS.evaluate:
            return None
    if path and not os.path.exists(path):
        if FLAGS.evaluate:
            raise app.UsageError(f'--evaluate needs a saved probe, and {path} does not exist: train one '
                                 'first, or point --resume at a probe checkpoint')
        raise app.UsageError(f'--resume={path} does not exist')
    return path


def load_probe(path, probe, optimizer, digest, train_folder):
    """Restore a saved probe after checking it was trained from this backbone, with this protocol,
    on these classes (and, when training goes on, on these training images)."""
    state = checkpoint.load(path)
    key, classes = trained_weights_key(), train_folder.classes
    if not isinstance(state, dict) or not ({'linear', 'model'} & set(state)):
        raise app.UsageError(f'{path} is not a probe checkpoint of main_lincls.py '
                             '(no "linear" or "model" key)')
    if key not in state:
        raise app.UsageError(f'{path} was trained with --protocol={state.get("protocol", "linear")}, '
                             f'not --protocol={FLAGS.protocol}')
    if state.get('arch') != FLAGS.arch or state.get('classes') != classes:
        raise app.UsageError(f'probe checkpoint {path} is a probe of a {state.get("arch")} over '
                             f'{len(state.get("classes") or [])} classes, not --arch={FLAGS.arch} over '
                             f'the {len(classes)} classes of {FLAGS.data_dir}')
    changed = [name for name, value in digest.items() if state['backbone_digest'].get(name) != value]
    if changed:
        raise app.UsageError(f'--pretrained={FLAGS.pretrained} is not the backbone the probe {path} was '
                             f'trained on ({state["pretrained"]}): {len(changed)} tensors differ, '
                             f'e.g. {", ".join(changed[:3])}')
    fingerprint = train_folder.fingerprint()
    if not FLAGS.evaluate and state.get('train_fingerprint', fingerprint) != fingerprint:
        raise app.UsageError(f'{path} was trained on other training images than the {len(train_folder)} of '
                             f'{train_folder.root} chosen now (--train_subset / --train_percent / --seed)')
    trained_module(probe).load_state_dict(state[key])
    optimizer.load_state_dict(state['optimizer'])
    print(f'loaded probe {path} (epoch {state["epoch"]})', flush=True)
    return state['epoch'], state['best_top1']


def main(argv):
    del argv
    info = dist.init_distributed(FLAGS.device)
    check_flags(info.world_size)
    torch.manual_seed(FLAGS.seed)  # the same initial classifier on every rank
    # kNN compares centre crops of both splits; training uses random crops.
    train_transform = (eval_transform if FLAGS.eval == 'knn' else linear_train_transform)(FLAGS.image_size)
    all_train = ImageFolder(os.path.join(FLAGS.data_dir, 'train'), train_transform)
    val_folder = ImageFolder(os.path.join(FLAGS.data_dir, 'val'), eval_transform(FLAGS.image_size))
    check_same_classes(all_train, val_folder)
    if FLAGS.pretrained == 'random':
        weights, backbone = None, build_backbone(FLAGS.arch)  # initialised from --seed, like the classifier
    else:
        weights = read_pretrained(FLAGS.pretrained, FLAGS.pretrained_format)
        backbone = weights.build(FLAGS.arch)
    source = pretrained_source(weights)
    if FLAGS.eval == 'knn':
        finish(knn_evaluation(backbone, all_train, val_folder, info.device), 'result_knn.json', source)
        dist.cleanup()
        return

    train_folder = labelled_split(all_train)
    probe = (FineTuned if FLAGS.protocol == 'finetune' else LinearProbe)(backbone, len(train_folder.classes))
    digest = probe.backbone_digest()  # of the weights as loaded
    probe.to(info.device)
    optimizer = build_optimizer(probe)
    start_epoch, best_top1 = 0, 0.0
    path = saved_probe_path()
    if path:
        start_epoch, best_top1 = load_probe(path, probe, optimizer, digest, train_folder)
    per_rank_batch = FLAGS.batch_size // info.world_size
    val_loader, val_sampler = make_loader(val_folder, per_rank_batch, FLAGS.workers, train=False)
    semi = semi_record(train_folder, len(all_train)) if is_semi_supervised() else {}
    if FLAGS.evaluate:
        result = validate(probe, val_loader, list(val_sampler), info.device, {'validate': path})
        finish({**result, 'best_top1': best_top1, 'epochs': start_epoch, **semi}, None, source)
        dist.cleanup()
        return

    # linear: DDP wraps the Linear alone: the frozen backbone has no gradients to reduce, and wrapping
    # it would broadcast its BatchNorm buffers from rank 0 before every forward pass for nothing.
    # finetune: DDP wraps the whole network, whose gradients all need reducing.
    trained = trained_module(probe)
    if info.world_size > 1:
        trained = torch.nn.parallel.DistributedDataParallel(
            trained, device_ids=[info.local_rank] if info.device.type == 'cuda' else None)
    train_loader, _ = make_loader(train_folder, per_rank_batch, FLAGS.workers, train=True, seed=FLAGS.seed)
    if len(train_loader) == 0:
        raise app.UsageError(f'--batch_size={FLAGS.batch_size} exceeds the {len(train_folder)} training '
                             f'images of {train_folder.root}: no full batch to train on')
    metrics = JsonlWriter(os.path.join(FLAGS.output_dir, 'metrics.jsonl'))
    if dist.is_main():
        os.makedirs(FLAGS.output_dir, exist_ok=True)
        if FLAGS.train_percent is not None:  # written once a resumed run is known to match it
            write_subset_list(subset_list_path(), train_folder)
        labelled = f' ({semi["labelled_percent"]:.3g} % of {len(all_train)})' if semi else ''
        print(f'{FLAGS.protocol}: {FLAGS.arch} from {FLAGS.pretrained}, {len(train_folder)} train'
              f'{labelled} / {len(val_folder)} val images of {len(train_folder.classes)} classes, '
              f'{len(train_loader)} steps/epoch of {FLAGS.batch_size} on {info.world_size} x '
              f'{info.device.type}', flush=True)
    progress = Progress(len(train_loader) * (FLAGS.epochs - start_epoch), FLAGS.report_freq, metrics)
    result = None
    for epoch in range(start_epoch, FLAGS.epochs):
        lr = set_epoch_lr(optimizer, epoch)
        probe.train()  # linear: the backbone stays in eval mode
        for step, (images, targets) in epoch_batches(train_loader, FLAGS.seed, epoch, info.rank):
            images = images.to(info.device, non_blocking=True)
            targets = targets.to(info.device, non_blocking=True)
            logits = trained(images) if FLAGS.protocol == 'finetune' else trained(probe.features(images))
            loss = F.cross_entropy(logits, targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            acc1 = (logits.detach().argmax(dim=1) == targets).float().mean() * 100
            progress.update({'epoch': epoch}, step, len(train_loader), FLAGS.batch_size,
                            loss=loss, acc1=acc1, lr=lr)
        if epoch == start_epoch and FLAGS.protocol == 'linear':
            changed = [name for name, value in probe.backbone_digest().items() if digest[name] != value]
            if changed:
                raise RuntimeError(f'{len(changed)} tensors of the frozen backbone changed during epoch '
                                   f'{epoch}, e.g. {", ".join(changed[:3])}; stopping')
        result = validate(probe, val_loader, list(val_sampler), info.device,
                          {'epoch': epoch, 'validate': 'val'})
        best_top1 = max(best_top1, result['top1'])
        metrics.write({'epoch': epoch, 'phase': 'val', **result, 'best_top1': best_top1})
        if dist.is_main():
            print(f'epoch {epoch}: val top1 {result["top1"]:.2f} top5 {result["top5"]:.2f} '
                  f'loss {result["loss"]:.4f} (best top1 {best_top1:.2f})', flush=True)
            save(probe, optimizer, epoch, best_top1, digest, train_folder)
            if best_top1 == result['top1']:
                save(probe, optimizer, epoch, best_top1, digest, train_folder, 'checkpoint_best.pth')
        dist.barrier()
    if result is None:  # resumed from a finished run
        result = validate(probe, val_loader, list(val_sampler), info.device, {'validate': 'val'})
    finish({'top1': result['top1'], 'top5': result['top5'], 'best_top1': best_top1, 'epochs': FLAGS.epochs,
            **semi}, 'result_semi.json' if semi else 'result_linear.json', source)
    dist.cleanup()


if __name__ == '__main__':
    errors.run(main, FLAGS)
