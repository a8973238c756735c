"""Stage 3's accuracies and result files, shared by the linear probe (main_lincls.py) and the kNN
evaluation (eval_knn.py)."""
import json

import torch

from utils import atomic, dist
from utils.features import gather_by_index


@torch.no_grad()
def correct_per_image(ranked, targets):
    """(B, 2) float: 1 where the target is the top class / among the top 5."""
    hits = ranked[:, :5] == targets[:, None]
    return torch.stack([hits[:, 0], hits.any(dim=1)], dim=1).float()


def accuracies(per_image, indices, size):
    """top-1 and top-5 (%) over the whole dataset: counts summed over ranks, padding dropped."""
    counts = gather_by_index(per_image, indices, size).sum(dim=0)
    return {'top1': 100.0 * float(counts[0]) / size, 'top5': 100.0 * float(counts[1]) / size}


def finish(result, path, source):
    """Print the result as one JSON line (rank 0) and, when `path` is given, write it there with
    `source` (where the evaluated backbone comes from) for tools/collect_results.py."""
    if dist.is_main():
        if path:
            atomic.write_json_atomic({**result, **source}, path)
        print(json.dumps(result), flush=True)
    return result
