"""Stage 3: linear probe of a frozen backbone (SPEC stage 3), or its weighted kNN accuracy.

    torchrun --nproc_per_node=8 main_lincls.py --data_dir=DATA --arch=resnet18 \
        --pretrained=runs/r18/checkpoint.pth --output_dir=runs/r18/lincls
    torchrun --nproc_per_node=8 main_lincls.py --eval=knn ...   # no training, k=20, T=0.07

The backbone comes from a distillation checkpoint (student weights, head dropped), its exported
student_backbone.pth, or any teacher checkpoint of stage 1. Defaults are SPEC's recipe for
ResNets; `--batch_size` is global. The run ends with one JSON line, also written to
<output_dir>/result_linear.json (result_knn.json for --eval=knn), for tools/collect_results.py.
"""
import json
import os
import pickle

import torch
import torch.nn.functional as F
from absl import app, flags

from data.folder import ImageFolder, check_same_classes
from data.transforms import eval_transform, linear_train_transform
from models import ARCHS, build_backbone, load_backbone
from models.checkpoints import FORMATS
from models.linear import LinearProbe
from utils import checkpoint, dist, knn
from utils.features import embed, gather_by_index
from utils.knn_classifier import knn_classify
from utils.logging import JsonlWriter, Progress
from utils.schedule import cosine_lr, set_lr
from utils.training import make_loader, seed_epoch

FLAGS = flags.FLAGS
flags.DEFINE_string('data_dir', None, 'ImageFolder root holding train/ and val/ with the same classes.')
flags.DEFINE_string('output_dir', None, 'Where checkpoints, metrics.jsonl and the result JSON go.')
flags.DEFINE_enum('arch', 'resnet18', ARCHS, 'Backbone of --pretrained.')
flags.DEFINE_string('pretrained', None, 'Checkpoint holding the backbone (distillation run, exported '
                    "student_backbone.pth, or a teacher), or 'random': the untrained --arch, a baseline.")
flags.DEFINE_enum('pretrained_format', 'auto', FORMATS,
                  "Layout of --pretrained: 'bingo' a distillation checkpoint, 'torchvision' the exported "
                  'backbone, moco/swav a teacher.')
flags.DEFINE_enum('eval', 'linear', ['linear', 'knn'],
                  'linear: train the probe; knn: weighted kNN vote, no training.')
flags.DEFINE_integer('epochs', 120, 'Training epochs of the probe.')
flags.DEFINE_integer('batch_size', 256, 'Global batch size, split evenly across processes.')
flags.DEFINE_float('lr', 30.0, 'Base learning rate (3.0 for EfficientNet-B0).')
flags.DEFINE_float('min_lr', 0.01, 'Learning rate the cosine ends at (0.001 for EfficientNet-B0).')
flags.DEFINE_float('weight_decay', 0.0, 'SGD weight decay.')
flags.DEFINE_float('momentum', 0.9, 'SGD momentum.')
flags.DEFINE_list('knn_k', ['20'], 'Neighbours voting (--eval=knn); the first is the headline result.')
flags.DEFINE_float('knn_temperature', 0.07, 'T of the vote weight exp(similarity / T).')
flags.DEFINE_enum('knn_backend', 'auto', knn.BACKENDS, 'Exact search engine (--eval=knn).')
flags.DEFINE_integer('image_size', 224, 'Crop size; validation resizes to size*256/224 first.')
flags.DEFINE_integer('workers', 8, 'DataLoader workers per process.')
flags.DEFINE_integer('seed', 0, 'Seed; each epoch reseeds from (seed, epoch, rank).')
flags.DEFINE_integer('report_freq', 10, 'Print and log progress every this many steps.')
flags.DEFINE_string('resume', None,
                    "Probe checkpoint to continue from; 'auto' = output_dir/checkpoint.pth if present.")
flags.DEFINE_bool('evaluate', False,
                  'Only validate the saved probe of --resume (default output_dir/checkpoint.pth).')
flags.DEFINE_string('device', 'auto', "'auto' (CUDA when available), 'cuda' or 'cpu'.")
flags.mark_flags_as_required(['data_dir', 'pretrained', 'output_dir'])


def check_flags(world_size):
    if FLAGS.batch_size % world_size:
        raise app.UsageError(f'--batch_size={FLAGS.batch_size} is not divisible by {world_size} processes')
    if FLAGS.eval == 'knn':
        if not FLAGS.knn_k or not all(k.isdigit() and int(k) > 0 for k in FLAGS.knn_k):
            raise app.UsageError(f'--knn_k={",".join(FLAGS.knn_k)} must list positive integers')
        if FLAGS.evaluate or FLAGS.resume:
            raise app.UsageError('--eval=knn trains nothing: --evaluate and --resume do not apply')


def pretrained_source():
    """Where the backbone comes from, for the result file: the distillation run's own record
    (method, teacher, epochs) when --pretrained is a main_distill.py checkpoint."""
    if FLAGS.pretrained == 'random':
        return {'arch': FLAGS.arch, 'pretrained': 'random', 'method': 'random init'}
    source = {'arch': FLAGS.arch, 'pretrained': os.path.abspath(FLAGS.pretrained)}
    try:
        state = torch.load(FLAGS.pretrained, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError:  # not one of this project's checkpoints
        return source
    if not (isinstance(state, dict) and isinstance(state.get('flags'), dict) and 'method' in state):
        return source
    run = state['flags']
    teacher = run.get('teacher') if state['method'] == 'bingo' else None
    return {**source, 'method': state['method'], 'distill_epochs': state.get('epoch'),
            'teacher': os.path.basename(teacher) if teacher else None,
            'teacher_arch': run.get('teacher_arch') if teacher else None}


def finish(result, name):
    """Print the result as one JSON line and write it to output_dir/<name> (rank 0)."""
    if dist.is_main():
        if name:
            checkpoint.write_json_atomic({**result, **pretrained_source()}, os.path.join(FLAGS.output_dir, name))
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


def save(probe, optimizer, epoch, best_top1, digest, classes, name='checkpoint.pth'):
    """The probe alone (the backbone is --pretrained's, identified by its digest)."""
    state = {'arch': FLAGS.arch, 'epoch': epoch + 1, 'linear': probe.linear.state_dict(),
             'optimizer': optimizer.state_dict(), 'best_top1': best_top1, 'classes': classes,
             'pretrained': os.path.abspath(FLAGS.pretrained), 'backbone_digest': digest,
             'flags': FLAGS.flag_values_dict()}
    checkpoint.save_atomic(state, os.path.join(FLAGS.output_dir, name))


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


def load_probe(path, probe, optimizer, digest, classes):
    """Restore a saved probe after checking it was trained on this backbone and these classes."""
    state = checkpoint.load(path)
    if not isinstance(state, dict) or 'linear' not in state:
        raise app.UsageError(f'{path} is not a probe checkpoint of main_lincls.py (no "linear" key)')
    if state.get('arch') != FLAGS.arch or state.get('classes') != classes:
        raise app.UsageError(f'probe checkpoint {path} is a probe of a {state.get("arch")} over '
                             f'{len(state.get("classes") or [])} classes, not --arch={FLAGS.arch} over '
                             f'the {len(classes)} classes of {FLAGS.data_dir}')
    changed = [name for name, value in digest.items() if state['backbone_digest'].get(name) != value]
    if changed:
        raise app.UsageError(f'--pretrained={FLAGS.pretrained} is not the backbone the probe {path} was '
                             f'trained on ({state["pretrained"]}): {len(changed)} tensors differ, '
                             f'e.g. {", ".join(changed[:3])}')
    probe.linear.load_state_dict(state['linear'])
    optimizer.load_state_dict(state['optimizer'])
    print(f'loaded probe {path} (epoch {state["epoch"]})', flush=True)
    return state['epoch'], state['best_top1']


def main(argv):
    del argv
    info = dist.init_distributed(FLAGS.device)
    check_flags(info.world_size)
    torch.manual_seed(FLAGS.seed)  # the same initial probe on every rank
    # kNN compares centre crops of both splits; the probe trains on random crops.
    train_transform = (eval_transform if FLAGS.eval == 'knn' else linear_train_transform)(FLAGS.image_size)
    train_folder = ImageFolder(os.path.join(FLAGS.data_dir, 'train'), train_transform)
    val_folder = ImageFolder(os.path.join(FLAGS.data_dir, 'val'), eval_transform(FLAGS.image_size))
    check_same_classes(train_folder, val_folder)
    if FLAGS.pretrained == 'random':
        backbone = build_backbone(FLAGS.arch)  # initialised from --seed, like the probe
    else:
        backbone = load_backbone(FLAGS.arch, FLAGS.pretrained, FLAGS.pretrained_format)
    if FLAGS.eval == 'knn':
        finish(knn_evaluation(backbone, train_folder, val_folder, info.device), 'result_knn.json')
        dist.cleanup()
        return

    probe = LinearProbe(backbone, len(train_folder.classes))
    digest = probe.backbone_digest()  # of the weights as loaded
    probe.to(info.device)
    optimizer = torch.optim.SGD(probe.linear.parameters(), FLAGS.lr, momentum=FLAGS.momentum,
                                weight_decay=FLAGS.weight_decay)
    start_epoch, best_top1 = 0, 0.0
    path = saved_probe_path()
    if path:
        start_epoch, best_top1 = load_probe(path, probe, optimizer, digest, train_folder.classes)
    per_rank_batch = FLAGS.batch_size // info.world_size
    val_loader, val_sampler = make_loader(val_folder, per_rank_batch, FLAGS.workers, train=False)
    if FLAGS.evaluate:
        result = validate(probe, val_loader, list(val_sampler), info.device, {'validate': path})
        finish({**result, 'best_top1': best_top1, 'epochs': start_epoch}, None)
        dist.cleanup()
        return

    # DDP wraps the Linear alone: the frozen backbone has no gradients to reduce, and wrapping it
    # would broadcast its BatchNorm buffers from rank 0 before every forward pass for nothing.
    train_linear = probe.linear
    if info.world_size > 1:
        train_linear = torch.nn.parallel.DistributedDataParallel(
            probe.linear, device_ids=[info.local_rank] if info.device.type == 'cuda' else None)
    train_loader, train_sampler = make_loader(train_folder, per_rank_batch, FLAGS.workers, train=True,
                                              seed=FLAGS.seed)
    if len(train_loader) == 0:
        raise app.UsageError(f'--batch_size={FLAGS.batch_size} exceeds the {len(train_folder)} training '
                             f'images of {train_folder.root}: no full batch to train on')
    metrics = JsonlWriter(os.path.join(FLAGS.output_dir, 'metrics.jsonl'))
    if dist.is_main():
        os.makedirs(FLAGS.output_dir, exist_ok=True)
        print(f'linear probe: {FLAGS.arch} from {FLAGS.pretrained}, {len(train_folder)} train / '
              f'{len(val_folder)} val images of {len(train_folder.classes)} classes, {len(train_loader)} '
              f'steps/epoch of {FLAGS.batch_size} on {info.world_size} x {info.device.type}', flush=True)
    progress = Progress(len(train_loader) * (FLAGS.epochs - start_epoch), FLAGS.report_freq, metrics)
    result = None
    for epoch in range(start_epoch, FLAGS.epochs):
        seed_epoch(FLAGS.seed, epoch, info.rank, train_sampler)
        lr = cosine_lr(FLAGS.lr, epoch, FLAGS.epochs, FLAGS.min_lr)
        set_lr(optimizer, lr)
        probe.train()  # the backbone stays in eval mode
        for step, (images, targets) in enumerate(train_loader):
            images = images.to(info.device, non_blocking=True)
            targets = targets.to(info.device, non_blocking=True)
            logits = train_linear(probe.features(images))
            loss = F.cross_entropy(logits, targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            acc1 = (logits.detach().argmax(dim=1) == targets).float().mean() * 100
            progress.update({'epoch': epoch}, step, len(train_loader), FLAGS.batch_size,
                            loss=loss, acc1=acc1, lr=lr)
        if epoch == start_epoch:
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
            save(probe, optimizer, epoch, best_top1, digest, train_folder.classes)
            if best_top1 == result['top1']:
                save(probe, optimizer, epoch, best_top1, digest, train_folder.classes, 'checkpoint_best.pth')
        dist.barrier()
    if result is None:  # resumed from a finished run
        result = validate(probe, val_loader, list(val_sampler), info.device, {'validate': 'val'})
    finish({'top1': result['top1'], 'top5': result['top5'], 'best_top1': best_top1, 'epochs': FLAGS.epochs},
           'result_linear.json')
    dist.cleanup()


if __name__ == '__main__':
    app.run(main)
