"""Stage 2: distil a small student from a frozen self-supervised teacher with bags of neighbours
(BINGO), or train MoCo v2 from scratch (`--method=moco`), or distil with the peers' objectives
(`--method=seed`, `--method=disco`; docs/peers.md).

    torchrun --nproc_per_node=8 main_distill.py --data_dir=DATA --neighbours=bags.npy \
        --teacher=moco_v2_800ep.pth.tar --teacher_arch=resnet50 --arch=resnet18 --output_dir=runs/r18

Defaults are the authors' released recipe (SPEC.md, stage 2); `--batch_size` is global.

Fast mode: `--fast` (on CUDA: bf16, channels-last, one pass for the views, cuDNN autotuning and the
whole step replayed as a CUDA graph); what each part costs in fidelity is in README.md and
BENCHMARKS.md.
"""
import os

import torch
from absl import app, flags

from data.bags import BagDataset, TwoViewDataset
from data.folder import ImageFolder
from data.jpeg_bags import EncodedBagDataset, EncodedTwoViewDataset, views_on_device
from data.neighbours import FORMATS as NEIGHBOUR_FORMATS, load_neighbours
from data.transforms import moco_v2_augmentation
from models import ARCHS, build_student, load_pretrained
from models.pretrained import FORMATS
from models.distill import build_training_module, student_optimizer
from models.fast import TrainStep
from utils import checkpoint, dist, errors, preemption, rundir
from utils.logging import JsonlWriter, Progress
from utils.schedule import cosine_lr, set_lr
from utils.training import epoch_batches, make_loader, rng_state, step_seed

FLAGS = flags.FLAGS
flags.DEFINE_string('data_dir', None, 'ImageFolder root holding train/.')
flags.DEFINE_string('output_dir', None, 'Where checkpoints, student_backbone.pth and metrics.jsonl go.')
flags.DEFINE_enum('method', 'bingo', ['bingo', 'moco', 'seed', 'disco'],
                  'bingo: distil from --teacher with --neighbours; moco: MoCo v2 from scratch; seed, disco: '
                  'the peers SEED and DisCo distilling from --teacher (docs/peers.md).')
flags.DEFINE_enum('arch', 'resnet18', ARCHS, 'Student backbone.')
flags.DEFINE_string('neighbours', None, 'Neighbour file (N, k) .npy written by knn_extract.py (bingo).')
flags.DEFINE_enum('neighbours_format', 'sidecar', NEIGHBOUR_FORMATS,
                  "sidecar: knn_extract.py's file, checked against the dataset through its .json sidecar; "
                  "released: a bare .npy of the released compute_knn.py (shape, dtype and index range "
                  "checked; the dataset it was built from cannot be).")
flags.DEFINE_integer('clus_pos_num', None, 'Use the first k neighbours of each row, as the released trainer '
                     'does (its default 5); default: every column of the file.')
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
flags.DEFINE_bool('cuda_graphs', False, 'Capture the whole training step (forward, backward, SGD, queue, '
                  'collectives) as a CUDA graph after 3 eager steps and replay it (CUDA only).')
flags.DEFINE_bool('fast', False, 'The recommended fast settings in one switch: --precision=bf16 --channels_last '
                  '--fast_views (bingo) --cudnn_benchmark --cuda_graphs (CUDA).')
flags.DEFINE_integer('seed', 0, 'Seed; each epoch reseeds from (seed, epoch, rank).')
flags.DEFINE_integer('save_freq', 10, 'Keep checkpoint_<epoch>.pth every this many epochs.')
flags.DEFINE_integer('report_freq', 10, 'Print and log progress every this many steps.')
flags.DEFINE_string('resume', None, "Checkpoint to continue from; 'auto' = the newest intact checkpoint of "
                    '--output_dir. An --output_dir holding checkpoints is always resumed, never overwritten.')
flags.DEFINE_string('device', 'auto', "'auto' (CUDA when available), 'cuda' or 'cpu'.")
flags.mark_flags_as_required(['data_dir', 'output_dir'])

# A resumed run must keep the RUN_FLAGS its checkpoint recorded: they define what the run computes.
# HOW_FLAGS change only how it runs, and may change on resuming. Every flag above is in one list.
RUN_FLAGS = ('data_dir', 'method', 'arch', 'neighbours', 'teacher', 'teacher_arch', 'teacher_bn', 'bag_loss',
             'epochs', 'batch_size', 'lr', 'weight_decay', 'momentum', 'temperature', 'queue_size', 'lam',
             'warmup_epochs', 'moco_momentum', 'image_size', 'seed', 'neighbours_format', 'clus_pos_num',
             'seed_teacher_temperature', 'disco_weight', 'student_hidden_dim', 'crop_min_scale')
HOW_FLAGS = ('output_dir', 'resume', 'teacher_format', 'workers', 'data_pipeline', 'precision', 'channels_last',
             'fast_views', 'compile', 'cudnn_benchmark', 'cuda_graphs', 'fast', 'save_freq', 'report_freq',
             'device')
PATH_FLAGS = ('data_dir', 'neighbours', 'teacher', 'output_dir')  # recorded as absolute paths

# Where the released recipes differ by method (SPEC.md; docs/peers.md): flags left unset take these.
METHOD_DEFAULTS = {
    'bingo': {'teacher_bn': 'train', 'student_hidden_dim': 2048},
    'moco': {'teacher_bn': 'train', 'student_hidden_dim': 2048},
    'seed': {'teacher_bn': 'eval', 'student_hidden_dim': 0},  # MoCo's --mlp: Linear(d, d)
    'disco': {'teacher_bn': 'local', 'student_hidden_dim': 2048},
}


def check_flags(world_size, device):
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
    if FLAGS.cuda_graphs and device.type != 'cuda':
        raise app.UsageError(f'--cuda_graphs needs a CUDA device, not {device}')


def speed_options(device):
    """--precision, --channels_last, --fast_views, --cudnn_benchmark and --cuda_graphs, with --fast
    switching on every one that applies (fast views: bingo; CUDA graphs: a CUDA device)."""
    fast = FLAGS.fast
    return dict(precision='bf16' if fast else FLAGS.precision,
                channels_last=fast or FLAGS.channels_last,
                fast_views=(fast and FLAGS.method == 'bingo') or FLAGS.fast_views,
                cudnn_benchmark=fast or FLAGS.cudnn_benchmark,
                cuda_graphs=(fast and device.type == 'cuda') or FLAGS.cuda_graphs)


def build_model(folder, speed):
    """The training module and the dataset it reads, per --method."""
    student = build_student(FLAGS.arch, FLAGS.student_hidden_dim)
    augmentation = moco_v2_augmentation(FLAGS.image_size, FLAGS.crop_min_scale)
    options = dict(queue_size=FLAGS.queue_size, temperature=FLAGS.temperature,
                   precision=speed['precision'], channels_last=speed['channels_last'],
                   fast_views=speed['fast_views'], compile_backend='inductor' if FLAGS.compile else None)
    if FLAGS.method == 'moco':
        model = build_training_module('moco', student, moco_momentum=FLAGS.moco_momentum, **options)
        if FLAGS.data_pipeline == 'gpu':
            return model, EncodedTwoViewDataset(folder)
        return model, TwoViewDataset(folder, augmentation)
    teacher = load_pretrained(FLAGS.teacher_arch, FLAGS.teacher, FLAGS.teacher_format, with_head=True)
    if FLAGS.method in ('seed', 'disco'):  # views of single images, no bags (SEED takes the first)
        model = build_training_module(FLAGS.method, student, teacher, teacher_bn=FLAGS.teacher_bn,
                                      moco_momentum=FLAGS.moco_momentum, disco_weight=FLAGS.disco_weight,
                                      seed_teacher_temperature=FLAGS.seed_teacher_temperature, **options)
        if FLAGS.data_pipeline == 'gpu':
            return model, EncodedTwoViewDataset(folder)
        return model, TwoViewDataset(folder, augmentation)
    neighbours = load_neighbours(FLAGS.neighbours, len(folder), folder.fingerprint(), FLAGS.neighbours_format,
                                 FLAGS.clus_pos_num, report=print if dist.is_main() else None)
    model = build_training_module('bingo', student, teacher, bag_loss=FLAGS.bag_loss,
                                  teacher_bn=FLAGS.teacher_bn, **options)
    if FLAGS.data_pipeline == 'gpu':
        return model, EncodedBagDataset(folder, neighbours)
    return model, BagDataset(folder, neighbours, augmentation)


def recorded_flags():
    """The flags a checkpoint records, paths made absolute: a run resumed from another working
    directory is compared by the files it reads, not by how their names were spelt."""
    values = {name: FLAGS[name].value for name in RUN_FLAGS + HOW_FLAGS}
    return {**values, **{name: os.path.abspath(values[name]) for name in PATH_FLAGS if values[name]}}


def save(model, optimizer, epoch, step, steps, rng=None):
    """checkpoint.pth after `step` of the `steps` steps of `epoch`. At the end of an epoch also
    checkpoint_<epoch>.pth (kept every --save_freq) and the exported student; mid-epoch (a stopped
    run) with every rank's RNG state `rng`, so that the run resumes at that very step."""
    finished = step == steps
    run = checkpoint.RunCheckpoint(FLAGS.arch, FLAGS.method, epoch + 1 if finished else epoch,
                                   0 if finished else step, dist.get_world_size(), rng, model.training_state(),
                                   optimizer.state_dict(), recorded_flags())
    keep = finished and ((epoch + 1) % FLAGS.save_freq == 0 or epoch + 1 == FLAGS.epochs)
    # The exported backbone loads into torchvision.models.<arch>() (its classifier aside).
    checkpoint.save_run(FLAGS.output_dir, run, keep, model.student.backbone.state_dict() if finished else None)


def resume(model, optimizer):
    """Where the run starts, (epoch, step, this rank's RNG state at that step or None): the start,
    or the checkpoint --output_dir holds (or --resume names) after checking its RUN_FLAGS."""
    found = rundir.checkpoint_to_resume(FLAGS.output_dir, FLAGS.resume)
    if found is None:
        return 0, 0, None
    path, state, note = found
    run = checkpoint.RunCheckpoint.from_dict(state, path)
    changed = checkpoint.changed_flags(run.flags, recorded_flags(), RUN_FLAGS)
    if changed:
        raise app.UsageError(f'{path} was trained with other values of flags that define the run: '
                             f'{"; ".join(changed)}. Pass its values to continue it, or another '
                             '--output_dir for a new run')
    epoch, step = run.epoch, run.step
    if step and run.world_size != dist.get_world_size():
        raise app.UsageError(f'{path} stopped within epoch {epoch} on {run.world_size} processes: '
                             'resume it on as many (each process resumes its own share of the epoch)')
    model.load_training_state(run.modules)
    optimizer.load_state_dict(run.optimizer)
    if dist.is_main():
        for line in (note, f'resumed from {path} at epoch {epoch}' + (f' step {step}' if step else '')):
            if line:
                print(line, flush=True)
    return epoch, step, run.rng[dist.get_rank()] if step else None


def main(argv):
    del argv
    info = dist.init_distributed(FLAGS.device)
    check_flags(info.world_size, info.device)
    speed = speed_options(info.device)
    for note in dist.main_decides(lambda: rundir.claim(FLAGS.output_dir)):  # one run per output_dir
        print(note, flush=True)
    torch.manual_seed(FLAGS.seed)  # same initial student and queue on every rank
    torch.backends.cudnn.benchmark = speed['cudnn_benchmark']
    folder = ImageFolder(os.path.join(FLAGS.data_dir, 'train'))
    if len(folder) // info.world_size < FLAGS.batch_size // info.world_size:
        raise app.UsageError(f'--batch_size={FLAGS.batch_size} exceeds the {len(folder)} images of '
                             f'{folder.root}: an epoch would have no full batch to train on')
    model, dataset = build_model(folder, speed)
    model.to(info.device)
    optimizer = student_optimizer(model, FLAGS.lr, FLAGS.momentum, FLAGS.weight_decay)
    start_epoch, start_step, start_rng = resume(model, optimizer)
    train_step = TrainStep(model, optimizer, 'graph' if speed['cuda_graphs'] else 'ddp',
                           device_ids=[info.local_rank] if info.device.type == 'cuda' else None)
    per_rank_batch = FLAGS.batch_size // info.world_size
    loader, _ = make_loader(dataset, per_rank_batch, FLAGS.workers, train=True, seed=FLAGS.seed)
    if dist.is_main():
        print(f'{FLAGS.method}: student {FLAGS.arch}, {len(dataset)} images, {len(loader)} steps/epoch '
              f'of {FLAGS.batch_size} on {info.world_size} x {info.device.type}', flush=True)
    progress = Progress(len(loader) * (FLAGS.epochs - start_epoch) - start_step, FLAGS.report_freq,
                        JsonlWriter(os.path.join(FLAGS.output_dir, 'metrics.jsonl')))
    lam = tuple(float(v) for v in FLAGS.lam)
    n_views = {'bingo': 4, 'seed': 1}.get(FLAGS.method, 2)  # of (q, k, pq, pk, i, j) or (q, k, i)
    stop = preemption.StopSignal()  # SIGTERM / SIGINT: finish the step, save, exit
    for epoch in range(start_epoch, FLAGS.epochs):
        lr = cosine_lr(FLAGS.lr, epoch, FLAGS.epochs)
        set_lr(optimizer, lr)
        epoch_lam = (1.0, 0.0) if epoch < FLAGS.warmup_epochs else lam
        model.train()
        resumed = epoch == start_epoch
        batches = epoch_batches(loader, FLAGS.seed, epoch, info.rank, start_step if resumed else 0,
                                start_rng if resumed else None)
        # --data_pipeline=gpu draws each batch's view parameters from its own seed (per rank).
        for step, views in views_on_device(batches, FLAGS.data_pipeline, info.device, FLAGS.image_size,
                                           n_views, lambda step: step_seed(FLAGS.seed, epoch, step, info.rank),
                                           FLAGS.crop_min_scale):
            model.seed_draws(step_seed(FLAGS.seed, epoch, step))  # alike on every rank: shuffle BN
            step_options = {'lam': epoch_lam} if FLAGS.method == 'bingo' else {}
            loss, (acc1, acc5) = train_step(views, **step_options)
            shown = progress.update({'epoch': epoch}, step, len(loader), FLAGS.batch_size,
                                    loss=loss, acc1=acc1, acc5=acc5, lr=lr)
            if shown and not torch.isfinite(torch.tensor(shown['loss'])):
                raise errors.UserError(f'loss is {shown["loss"]} at epoch {epoch} step {step + 1}; '
                                       f'stopping, the last good checkpoint in {FLAGS.output_dir} is kept')
            if stop.requested():
                break
        done = step + 1
        rng = dist.gather_objects(rng_state(info.device)) if done < len(loader) else None
        if dist.is_main():
            save(model, optimizer, epoch, done, len(loader), rng)
        dist.barrier()
        if stop.received:
            raise preemption.Preempted(f'{stop.received} at epoch {epoch} step {done}/{len(loader)}; saved '
                                       f'{FLAGS.output_dir}/{checkpoint.LATEST}, which the same command resumes')
    if start_epoch == FLAGS.epochs and dist.is_main():
        print(f'the run in {FLAGS.output_dir} has finished its {FLAGS.epochs} epochs: nothing to do', flush=True)
    dist.cleanup()


if __name__ == '__main__':
    errors.run(main)
