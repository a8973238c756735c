"""Stage 2: distil a small student from a frozen self-supervised teacher with bags of neighbours
(BINGO), or train MoCo v2 from scratch (`--method=moco`), or distil with the peers' objectives
(`--method=seed`, `--method=disco`; docs/peers.md).

    torchrun --nproc_per_node=8 main_distill.py --data_dir=DATA --neighbours=bags.npy \
        --teacher=moco_v2_800ep.pth.tar --teacher_arch=resnet50 --arch=resnet18 --output_dir=runs/r18

Defaults are the authors' released recipe (SPEC.md, stage 2); `--batch_size` is global.

Fast mode (the same loss; see BENCHMARKS.md): `--precision=bf16 --channels_last --fast_views
--cudnn_benchmark`, optionally `--compile`.
"""
import os

import torch
from absl import app, flags

from data.bags import BagDataset, TwoViewDataset
from data.folder import ImageFolder
from data.jpeg_bags import EncodedBagDataset, EncodedTwoViewDataset, gpu_views
from data.neighbours import load_neighbours
from data.transforms import moco_v2_augmentation
from models import ARCHS, build_student, load_teacher
from models.checkpoints import FORMATS
from models.distill import DisCo, build_training_module, student_optimizer, train_step
from utils import checkpoint, dist
from utils.logging import JsonlWriter, Progress
from utils.schedule import cosine_lr, set_lr
from utils.training import make_loader, seed_epoch

FLAGS = flags.FLAGS
flags.DEFINE_string('data_dir', None, 'ImageFolder root holding train/.')
flags.DEFINE_string('output_dir', None, 'Where checkpoints, student_backbone.pth and metrics.jsonl go.')
flags.DEFINE_enum('method', 'bingo', ['bingo', 'moco', 'seed', 'disco'],
                  'bingo: distil from --teacher with --neighbours; moco: MoCo v2 from scratch; seed, disco: '
                  'the peers SEED and DisCo distilling from --teacher (docs/peers.md).')
flags.DEFINE_enum('arch', 'resnet18', ARCHS, 'Student backbone.')
flags.DEFINE_string('neighbours', None, 'Neighbour file (N, k) .npy written by knn_extract.py (bingo).')
flags.DEFINE_string('teacher', None, 'Teacher checkpoint (bingo, seed, disco).')
flags.DEFINE_enum('teacher_arch', 'resnet50', ARCHS, 'Teacher backbone.')
flags.DEFINE_enum('teacher_format', 'auto', FORMATS, 'Teacher checkpoint layout.')
flags.DEFINE_enum('teacher_bn', None, ['train', 'eval', 'local'],
                  'train: batch statistics with shuffle BN; eval: running statistics; local: each process\'s '
                  'own batch statistics. Default: the method\'s release (bingo train, seed eval, disco local).')
flags.DEFINE_enum('bag_loss', 'released', ['released', 'paper'],
                  'released: SPEC step 5 with teacher neighbour keys and CutMix; paper: L_intra + L_inter.')
flags.DEFINE_integer('epochs', 200, 'Training epochs.')
flags.DEFINE_integer('batch_size', 256, 'Global batch size, split evenly across processes.')
flags.DEFINE_float('lr', 0.03, 'Base learning rate (cosine per epoch).')
flags.DEFINE_float('weight_decay', 1e-4, 'SGD weight decay (4e-5 for EfficientNet-B0).')
flags.DEFINE_float('momentum', 0.9, 'SGD momentum.')
flags.DEFINE_float('temperature', 0.2, 'Contrast temperature (0.12 for EfficientNet-B0); the student\'s '
                   'temperature for seed, MoCo\'s for disco.')
flags.DEFINE_integer('queue_size', 65536, 'K, the number of teacher keys in the queue.')
flags.DEFINE_list('lam', ['0.5', '0.5'], '(l_self, l_cross) weights after warm-up.')
flags.DEFINE_integer('warmup_epochs', 11,
                     'Epochs trained with lam=(1, 0) first (released: while epoch <= 10).')
flags.DEFINE_float('moco_momentum', 0.999, 'Momentum of the MoCo key encoder (--method=moco, disco).')
flags.DEFINE_float('seed_teacher_temperature', 1e-4, 'Temperature of the teacher\'s similarity '
                   'distribution (--method=seed; SEED\'s released --distill-t).')
flags.DEFINE_float('disco_weight', 32.0, 'Weight of DisCo\'s consistency term per sample and view '
                   '(--method=disco): the release sums it over each of its 8 GPUs\' 32 images, weight 1.')
flags.DEFINE_integer('student_hidden_dim', None, 'Hidden width of the student\'s MLP head, 0 = the '
                     'backbone\'s feature width. Default: the method\'s release (2048; seed 0).')
flags.DEFINE_float('crop_min_scale', 0.2, 'Smallest area share of the RandomResizedCrop of the views '
                   '(MoCo v2: 0.2; SEED\'s release with a SwAV teacher: 0.14).')
flags.DEFINE_integer('image_size', 224, 'Crop size of the augmented views.')
flags.DEFINE_integer('workers', 8, 'DataLoader workers per process.')
flags.DEFINE_enum('data_pipeline', 'cpu', ['cpu', 'gpu'],
                  'cpu: PIL decoding and augmentation in the DataLoader workers (released); gpu: the workers '
                  'only read file bytes, decoding (nvJPEG) and the views run batched on --device.')
flags.DEFINE_enum('precision', 'fp32', ['fp32', 'bf16'], 'fp32 is the released arithmetic; bf16 autocast.')
flags.DEFINE_bool('channels_last', False, 'Channels-last memory format for the networks.')
flags.DEFINE_bool('fast_views', False, 'bingo: the student\'s three views in one pass and the teacher\'s '
                  'two keys in another, BatchNorm statistics still per view (the same loss).')
flags.DEFINE_bool('compile', False, 'torch.compile the student\'s and teacher\'s forward (compiling '
                  'takes a minute or more at the start).')
flags.DEFINE_bool('cudnn_benchmark', False, 'Let cuDNN time its convolution algorithms on the first steps.')
flags.DEFINE_integer('seed', 0, 'Seed; each epoch reseeds from (seed, epoch, rank).')
flags.DEFINE_integer('save_freq', 10, 'Keep checkpoint_<epoch>.pth every this many epochs.')
flags.DEFINE_integer('report_freq', 10, 'Print and log progress every this many steps.')
flags.DEFINE_string('resume', None, "Checkpoint to continue from; 'auto' = output_dir/checkpoint.pth if present.")
flags.DEFINE_string('device', 'auto', "'auto' (CUDA when available), 'cuda' or 'cpu'.")
flags.mark_flags_as_required(['data_dir', 'output_dir'])

# Where the released recipes differ by method (SPEC.md; docs/peers.md): flags left unset take these.
METHOD_DEFAULTS = {
    'bingo': {'teacher_bn': 'train', 'student_hidden_dim': 2048},
    'moco': {'teacher_bn': 'train', 'student_hidden_dim': 2048},
    'seed': {'teacher_bn': 'eval', 'student_hidden_dim': 0},  # MoCo's --mlp: Linear(d, d)
    'disco': {'teacher_bn': 'local', 'student_hidden_dim': 2048},
}


def check_flags(world_size):
    if FLAGS.batch_size % world_size:
        raise app.UsageError(f'--batch_size={FLAGS.batch_size} is not divisible by {world_size} processes')
    if FLAGS.queue_size % FLAGS.batch_size:
        raise app.UsageError(f'--queue_size={FLAGS.queue_size} must be a multiple of the global '
                             f'--batch_size={FLAGS.batch_size}')
    if FLAGS.method == 'bingo' and not (FLAGS.teacher and FLAGS.neighbours):
        raise app.UsageError('--method=bingo needs --teacher and --neighbours')
    if FLAGS.method in ('seed', 'disco') and not FLAGS.teacher:
        raise app.UsageError(f'--method={FLAGS.method} needs --teacher')
    if FLAGS.method != 'bingo' and FLAGS.fast_views:
        raise app.UsageError(f'--fast_views applies to --method=bingo, not {FLAGS.method}')
    for name, value in METHOD_DEFAULTS[FLAGS.method].items():
        if FLAGS[name].value is None:
            setattr(FLAGS, name, value)


def build_model(folder):
    """The training module and the dataset it reads, per --method."""
    student = build_student(FLAGS.arch, FLAGS.student_hidden_dim)
    augmentation = moco_v2_augmentation(FLAGS.image_size, FLAGS.crop_min_scale)
    options = dict(queue_size=FLAGS.queue_size, temperature=FLAGS.temperature,
                   precision=FLAGS.precision, channels_last=FLAGS.channels_last,
                   fast_views=FLAGS.fast_views, compile_backend='inductor' if FLAGS.compile else None)
    if FLAGS.method == 'moco':
        model = build_training_module('moco', student, moco_momentum=FLAGS.moco_momentum, **options)
        if FLAGS.data_pipeline == 'gpu':
            return model, EncodedTwoViewDataset(folder)
        return model, TwoViewDataset(folder, augmentation)
    teacher = load_teacher(FLAGS.teacher_arch, FLAGS.teacher, FLAGS.teacher_format)
    if FLAGS.method in ('seed', 'disco'):  # views of single images, no bags (SEED takes the first)
        model = build_training_module(FLAGS.method, student, teacher, teacher_bn=FLAGS.teacher_bn,
                                      moco_momentum=FLAGS.moco_momentum, disco_weight=FLAGS.disco_weight,
                                      seed_teacher_temperature=FLAGS.seed_teacher_temperature, **options)
        if FLAGS.data_pipeline == 'gpu':
            return model, EncodedTwoViewDataset(folder)
        return model, TwoViewDataset(folder, augmentation)
    neighbours = load_neighbours(FLAGS.neighbours, len(folder), folder.fingerprint())
    model = build_training_module('bingo', student, teacher, bag_loss=FLAGS.bag_loss,
                                  teacher_bn=FLAGS.teacher_bn, **options)
    if FLAGS.data_pipeline == 'gpu':
        return model, EncodedBagDataset(folder, neighbours)
    return model, BagDataset(folder, neighbours, augmentation)


def save(model, optimizer, epoch):
    """checkpoint.pth (latest, every epoch), checkpoint_<epoch>.pth (kept) and the exported student."""
    state = {'arch': FLAGS.arch, 'method': FLAGS.method, 'epoch': epoch + 1,
             'student': model.student.state_dict(), 'queue': model.queue.state_dict(),
             'optimizer': optimizer.state_dict(), 'flags': FLAGS.flag_values_dict()}
    if FLAGS.method == 'moco':
        state['teacher'] = model.teacher.state_dict()
    if isinstance(model, DisCo):
        state['key_encoder'] = model.key_encoder.state_dict()
    checkpoint.save_atomic(state, os.path.join(FLAGS.output_dir, 'checkpoint.pth'))
    if (epoch + 1) % FLAGS.save_freq == 0 or epoch + 1 == FLAGS.epochs:
        checkpoint.save_atomic(state, os.path.join(FLAGS.output_dir, f'checkpoint_{epoch + 1:04d}.pth'))
    # Loads into torchvision.models.<arch>() (its classifier aside).
    checkpoint.save_atomic(model.student.backbone.state_dict(),
                           os.path.join(FLAGS.output_dir, 'student_backbone.pth'))


def resume(model, optimizer):
    """Start epoch of the run: 0, or where the given/latest checkpoint stopped."""
    path = FLAGS.resume
    if path == 'auto':
        path = os.path.join(FLAGS.output_dir, 'checkpoint.pth')
        if not os.path.exists(path):
            return 0
    if not path:
        return 0
    state = checkpoint.load(path)
    if state.get('arch') != FLAGS.arch or state.get('method') != FLAGS.method:
        raise app.UsageError(f'--resume={path} holds a {state.get("method")} {state.get("arch")} run, '
                             f'not --method={FLAGS.method} --arch={FLAGS.arch}')
    model.student.load_state_dict(state['student'])
    model.queue.load_state_dict(state['queue'])
    if FLAGS.method == 'moco':
        model.teacher.load_state_dict(state['teacher'])
    if isinstance(model, DisCo):
        model.key_encoder.load_state_dict(state['key_encoder'])
    optimizer.load_state_dict(state['optimizer'])
    print(f'resumed from {path} at epoch {state["epoch"]}', flush=True)
    return state['epoch']


def main(argv):
    del argv
    info = dist.init_distributed(FLAGS.device)
    check_flags(info.world_size)
    torch.manual_seed(FLAGS.seed)  # same initial student and queue on every rank
    torch.backends.cudnn.benchmark = FLAGS.cudnn_benchmark
    folder = ImageFolder(os.path.join(FLAGS.data_dir, 'train'))
    model, dataset = build_model(folder)
    model.to(info.device)
    optimizer = student_optimizer(model, FLAGS.lr, FLAGS.momentum, FLAGS.weight_decay)
    start_epoch = resume(model, optimizer)
    train_model = model
    if info.world_size > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[info.local_rank] if info.device.type == 'cuda' else None)
    per_rank_batch = FLAGS.batch_size // info.world_size
    loader, sampler = make_loader(dataset, per_rank_batch, FLAGS.workers, train=True, seed=FLAGS.seed)
    if dist.is_main():
        os.makedirs(FLAGS.output_dir, exist_ok=True)
        print(f'{FLAGS.method}: student {FLAGS.arch}, {len(dataset)} images, {len(loader)} steps/epoch '
              f'of {FLAGS.batch_size} on {info.world_size} x {info.device.type}', flush=True)
    progress = Progress(len(loader) * (FLAGS.epochs - start_epoch), FLAGS.report_freq,
                        JsonlWriter(os.path.join(FLAGS.output_dir, 'metrics.jsonl')))
    lam = tuple(float(v) for v in FLAGS.lam)
    n_views = {'bingo': 4, 'seed': 1}.get(FLAGS.method, 2)  # of (q, k, pq, pk, i, j) or (q, k, i)
    for epoch in range(start_epoch, FLAGS.epochs):
        seed_epoch(FLAGS.seed, epoch, info.rank, sampler)
        lr = cosine_lr(FLAGS.lr, epoch, FLAGS.epochs)
        set_lr(optimizer, lr)
        epoch_lam = (1.0, 0.0) if epoch < FLAGS.warmup_epochs else lam
        model.train()
        for step, batch in enumerate(loader):
            if FLAGS.data_pipeline == 'gpu':  # decode and augment the whole batch on the device
                views = gpu_views(batch, info.device, FLAGS.image_size, min_scale=FLAGS.crop_min_scale)[:n_views]
            else:
                views = [v.to(info.device, non_blocking=True) for v in batch[:n_views]]  # drop the indices
            step_options = {'lam': epoch_lam} if FLAGS.method == 'bingo' else {}
            loss, (acc1, acc5) = train_step(train_model, optimizer, views, **step_options)
            shown = progress.update({'epoch': epoch}, step, len(loader), FLAGS.batch_size,
                                    loss=loss, acc1=acc1, acc5=acc5, lr=lr)
            if shown and not torch.isfinite(torch.tensor(shown['loss'])):
                raise FloatingPointError(f'loss is {shown["loss"]} at epoch {epoch} step {step + 1}; '
                                         f'stopping, the last good checkpoint in {FLAGS.output_dir} is kept')
        if dist.is_main():
            save(model, optimizer, epoch)
        dist.barrier()
    dist.cleanup()


if __name__ == '__main__':
    app.run(main)
