"""Times stage 1's exact top-(k+1) self-search and checks it against an exact brute force.

For each case (uniform or clustered features, a dimension) the whole search runs once, as
knn_extract.py runs it (`utils.knn.neighbours_excluding_self`); then --sample random rows are
searched by brute force in float64 (exact products of the fp32 features; ties by the lower index)
and their lists compared, and, for information, by an fp32 brute-force matmul (TF32 off), whose own
rounding reorders near-ties. Prints seconds, peak memory beside `utils.knn.fast_search_bytes`, and
the share of sampled rows equal to the exact lists. From the repository root:

    python3 -m benchmarks.bench_knn --cases=uniform:2048,clustered:2048,uniform:4096   # CUDA: N = 1 281 167
    python3 -m benchmarks.bench_knn --device=cpu --n=20000 --cases=clustered:64 --backends=fast,faiss
"""
import json
import time

import numpy as np
import torch
import torch.nn.functional as F
from absl import app, flags

from utils import knn

ENGINES = {
    'fast': dict(backend='torch', fast=True),     # certified bf16 candidates, float64 re-scoring
    'exact': dict(backend='torch', fast=False),   # float64 brute force (slow at full size)
    'faiss': dict(backend='faiss', fast=None),
}

FLAGS = flags.FLAGS
flags.DEFINE_integer('n', None, 'Rows (default: 1 281 167 on CUDA, 20 000 on CPU).')
flags.DEFINE_list('cases', ['uniform:2048', 'clustered:2048'],
                  'kind:dimension pairs; kind is uniform (random on the sphere) or clustered (40 per cluster).')
flags.DEFINE_integer('k', 5, 'Neighbours kept per row; k + 1 are searched.')
flags.DEFINE_list('backends', ['fast'], f'Engines to time, from {list(ENGINES)}.')
flags.DEFINE_string('device', None, 'cpu or cuda (default: cuda when available).')
flags.DEFINE_integer('chunk_size', 4096, 'Queries per chunk.')
flags.DEFINE_integer('sample', 2048, 'Rows checked against the brute force.')
flags.DEFINE_integer('seed', 0, 'Random seed of the features.')
flags.DEFINE_string('json', None, 'Also write the results to this JSON file.')


def make_features(n, dim, clustered, device, seed):
    """L2-normalised (n, dim) features, uniform on the sphere or in clusters of 40."""
    generator = torch.Generator(device).manual_seed(seed)
    features = torch.randn(n, dim, generator=generator, device=device)
    if clustered:
        centres = F.normalize(torch.randn(max(1, n // 40), dim, generator=generator, device=device), dim=1)
        cluster = torch.randint(len(centres), (n,), generator=generator, device=device)
        # Noise of norm 0.1: similarities inside a cluster lie within ~0.01 of 1, where bf16
        # resolves steps of 2^-8: many neighbours tie in bf16 but not in fp32.
        features.mul_(0.1 / dim ** 0.5).add_(centres[cluster])
    return F.normalize(features, dim=1, out=features)


def synchronize(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def without_self(indices, rows):
    """Remove each row's own index (as neighbours_excluding_self does). (R, k + 1) -> (R, k)"""
    keep = indices != rows[:, None]
    keep[keep.all(axis=1), -1] = False
    return indices[keep].reshape(len(rows), -1)


def sampled_agreement(features, neighbours, k, sample, seed):
    """Shares of sampled rows whose lists equal the exact brute force, and the fp32 matmul's."""
    rows = np.sort(np.random.default_rng(seed).choice(features.shape[0], size=min(sample, features.shape[0]),
                                                      replace=False))
    queries = features[torch.as_tensor(rows, device=features.device)]
    _, exact = knn._exact_search(features, queries, k + 1)
    exact = without_self(exact.cpu().numpy(), rows)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        fp32 = torch.cat([(queries[i:i + 256] @ features.T).topk(k + 1, dim=1).indices
                          for i in range(0, len(rows), 256)])
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    fp32 = without_self(fp32.cpu().numpy(), rows)
    return ((neighbours[rows] == exact).all(axis=1).mean(), (fp32 == exact).all(axis=1).mean())


def main(argv):
    del argv
    device = torch.device(FLAGS.device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    unknown = sorted(set(FLAGS.backends) - set(ENGINES))
    if unknown:
        raise app.UsageError(f'--backends: unknown {unknown}; choose from {list(ENGINES)}')
    n = FLAGS.n or (1_281_167 if device.type == 'cuda' else 20_000)
    name = torch.cuda.get_device_name(device) if device.type == 'cuda' else f'cpu, {torch.get_num_threads()} threads'
    print(f'bench_knn: N = {n}, k = {FLAGS.k} (+ self), chunk_size = {FLAGS.chunk_size}, {name}, '
          f'torch {torch.__version__}', flush=True)
    print(f'{"case":<16}{"engine":<8}{"seconds":>9}{"peak GiB":>10}{"model GiB":>10}'
          f'{"exact rows":>12}{"fp32 matmul":>13}', flush=True)
    results = []
    for case in FLAGS.cases:
        kind, dim = case.split(':')
        dim = int(dim)
        if kind not in ('uniform', 'clustered'):
            raise app.UsageError(f'--cases: {case!r} is not uniform:<dim> or clustered:<dim>')
        features = make_features(n, dim, kind == 'clustered', device, FLAGS.seed)
        for engine in FLAGS.backends:
            if device.type == 'cuda':
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            synchronize(device)
            start = time.perf_counter()
            try:
                neighbours = knn.neighbours_excluding_self(features, FLAGS.k, chunk_size=FLAGS.chunk_size,
                                                           **ENGINES[engine])
            except knn.FaissNotInstalledError:
                print(f'{case:<16}{engine:<8} skipped: faiss is not installed', flush=True)
                continue
            synchronize(device)
            seconds = time.perf_counter() - start
            peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == 'cuda' else float('nan')
            model = knn.fast_search_bytes(n, dim, FLAGS.chunk_size) / 2**30
            exact, fp32 = sampled_agreement(features, neighbours, FLAGS.k, FLAGS.sample, FLAGS.seed)
            print(f'{case:<16}{engine:<8}{seconds:>9.2f}{peak:>10.1f}{model:>10.1f}{exact:>12.4f}{fp32:>13.4f}',
                  flush=True)
            results.append({'case': case, 'engine': engine, 'n': n, 'seconds': seconds, 'peak_gib': peak,
                            'model_gib': model, 'exact_rows': exact, 'fp32_matmul_rows': fp32})
        del features
    if FLAGS.json:
        with open(FLAGS.json, 'w') as f:
            json.dump({'device': name, 'torch': torch.__version__, 'results': results}, f, indent=1)
    failed = [r for r in results if r['exact_rows'] < 1.0]
    print(f'{"FAIL" if failed else "PASS"} bench_knn: every sampled row equals the exact lists'
          + (f' except in {[(r["case"], r["engine"]) for r in failed]}' if failed else ''), flush=True)
    return 1 if failed else 0


if __name__ == '__main__':
    app.run(lambda argv: exit(main(argv)))
