"""Frozen-network features over a dataset, sharded across ranks and put back in dataset order."""
import torch
import torch.nn.functional as F

from utils import dist
from utils.logging import Progress


@torch.no_grad()
def embed(network, loader, device, header, report_freq=20):
    """L2-normalised outputs (shard, d) and labels (shard,) of this rank's shard, in loader order."""
    progress = Progress(len(loader), report_freq)
    features, labels = [], []
    for step, (images, targets) in enumerate(loader):
        features.append(F.normalize(network(images.to(device, non_blocking=True)).float(), dim=1))
        labels.append(targets.to(device))
        progress.update(header, step, len(loader), images.shape[0] * dist.get_world_size())
    return torch.cat(features), torch.cat(labels)


@torch.no_grad()
def gather_by_index(rows: torch.Tensor, indices, size: int) -> torch.Tensor:
    """(size, ...) on every rank: row i holds the value computed for dataset index i.

    rows[j] (this rank's shard) belongs to dataset index indices[j]. An evaluation
    DistributedSampler pads its last round with repeats so that every rank gets as many
    images; a repeat is the same image through the same deterministic transform, so it is
    written over its first copy and counted once. After dropping those repeats every index
    0..size-1 must be present exactly once.
    """
    indices = torch.as_tensor(indices, dtype=torch.long, device=rows.device)
    if indices.shape != rows.shape[:1]:
        raise ValueError(f'{rows.shape[0]} rows but {indices.numel()} dataset indices')
    all_rows, all_indices = dist.all_gather_cat(rows), dist.all_gather_cat(indices)
    padding = all_indices.numel() - size
    ordered = rows.new_zeros((size, *rows.shape[1:]))
    ordered[all_indices] = all_rows
    seen = torch.zeros(size, dtype=torch.long, device=rows.device).index_add_(
        0, all_indices, torch.ones_like(all_indices))
    if int(seen.min()) < 1 or int((seen - 1).sum()) != padding:
        missing = (seen == 0).nonzero().flatten()[:5].tolist()
        raise RuntimeError(f'gathered {all_indices.numel()} rows ({padding} padding) for {size} images, '
                           f'but indices are not each present exactly once, missing e.g. {missing}')
    return ordered
