"""Stage 2: distil a small student from a frozen self-supervised teacher with bags of neighbours
(BINGO), or train MoCo v2 from scratch (`--method=moco`), or distil with the peers' objectives
(`--method=seed`, `--method=disco`; docs/peers.md).

    torchrun --nproc_per_node=8 main_distill.py --data_dir=DATA --neighbours=bags.npy \
        --teacher=moco_v2_800ep.pth.tar --teacher_arch=resnet50 --arch=resnet18 --output_dir=runs/r18

Defaults are the authors' released recipe (SPEC.md, stage 2); `--batch_size` is global.

Fast mode: `--fast` (on CUDA: bf16, channels-last, one pass for the views, cuDNN autotuning and the
whole step replayed as a CUDA graph); what each part costs in fidelity is in README.md and
BENCHMARKS.md.

`run(args)` is the whole stage on this process, for a test or another program to call with
`Args` (utils/args.py); the command line is `main`.
"""
import dataclasses
import os

import torch
from absl import app, flags

from data.folder import ImageFolder
from data.jpeg_bags import training_dataset, views_on_device
from data.neighbours import FORMATS as NEIGHBOUR_FORMATS, load_neighbours
from data.transforms import AUGMENTATIONS
from models import ARCHS, build_student, load_pretrained
from models.distill import build_training_module, student_optimizer
from models.fast import TrainStep
from models.pretrained import FORMATS
from utils import checkpoint, dist, errors, preemption, rundir
from utils.args import Args
from utils.logging import JsonlWriter, Progress
from utils.schedule import cosine_lr, set_lr
from utils.training import epoch_batches, make_loader, rng_state, step_seed, stop_workers

FLAGS = flags.FlagValues()  # this script's own flags, read once in main() (utils/args.py)
flags.DEFINE_string('data_dir', None, 'ImageFolder root holding train/.', flag_values=FLAGS)
flags.DEFINE_string('output_dir', None, 'Where checkpoints, student_backbone.pth and metrics.jsonl go.',
                    flag_values=FLAGS)
flags.DEFINE_enum('method', 'bingo', ['bingo', 'moco', 'seed', 'disco'],
                  'bingo: distil from --teacher with --neighbours; moco: MoCo v2 from scratch; seed, disco: '
                  'the peers SEED and DisCo distilling from --teacher (docs/peers.md).', flag_values=FLAGS)
flags.DEFINE_enum('arch', 'resnet18', ARCHS, 'Student backbone.', flag_values=FLAGS)
flags.DEFINE_string('neighbours', None, 'Neighbour file (N, k) .npy written by knn_extract.py (bingo).',
                    flag_values=FLAGS)
flags.DEFINE_enum('neighbours_format', 'sidecar', NEIGHBOUR_FORMATS,
                  "sidecar: knn_extract.py's file, checked against the dataset through its .json sidecar; "
                  "released: a bare .npy of the released compute_knn.py (shape, dtype and index range "
                  "checked; the dataset it was built from cannot be).", flag_values=FLAGS)
flags.DEFINE_integer('clus_pos_num', None, 'Use the first k neighbours of each row, as the released trainer '
                     'does (its default 5); default: every column of the file.', flag_values=FLAGS)
flags.DEFINE_string('teacher', None, 'Teacher checkpoint (bingo, seed, disco).', flag_values=FLAGS)
flags.DEFINE_enum('teacher_arch', 'resnet50', ARCHS, 'Teacher backbone.', flag_values=FLAGS)
flags.DEFINE_enum('teacher_format', 'auto', FORMATS, 'Teacher checkpoint layout.', flag_values=FLAGS)
flags.DEFINE_enum('teacher_bn', None, ['train', 'eval', 'local'],
                  'train: batch statistics with shuffle BN; eval: running statistics; local: each process\'s '
                  'own batch statistics. Default: the method\'s release (bingo train, seed eval, disco local).',
                  flag_values=FLAGS)
flags.DEFINE_enum('bag_loss', 'released', ['released', 'paper'],
                  'released: SPEC step 5 with teacher neighbour keys and CutMix; paper: L_intra + L_inter.',
                  flag_values=FLAGS)
flags.DEFINE_integer('epochs', 200, 'Training epochs.', flag_values=FLAGS)
flags.DEFINE_integer('batch_size', 256, 'Global batch size, split evenly across processes.', flag_values=FLAGS)
flags.DEFINE_float('lr', 0.03, 'Base learning rate (cosine per epoch).', flag_values=FLAGS)
flags.DEFINE_float('weight_decay', 1e-4, 'SGD weight decay (4e-5 for EfficientNet-B0).', flag_values=FLAGS)
flags.DEFINE_float('momentum', 0.9, 'SGD momentum.', flag_values=FLAGS)
flags.DEFINE_float('temperature', 0.2, 'Contrast temperature (0.12 for EfficientNet-B0); the student\'s '
                   'temperature for seed, MoCo\'s for disco.', flag_values=FLAGS)
flags.DEFINE_integer('queue_size', 65536, 'K, the number of teacher keys in the queue (0: none, with '
                     '--method=moco --moco_batch_keys).', flag_values=FLAGS)
flags.DEFINE_list('lam', ['0.5', '0.5'], '(l_self, l_cross) weights after warm-up.', flag_values=FLAGS)
flags.DEFINE_integer('warmup_epochs', 11,
                     'Epochs trained with lam=(1, 0) first (released: while epoch <= 10).', flag_values=FLAGS)
flags.DEFINE_float('moco_momentum', 0.999, 'Momentum of the MoCo key encoder (--method=moco, disco).',
                   flag_values=FLAGS)
flags.DEFINE_bool('moco_batch_keys', False, 'MoCo: the batch\'s other keys are negatives beside the queue '
                  '(MoCo v3); off: MoCo v2, the queue alone.', flag_values=FLAGS)
flags.DEFINE_float('seed_teacher_temperature', 1e-4, 'Temperature of the teacher\'s similarity '
                   'distribution (--method=seed; SEED\'s released --distill-t).', flag_values=FLAGS)
flags.DEFINE_float('disco_weight', 32.0, 'Weight of DisCo\'s consistency term per sample and view '
                   '(--method=disco): the release sums it over each of its 8 GPUs\' 32 images, weight 1.',
                   flag_values=FLAGS)
flags.DEFINE_integer('student_hidden_dim', None, 'Hidden width of the student\'s MLP head, 0 = the '
                     'backbone\'s feature width. Default: the method\'s release (2048; seed 0).', flag_values=FLAGS)
flags.DEFINE_float('crop_min_scale', 0.2, 'Smallest area share of the RandomResizedCrop of the views '
                   '(MoCo v2: 0.2; SEED\'s release with a SwAV teacher: 0.14).', flag_values=FLAGS)
flags.DEFINE_enum('augmentation', 'moco_v2', list(AUGMENTATIONS), 'moco_v2: the released views; greyscale: '
                  'crop, flip and brightness/contrast only, for small greyscale images (the Fashion-MNIST '
                  'demo).', flag_values=FLAGS)
flags.DEFINE_integer('image_size', 224, 'Crop size of the augmented views.', flag_values=FLAGS)
flags.DEFINE_integer('workers', 8, 'DataLoader workers per process.', flag_values=FLAGS)
flags.DEFINE_enum('data_pipeline', 'cpu', ['cpu', 'gpu'],
                  'cpu: PIL decoding and augmentation in the DataLoader workers (released); gpu: the workers '
                  'only read file bytes, decoding (nvJPEG) and the views run batched on --device.', flag_values=FLAGS)
flags.DEFINE_enum('precision', 'fp32', ['fp32', 'bf16'], 'fp32 is the released arithmetic; bf16 autocast.',
                  flag_values=FLAGS)
flags.DEFINE_bool('channels_last', False, 'Channels-last memory format for the networks.', flag_values=FLAGS)
flags.DEFINE_bool('fast_views', False, 'bingo: the student\'s three views in one pass and the teacher\'s '
                  'two keys in another, BatchNorm statistics still per view (the same loss).', flag_values=FLAGS)
flags.DEFINE_bool('compile', False, 'torch.compile the student\'s and teacher\'s forward (compiling '
                  'takes a minute or more at the start).', flag_values=FLAGS)
flags.DEFINE_bool('cudnn_benchmark', False, 'Let cuDNN time its convolution algorithms on the first steps.',
                  flag_values=FLAGS)
flags.DEFINE_bool('cuda_graphs', False, 'Capture the whole training step (forward, backward, SGD, queue, '
                  'collectives) as a CUDA graph after 3 eager steps and replay it (CUDA only).', flag_values=FLAGS)
flags.DEFINE_bool('fast', False, 'The recommended fast settings in one switch: --precision=bf16 --channels_last '
                  '--fast_views (bingo) --cudnn_benchmark --cuda_graphs (CUDA).', flag_values=FLAGS)
flags.DEFINE_integer('seed', 0, 'Seed; each epoch reseeds from (seed, epoch, rank).', flag_values=FLAGS)
flags.DEFINE_integer('save_freq', 10, 'Keep checkpoint_<epoch>.pth every this many epochs.', flag_values=FLAGS)
flags.DEFINE_integer('checkpoint_freq', 1, 'Write checkpoint.pth (what --resume=auto continues from) and the exported '
                     'student every this many epochs; the last epoch, a kept checkpoint and a stop signal always '
                     'write them. Above 1 for epochs of seconds, where the write is a tenth of the epoch.',
                     lower_bound=1, flag_values=FLAGS)
flags.DEFINE_integer('report_freq', 10, 'Print and log progress every this many steps.', flag_values=FLAGS)
flags.DEFINE_string('resume', None, "Checkpoint to continue from; 'auto' = the newest intact checkpoint of "
                    '--output_dir. An --output_dir holding checkpoints is always resumed, never overwritten.',
                    flag_values=FLAGS)
flags.DEFINE_string('device', 'auto', "'auto' (CUDA when available), 'cuda' or 'cpu'.", flag_values=FLAGS)
flags.mark_flags_as_required(['data_dir', 'output_dir'], flag_values=FLAGS)

# A resumed run must keep the RUN_FLAGS its checkpoint recorded: they define what the run computes.
# HOW_FLAGS change only how it runs, and may change on resuming. Every flag above is in one list.
RUN_FLAGS = ('data_dir', 'method', 'arch', 'neighbours', 'teacher', 'teacher_arch', 'teacher_bn', 'bag_loss',
             'epochs', 'batch_size', 'lr', 'weight_decay', 'momentum', 'temperature', 'queue_size', 'lam',
             'warmup_epochs', 'moco_momentum', 'image_size', 'seed', 'neighbours_format', 'clus_pos_num',
             'seed_teacher_temperature', 'disco_weight', 'student_hidden_dim', 'crop_min_scale',
             'augmentation', 'moco_batch_keys')
HOW_FLAGS = ('output_dir', 'resume', 'teacher_format', 'workers', 'data_pipeline', 'precision', 'channels_last',
             'fast_views', 'compile', 'cudnn_benchmark', 'cuda_graphs', 'fast', 'save_freq', 'checkpoint_freq',
             'report_freq', 'device')
PATH_FLAGS = ('data_dir', 'neighbours', 'teacher', 'output_dir')  # recorded as absolute paths

# Where the released recipes differ by method (SPEC.md; docs/peers.md): flags left unset take these (checked()).
METHOD_DEFAULTS = {
    'bingo': {'teacher_bn': 'train', 'student_hidden_dim': 2048},
    'moco': {'teacher_bn': 'train', 'student_hidden_dim': 2048},
    'seed': {'teacher_bn': 'eval', 'student_hidden_dim': 0},  # MoCo's --mlp: Linear(d, d)
    'disco': {'teacher_bn': 'local', 'student_hidden_dim': 2048},
}


# ------------------------------------------------------------------ arguments

def checked(args, world_size, device):
    """`args` with the method's released defaults (METHOD_DEFAULTS) for the flags left unset, after
    refusing what cannot run."""
    if args.batch_size % world_size:
        raise app.UsageError(f'--batch_size={args.batch_size} is not divisible by {world_size} processes')
    if args.queue_size % args.batch_size:
        raise app.UsageError(f'--queue_size={args.queue_size} must be a multiple of the global '
                             f'--batch_size={args.batch_size}')
    if args.queue_size == 0 and not (args.method == 'moco' and args.moco_batch_keys):
        raise app.UsageError('--queue_size=0 leaves no negatives: it needs --method=moco --moco_batch_keys, '
                             'whose negatives are the batch\'s other keys')
    if args.method == 'bingo' and not (args.teacher and args.neighbours):
        raise app.UsageError('--method=bingo needs --teacher and --neighbours')
    if args.method in ('seed', 'disco') and not args.teacher:
        raise app.UsageError(f'--method={args.method} needs --teacher')
    if args.method != 'bingo' and args.fast_views:
        raise app.UsageError(f'--fast_views applies to --method=bingo, not {args.method}')
    if args.cuda_graphs and device.type != 'cuda':
        raise app.UsageError(f'--cuda_graphs needs a CUDA device, not {device}')
    unset = {name: value for name, value in METHOD_DEFAULTS[args.method].items() if getattr(args, name) is None}
    return args.replace(**unset)


@dataclasses.dataclass(frozen=True)
class Speed:
    """How the step computes: --precision, --channels_last, --fast_views, --cudnn_benchmark and
    --cuda_graphs, with --fast switching on every one that applies (fast views: bingo; CUDA graphs:
    a CUDA device)."""
    precision: str
    channels_last: bool
    fast_views: bool
    cudnn_benchmark: bool
    cuda_graphs: bool

    @classmethod
    def of(cls, args, device):
        fast = args.fast
        return cls(precision='bf16' if fast else args.precision,
                   channels_last=fast or args.channels_last,
                   fast_views=(fast and args.method == 'bingo') or args.fast_views,
                   cudnn_benchmark=fast or args.cudnn_benchmark,
                   cuda_graphs=(fast and device.type == 'cuda') or args.cuda_graphs)


def recorded_flags(args):
    """The flags a checkpoint records, paths made absolute: a run resumed from another working
    directory is compared by the files it reads, not by how their names were spelt."""
    values = {name: getattr(args, name) for name in RUN_FLAGS + HOW_FLAGS}
    return {**values, **{name: os.path.abspath(values[name]) for name in PATH_FLAGS if values[name]}}


# ------------------------------------------------------------------ model and data

def build(args, speed, folder):
    """The training module of --method (student, teacher, queue) and the dataset of its views."""
    student = build_student(args.arch, args.student_hidden_dim)
    teacher = None if args.method == 'moco' else load_pretrained(args.teacher_arch, args.teacher,
                                                                 args.teacher_format, with_head=True)
    model = build_training_module(
        args.method, student, teacher, queue_size=args.queue_size, temperature=args.temperature,
        bag_loss=args.bag_loss, lam=tuple(float(v) for v in args.lam), warmup_epochs=args.warmup_epochs,
        teacher_bn=args.teacher_bn, moco_momentum=args.moco_momentum, moco_batch_keys=args.moco_batch_keys,
        seed_teacher_temperature=args.seed_teacher_temperature, disco_weight=args.disco_weight,
        precision=speed.precision, channels_last=speed.channels_last, fast_views=speed.fast_views,
        compile_backend='inductor' if args.compile else None)
    neighbours = None  # bags for BINGO; the others see views of single images
    if args.method == 'bingo':
        neighbours = load_neighbours(args.neighbours, len(folder), folder.fingerprint(), args.neighbours_format,
                                     args.clus_pos_num, report=print if dist.is_main() else None)
    dataset = training_dataset(folder, neighbours, args.data_pipeline,
                               AUGMENTATIONS[args.augmentation](args.image_size, args.crop_min_scale))
    return model, dataset


# ------------------------------------------------------------------ checkpoints

def kept(args, epochs_done):
    """Whether the end of the epoch keeps checkpoint_<epoch>.pth: every --save_freq, and the last."""
    return epochs_done % args.save_freq == 0 or epochs_done == args.epochs


def save(args, model, optimizer, epoch, step, steps, rng=None):
    """checkpoint.pth after `step` of the `steps` steps of `epoch`. At the end of an epoch also
    checkpoint_<epoch>.pth (kept every --save_freq) and the exported student; mid-epoch (a stopped
    run) with every rank's RNG state `rng`, so that the run resumes at that very step."""
    finished = step == steps
    run = checkpoint.RunCheckpoint(args.arch, args.method, epoch + 1 if finished else epoch,
                                   0 if finished else step, dist.get_world_size(), rng, model.training_state(),
                                   optimizer.state_dict(), recorded_flags(args))
    keep = finished and kept(args, epoch + 1)
    # The exported backbone loads into torchvision.models.<arch>() (its classifier aside).
    checkpoint.save_run(args.output_dir, run, keep, model.student.backbone.state_dict() if finished else None)


def resume(args, model, optimizer):
    """Where the run starts, (epoch, step, this rank's RNG state at that step or None): the start,
    or the checkpoint --output_dir holds (or --resume names) after checking its RUN_FLAGS."""
    found = rundir.checkpoint_to_resume(args.output_dir, args.resume)
    if found is None:
        return 0, 0, None
    path, state, note = found
    run = checkpoint.RunCheckpoint.from_dict(state, path)
    changed = checkpoint.changed_flags(run.flags, recorded_flags(args), RUN_FLAGS)
    if changed:
        raise app.UsageError(f'{path} was trained with other values of flags that define the run: '
                             f'{"; ".join(changed)}. Pass its values to continue it, or another '
                             '--output_dir for a new run')
    if run.step and run.world_size != dist.get_world_size():
        raise app.UsageError(f'{path} stopped within epoch {run.epoch} on {run.world_size} processes: '
                             'resume it on as many (each process resumes its own share of the epoch)')
    model.load_training_state(run.modules)
    optimizer.load_state_dict(run.optimizer)
    if dist.is_main():
        for line in (note, f'resumed from {path} at epoch {run.epoch}' + (f' step {run.step}' if run.step else '')):
            if line:
                print(line, flush=True)
    return run.epoch, run.step, run.rng[dist.get_rank()] if run.step else None


# ------------------------------------------------------------------ training

def run(args):
    """Stage 2 on this process (alone, or one of torchrun's): train, checkpoint, resume."""
    info = dist.init_distributed(args.device)
    args = checked(args, info.world_size, info.device)
    speed = Speed.of(args, info.device)
    for note in dist.main_decides(lambda: rundir.claim(args.output_dir)):  # one run per output_dir
        print(note, flush=True)
    torch.manual_seed(args.seed)  # same initial student and queue on every rank
    torch.backends.cudnn.benchmark = speed.cudnn_benchmark
    folder = ImageFolder(os.path.join(args.data_dir, 'train'))
    if len(folder) // info.world_size < args.batch_size // info.world_size:
        raise app.UsageError(f'--batch_size={args.batch_size} exceeds the {len(folder)} images of '
                             f'{folder.root}: an epoch would have no full batch to train on')
    if args.queue_size >= len(folder):
        raise app.UsageError(f'--queue_size={args.queue_size} is not below the {len(folder)} images of '
                             f'{folder.root}: the queue would hold an older key of every image, so each '
                             'positive would also be one of its own negatives')
    model, dataset = build(args, speed, folder)
    model.to(info.device)
    optimizer = student_optimizer(model, args.lr, args.momentum, args.weight_decay)
    start_epoch, start_step, start_rng = resume(args, model, optimizer)
    # forward (loss, queue push), backward and SGD step: eager under DDP, or a replayed CUDA graph
    train_step = TrainStep(model, optimizer, 'graph' if speed.cuda_graphs else 'ddp',
                           device_ids=[info.local_rank] if info.device.type == 'cuda' else None)
    loader, _ = make_loader(dataset, args.batch_size // info.world_size, args.workers, train=True, seed=args.seed,
                            persistent_workers=True)
    if dist.is_main():
        print(f'{args.method}: student {args.arch}, {len(dataset)} images, {len(loader)} steps/epoch '
              f'of {args.batch_size} on {info.world_size} x {info.device.type}', flush=True)
    progress = Progress(len(loader) * (args.epochs - start_epoch) - start_step, args.report_freq,
                        JsonlWriter(os.path.join(args.output_dir, 'metrics.jsonl')))
    stop = preemption.StopSignal()  # SIGTERM / SIGINT: finish the step, save, exit
    try:
        for epoch in range(start_epoch, args.epochs):
            lr = cosine_lr(args.lr, epoch, args.epochs)
            set_lr(optimizer, lr)
            inputs = model.epoch_inputs(epoch)  # BINGO's lam: (1, 0) for the warm-up epochs
            model.train()
            resumed = epoch == start_epoch
            batches = epoch_batches(loader, args.seed, epoch, info.rank, start_step if resumed else 0,
                                    start_rng if resumed else None)
            # --data_pipeline=gpu draws each batch's view parameters from its own seed (per rank).
            for step, views in views_on_device(batches, args.data_pipeline, info.device, args.image_size,
                                               model.n_views, lambda step: step_seed(args.seed, epoch, step, info.rank),
                                               args.crop_min_scale, args.augmentation):
                model.seed_draws(step_seed(args.seed, epoch, step))  # alike on every rank: shuffle BN
                loss, (acc1, acc5) = train_step(views, **inputs)
                shown = progress.update({'epoch': epoch}, step, len(loader), args.batch_size,
                                        loss=loss, acc1=acc1, acc5=acc5, lr=lr)
                if shown and not torch.isfinite(torch.tensor(shown['loss'])):
                    raise errors.UserError(f'loss is {shown["loss"]} at epoch {epoch} step {step + 1}; '
                                           f'stopping, the last good checkpoint in {args.output_dir} is kept')
                if stop.requested():
                    break
            done = step + 1
            rng = dist.gather_objects(rng_state(info.device)) if done < len(loader) else None
            # checkpoint.pth: after a stop always; after a whole epoch every --checkpoint_freq and when kept
            if dist.is_main() and (done < len(loader) or stop.received or kept(args, epoch + 1)
                                   or (epoch + 1) % args.checkpoint_freq == 0):
                save(args, model, optimizer, epoch, done, len(loader), rng)
            dist.barrier()
            if stop.received:
                raise preemption.Preempted(f'{stop.received} at epoch {epoch} step {done}/{len(loader)}; saved '
                                           f'{args.output_dir}/{checkpoint.LATEST}, which the same command resumes')
    finally:
        stop.close()
        stop_workers(loader)
    if start_epoch == args.epochs and dist.is_main():
        print(f'the run in {args.output_dir} has finished its {args.epochs} epochs: nothing to do', flush=True)
    dist.cleanup()


def main(argv):
    del argv
    run(Args.from_flags(FLAGS))


if __name__ == '__main__':
    errors.run(main, FLAGS)
