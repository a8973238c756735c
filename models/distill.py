"""The training objectives of stage 2 as modules: BINGO distillation and MoCo v2 (SPEC stage 2), and
the peers' SEED and DisCo (docs/peers.md).

Each module owns the student, its teacher and the queue of teacher keys; `forward` is one training
step up to the loss (the queue is updated inside, after the loss has used it, as in MoCo). The
whole module is what DDP wraps: the student's three passes then share one gradient reduction.
Each also owns what the training loop needs of it: how many views a step takes (`n_views`), the
step's inputs that follow the epoch (`epoch_inputs`: BINGO's lam), its random draws (`draw`) and
what a checkpoint keeps (`training_state`).
"""
import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from data.cutmix import cutmix, cutmix_box
from models.fast import batch_norm_views, per_view_batch_norm
from models.loss import (batch_keys_accuracy, bingo_loss, bingo_paper_loss, contrast_accuracy, disco_loss,
                         moco_batch_keys_loss, moco_loss, seed_loss)
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
        (checked at start), so a batch never wraps; the pointer stays on the device (no sync).
        K = 0 (MoCo with the batch's keys alone) keeps nothing."""
        if not len(self.keys):
            return
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
    n_views = 2  # the views of each sample forward() takes, in the order the datasets give them
    # What a checkpoint keeps of the module (training_state): the frozen teacher is the teacher
    # file's, so only what training changes.
    trained_parts = ('student', 'queue')

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

        # Shuffle BN draws its permutations of the node batch from this generator: seeded alike on
        # every rank (seed_draws), so all ranks of a node draw the same permutation, with no
        # broadcast and no draw on the device.
        self.node_generator = torch.Generator().manual_seed(0)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.teacher_bn == 'eval':  # running statistics, never batch statistics
            self.teacher.eval()
        return self

    def training_state(self) -> dict:
        """{part: state dict} of what training changes, for a checkpoint (utils.checkpoint.RunCheckpoint)."""
        return {part: getattr(self, part).state_dict() for part in self.trained_parts}

    def load_training_state(self, state: dict):
        """Restore what training_state() returned."""
        for part in self.trained_parts:
            getattr(self, part).load_state_dict(state[part])

    def epoch_inputs(self, epoch: int) -> dict:
        """Keyword inputs of every step of `epoch` besides the views (TrainStep passes them on)."""
        del epoch
        return {}

    def compile_networks(self, backend: str):
        """torch.compile the forward of every network, static shapes; state-dict names are unchanged."""
        for network in self.networks():
            network.compile(backend=backend, dynamic=False)

    def networks(self):
        return [self.student, self.teacher]

    def seed_draws(self, seed: int):
        """Reseed the node-wide draws (call with the same seed on every rank, e.g. per epoch)."""
        self.node_generator.manual_seed(seed)

    def _permutation(self, batch_size, shuffle_bn=None):
        """A permutation of the node batch for shuffle BN (teacher_bn 'train', or shuffle_bn=True),
        or None without it ('eval': running statistics; 'local': each process's own batch). (node_size * B,)"""
        if not (self.teacher_bn == 'train' if shuffle_bn is None else shuffle_bn):
            return None
        return torch.randperm(dist.node_size() * batch_size, generator=self.node_generator)

    def _run(self, network, x):
        """One pass with the configured precision; embeddings come back in fp32 (fp64 inputs stay
        fp64) for the loss. Autocast's weight cache is off: it must not outlive a CUDA graph capture."""
        x = x.contiguous(memory_format=self.memory_format)
        with torch.autocast(x.device.type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None, cache_enabled=False):
            out = network(x)
        return out.to(torch.promote_types(out.dtype, torch.float32))

    def _run_views(self, network, *views):
        """One pass over the views concatenated (V*B, ...), BatchNorm statistics per view
        (models/fast.py); returns the V embeddings (B, D) in order."""
        with batch_norm_views(network, len(views)):
            return self._run(network, torch.cat(views)).chunk(len(views))

    @torch.no_grad()
    def _shuffle(self, x, perm):
        """Shuffle BN for the train-mode teacher (perm is not None): the batch is permuted across
        the node's GPUs so that its BatchNorm statistics mix samples of several GPUs."""
        return x if perm is None else dist.shuffle_across_node(x, perm)

    @torch.no_grad()
    def _unshuffle(self, y, perm):
        return y if perm is None else dist.unshuffle(y, perm)

    @torch.no_grad()
    def _teacher(self, x, perm):
        return self._unshuffle(self._run(self.teacher, self._shuffle(x, perm)), perm)


class BingoDistiller(_Contrastive):
    """BINGO: every view of a bag is pulled to the frozen teacher's keys of the bag (SPEC steps 1-6).

    lam: (l_self, l_cross) after the first `warmup_epochs` epochs, which train with (1, 0) (SPEC step 5).
    fast_views: the student's views go through one pass and the teacher's keys through another,
    with BatchNorm statistics per view (models/fast.py): the same loss as the released separate
    passes, with fewer and larger kernels.
    """

    n_views = 4  # anchor, anchor key, neighbour, neighbour key

    def __init__(self, student, teacher, queue_size=65536, temperature=0.2, bag_loss='released',
                 teacher_bn='train', precision='fp32', channels_last=False, cutmix_alpha=2.0,
                 fast_views=False, lam=(0.5, 0.5), warmup_epochs=11):
        super().__init__(student, teacher, queue_size, temperature, teacher_bn, precision, channels_last)
        self.bag_loss = bag_loss
        self.lam, self.warmup_epochs = tuple(lam), warmup_epochs
        self.cutmix_alpha = cutmix_alpha
        self.fast_views = fast_views
        if fast_views:
            per_view_batch_norm(self.student)
            per_view_batch_norm(self.teacher)

    def epoch_inputs(self, epoch):
        """lam: (1, 0) while epoch < warmup_epochs (released: while epoch <= 10), then `lam`; a step
        input, not a constant of the step, so that a captured CUDA graph takes the new value."""
        return {'lam': (1.0, 0.0) if epoch < self.warmup_epochs else self.lam}

    def draw(self, batch_size, image_size):
        """The step's random draws, on the CPU, in the released order: the teacher's shuffle of the
        anchor keys, the CutMix box and lambda (torch's global RNG, each rank its own), the shuffle
        of the neighbour keys. Tensors, so that a CUDA graph can replay the step with new draws."""
        draws = {'anchor_perm': self._permutation(batch_size)}
        if self.bag_loss == 'released':
            box, mix_lambda = cutmix_box(image_size, image_size, self.cutmix_alpha)
            draws.update(box=torch.tensor(box), mix_lambda=torch.tensor(mix_lambda),
                         neighbour_perm=self._permutation(batch_size))
        return {key: value for key, value in draws.items() if value is not None}

    def forward(self, anchor, anchor_key, neighbour, neighbour_key, lam=(0.5, 0.5), draws=None):
        """anchor/anchor_key: two views of image i; neighbour/neighbour_key: two views of its bag
        neighbour j; all (B,3,H,W). draws: `draw()`'s tensors on the views' device (drawn here
        when None). Returns (loss, [acc@1, acc@5])."""
        if draws is None:
            draws = {k: v.to(anchor.device) for k, v in self.draw(anchor.shape[0], anchor.shape[-1]).items()}
        queue = self.queue.keys.clone()  # the loss keeps it for backward; push() rewrites the buffer
        if self.bag_loss == 'paper':
            s_anchor, s_neighbour, t_anchor = self._embed_paper(anchor, anchor_key, neighbour,
                                                                draws.get('anchor_perm'))
            loss = bingo_paper_loss(s_anchor, s_neighbour, t_anchor, queue, self.temperature)
        else:
            s_anchor, s_neighbour, s_mix, t_anchor, t_neighbour = self._embed(
                anchor, anchor_key, neighbour, neighbour_key, draws)
            loss = bingo_loss(s_anchor, s_neighbour, s_mix, t_anchor, t_neighbour, queue,
                              draws['mix_lambda'], lam, self.temperature)
        accuracy = contrast_accuracy(s_anchor, t_anchor, queue)
        self.queue.push(dist.all_gather_cat(t_anchor))
        return loss, accuracy

    def _embed(self, anchor, anchor_key, neighbour, neighbour_key, draws):
        """SPEC steps 1-3: student embeddings of the anchor, neighbour and CutMix views, teacher keys
        of the anchor and the neighbour."""
        anchor_perm, neighbour_perm = draws.get('anchor_perm'), draws.get('neighbour_perm')
        mix = cutmix(anchor, neighbour, draws['box'])
        if not self.fast_views:  # as released: five separate passes, BatchNorm statistics per view
            s_anchor = self._run(self.student, anchor)
            s_neighbour = self._run(self.student, neighbour)
            t_anchor = self._teacher(anchor_key, anchor_perm)
            s_mix = self._run(self.student, mix)
            t_neighbour = self._teacher(neighbour_key, neighbour_perm)
            return s_anchor, s_neighbour, s_mix, t_anchor, t_neighbour
        s_anchor, s_neighbour, s_mix = self._run_views(self.student, anchor, neighbour, mix)
        with torch.no_grad():
            t_anchor, t_neighbour = self._run_views(self.teacher, self._shuffle(anchor_key, anchor_perm),
                                                    self._shuffle(neighbour_key, neighbour_perm))
        return (s_anchor, s_neighbour, s_mix, self._unshuffle(t_anchor, anchor_perm),
                self._unshuffle(t_neighbour, neighbour_perm))

    def _embed_paper(self, anchor, anchor_key, neighbour, anchor_perm):
        """The paper's loss needs the student's anchor and neighbour views and the teacher's anchor key."""
        if self.fast_views:
            s_anchor, s_neighbour = self._run_views(self.student, anchor, neighbour)
        else:
            s_anchor = self._run(self.student, anchor)
            s_neighbour = self._run(self.student, neighbour)
        return s_anchor, s_neighbour, self._teacher(anchor_key, anchor_perm)


class MoCo(_Contrastive):
    """MoCo v2 from scratch: the teacher is a momentum copy of the student, one positive, no bags.

    batch_keys: the batch's other keys are negatives too (MoCo v3). MoCo v2 contrasts with the queue
    alone, whose keys all come from older key encoders than the positive's; in a run of a few hundred
    steps the encoder changes fast enough for that age to give the positive away (the Fashion-MNIST
    demo's short runs collapse to a loss of log(K + 1) without them).
    """

    trained_parts = ('student', 'queue', 'teacher')  # the teacher follows the student by momentum

    def __init__(self, student, queue_size=65536, temperature=0.2, momentum=0.999,
                 precision='fp32', channels_last=False, batch_keys=False):
        super().__init__(student, copy.deepcopy(student), queue_size, temperature, 'train',
                         precision, channels_last)
        self.momentum = momentum
        self.batch_keys = batch_keys

    def draw(self, batch_size, image_size):
        """The step's random draw: the shuffle of the keys across the node (see BingoDistiller.draw)."""
        del image_size
        return {'key_perm': self._permutation(batch_size)}

    def forward(self, query, key, draws=None):
        """query/key: two views of the same images (B,3,H,W). Returns (loss, [acc@1, acc@5])."""
        if draws is None:
            draws = {k: v.to(query.device) for k, v in self.draw(query.shape[0], query.shape[-1]).items()}
        queue = self.queue.keys.clone()
        s_query = self._run(self.student, query)
        momentum_update(self.teacher, self.student, self.momentum)
        t_key = self._teacher(key, draws['key_perm'])
        keys = dist.all_gather_cat(t_key)  # (global batch, D)
        if self.batch_keys:
            own_rows = dist.get_rank() * t_key.shape[0] + torch.arange(t_key.shape[0], device=t_key.device)
            loss = moco_batch_keys_loss(s_query, keys, own_rows, queue, self.temperature)
            accuracy = batch_keys_accuracy(s_query, keys, own_rows, queue)
        else:
            loss = moco_loss(s_query, t_key, queue, self.temperature)
            accuracy = contrast_accuracy(s_query, t_key, queue)
        self.queue.push(keys)
        return loss, accuracy


class SEED(_Contrastive):
    """SEED (Fang et al., ICLR 2021): one view of each image; the student's similarity distribution
    over [the teacher's embedding, the queue] learns the frozen teacher's (docs/peers.md). The
    queue holds teacher embeddings. `temperature` is the student's."""

    n_views = 1

    def __init__(self, student, teacher, queue_size=65536, temperature=0.2, teacher_temperature=1e-4,
                 teacher_bn='eval', precision='fp32', channels_last=False):
        super().__init__(student, teacher, queue_size, temperature, teacher_bn, precision, channels_last)
        self.teacher_temperature = teacher_temperature

    def draw(self, batch_size, image_size):
        """The step's random draw: the teacher's shuffle across the node, with teacher_bn='train'."""
        del image_size
        perm = self._permutation(batch_size)
        return {} if perm is None else {'perm': perm}

    def forward(self, view, draws=None):
        """view: one view of each image (B,3,H,W), seen by student and teacher alike.
        Returns (loss, [acc@1, acc@5])."""
        if draws is None:
            draws = {k: v.to(view.device) for k, v in self.draw(view.shape[0], view.shape[-1]).items()}
        queue = self.queue.keys.clone()
        s_view = self._run(self.student, view)
        t_view = self._teacher(view, draws.get('perm'))
        loss = seed_loss(s_view, t_view, queue, self.temperature, self.teacher_temperature)
        accuracy = contrast_accuracy(s_view, t_view, queue)
        self.queue.push(dist.all_gather_cat(t_view))
        return loss, accuracy


class DisCo(_Contrastive):
    """DisCo (Gao et al., ECCV 2022): MoCo v2 on the student (its momentum key encoder, shuffle BN and
    queue of momentum keys) plus the consistency of the student's embedding of each view with the
    frozen teacher's embedding of that view (docs/peers.md)."""

    trained_parts = ('student', 'queue', 'key_encoder')

    def __init__(self, student, teacher, queue_size=65536, temperature=0.2, momentum=0.999, weight=32.0,
                 teacher_bn='local', precision='fp32', channels_last=False):
        super().__init__(student, teacher, queue_size, temperature, teacher_bn, precision, channels_last)
        self.key_encoder = freeze(copy.deepcopy(student))
        self.momentum = momentum
        self.weight = weight

    def networks(self):
        return [self.student, self.teacher, self.key_encoder]

    def draw(self, batch_size, image_size):
        """The step's random draws: the key encoder's shuffle BN (always, as MoCo), and the teacher's
        shuffles of both views with teacher_bn='train'."""
        del image_size
        draws = {'key_perm': self._permutation(batch_size, shuffle_bn=True),
                 'query_teacher_perm': self._permutation(batch_size),
                 'key_teacher_perm': self._permutation(batch_size)}
        return {key: value for key, value in draws.items() if value is not None}

    @torch.no_grad()
    def _key(self, x, perm):
        """The momentum encoder's keys, with shuffle BN whatever the teacher's BatchNorm mode (MoCo)."""
        return dist.unshuffle(self._run(self.key_encoder, dist.shuffle_across_node(x, perm)), perm)

    def forward(self, query, key, draws=None):
        """query/key: two views of the same images (B,3,H,W). Returns (loss, [acc@1, acc@5])."""
        if draws is None:
            draws = {k: v.to(query.device) for k, v in self.draw(query.shape[0], query.shape[-1]).items()}
        queue = self.queue.keys.clone()
        s_query = self._run(self.student, query)  # separate passes: BatchNorm statistics per view
        s_key = self._run(self.student, key)
        momentum_update(self.key_encoder, self.student, self.momentum)
        momentum_key = self._key(key, draws['key_perm'])
        t_query = self._teacher(query, draws.get('query_teacher_perm'))
        t_key = self._teacher(key, draws.get('key_teacher_perm'))
        loss = disco_loss(s_query, s_key, momentum_key, t_query, t_key, queue, self.temperature, self.weight)
        accuracy = contrast_accuracy(s_query, momentum_key, queue)
        self.queue.push(dist.all_gather_cat(momentum_key))
        return loss, accuracy


def build_training_module(method, student, teacher=None, *, queue_size=65536, temperature=0.2,
                          bag_loss='released', lam=(0.5, 0.5), warmup_epochs=11, teacher_bn='train',
                          moco_momentum=0.999, moco_batch_keys=False, seed_teacher_temperature=1e-4,
                          disco_weight=32.0, precision='fp32', channels_last=False, fast_views=False,
                          compile_backend=None):
    """main_distill's training module, BINGO, MoCo v2, SEED or DisCo (`method`), with its speed
    options; each method takes the arguments its class names. The step benchmark builds it here
    too, so it times the trainer's own code.

    compile_backend: torch.compile backend of the networks' forward ('inductor' for --compile),
    static shapes; None runs them eagerly.
    """
    if fast_views and method != 'bingo':
        raise ValueError(f'fast_views applies to method=bingo, not {method}')
    if method == 'moco':
        model = MoCo(student, queue_size=queue_size, temperature=temperature, momentum=moco_momentum,
                     precision=precision, channels_last=channels_last, batch_keys=moco_batch_keys)
    elif method == 'seed':
        model = SEED(student, teacher, queue_size=queue_size, temperature=temperature,
                     teacher_temperature=seed_teacher_temperature, teacher_bn=teacher_bn, precision=precision,
                     channels_last=channels_last)
    elif method == 'disco':
        model = DisCo(student, teacher, queue_size=queue_size, temperature=temperature, momentum=moco_momentum,
                      weight=disco_weight, teacher_bn=teacher_bn, precision=precision, channels_last=channels_last)
    else:
        model = BingoDistiller(student, teacher, queue_size=queue_size, temperature=temperature, bag_loss=bag_loss,
                               lam=lam, warmup_epochs=warmup_epochs, teacher_bn=teacher_bn, precision=precision,
                               channels_last=channels_last, fast_views=fast_views)
    if compile_backend:
        model.compile_networks(compile_backend)
    return model


def student_optimizer(model, lr, momentum=0.9, weight_decay=1e-4):
    """SGD over the student's parameters (the teacher is frozen or follows by momentum)."""
    return torch.optim.SGD(model.student.parameters(), lr, momentum=momentum, weight_decay=weight_decay)
