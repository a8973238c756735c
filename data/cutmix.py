"""CutMix of a bag (SPEC stage 2, step 1): one box per batch, the neighbour's pixels pasted into the anchor."""
import math

import torch


def cutmix_box(height: int, width: int, alpha: float = 2.0):
    """Draw lambda ~ Beta(alpha, alpha) and a box of side ratio sqrt(1 - lambda), centre uniform,
    clipped to the image, from torch's global (CPU) RNG. Returns (top, bottom, left, right) and the
    anchor's area share after clipping."""
    lam = torch.distributions.Beta(alpha, alpha).sample().item()
    cut = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * cut), int(width * cut)
    cy, cx = torch.randint(height, ()).item(), torch.randint(width, ()).item()
    top, bottom = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
    left, right = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
    return (top, bottom, left, right), 1.0 - (bottom - top) * (right - left) / (height * width)


def cutmix(anchor: torch.Tensor, neighbour: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
    """(B,C,H,W) anchor views with the box region taken from the neighbour views.

    box: (4,) int64 (top, bottom, left, right), a tensor on the views' device, so that the same
    kernels serve every box (a CUDA graph replays them with the next step's box)."""
    rows = torch.arange(anchor.shape[2], device=anchor.device)
    cols = torch.arange(anchor.shape[3], device=anchor.device)
    inside = (((rows >= box[0]) & (rows < box[1]))[:, None]
              & ((cols >= box[2]) & (cols < box[3]))[None, :])  # (H, W)
    return torch.where(inside, neighbour, anchor)
