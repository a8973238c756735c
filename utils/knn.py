"""Exact k-nearest-neighbour search by inner product (SPEC stage 1).

Features are L2-normalised, so inner-product order is L2-distance order. Engines:
- faiss: IndexFlatIP, on all GPUs when faiss has GPU support and the tensors are on CUDA
  (the released code's engine);
- torch reference: fp32 matmul + top-k, chunked over queries and tiled over the database;
- torch fast (default for the torch backend on CUDA): scores in bf16, then every candidate that
  bf16 rounding could have misplaced is re-ranked in fp32, so the neighbour lists are those of
  the fp32 reference (exact ties aside).
"""
import contextlib
import functools
import logging
import math

import numpy as np
import torch

BACKENDS = ('auto', 'faiss', 'torch')

# Largest score block / gathered candidate block, in elements (1 GiB / 512 MiB of fp32).
_MAX_SCORE_ELEMENTS = 2 ** 28
_MAX_GATHER_ELEMENTS = 2 ** 27
_MATMUL_ALIGN = 128     # an unpadded odd row count ran the bf16 matmul at 1/6 of the speed
_BF16_UNIT_ROUNDOFF = 2.0 ** -8
_FP32_UNIT_ROUNDOFF = 2.0 ** -24


class FaissNotInstalledError(ValueError, ImportError):
    """backend='faiss' was asked for but faiss cannot be imported."""


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


def _resolve_backend(backend, device):
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


@torch.no_grad()
def search(database, queries, k, backend='auto', chunk_size=4096, fast=None):
    """Exact top-k of queries (M, D) against database (N, D) by inner product, nearest first.

    Returns (scores (M, k) float32, indices (M, k) int64) on the tensors' device. `fast` picks the
    torch backend's bf16 + fp32 re-rank path (None: on CUDA only); it does not affect faiss.
    """
    _check_inputs(database, queries, k, chunk_size)
    device = database.device
    backend = _resolve_backend(backend, device)
    if queries.shape[0] == 0:
        return (torch.empty(0, k, dtype=torch.float32, device=device),
                torch.empty(0, k, dtype=torch.int64, device=device))
    if backend == 'faiss':
        return _faiss_search(database, queries, k)
    if fast is None:
        fast = device.type == 'cuda'
    if fast:
        search_chunk = functools.partial(_fast_chunk_search, *_prepare_fast(database))
    else:
        # Database tile width keeping a chunk's score block under _MAX_SCORE_ELEMENTS.
        tile = max(k, _MAX_SCORE_ELEMENTS // chunk_size)
        search_chunk = functools.partial(_reference_chunk_search, database.float(), tile)
    results = [search_chunk(queries[start:start + chunk_size], k)
               for start in range(0, queries.shape[0], chunk_size)]
    scores, indices = zip(*results)
    return torch.cat(scores), torch.cat(indices)


def _faiss_search(database, queries, k):
    faiss = _import_faiss()
    index = faiss.IndexFlatIP(database.shape[1])
    if database.is_cuda and _faiss_has_gpu(faiss):
        index = faiss.index_cpu_to_all_gpus(index)
    index.add(database.float().cpu().contiguous().numpy())
    scores, indices = index.search(queries.float().cpu().contiguous().numpy(), k)
    return (torch.from_numpy(scores).to(database.device),
            torch.from_numpy(indices).long().to(database.device))


def _reference_chunk_search(database, tile, queries, k):
    """fp32 matmul + top-k per database tile, merged into a running top-k.

    On CUDA the matmul is exact fp32 only while TF32 is off (torch's default).
    """
    queries = queries.float()
    best_scores = best_indices = None
    for first in range(0, database.shape[0], tile):
        scores = queries @ database[first:first + tile].T
        top = scores.topk(min(k, scores.shape[1]), dim=1)
        indices = top.indices + first
        if best_scores is None:
            best_scores, best_indices = top.values, indices
            continue
        merged = torch.cat([best_scores, top.values], dim=1).topk(k, dim=1)
        best_indices = torch.cat([best_indices, indices], dim=1).gather(1, merged.indices)
        best_scores = merged.values
    return best_scores, best_indices


def _block_width(n):
    """Columns per block for the block-maxima selection: a multiple of 128 near sqrt(n / 2),
    which balances the top-k over block maxima against the gather of the chosen blocks
    (1024 for ImageNet's 1.28M rows)."""
    width = _MATMUL_ALIGN
    while 2 * width * width < n:
        width *= 2
    return width


def _score_error_bound(dim):
    """Bound on |bf16 score - exact score| + |fp32 score - exact score| for unit vectors.

    With u = 2^-8 (bf16 unit roundoff): rounding x and y to bf16 changes each x_i y_i by at most
    (2u + u^2)|x_i y_i|, and sum |x_i y_i| <= |x||y| = 1 (Cauchy-Schwarz). Products of bf16
    numbers are exact in fp32; summing d of them in fp32, in any order, adds at most
    g = d 2^-24 / (1 - d 2^-24) times sum |x^_i y^_i| <= (1 + u)^2. Rounding the result to bf16
    adds u times its magnitude, <= (1 + u)^2 (1 + g). An fp32 dot product is within g of exact.
    """
    u = _BF16_UNIT_ROUNDOFF
    g = dim * _FP32_UNIT_ROUNDOFF / (1 - dim * _FP32_UNIT_ROUNDOFF)
    bf16_error = (2 * u + u * u) + g * (1 + u) ** 2 + u * (1 + u) ** 2 * (1 + g)
    return bf16_error + g


@contextlib.contextmanager
def _fp32_matmul_reductions():
    """Keep cuBLAS from reducing split-K partial sums in bf16, which the error bound excludes."""
    allowed = torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction
    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = allowed


def _prepare_fast(database):
    """(fp32 database, bf16 database padded to whole blocks, block width, largest row norm)."""
    n, dim = database.shape
    width = _block_width(n)
    n_blocks = math.ceil(n / width)
    # Zero rows pad the database to whole blocks; their scores are set to -inf.
    database_bf16 = database.new_zeros(n_blocks * width, dim, dtype=torch.bfloat16)
    database_bf16[:n] = database
    database = database.float()
    return database, database_bf16, width, database.norm(dim=1).max()


def _gather_blocks(scores, blocks, width):
    """scores (m, n_blocks * width), blocks (m, b) -> those blocks' scores (m, b * width)."""
    m = scores.shape[0]
    by_block = scores.view(m, -1, width)
    return by_block.gather(1, blocks[:, :, None].expand(-1, -1, width)).reshape(m, -1)


def _fast_chunk_search(database, database_bf16, width, database_norm, queries, k):
    """bf16 scores, block-maxima candidate selection with an error bound, fp32 re-rank.

    Two host syncs per chunk: the number of candidate blocks and of candidates.
    """
    n, dim = database.shape
    m = queries.shape[0]
    queries = queries.float()
    # Scores of non-unit vectors scale the bound by the product of their norms.
    margin = 2 * _score_error_bound(dim) * queries.norm(dim=1).max() * database_norm
    with _fp32_matmul_reductions():
        scores = queries.bfloat16() @ database_bf16.T                    # (m, n_blocks * width)
    scores[:, n:] = -math.inf
    block_max = scores.view(m, -1, width).amax(dim=2)                    # (m, n_blocks)

    # The k-th best score lies in the k blocks with the largest maxima: any block holding one of
    # the k best scores has a maximum at least as large as every block outside those k.
    top_blocks = block_max.topk(min(k, block_max.shape[1]), dim=1).indices
    kth = _gather_blocks(scores, top_blocks, width).topk(k, dim=1).values[:, -1].float()
    # With e = _score_error_bound: the k best in bf16 all score >= kth - e in fp32, so an fp32 top-k
    # neighbour j scores >= kth - e in fp32 and >= kth - 2e in bf16; it is a candidate.
    threshold = (kth - margin)[:, None]

    n_blocks = int((block_max >= threshold).sum(dim=1).max())
    blocks = block_max.topk(n_blocks, dim=1).indices                     # (m, n_blocks)
    block_scores = _gather_blocks(scores, blocks, width)                 # (m, n_blocks * width)
    columns = (blocks[:, :, None] * width + torch.arange(width, device=blocks.device)).view(m, -1)
    is_candidate = block_scores >= threshold
    n_candidates = int(is_candidate.sum(dim=1).max())
    # Rows with fewer candidates are filled with non-candidates, masked out after the re-rank.
    picked = block_scores.masked_fill(~is_candidate, -math.inf).topk(n_candidates, dim=1)
    filler = picked.values == -math.inf
    candidates = columns.gather(1, picked.indices).masked_fill(filler, 0)  # (m, n_candidates)

    exact = _exact_scores(queries, database, candidates).masked_fill(filler, -math.inf)
    best = exact.topk(k, dim=1)
    return best.values, candidates.gather(1, best.indices)


def _exact_scores(queries, database, candidates):
    """fp32 dot products of queries (m, D) with database[candidates] (m, c) -> (m, c).

    Multiply-and-sum rather than a batched matmul, so TF32 settings cannot lower the precision.
    """
    m, count = candidates.shape
    rows_per_piece = max(1, _MAX_GATHER_ELEMENTS // (count * database.shape[1]))
    exact = torch.empty(m, count, dtype=torch.float32, device=queries.device)
    for first in range(0, m, rows_per_piece):
        rows = slice(first, first + rows_per_piece)
        exact[rows] = (database[candidates[rows]] * queries[rows, None, :]).sum(dim=2)
    return exact


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
