"""Exact k-nearest-neighbour search by inner product (SPEC stage 1).

Features are L2-normalised, so inner-product order is L2-distance order. "Exact" means: the lists
that the exact inner products of the stored (fp32) features give, ties broken by the lower index.
Engines:
- faiss: IndexFlatIP (the released code's engine); on CUDA tensors a GPU index on the tensors' own
  GPU only, so that every torchrun rank uses its own device;
- torch exact (`fast=False`): float64 products of the fp32 features, tiled over the database;
- torch fast (`fast=True`, the default on CUDA): bf16 candidates, certified, re-scored in float64.

The fast path, per chunk of queries, streams the database in tiles: bf16 products with fp32
accumulation (fp32 output where torch offers it) give approximate scores s~, of which the m best
per query are kept (`_candidates`). Every pair's error |s~ - s| is at most a bound e(x) computed
from the rounding of x and of the database rows (`_error_bound`), so a query whose k-th best exact
score among its m candidates exceeds the m-th approximate score plus e(x) cannot have any other
row in its k best: its list is certified. Uncertified queries (ties, duplicates, clusters tighter
than the bound) are searched again with more candidates, then by the exact path. The bound is checked
on every candidate at run time: arithmetic that broke it stops the search with an error.

Peak memory of the fast path on the search device (`fast_search_bytes`): the fp32 features (the
caller's tensor, 4 N D bytes) and their bf16 copy padded to 128 rows (2 N D), plus per chunk of C
queries a C x T score tile (4 C T bytes, T = `tile_rows`), its block maxima (C T / 32 bytes) and
bounded scratch (re-scoring, exact fall-back: `_SCRATCH_ELEMENTS` float64 each). It depends on
(N, D, C) only, never on the data.
"""
import functools
import logging
import math

import numpy as np
import torch

from utils.errors import UserError

BACKENDS = ('auto', 'faiss', 'torch')

_BLOCK = 128                   # database rows per block maximum; matmuls want row counts of 128 n
_TILE_ELEMENTS = 2 ** 29       # one chunk's score tile: 2 GiB of fp32
_SCRATCH_ELEMENTS = 2 ** 27    # gathered candidates / exact score rows: 1 GiB of float64
# Candidates per query in the two certified rounds: clusters of a few dozen near-equal rows (within
# the bf16 bound of each other) are certified by the first; larger groups of duplicates by the second.
_CANDIDATES = (64, 512)
_FP32_UNIT_ROUNDOFF = 2.0 ** -24
_BF16_UNIT_ROUNDOFF = 2.0 ** -8


class FaissNotInstalledError(UserError, ValueError, ImportError):
    """backend='faiss' was asked for but faiss cannot be imported."""


class BoundViolationError(RuntimeError):
    """The device's bf16 arithmetic broke the error bound that certification relies on."""


def _import_faiss():
    """The faiss module, or None when it is not installed."""
    # faiss's loader logs every CPU build it tries ("Could not load library ... ModuleNotFoundError")
    # at INFO, which absl prints: not errors, so only its warnings are let through.
    logging.getLogger('faiss.loader').setLevel(logging.WARNING)
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def _faiss_has_gpu(faiss):
    return hasattr(faiss, 'StandardGpuResources') and faiss.get_num_gpus() > 0


def resolve_backend(backend, device):
    """The engine `search` uses for `backend` on `device`: 'faiss' or 'torch' ('auto' resolved)."""
    if backend not in BACKENDS:
        raise ValueError(f'knn backend {backend!r} is not one of {BACKENDS}')
    faiss = _import_faiss()
    if backend == 'auto':
        usable = faiss is not None and (
            device.type == 'cpu' or (device.type == 'cuda' and _faiss_has_gpu(faiss)))
        return 'faiss' if usable else 'torch'
    if backend == 'faiss' and faiss is None:
        raise FaissNotInstalledError(
            "knn backend 'faiss' needs the faiss package, which is not installed: "
            "pip install faiss-cpu (or faiss-gpu), or pass --knn_backend=torch")
    return backend


def _check_inputs(database, queries, k, chunk_size):
    for name, t in (('database', database), ('queries', queries)):
        if t.dim() != 2 or not t.is_floating_point():
            raise ValueError(f'knn {name} must be a 2-D float tensor, got shape '
                             f'{tuple(t.shape)} dtype {t.dtype}')
    if database.shape[1] != queries.shape[1]:
        raise ValueError(f'knn database has dimension {database.shape[1]} but queries have '
                         f'{queries.shape[1]}')
    if database.device != queries.device:
        raise ValueError(f'knn database is on {database.device} '
                         f'but queries are on {queries.device}')
    if not 1 <= k <= database.shape[0]:
        raise ValueError(f'knn k={k} must be between 1 and the database size {database.shape[0]}')
    if chunk_size < 1:
        raise ValueError(f'knn chunk_size={chunk_size} must be positive')


def tile_rows(chunk_size):
    """Database rows per score tile of a chunk: a multiple of _BLOCK, the tile within _TILE_ELEMENTS."""
    return max(_BLOCK, _TILE_ELEMENTS // chunk_size // _BLOCK * _BLOCK)


def fast_search_bytes(n, dim, chunk_size):
    """Upper bound on the peak memory (bytes) of the fast search on its device, n x dim features
    (counted: 4 n dim) searched by chunks of chunk_size queries; see the module docstring. The
    scratch term covers the re-scoring pieces and the exact fall-back's score rows, masks and
    float64 database slice (each at most _SCRATCH_ELEMENTS elements of 8 bytes)."""
    padded = math.ceil(n / _BLOCK) * _BLOCK
    tile = min(tile_rows(chunk_size), padded)
    chunk = min(chunk_size, n)
    return (4 * n * dim + 2 * padded * dim + 4 * chunk * tile * (1 + 1 / _BLOCK)
            + 4 * 8 * _SCRATCH_ELEMENTS + 16 * chunk * dim)


@torch.no_grad()
def search(database, queries, k, backend='auto', chunk_size=4096, fast=None):
    """Exact top-k of queries (M, D) against database (N, D) by inner product, nearest first,
    ties by the lower index (faiss: its own order within exact ties).

    Returns (scores (M, k) float32, indices (M, k) int64) on the tensors' device. `fast` picks the
    torch backend's certified bf16 path (None: on CUDA only); it does not affect faiss.
    """
    _check_inputs(database, queries, k, chunk_size)
    device = database.device
    if resolve_backend(backend, device) == 'faiss':
        return _faiss_search(database, queries, k)
    if queries.shape[0] == 0:
        return (torch.empty(0, k, dtype=torch.float32, device=device),
                torch.empty(0, k, dtype=torch.int64, device=device))
    if fast is None:
        fast = device.type == 'cuda'
    if fast:
        search_chunk = functools.partial(_fast_chunk_search, _Database(database, chunk_size))
    else:
        search_chunk = functools.partial(_exact_search, database.float())
    results = [search_chunk(queries[start:start + chunk_size].float(), k)
               for start in range(0, queries.shape[0], chunk_size)]
    scores, indices = zip(*results)
    return torch.cat(scores).float(), torch.cat(indices)


def _faiss_search(database, queries, k):
    faiss = _import_faiss()
    dim = database.shape[1]
    if database.is_cuda and _faiss_has_gpu(faiss):
        config = faiss.GpuIndexFlatConfig()
        config.device = database.device.index if database.device.index is not None else torch.cuda.current_device()
        index = faiss.GpuIndexFlatIP(faiss.StandardGpuResources(), dim, config)  # this rank's GPU only
    else:
        index = faiss.IndexFlatIP(dim)
    index.add(database.float().cpu().contiguous().numpy())
    scores, indices = index.search(queries.float().cpu().contiguous().numpy(), k)
    return (torch.from_numpy(scores).to(database.device),
            torch.from_numpy(indices).long().to(database.device))


# ----------------------------------------------------------------------------- exact selection

def _rank_lowest_index_first(scores, indices, k):
    """The k best of each row by (score descending, index ascending). (R, c) -> (R, k) each."""
    order = torch.argsort(indices, dim=1, stable=True)
    scores, indices = scores.gather(1, order), indices.gather(1, order)
    order = torch.argsort(scores, dim=1, descending=True, stable=True)[:, :k]
    return scores.gather(1, order), indices.gather(1, order)


def _top_k_lowest_index(scores, k):
    """The k best columns of each row of scores (R, N), ties at the k-th value by the lower column,
    sorted by (score descending, column ascending). Memory: a few (R, N) masks."""
    kth = scores.topk(k, dim=1).values[:, -1:]
    greater = scores > kth
    equal = scores == kth
    needed = k - greater.sum(dim=1, keepdim=True)
    chosen = greater | (equal & (torch.cumsum(equal, dim=1) <= needed))  # exactly k per row
    columns = chosen.nonzero()[:, 1].view(-1, k)  # ascending within each row
    return _rank_lowest_index_first(scores.gather(1, columns), columns, k)


def _exact_search(database, queries, k):
    """float64 scores of queries (R, D) against every row of database (N, D) (products of fp32
    numbers are exact in float64; sums of D of them err by ~D 2^-53): the reference, and the
    fast path's last resort. Rows in pieces whose (r, N) score block stays within _SCRATCH_ELEMENTS."""
    n, dim = database.shape
    rows = max(1, _SCRATCH_ELEMENTS // n)
    tile = max(1, _SCRATCH_ELEMENTS // dim)  # database rows converted to float64 at a time
    scores_out, indices_out = [], []
    for first in range(0, queries.shape[0], rows):
        piece = queries[first:first + rows].double()
        scores = torch.empty(piece.shape[0], n, dtype=torch.float64, device=queries.device)
        for start in range(0, n, tile):
            scores[:, start:start + tile] = piece @ database[start:start + tile].double().T
        best_scores, best_indices = _top_k_lowest_index(scores, k)
        scores_out.append(best_scores)
        indices_out.append(best_indices)
    return torch.cat(scores_out), torch.cat(indices_out)


# ----------------------------------------------------------------------------- the fast path

def _fp32_out_matmul(device):
    """Whether torch.mm(bf16, bf16, out_dtype=float32) runs on `device` (CUDA, torch >= 2.8)."""
    return _probe_fp32_out(device.type, device.index)


@functools.lru_cache(maxsize=None)
def _probe_fp32_out(device_type, index):
    if device_type != 'cuda':
        return False
    a = torch.ones(8, 8, dtype=torch.bfloat16, device=torch.device(device_type, index))
    try:
        return torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32
    except (TypeError, RuntimeError, NotImplementedError):
        return False


class _Database:
    """The fast path's view of the database: fp32 rows for exact re-scoring, bf16 rows padded to
    whole blocks for the candidate products, and the norms the error bound needs."""

    def __init__(self, database, chunk_size):
        self.rows = database.float()                       # (N, D), the caller's tensor when fp32
        n, dim = self.rows.shape
        self.n, self.dim = n, dim
        padded = math.ceil(n / _BLOCK) * _BLOCK
        self.tile = min(tile_rows(chunk_size), padded)
        self.fp32_out = _fp32_out_matmul(self.rows.device)
        on_cpu = self.rows.device.type == 'cpu'
        # CPU: bf16 matmuls are emulated, so the rounded rows are kept as fp32 (exact) and the
        # product runs in fp32: the same exact products and fp32 sums as on the GPU.
        self.low = self.rows.new_zeros(padded, dim, dtype=torch.float32 if on_cpu else torch.bfloat16)
        norms = torch.zeros(3, dtype=torch.float64, device=self.rows.device)  # max |y|, |y_hi|, |y_lo|
        for start in range(0, n, max(1, _SCRATCH_ELEMENTS // dim)):  # float64 copies within the scratch
            y = self.rows[start:start + max(1, _SCRATCH_ELEMENTS // dim)]
            high = y.bfloat16()
            self.low[start:start + y.shape[0]] = high
            high = high.float()
            pieces = torch.stack([y.double().norm(dim=1), high.double().norm(dim=1),
                                  (y - high).double().norm(dim=1)])
            norms = torch.maximum(norms, pieces.amax(dim=1))
        self.norm, self.high_norm, self.low_norm = norms.tolist()

    def scores(self, queries_low, start):
        """Approximate scores (C, T) of the chunk against tile `start`, fp32 (or bf16 where torch
        has no fp32 output): bf16 products, fp32 sums."""
        tile = self.low[start:start + self.tile]
        if self.low.dtype == torch.float32:
            return queries_low @ tile.T
        if self.fp32_out:
            return torch.mm(queries_low, tile.T, out_dtype=torch.float32)
        return queries_low @ tile.T


def _error_bound(queries, database):
    """e(x) (R,) float64 with |s~(x, y) - x.y| <= e(x) for every database row y.

    x.y - x_hi.y_hi = x_lo.y + x_hi.y_lo, so |.| <= |x_lo||y| + |x_hi||y_lo| (Cauchy-Schwarz),
    with hi the bf16 rounding and lo the remainder (exact in fp32). Products of bf16 numbers are
    exact in fp32; summing D of them in fp32, in any order (split-K included), with adders that may
    truncate (2 ulps per addition, as tensor cores are documented to do), adds at most
    g |x_hi||y_hi|, g = 2 D u / (1 - 2 D u), u = 2^-24. A bf16 output (no fp32 output in this
    torch) adds u_bf16 |s~| at certification (`_certify`). Norms are computed in float64; the
    factor 1 + 2^-20 covers their rounding.
    """
    dim = queries.shape[1]
    g = 2 * dim * _FP32_UNIT_ROUNDOFF / (1 - 2 * dim * _FP32_UNIT_ROUNDOFF)
    high = queries.bfloat16().float()
    x_high = high.double().norm(dim=1)
    x_low = (queries - high).double().norm(dim=1)
    bound = x_low * database.norm + x_high * database.low_norm + g * x_high * database.high_norm
    return bound * (1 + 2.0 ** -20)


def _candidates(database, queries, m):
    """The m best rows of each query by approximate score: (scores (C, m) fp32, rows (C, m)).

    Per tile: block maxima over _BLOCK columns, the m best blocks (which hold the tile's m best
    scores: a block outside them has m blocks, each with a larger-or-equal maximum, before it),
    the m best columns of those, merged into the running m best.
    """
    c = queries.shape[0]
    queries_low = queries.bfloat16()
    if database.low.dtype == torch.float32:
        queries_low = queries_low.float()
    best_scores = best_rows = None
    for start in range(0, database.low.shape[0], database.tile):
        scores = database.scores(queries_low, start).float()              # (C, T)
        if start + scores.shape[1] > database.n:                          # zero padding rows
            scores[:, database.n - start:] = -math.inf
        blocks = scores.view(c, -1, _BLOCK)                               # (C, T / B, B)
        top_blocks = blocks.amax(dim=2).topk(min(m, blocks.shape[1]), dim=1).indices
        in_blocks = blocks.gather(1, top_blocks[:, :, None].expand(-1, -1, _BLOCK)).view(c, -1)
        top = in_blocks.topk(min(m, in_blocks.shape[1]), dim=1)
        rows = start + top_blocks.gather(1, top.indices // _BLOCK) * _BLOCK + top.indices % _BLOCK
        if best_scores is None:
            best_scores, best_rows = top.values, rows
            continue
        merged = torch.cat([best_scores, top.values], dim=1).topk(m, dim=1)
        best_rows = torch.cat([best_rows, rows], dim=1).gather(1, merged.indices)
        best_scores = merged.values
    return best_scores, best_rows


def _rescore(database, queries, rows):
    """float64 scores of queries (C, D) with database rows (C, m), in pieces of bounded memory."""
    c, m = rows.shape
    per_piece = max(1, _SCRATCH_ELEMENTS // (m * database.dim))
    exact = torch.empty(c, m, dtype=torch.float64, device=queries.device)
    for first in range(0, c, per_piece):
        piece = slice(first, first + per_piece)
        candidates = database.rows[rows[piece]].double()                    # (p, m, D)
        exact[piece] = torch.bmm(candidates, queries[piece].double()[:, :, None]).squeeze(2)
    return exact


def _certify(database, queries, k, m):
    """Candidates of queries, re-scored exactly: (scores (C, k), rows (C, k), certified (C,))."""
    approximate, rows = _candidates(database, queries, m)
    exact = _rescore(database, queries, rows)
    bound = _error_bound(queries, database)                                 # (C,)
    if not database.fp32_out and database.low.dtype == torch.bfloat16:      # bf16 output rounding
        bound = bound + _BF16_UNIT_ROUNDOFF * (approximate.double().abs() + bound[:, None]).amax(dim=1)
    error = (approximate.double() - exact).abs().amax(dim=1)
    if bool((error > bound).any()):
        worst = int((error / bound).argmax())
        raise BoundViolationError(
            f'knn: bf16 scores on {queries.device} erred by {error[worst].item():.3e} against a '
            f'bound of {bound[worst].item():.3e}: this device\'s matrix products are not what the '
            f'bound assumes; search with fast=False (exact float64) or with faiss instead')
    scores, best = _rank_lowest_index_first(exact, rows, k)
    # Any row outside the m candidates scores at most (m-th approximate score) + bound exactly.
    certified = (m >= database.n) | (scores[:, -1] > approximate[:, -1].double() + bound)
    return scores, best, certified


def _fast_chunk_search(database, queries, k):
    """Certified candidates for every query; uncertified ones again with more candidates, then
    the exact path. One host sync per round (how many queries remain)."""
    scores = torch.empty(queries.shape[0], k, dtype=torch.float64, device=queries.device)
    indices = torch.empty(queries.shape[0], k, dtype=torch.int64, device=queries.device)
    pending = torch.arange(queries.shape[0], device=queries.device)
    for m in _CANDIDATES:
        candidates = min(database.n, max(m, 2 * k))
        found, rows, certified = _certify(database, queries[pending], k, candidates)
        scores[pending[certified]], indices[pending[certified]] = found[certified], rows[certified]
        pending = pending[~certified]
        if pending.numel() == 0:
            return scores, indices
    scores[pending], indices[pending] = _exact_search(database.rows, queries[pending], k)
    return scores, indices


def neighbours_excluding_self(features, k, backend='auto', query_range=None, fast=None,
                              chunk_size=4096):
    """Each query row's k nearest other rows of features (N, D), nearest first.

    query_range=(start, stop) searches for rows start..stop-1 only (ranks split the search this
    way). The k+1 nearest are searched and the row's own index is removed wherever it appears
    (a duplicate may tie with or outrank it); where it is absent the last is dropped.
    Returns an np.ndarray (stop - start, k) of int64.
    """
    n = features.shape[0]
    if not 1 <= k < n:
        raise ValueError(f'knn k={k} must be between 1 and the number of rows minus one ({n - 1})')
    start, stop = (0, n) if query_range is None else query_range
    if not 0 <= start <= stop <= n:
        raise ValueError(f'knn query_range={query_range} is not within 0..{n}')
    _, indices = search(features, features[start:stop], k + 1, backend=backend,
                        chunk_size=chunk_size, fast=fast)
    indices = indices.cpu().numpy()
    keep = indices != np.arange(start, stop)[:, None]
    keep[keep.all(axis=1), -1] = False
    return indices[keep].reshape(stop - start, k)
