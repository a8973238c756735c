"""The three stages as a user runs them on a GPU, with every fast path, checked: PASS/FAIL lines.

Run through benchmarks/gpu_smoke.sh (the CUDA tests first). Real photos: the 20 ImageNet JPEGs of
the foolbox wheel (datasets/foolbox-3.3.4-py3-none-any.whl), rotated and cropped into variants,
8 class folders; a randomly initialised teacher in MoCo v2's public layout (ResNet-50 with BatchNorm
statistics and affine terms that are not the defaults, as a trained file has). Every stage runs
through torchrun:
1. knn_extract.py as released, then with --data_pipeline=gpu --precision=bf16 --channels_last
   (its bags compared with the first's);
2. main_distill.py for --steps steps (one epoch) with each fast flag alone and all together
   (--fast), with --data_pipeline=cpu and gpu; the released flags and --fast at 3 seeds with
   both pipelines. FAIL on any non-finite loss (the trainer stops) or failed run, and when the
   mean loss of the steps with --data_pipeline=gpu differs from --data_pipeline=cpu's at the same
   seed by more than the seed-to-seed spread (max - min over the seeds, the larger of the two
   pipelines'): both pipelines draw the same distribution of views;
3. main_lincls.py and eval_knn.py: a linear probe epoch and the kNN evaluation of a student.
Runs go --parallel at a time on the one GPU. Logs in --work/logs.
"""
import argparse
import io
import itertools
import json
import os
import subprocess
import sys
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor, as_completed

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# main_distill.py flag sets: each fast flag alone, then all of them (--fast).
FLAG_SETS = {
    'released': [],
    'bf16': ['--precision=bf16'],
    'channels_last': ['--channels_last'],
    'fast_views': ['--fast_views'],
    'cudnn_benchmark': ['--cudnn_benchmark'],
    'cuda_graphs': ['--cuda_graphs'],
    'fast': ['--fast'],
}
SEEDS = (0, 1, 2)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--work', default='/tmp/bingo_gpu_smoke')
    parser.add_argument('--device', default='cuda')
    parser.add_argument('--wheel', default=os.path.join(REPO, 'datasets', 'foolbox-3.3.4-py3-none-any.whl'))
    parser.add_argument('--per_class', type=int, default=80, help='Training images per class (8 classes).')
    parser.add_argument('--batch_size', type=int, default=32)
    parser.add_argument('--image_size', type=int, default=64)
    parser.add_argument('--teacher_arch', default='resnet50')
    parser.add_argument('--parallel', type=int, default=8)
    parser.add_argument('--workers', type=int, default=2)
    parser.add_argument('--flag_sets', default=','.join(FLAG_SETS), help='A subset of the flag sets to run.')
    parser.add_argument('--seeds', type=int, default=len(SEEDS), help='Seeds of the released and --fast runs.')
    return parser.parse_args()


def make_data(args):
    """Train/val ImageFolder trees of real photo variants and the teacher file, once."""
    import torch
    import torchvision
    from PIL import Image
    root = os.path.join(args.work, 'data')
    teacher = os.path.join(args.work, 'teacher.pth')
    if os.path.exists(os.path.join(args.work, 'ready')):
        return root, teacher
    with zipfile.ZipFile(args.wheel) as wheel:
        sources = [Image.open(io.BytesIO(wheel.read(n))).convert('RGB') for n in sorted(wheel.namelist())
                   if 'imagenet_' in n and n.endswith('.jpg')]
    for split, count in (('train', args.per_class), ('val', max(4, args.per_class // 8))):
        for c in range(8):
            folder = os.path.join(root, split, f'c{c}')
            os.makedirs(folder, exist_ok=True)
            for i in range(count):
                img = sources[(c * 7 + i) % len(sources)].resize((160, 160))
                img = img.rotate(i % 7 * 3).crop((i % 11, i % 13, 160 - i % 5, 160 - i % 3))
                img.save(os.path.join(folder, f'{i:04d}.jpg'), quality=90)
    torch.manual_seed(0)
    net = torchvision.models.__dict__[args.teacher_arch]()
    for m in net.modules():  # BatchNorm terms as a trained file has them, not the defaults
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.75, 1.25)
            m.weight.data.uniform_(0.75, 1.25)
            m.bias.data.normal_(0, 0.1)
    width = net.fc.in_features
    net.fc = torch.nn.Sequential(torch.nn.Linear(width, 2048), torch.nn.ReLU(), torch.nn.Linear(2048, 128))
    torch.save({'state_dict': {f'module.encoder_q.{k}': v for k, v in net.state_dict().items()}}, teacher)
    open(os.path.join(args.work, 'ready'), 'w').close()
    return root, teacher


def torchrun(script, flags, log):
    """Run `script` under torchrun (one process); returns (ok, seconds, the log's last lines)."""
    command = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=1',
               os.path.join(REPO, script)] + flags
    start = time.time()
    with open(log, 'w') as f:
        result = subprocess.run(command, cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
                                env=dict(os.environ, PYTHONUNBUFFERED='1'))
    with open(log) as f:
        tail = f.read().splitlines()[-3:]
    return result.returncode == 0, time.time() - start, tail


def report(ok, message):
    print(f'{"PASS" if ok else "FAIL"} {message}', flush=True)
    return ok


def mean_loss(run_dir):
    with open(os.path.join(run_dir, 'metrics.jsonl')) as f:
        return float(np.mean([json.loads(line)['loss'] for line in f]))


def main():
    args = parse_args()
    logs = os.path.join(args.work, 'logs')
    os.makedirs(logs, exist_ok=True)
    data, teacher = make_data(args)
    common = [f'--data_dir={data}', f'--teacher={teacher}', f'--teacher_arch={args.teacher_arch}',
              f'--device={args.device}', f'--workers={args.workers}', f'--image_size={args.image_size}']
    results = []

    # Stage 1: released, then the opt-ins compared with it.
    bags = os.path.join(args.work, 'bags.npy')
    for name, extra in (('released', [f'--output={bags}']),
                        ('gpu_bf16', [f'--output={bags}.fast.npy', '--data_pipeline=gpu', '--precision=bf16',
                                      '--channels_last', f'--reference_neighbours={bags}'])):
        ok, seconds, tail = torchrun('knn_extract.py', common + ['--batch_size=128'] + extra,
                                     os.path.join(logs, f'knn_{name}.log'))
        results.append(report(ok, f'knn_extract.py {name} ({seconds:.0f} s): {" | ".join(tail)}'))
    if not os.path.exists(bags):
        return 1

    # Stage 2: every flag set with both pipelines; the released flags and --fast at 3 seeds.
    runs = [(flags, pipe, seed) for flags in args.flag_sets.split(',') for pipe in ('cpu', 'gpu')
            for seed in (SEEDS[:args.seeds] if flags in ('released', 'fast') else SEEDS[:1])]
    if args.device != 'cuda':
        runs = [run for run in runs if run[0] not in ('cuda_graphs', 'fast')]

    def distill(run):
        flags, pipe, seed = run
        out = os.path.join(args.work, 'runs', f'{flags}_{pipe}_{seed}')
        command = common + [f'--output_dir={out}', f'--neighbours={bags}', '--arch=resnet18', '--epochs=1',
                            f'--batch_size={args.batch_size}', f'--queue_size={args.batch_size * 16}',
                            f'--data_pipeline={pipe}', f'--seed={seed}', '--report_freq=1'] + FLAG_SETS[flags]
        return run, out, torchrun('main_distill.py', command, os.path.join(logs, f'distill_{flags}_{pipe}_{seed}.log'))

    losses = {}
    # The first --data_pipeline=gpu run alone: it compiles the colour ops into inductor's cache,
    # which the others then read instead of compiling them all at once.
    first = runs.index(('released', 'gpu', 0))
    done = [distill(runs[first])]
    with ThreadPoolExecutor(args.parallel) as pool:
        futures = [pool.submit(distill, run) for run in runs[:first] + runs[first + 1:]]
        for (flags, pipe, seed), out, (ok, seconds, tail) in itertools.chain(done, (f.result() for f in as_completed(futures))):
            loss = mean_loss(out) if ok else float('nan')
            ok = ok and np.isfinite(loss)
            losses[flags, pipe, seed] = loss
            results.append(report(ok, f'main_distill.py {" ".join(FLAG_SETS[flags]) or "(released)"} '
                                      f'--data_pipeline={pipe} --seed={seed} ({seconds:.0f} s): mean loss '
                                      f'{loss:.4f}' + ('' if ok else f': {" | ".join(tail)}')))
    seeds = SEEDS[:args.seeds]
    for flags in ('released', 'fast'):  # needs two seeds or more for a spread
        if len(seeds) < 2 or not all((flags, pipe, seed) in losses for pipe in ('cpu', 'gpu') for seed in seeds):
            continue
        cpu = np.array([losses[flags, 'cpu', s] for s in seeds])
        gpu = np.array([losses[flags, 'gpu', s] for s in seeds])
        spread = max(np.ptp(cpu), np.ptp(gpu))
        gap = np.abs(gpu - cpu).max()
        results.append(report(bool(gap <= spread), f'{flags}: --data_pipeline=gpu vs cpu, mean loss of the '
                              f'first steps per seed {np.round(gpu, 4).tolist()} vs {np.round(cpu, 4).tolist()}: '
                              f'largest gap {gap:.4f} <= seed-to-seed spread {spread:.4f}'))

    # Stage 3 on the released student.
    student = os.path.join(args.work, 'runs', 'released_cpu_0', 'checkpoint.pth')
    for name, script, extra in (('linear', 'main_lincls.py', ['--epochs=1', '--lr=1.0']), ('knn', 'eval_knn.py', [])):
        ok, seconds, tail = torchrun(script, [
            f'--data_dir={data}', f'--pretrained={student}', '--arch=resnet18', f'--device={args.device}',
            f'--workers={args.workers}', f'--image_size={args.image_size}', f'--batch_size={args.batch_size}',
            f'--output_dir={os.path.join(args.work, "eval", name)}'] + extra, os.path.join(logs, f'lincls_{name}.log'))
        results.append(report(ok, f'{script} ({seconds:.0f} s): {" | ".join(tail)}'))
    print(f'gpu_smoke: {"PASS" if all(results) else "FAIL"} ({sum(results)}/{len(results)} checks)', flush=True)
    return 0 if all(results) else 1


if __name__ == '__main__':
    sys.exit(main())
