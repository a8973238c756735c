"""CutMix of a bag (SPEC stage 2, step 1): one box per batch, the neighbour's pixels pasted into the anchor."""
import math

import torch


def cutmix_box(height: int, width: int, alpha: float = 2.0):
    """Draw lambda ~ Beta(alpha, alpha) and a box of side ratio sqrt(1 - lambda), centre uniform,
    clipped to the image. Returns (top, bottom, left, right) and the anchor's area share after
    clipping. Drawn on the CPU so the training step never waits for the GPU."""
    lam = torch.distributions.Beta(alpha, alpha).sample().item()
    cut = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * cut), int(width * cut)
    cy, cx = torch.randint(height, ()).item(), torch.randint(width, ()).item()
    top, bottom = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
    left, right = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
    return (top, bottom, left, right), 1.0 - (bottom - top) * (right - left) / (height * width)


def cutmix(anchor: torch.Tensor, neighbour: torch.Tensor, alpha: float = 2.0):
    """(B,C,H,W) anchor views with one box region taken from the neighbour views; returns (mix, lambda)."""
    (top, bottom, left, right), lam = cutmix_box(anchor.shape[2], anchor.shape[3], alpha)
    mix = anchor.clone()
    mix[:, :, top:bottom, left:right] = neighbour[:, :, top:bottom, left:right]
    return mix, lam
