"""Times the exact top-(k+1) self-search of stage 1 with each knn engine.

Row agreement is the share of rows whose k neighbours (self removed) equal those of the fp32
torch reference, which therefore always runs. From the repository root:

    python -m benchmarks.bench_knn                      # CUDA: 1 281 167 x 2048; CPU: 50 000 x 512
    python -m benchmarks.bench_knn --device=cpu --n=20000 --clustered
"""
import time

import torch
import torch.nn.functional as F
from absl import app, flags

from utils import knn

METHODS = {
    'torch': dict(backend='torch', fast=False),      # fp32 matmul + top-k (the reference)
    'torch_fast': dict(backend='torch', fast=True),  # bf16 scores, exact fp32 re-rank
    'faiss': dict(backend='faiss', fast=None),
}

FLAGS = flags.FLAGS
flags.DEFINE_integer('n', None, 'Rows (default: 1 281 167 on CUDA, 50 000 on CPU).')
flags.DEFINE_integer('dim', None, 'Feature dimension (default: 2048 on CUDA, 512 on CPU).')
flags.DEFINE_integer('k', 5, 'Neighbours kept per row; k + 1 are searched.')
flags.DEFINE_list('backends', None, f'Engines to time, from {list(METHODS)} (default: all on '
                  'CUDA; torch and faiss on CPU, where bf16 matmuls are emulated and slow).')
flags.DEFINE_string('device', None, 'cpu or cuda (default: cuda when available).')
flags.DEFINE_bool('clustered', False, 'Tight clusters of 40 rows instead of uniform random rows, '
                  'so that many neighbours are closer than bf16 resolves.')
flags.DEFINE_integer('chunk_size', 4096, 'Queries per chunk.')
flags.DEFINE_integer('seed', 0, 'Random seed of the features.')


def make_features(n, dim, clustered, device, seed):
    """L2-normalised (n, dim) features, uniform on the sphere or in clusters of 40."""
    generator = torch.Generator(device).manual_seed(seed)
    features = torch.randn(n, dim, generator=generator, device=device)
    if clustered:
        centres = torch.randn(max(1, n // 40), dim, generator=generator, device=device)
        cluster = torch.randint(len(centres), (n,), generator=generator, device=device)
        # Noise of norm 0.1: cosine similarities inside a cluster lie within ~0.01 of 1, where
        # bf16 resolves steps of 2^-9, so many neighbours tie in bf16 but not in fp32.
        features = F.normalize(centres, dim=1)[cluster] + features * (0.1 / dim ** 0.5)
    return F.normalize(features, dim=1)


def timed(device, fn):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    result = fn()
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
    return result, time.perf_counter() - start


def main(argv):
    del argv
    device = torch.device(FLAGS.device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    on_cuda = device.type == 'cuda'
    backends = FLAGS.backends or (list(METHODS) if on_cuda else ['torch', 'faiss'])
    unknown = sorted(set(backends) - set(METHODS))
    if unknown:
        raise app.UsageError(f'--backends: unknown {unknown}; choose from {list(METHODS)}')
    n = FLAGS.n or (1_281_167 if on_cuda else 50_000)
    dim = FLAGS.dim or (2048 if on_cuda else 512)
    features = make_features(n, dim, FLAGS.clustered, device, FLAGS.seed)
    print(f'{n} x {dim} {"clustered" if FLAGS.clustered else "random"} features on {device} '
          f'({torch.get_num_threads()} CPU threads), k = {FLAGS.k} (+ self), '
          f'chunk_size = {FLAGS.chunk_size}')

    names = ['torch'] + [name for name in backends if name != 'torch']
    rows, reference = [], None
    for name in names:
        try:
            neighbours, seconds = timed(device, lambda: knn.neighbours_excluding_self(
                features, FLAGS.k, chunk_size=FLAGS.chunk_size, **METHODS[name]))
        except knn.FaissNotInstalledError:
            print(f'{name}: skipped, faiss is not installed')
            continue
        if reference is None:
            reference = neighbours
        rows.append((name, seconds, (neighbours == reference).all(axis=1).mean()))

    print(f'{"engine":<12}{"seconds":>10}{"vs faiss":>10}{"row agreement":>16}')
    faiss_seconds = {name: seconds for name, seconds, _ in rows}.get('faiss')
    for name, seconds, agreement in rows:
        ratio = f'{seconds / faiss_seconds:.2f}x' if faiss_seconds else '-'
        print(f'{name:<12}{seconds:>10.2f}{ratio:>10}{agreement:>16.4f}')


if __name__ == '__main__':
    app.run(main)
