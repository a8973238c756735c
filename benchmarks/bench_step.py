"""Times main_distill's BINGO training step in the reference mode and the fast modes, in one run.

The model is built by `models.distill.build_training_module` and stepped by
`models.fast.TrainStep`, the code main_distill.py runs (forward with the queue push, backward,
SGD; replayed as a CUDA graph in the `graph` modes); only data loading is left out: the four views
are fixed random tensors on the device. The teacher is a randomly initialised backbone with the
MoCo v2 head (timings do not depend on weights). Every mode starts from the same weights, inputs
and random draws, so the first step's loss is compared with the reference's (PASS/FAIL line; exit
status 1 on a FAIL). `setup s` is the time to the first timed step: the warm-up steps with cuDNN
autotuning, compiling (`--compile`: inductor's cache, TORCHINDUCTOR_CACHE_DIR, makes a second run
faster) and the graph capture. From the repository root:

    python3 -m benchmarks.bench_step --device=cuda --batch_size=128   # ResNet-18 <- ResNet-50, 224 px, K = 65 536
    python3 -m benchmarks.bench_step --device=cpu --teacher_arch=resnet18 --image_size=32 \\
        --batch_size=16 --queue_size=4096 --steps=5
"""
import argparse
import datetime
import gc
import json
import os
import sys
import tempfile
import time

import torch

from models import ARCHS, build_backbone, build_student
from models.distill import build_training_module, student_optimizer
from models.fast import BF16_LOSS_RTOL, TrainStep
from models.heads import Embedder, moco_head

# Each mode as main_distill.py flags; 'reference' is the released arithmetic (fp32, eager, five passes).
MODES = {
    'reference': {},
    'views': {'fast_views': True},
    'bf16': {'precision': 'bf16', 'channels_last': True, 'cudnn_benchmark': True},
    'fast': {'precision': 'bf16', 'channels_last': True, 'cudnn_benchmark': True, 'fast_views': True},
    'graph': {'fast': True},  # = fast + cuda_graphs
    'fast_compile': {'precision': 'bf16', 'channels_last': True, 'cudnn_benchmark': True,
                     'fast_views': True, 'compile': True},
    'graph_compile': {'fast': True, 'compile': True},
}
FAST = {'precision': 'bf16', 'channels_last': True, 'cudnn_benchmark': True, 'fast_views': True,
        'cuda_graphs': True}


def options(mode):
    """A mode's settings, with --fast expanded into what it switches on."""
    settings = dict(MODES[mode])
    if settings.pop('fast', False):
        settings = {**FAST, **settings}
    return settings
# fp32 modes compute the reference loss up to summation order (and, on CUDA, TF32 rounding of
# convolutions run at another batch size); the tight checks are check_gpu.py and the tests.
FP32_LOSS_RTOL = 1e-4


def mode_flags(name):
    """The main_distill.py command-line flags of a mode."""
    return ' '.join(f'--{key}' if value is True else f'--{key}={value}'
                    for key, value in MODES[name].items()) or '(defaults)'


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--arch', default='resnet18', choices=ARCHS, help='Student backbone.')
    parser.add_argument('--teacher_arch', default='resnet50', choices=ARCHS, help='Teacher backbone.')
    parser.add_argument('--batch_size', type=int, default=128, help='Samples per step (one process).')
    parser.add_argument('--image_size', type=int, default=224, help='Side of the square views.')
    parser.add_argument('--queue_size', type=int, default=65536, help='K, teacher keys in the queue.')
    parser.add_argument('--modes', default='reference,fast',
                        help=f'Comma-separated modes from {list(MODES)}; the reference always runs first.')
    parser.add_argument('--warmup', type=int, default=3, help='Untimed steps first (compile, cuDNN tuning).')
    parser.add_argument('--steps', type=int, default=10, help='Timed steps.')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--json', default=None, help='Also write the results to this JSON file.')
    args = parser.parse_args(argv)
    modes = [m for m in args.modes.split(',') if m]
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        parser.error(f'--modes: unknown {unknown}; choose from {list(MODES)}')
    args.modes = ['reference'] + [m for m in modes if m != 'reference']
    if args.warmup < 1 or args.steps < 1:
        parser.error('--warmup and --steps must be at least 1')
    if args.queue_size % args.batch_size:
        parser.error(f'--queue_size={args.queue_size} must be a multiple of --batch_size={args.batch_size}')
    return args


def build(mode, args, device):
    """TrainStep of `mode` over its model, from the same seed in every mode."""
    settings = options(mode)
    torch.manual_seed(args.seed)
    student = build_student(args.arch)
    teacher_backbone = build_backbone(args.teacher_arch)
    teacher = Embedder(teacher_backbone, moco_head(teacher_backbone.feature_dim))
    model = build_training_module(
        'bingo', student, teacher, queue_size=args.queue_size,
        precision=settings.get('precision', 'fp32'), channels_last=settings.get('channels_last', False),
        fast_views=settings.get('fast_views', False),
        compile_backend='inductor' if settings.get('compile') else None)
    model.to(device).train()
    return TrainStep(model, student_optimizer(model, lr=0.03), 'graph' if settings.get('cuda_graphs') else 'ddp')


def synchronize(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def time_mode(mode, args, views, device):
    """samples/s over `args.steps` steps after the warm-up, the first step's loss, setup seconds."""
    settings = options(mode)
    torch.backends.cudnn.benchmark = settings.get('cudnn_benchmark', False)
    start = time.perf_counter()
    train_step = build(mode, args, device)
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(args.seed + 1)  # the same CutMix box and shuffles in every mode
    first_loss = train_step(views, lam=(0.5, 0.5))[0].item()
    # A graph is captured after TrainStep's eager warm-up steps: time replays only.
    warmup = max(args.warmup, train_step.warmup_steps + 1) if train_step.mode == 'graph' else args.warmup
    for _ in range(warmup - 1):
        train_step(views, lam=(0.5, 0.5))
    synchronize(device)
    setup_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(args.steps):
        train_step(views, lam=(0.5, 0.5))
    synchronize(device)
    elapsed = time.perf_counter() - start
    result = {'mode': mode, 'flags': mode_flags(mode), 'samples_per_s': args.batch_size * args.steps / elapsed,
              'step_ms': 1000 * elapsed / args.steps, 'setup_s': setup_s, 'first_loss': first_loss}
    if device.type == 'cuda':
        result['peak_gib'] = torch.cuda.max_memory_allocated(device) / 2**30
    del train_step
    gc.collect()
    if device.type == 'cuda':
        torch.cuda.empty_cache()
    return result


def device_name(device):
    if device.type == 'cuda':
        return torch.cuda.get_device_name(device)
    return f'cpu ({torch.get_num_threads()} threads)'


def write_json(path, record):
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with tempfile.NamedTemporaryFile('w', dir=folder, suffix='.tmp', delete=False) as f:
        json.dump(record, f, indent=1)
    os.replace(f.name, path)


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    setup = {'student': args.arch, 'teacher': args.teacher_arch, 'image_size': args.image_size,
             'batch_size': args.batch_size, 'queue_size': args.queue_size, 'steps': args.steps,
             'warmup': args.warmup, 'device': device_name(device), 'torch': torch.__version__,
             'date': datetime.datetime.now().isoformat(timespec='seconds'),
             'command': ' '.join(['python3', os.path.relpath(sys.argv[0])] + sys.argv[1:])}
    print(f'bench_step: student {args.arch}, teacher {args.teacher_arch} (MoCo v2 head), '
          f'{args.image_size} px, batch {args.batch_size}, K {args.queue_size}, {setup["device"]}, '
          f'torch {torch.__version__}, {setup["date"]}', flush=True)
    generator = torch.Generator().manual_seed(args.seed)
    views = [torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=generator).to(device)
             for _ in range(4)]  # anchor, anchor key, neighbour, neighbour key
    print(f'{"mode":<13} {"samples/s":>10} {"step ms":>9} {"setup s":>8} {"x ref":>6} '
          f'{"loss rel diff":>14}  flags', flush=True)
    results, failures = [], []
    for mode in args.modes:
        if options(mode).get('cuda_graphs') and device.type != 'cuda':
            print(f'{mode:<13} skipped: CUDA graphs need a CUDA device', flush=True)
            continue
        result = time_mode(mode, args, views, device)
        reference = results[0] if results else result
        result['speedup'] = result['samples_per_s'] / reference['samples_per_s']
        result['loss_rel_diff'] = abs(result['first_loss'] - reference['first_loss']) / abs(reference['first_loss'])
        results.append(result)
        print(f'{mode:<13} {result["samples_per_s"]:>10.1f} {result["step_ms"]:>9.1f} '
              f'{result["setup_s"]:>8.1f} {result["speedup"]:>6.2f} {result["loss_rel_diff"]:>14.1e}  '
              f'{result["flags"]}', flush=True)
        if args.json:
            write_json(args.json, {**setup, 'results': results})
    for result in results[1:]:
        tolerance = BF16_LOSS_RTOL if options(result['mode']).get('precision') == 'bf16' else FP32_LOSS_RTOL
        ok = result['loss_rel_diff'] <= tolerance
        print(f'{"PASS" if ok else "FAIL"} {result["mode"]}: first-step loss {result["first_loss"]:.6f} vs '
              f'reference {results[0]["first_loss"]:.6f}, relative difference {result["loss_rel_diff"]:.1e} '
              f'(tolerance {tolerance:.0e})', flush=True)
        if not ok:
            failures.append(result['mode'])
    return 1 if failures else 0


if __name__ == '__main__':
    sys.exit(main())
