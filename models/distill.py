"""The two training objectives of stage 2 as modules: BINGO distillation and MoCo v2 (SPEC stage 2).

Each module owns the student, its teacher and the queue of teacher keys; `forward` is one training
step up to the loss (the queue is updated inside, after the loss has used it, as in MoCo). The
whole module is what DDP wraps: the student's three passes then share one gradient reduction.
"""
import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from data.cutmix import cutmix
from models.loss import bingo_loss, bingo_paper_loss, contrast_accuracy, moco_loss
from utils import dist


class KeyQueue(nn.Module):
    """FIFO of K teacher keys (K, D), initialised with random unit vectors."""

    def __init__(self, size: int, dim: int):
        super().__init__()
        self.register_buffer('keys', F.normalize(torch.randn(size, dim), dim=1))
        self.register_buffer('ptr', torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def push(self, keys: torch.Tensor):
        """Overwrite the oldest rows with `keys` (the global batch). K is a multiple of its size
        (checked at start), so a batch never wraps; the pointer stays on the device (no sync)."""
        rows = self.ptr + torch.arange(keys.shape[0], device=keys.device)
        self.keys.index_copy_(0, rows, keys.to(self.keys.dtype))
        self.ptr.copy_((self.ptr + keys.shape[0]) % self.keys.shape[0])


def freeze(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        p.requires_grad = False
    return module


@torch.no_grad()
def embed_shuffled(teacher: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Teacher embedding with shuffle BN: the batch is permuted across the node's GPUs so that
    train-mode BatchNorm statistics mix samples of several GPUs, then put back in order."""
    shuffled, perm = dist.shuffle_across_node(x)
    return dist.unshuffle(teacher(shuffled), perm)


class _Contrastive(nn.Module):
    def __init__(self, student, teacher, queue_size, temperature, teacher_bn, precision, channels_last):
        super().__init__()
        self.student, self.teacher = student, freeze(teacher)
        self.queue = KeyQueue(queue_size, student.head[-1].out_features)
        self.temperature = temperature
        self.teacher_bn = teacher_bn
        self.autocast_dtype = torch.bfloat16 if precision == 'bf16' else None
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def train(self, mode: bool = True):
        super().train(mode)
        if self.teacher_bn == 'eval':  # running statistics, never batch statistics
            self.teacher.eval()
        return self

    def _run(self, network, x):
        """One pass with the configured precision; embeddings come back in fp32 for the loss."""
        x = x.contiguous(memory_format=self.memory_format)
        with torch.autocast(x.device.type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None):
            return network(x).float()

    def _teacher(self, x):
        if self.teacher_bn == 'train':
            return embed_shuffled(lambda v: self._run(self.teacher, v), x)
        with torch.no_grad():
            return self._run(self.teacher, x)


class BingoDistiller(_Contrastive):
    """BINGO: every view of a bag is pulled to the frozen teacher's keys of the bag (SPEC steps 1-6)."""

    def __init__(self, student, teacher, queue_size=65536, temperature=0.2, bag_loss='released',
                 teacher_bn='train', precision='fp32', channels_last=False, cutmix_alpha=2.0):
        super().__init__(student, teacher, queue_size, temperature, teacher_bn, precision, channels_last)
        self.bag_loss = bag_loss
        self.cutmix_alpha = cutmix_alpha

    def forward(self, anchor, anchor_key, neighbour, neighbour_key, lam=(0.5, 0.5)):
        """anchor/anchor_key: two views of image i; neighbour/neighbour_key: two views of its bag
        neighbour j; all (B,3,H,W). Returns (loss, [acc@1, acc@5])."""
        queue = self.queue.keys.clone()  # the loss keeps it for backward; push() rewrites the buffer
        # Separate passes, as released: BatchNorm statistics are per view.
        s_anchor = self._run(self.student, anchor)
        s_neighbour = self._run(self.student, neighbour)
        t_anchor = self._teacher(anchor_key)
        if self.bag_loss == 'paper':
            loss = bingo_paper_loss(s_anchor, s_neighbour, t_anchor, queue, self.temperature)
        else:
            mix, mix_lambda = cutmix(anchor, neighbour, self.cutmix_alpha)
            s_mix = self._run(self.student, mix)
            t_neighbour = self._teacher(neighbour_key)
            loss = bingo_loss(s_anchor, s_neighbour, s_mix, t_anchor, t_neighbour, queue, mix_lambda,
                              lam, self.temperature)
        accuracy = contrast_accuracy(s_anchor, t_anchor, queue)
        self.queue.push(dist.all_gather_cat(t_anchor))
        return loss, accuracy


class MoCo(_Contrastive):
    """MoCo v2 from scratch: the teacher is a momentum copy of the student, one positive, no bags."""

    def __init__(self, student, queue_size=65536, temperature=0.2, momentum=0.999,
                 precision='fp32', channels_last=False):
        super().__init__(student, copy.deepcopy(student), queue_size, temperature, 'train',
                         precision, channels_last)
        self.momentum = momentum

    @torch.no_grad()
    def _momentum_update(self):
        for s, t in zip(self.student.parameters(), self.teacher.parameters()):
            t.mul_(self.momentum).add_(s.detach(), alpha=1.0 - self.momentum)

    def forward(self, query, key):
        """query/key: two views of the same images (B,3,H,W). Returns (loss, [acc@1, acc@5])."""
        queue = self.queue.keys.clone()
        s_query = self._run(self.student, query)
        self._momentum_update()
        t_key = self._teacher(key)
        loss = moco_loss(s_query, t_key, queue, self.temperature)
        accuracy = contrast_accuracy(s_query, t_key, queue)
        self.queue.push(dist.all_gather_cat(t_key))
        return loss, accuracy
