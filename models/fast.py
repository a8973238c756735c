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

from utils import dist

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


class TrainStep:
    """main_distill's training step: forward (with the queue push), backward, SGD step.

    mode:
    - 'ddp': eager; under torchrun the module is wrapped in DistributedDataParallel (released).
    - 'graph' (CUDA): the whole step is captured once as a CUDA graph after `warmup_steps` eager
      steps and replayed for every later batch. At 32 images per GPU the eager step is bound by
      launching thousands of kernels from Python; a replay launches them in one call. Inputs are
      copied into the graph's static buffers first: the views, `lam` and the step's draws (CutMix
      box and lambda, shuffle permutations: models.distill's `draw`). DDP's reducer cannot be
      captured, so its two collectives are done by hand inside the graph, as DDP does them:
      rank 0's buffers broadcast before the forward, gradients averaged after the backward. The
      SGD step's lr is part of the graph: a new lr (once per epoch) captures it again.
    - 'manual': the graph's step run eagerly (hand collectives, no capture); on CPU it lets the
      tests compare the graph's arithmetic with the DDP step on gloo processes.
    Call with the views and keyword tensors (lam, draws); returns (loss, [acc@1, acc@5]) as device
    tensors, nothing read back.
    """

    def __init__(self, model, optimizer, mode='ddp', device_ids=None, warmup_steps=3):
        if mode not in ('ddp', 'graph', 'manual'):
            raise ValueError(f'TrainStep mode {mode!r} is not ddp, graph or manual')
        self.model, self.optimizer, self.mode = model, optimizer, mode
        self.device = next(model.parameters()).device
        if mode == 'graph' and self.device.type != 'cuda':
            raise ValueError('CUDA graphs need the model on a CUDA device')
        self.train_model = model
        if mode == 'ddp' and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            self.train_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
        self.warmup_steps = warmup_steps
        self.steps = 0
        self.graph = None

    def _inputs(self, inputs):
        """lam and draws as tensors on the device (draws: a dict of tensors)."""
        moved = {}
        for key, value in inputs.items():
            if isinstance(value, dict):
                moved[key] = {k: dist.to_device(v, self.device) for k, v in value.items()}
            else:
                moved[key] = dist.to_device(value, self.device)
        return moved

    def _manual_step(self, views, inputs):
        dist.broadcast_buffers(self.model)
        loss, accuracy = self.model(*views, **inputs)
        loss.backward()
        dist.average_gradients(self.model.student.parameters())
        self.optimizer.step()
        return loss, accuracy

    def __call__(self, views, **inputs):
        if 'draws' not in inputs:  # the step's random draws, made on the host (see draw())
            inputs['draws'] = self.model.draw(views[0].shape[0], views[0].shape[-1])
        inputs = self._inputs(inputs)
        self.steps += 1
        if self.mode == 'ddp':
            loss, accuracy = self.train_model(*views, **inputs)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            return loss, accuracy
        if self.mode == 'manual':
            self.optimizer.zero_grad(set_to_none=True)
            return self._manual_step(views, inputs)
        lrs = [group['lr'] for group in self.optimizer.param_groups]
        if self.graph is not None and lrs != self.graph_lrs:
            self.graph = None  # the lr is baked into the captured SGD kernels
        if self.graph is None and self.steps <= self.warmup_steps:
            return self._warmup(views, inputs)
        if self.graph is None:
            self._capture(views, inputs, lrs)
        for static, view in zip(self.static_views, views):
            static.copy_(view, non_blocking=True)
        _copy_nested(self.static_inputs, inputs)
        self.graph.replay()
        return self.loss.clone(), [a.clone() for a in self.accuracy]

    def _warmup(self, views, inputs):
        """An eager step on a side stream, as torch.cuda.graph's documentation asks before a capture
        (cuDNN autotuning, lazy initialisation, the optimizer's momentum buffers)."""
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            self.optimizer.zero_grad(set_to_none=True)
            loss, accuracy = self._manual_step(views, inputs)
        torch.cuda.current_stream(self.device).wait_stream(side)
        return loss, accuracy

    def _capture(self, views, inputs, lrs):
        self.graph = None  # frees the previous graph's memory pool first
        self.static_views = [view.clone() for view in views]
        self.static_inputs = _clone_nested(inputs)
        self.optimizer.zero_grad(set_to_none=True)  # backward allocates the gradients inside the graph
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: the DataLoader's pin-memory thread keeps calling CUDA during the capture.
        with torch.cuda.graph(self.graph, capture_error_mode='thread_local'):
            self.loss, self.accuracy = self._manual_step(self.static_views, self.static_inputs)
        self.graph_lrs = lrs


def _clone_nested(inputs):
    return {k: _clone_nested(v) if isinstance(v, dict) else v.clone() for k, v in inputs.items()}


def _copy_nested(static, inputs):
    if static.keys() != inputs.keys():
        raise ValueError(f'step inputs changed from {sorted(static)} to {sorted(inputs)}')
    for key, value in inputs.items():
        if isinstance(value, dict):
            _copy_nested(static[key], value)
        else:
            static[key].copy_(value, non_blocking=True)
