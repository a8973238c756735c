"""The training objectives of stage 2 as modules: BINGO distillation and MoCo v2 (SPEC stage 2), and
the peers' SEED and DisCo (docs/peers.md).

Each module owns the student, its teacher and the queue of teacher keys; `forward` is one training
step up to the loss (the queue is updated inside, after the loss has used it, as in MoCo). The
whole module is what DDP wraps: the student's three passes then share one gradient reduction.
"""
import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from data.cutmix import cutmix
from models.fast import batch_norm_views, per_view_batch_norm
from models.loss import bingo_loss, bingo_paper_loss, contrast_accuracy, disco_loss, moco_loss, seed_loss
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
def momentum_update(key_encoder: nn.Module, encoder: nn.Module, momentum: float):
    """MoCo's key encoder update: key = momentum * key + (1 - momentum) * encoder, parameters only."""
    for k, q in zip(key_encoder.parameters(), encoder.parameters()):
        k.mul_(momentum).add_(q.detach(), alpha=1.0 - momentum)


class _Contrastive(nn.Module):
    def __init__(self, student, teacher, queue_size, temperature, teacher_bn, precision, channels_last):
        super().__init__()
        self.student, self.teacher = student, freeze(teacher)
        self.queue = KeyQueue(queue_size, student.head[-1].out_features)
        self.temperature = temperature
        self.teacher_bn = teacher_bn
        self.autocast_dtype = torch.bfloat16 if precision == 'bf16' else None
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        if channels_last:  # weights too, or every convolution converts them on each call
            self.to(memory_format=torch.channels_last)

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

    def _run_views(self, network, *views):
        """One pass over the views concatenated (V*B, ...), BatchNorm statistics per view
        (models/fast.py); returns the V embeddings (B, D) in order."""
        with batch_norm_views(network, len(views)):
            return self._run(network, torch.cat(views)).chunk(len(views))

    @torch.no_grad()
    def _shuffle(self, x):
        """Shuffle BN for the train-mode teacher: the batch is permuted across the node's GPUs so
        that its BatchNorm statistics mix samples of several GPUs ('local': each process's own
        batch, unshuffled). Returns (input, permutation)."""
        if self.teacher_bn == 'train':
            return dist.shuffle_across_node(x)
        return x, None

    @torch.no_grad()
    def _unshuffle(self, y, perm):
        return y if perm is None else dist.unshuffle(y, perm)

    @torch.no_grad()
    def _teacher(self, x):
        x, perm = self._shuffle(x)
        return self._unshuffle(self._run(self.teacher, x), perm)


class BingoDistiller(_Contrastive):
    """BINGO: every view of a bag is pulled to the frozen teacher's keys of the bag (SPEC steps 1-6).

    fast_views: the student's views go through one pass and the teacher's keys through another,
    with BatchNorm statistics per view (models/fast.py): the same loss as the released separate
    passes, with fewer and larger kernels.
    """

    def __init__(self, student, teacher, queue_size=65536, temperature=0.2, bag_loss='released',
                 teacher_bn='train', precision='fp32', channels_last=False, cutmix_alpha=2.0,
                 fast_views=False):
        super().__init__(student, teacher, queue_size, temperature, teacher_bn, precision, channels_last)
        self.bag_loss = bag_loss
        self.cutmix_alpha = cutmix_alpha
        self.fast_views = fast_views
        if fast_views:
            per_view_batch_norm(self.student)
            per_view_batch_norm(self.teacher)

    def forward(self, anchor, anchor_key, neighbour, neighbour_key, lam=(0.5, 0.5)):
        """anchor/anchor_key: two views of image i; neighbour/neighbour_key: two views of its bag
        neighbour j; all (B,3,H,W). Returns (loss, [acc@1, acc@5])."""
        queue = self.queue.keys.clone()  # the loss keeps it for backward; push() rewrites the buffer
        if self.bag_loss == 'paper':
            s_anchor, s_neighbour, t_anchor = self._embed_paper(anchor, anchor_key, neighbour)
            loss = bingo_paper_loss(s_anchor, s_neighbour, t_anchor, queue, self.temperature)
        else:
            s_anchor, s_neighbour, s_mix, t_anchor, t_neighbour, mix_lambda = self._embed(
                anchor, anchor_key, neighbour, neighbour_key)
            loss = bingo_loss(s_anchor, s_neighbour, s_mix, t_anchor, t_neighbour, queue, mix_lambda,
                              lam, self.temperature)
        accuracy = contrast_accuracy(s_anchor, t_anchor, queue)
        self.queue.push(dist.all_gather_cat(t_anchor))
        return loss, accuracy

    def _embed(self, anchor, anchor_key, neighbour, neighbour_key):
        """SPEC steps 1-3: student embeddings of the anchor, neighbour and CutMix views, teacher keys
        of the anchor and the neighbour, and CutMix's lambda."""
        if not self.fast_views:  # as released: five separate passes, BatchNorm statistics per view
            s_anchor = self._run(self.student, anchor)
            s_neighbour = self._run(self.student, neighbour)
            t_anchor = self._teacher(anchor_key)
            mix, mix_lambda = cutmix(anchor, neighbour, self.cutmix_alpha)
            s_mix = self._run(self.student, mix)
            t_neighbour = self._teacher(neighbour_key)
            return s_anchor, s_neighbour, s_mix, t_anchor, t_neighbour, mix_lambda
        # The random draws keep the released order (shuffle, CutMix box, shuffle), so both paths
        # see the same permutations and box for the same seed.
        anchor_key, anchor_perm = self._shuffle(anchor_key)
        mix, mix_lambda = cutmix(anchor, neighbour, self.cutmix_alpha)
        neighbour_key, neighbour_perm = self._shuffle(neighbour_key)
        s_anchor, s_neighbour, s_mix = self._run_views(self.student, anchor, neighbour, mix)
        with torch.no_grad():
            t_anchor, t_neighbour = self._run_views(self.teacher, anchor_key, neighbour_key)
        return (s_anchor, s_neighbour, s_mix, self._unshuffle(t_anchor, anchor_perm),
                self._unshuffle(t_neighbour, neighbour_perm), mix_lambda)

    def _embed_paper(self, anchor, anchor_key, neighbour):
        """The paper's loss needs the student's anchor and neighbour views and the teacher's anchor key."""
        if self.fast_views:
            s_anchor, s_neighbour = self._run_views(self.student, anchor, neighbour)
        else:
            s_anchor = self._run(self.student, anchor)
            s_neighbour = self._run(self.student, neighbour)
        return s_anchor, s_neighbour, self._teacher(anchor_key)


class MoCo(_Contrastive):
    """MoCo v2 from scratch: the teacher is a momentum copy of the student, one positive, no bags."""

    def __init__(self, student, queue_size=65536, temperature=0.2, momentum=0.999,
                 precision='fp32', channels_last=False):
        super().__init__(student, copy.deepcopy(student), queue_size, temperature, 'train',
                         precision, channels_last)
        self.momentum = momentum

    def forward(self, query, key):
        """query/key: two views of the same images (B,3,H,W). Returns (loss, [acc@1, acc@5])."""
        queue = self.queue.keys.clone()
        s_query = self._run(self.student, query)
        momentum_update(self.teacher, self.student, self.momentum)
        t_key = self._teacher(key)
        loss = moco_loss(s_query, t_key, queue, self.temperature)
        accuracy = contrast_accuracy(s_query, t_key, queue)
        self.queue.push(dist.all_gather_cat(t_key))
        return loss, accuracy


class SEED(_Contrastive):
    """SEED (Fang et al., ICLR 2021): one view of each image; the student's similarity distribution
    over [the teacher's embedding, the queue] learns the frozen teacher's (docs/peers.md). The
    queue holds teacher embeddings. `temperature` is the student's."""

    def __init__(self, student, teacher, queue_size=65536, temperature=0.2, teacher_temperature=1e-4,
                 teacher_bn='eval', precision='fp32', channels_last=False):
        super().__init__(student, teacher, queue_size, temperature, teacher_bn, precision, channels_last)
        self.teacher_temperature = teacher_temperature

    def forward(self, view):
        """view: one view of each image (B,3,H,W), seen by student and teacher alike.
        Returns (loss, [acc@1, acc@5])."""
        queue = self.queue.keys.clone()
        s_view = self._run(self.student, view)
        t_view = self._teacher(view)
        loss = seed_loss(s_view, t_view, queue, self.temperature, self.teacher_temperature)
        accuracy = contrast_accuracy(s_view, t_view, queue)
        self.queue.push(dist.all_gather_cat(t_view))
        return loss, accuracy


class DisCo(_Contrastive):
    """DisCo (Gao et al., ECCV 2022): MoCo v2 on the student (its momentum key encoder, shuffle BN and
    queue of momentum keys) plus the consistency of the student's embedding of each view with the
    frozen teacher's embedding of that view (docs/peers.md)."""

    def __init__(self, student, teacher, queue_size=65536, temperature=0.2, momentum=0.999, weight=32.0,
                 teacher_bn='local', precision='fp32', channels_last=False):
        super().__init__(student, teacher, queue_size, temperature, teacher_bn, precision, channels_last)
        self.key_encoder = freeze(copy.deepcopy(student))
        self.momentum = momentum
        self.weight = weight

    @torch.no_grad()
    def _key(self, x):
        """The momentum encoder's keys, with shuffle BN whatever the teacher's BatchNorm mode (MoCo)."""
        x, perm = dist.shuffle_across_node(x)
        return dist.unshuffle(self._run(self.key_encoder, x), perm)

    def forward(self, query, key):
        """query/key: two views of the same images (B,3,H,W). Returns (loss, [acc@1, acc@5])."""
        queue = self.queue.keys.clone()
        s_query = self._run(self.student, query)  # separate passes: BatchNorm statistics per view
        s_key = self._run(self.student, key)
        momentum_update(self.key_encoder, self.student, self.momentum)
        momentum_key = self._key(key)
        t_query, t_key = self._teacher(query), self._teacher(key)
        loss = disco_loss(s_query, s_key, momentum_key, t_query, t_key, queue, self.temperature, self.weight)
        accuracy = contrast_accuracy(s_query, momentum_key, queue)
        self.queue.push(dist.all_gather_cat(momentum_key))
        return loss, accuracy


def build_training_module(method, student, teacher=None, *, queue_size=65536, temperature=0.2,
                          bag_loss='released', teacher_bn='train', precision='fp32',
                          channels_last=False, fast_views=False, compile_backend=None,
                          moco_momentum=0.999, seed_teacher_temperature=1e-4, disco_weight=32.0):
    """main_distill's training module, BINGO, MoCo v2, SEED or DisCo (`method`), with its speed
    options; the step benchmark builds it here too, so it times the trainer's own code.

    compile_backend: torch.compile backend of the student's and teacher's forward ('inductor' for
    --compile), static shapes; None runs them eagerly. State-dict names are unchanged.
    """
    options = dict(queue_size=queue_size, temperature=temperature, precision=precision,
                   channels_last=channels_last)
    if fast_views and method != 'bingo':
        raise ValueError(f'fast_views applies to method=bingo, not {method}')
    if method == 'moco':
        model = MoCo(student, momentum=moco_momentum, **options)
    elif method == 'seed':
        model = SEED(student, teacher, teacher_temperature=seed_teacher_temperature, teacher_bn=teacher_bn,
                     **options)
    elif method == 'disco':
        model = DisCo(student, teacher, momentum=moco_momentum, weight=disco_weight, teacher_bn=teacher_bn,
                      **options)
    else:
        model = BingoDistiller(student, teacher, bag_loss=bag_loss, teacher_bn=teacher_bn,
                               fast_views=fast_views, **options)
    if compile_backend:
        model.student.compile(backend=compile_backend, dynamic=False)
        model.teacher.compile(backend=compile_backend, dynamic=False)
        if isinstance(model, DisCo):
            model.key_encoder.compile(backend=compile_backend, dynamic=False)
    return model


def student_optimizer(model, lr, momentum=0.9, weight_decay=1e-4):
    """SGD over the student's parameters (the teacher is frozen or follows by momentum)."""
    return torch.optim.SGD(model.student.parameters(), lr, momentum=momentum, weight_decay=weight_decay)


def train_step(train_model, optimizer, views, **kwargs):
    """One step of main_distill's loop: loss (and queue push), backward, SGD step. Returns the loss
    and [acc@1, acc@5] as device tensors; nothing is read back, so the host never waits."""
    loss, accuracy = train_model(*views, **kwargs)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss, accuracy
