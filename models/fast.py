"""Fast mode of the training step: several views in one pass with BatchNorm statistics per view.

The released step runs the student three times (anchor, neighbour, CutMix views) and the teacher
twice, so that every BatchNorm normalises each view with that view's own batch statistics. Here
the views are concatenated into one (V*B, ...) batch, which gives the convolutions V times larger
batches and a third of the convolution launches, and every BatchNorm layer is swapped for one that
normalises each block of B rows on its own. Each block goes through the stock BatchNorm forward in
view order, so outputs, gradients and running statistics are those of V separate passes (running
statistics: V momentum updates in order, num_batches_tracked += V). Layers that draw random
numbers per sample (EfficientNet's stochastic depth) draw from the same distribution, not the
same numbers.

    per_view_batch_norm(student)              # once; parameter and buffer names are unchanged
    with batch_norm_views(student, 3):
        s = student(torch.cat([anchor, neighbour, mix]))  # (3B, D), rows in view order
"""
import contextlib

import torch
import torch.nn as nn

# Relative difference of the loss allowed between the bf16 fast mode and the fp32 reference on the
# same inputs and weights (tests/test_fast_step.py, benchmarks/). Measured on CPU at random init:
# resnet18 <- resnet18, 32 px, batch 8, K = 4096, 8 seeds: at most 1.2e-3; resnet18 <- resnet50,
# 64 px, batch 16, K = 1024: 2.1e-3. It holds for batches of 8 or more per view and K >= 1024:
# with 4 samples and K = 64 the loss moves by up to 2.1e-2 (few negatives make it sensitive to
# each logit, and 4-sample BatchNorm statistics amplify rounding).
BF16_LOSS_RTOL = 2e-2


class _PerViewBatchNorm:
    """Mixin over a BatchNorm class: in training with `views` > 1, the batch is `views` equal
    blocks (one per view, in order), each normalised by the stock forward on its own."""

    views = 1

    def forward(self, x):
        if self.views == 1 or not self.training:
            return super().forward(x)
        if x.shape[0] % self.views:
            raise ValueError(f'{type(self).__name__}: batch of {x.shape[0]} rows is not '
                             f'{self.views} equal views')
        return torch.cat([super(_PerViewBatchNorm, self).forward(view) for view in x.chunk(self.views)])


class PerViewBatchNorm1d(_PerViewBatchNorm, nn.BatchNorm1d):
    """BatchNorm1d with per-view statistics inside `batch_norm_views` (SwAV's head)."""


class PerViewBatchNorm2d(_PerViewBatchNorm, nn.BatchNorm2d):
    """BatchNorm2d with per-view statistics inside `batch_norm_views`."""


_PER_VIEW = {nn.BatchNorm1d: PerViewBatchNorm1d, nn.BatchNorm2d: PerViewBatchNorm2d}


def per_view_batch_norm(module: nn.Module) -> nn.Module:
    """Swap every BatchNorm1d/2d of `module` (in place) for its per-view class, keeping the same
    parameter and buffer tensors, so state dicts, optimizers and checkpoints see no change.
    Outside `batch_norm_views` the swapped layers behave exactly as before."""
    for name, child in module.named_children():
        cls = _PER_VIEW.get(type(child))
        if cls is None:
            per_view_batch_norm(child)
            continue
        swapped = cls(child.num_features, child.eps, child.momentum, child.affine,
                      child.track_running_stats)
        for key, tensor in [*child.named_parameters(recurse=False), *child.named_buffers(recurse=False)]:
            setattr(swapped, key, tensor)
        swapped.train(child.training)
        setattr(module, name, swapped)
    return module


@contextlib.contextmanager
def batch_norm_views(module: nn.Module, views: int):
    """Within the block, the per-view BatchNorm layers of `module` split their batch into `views`."""
    layers = [m for m in module.modules() if isinstance(m, _PerViewBatchNorm)]
    for layer in layers:
        layer.views = views
    try:
        yield
    finally:
        for layer in layers:
            layer.views = 1
