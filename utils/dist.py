"""Small distributed helpers: torchrun environment, gathers and the teacher's shuffle BN.

A plain `python script.py` runs as a one-process group-less job; every helper below then
degrades to the identity, so the training code has a single path.
"""
import dataclasses
import datetime
import os

import torch
import torch.distributed as dist

from utils.errors import UserError


@dataclasses.dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device


_node_group = None  # process group of the ranks on this node, for shuffle BN


def init_distributed(device: str = 'auto') -> DistInfo:
    """Read torchrun's environment, pick the device and start NCCL (GPU) or gloo (CPU)."""
    rank = int(os.environ.get('RANK', 0))
    world_size = int(os.environ.get('WORLD_SIZE', 1))
    local_rank = int(os.environ.get('LOCAL_RANK', 0))
    local_world_size = int(os.environ.get('LOCAL_WORLD_SIZE', world_size))
    if device == 'auto':
        device = 'cuda' if torch.cuda.is_available() else 'cpu'
    if device == 'cuda':
        torch.cuda.set_device(local_rank)
        dev = torch.device('cuda', local_rank)
    else:
        dev = torch.device(device)
    if world_size > 1:
        backend = 'nccl' if dev.type == 'cuda' else 'gloo'
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30),
                                device_id=dev if dev.type == 'cuda' else None)
        global _node_group
        if local_world_size == world_size:
            _node_group = dist.group.WORLD
        else:  # one group per node; new_subgroups must be called by every rank
            _node_group, _ = dist.new_subgroups(local_world_size)
    return DistInfo(rank, world_size, local_rank, local_world_size, dev)


def to_device(value, device: torch.device) -> torch.Tensor:
    """`value` (a tensor or anything torch.as_tensor takes) on `device` without a host sync: a CPU
    tensor bound for CUDA goes through pinned memory (a pageable copy would wait for the stream)."""
    value = torch.as_tensor(value)
    if device.type == 'cuda' and value.device.type == 'cpu':
        return value.pin_memory().to(device, non_blocking=True)
    return value.to(device)


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main() -> bool:
    return get_rank() == 0


def barrier():
    if is_dist():
        dist.barrier()


def cleanup():
    if is_dist():
        # Every rank past its last collective before any closes its connections: a gloo peer that
        # closes early can abort the other mid-teardown (seen once, SIGABRT, in a 2-process test).
        dist.barrier()
        dist.destroy_process_group()


def cpu_group():
    """A process group for small CPU tensors, None in a one-process run: the default group under
    gloo, a gloo group beside NCCL (collective: every rank must call it)."""
    if not is_dist():
        return None
    if dist.get_backend() == 'gloo':
        return dist.group.WORLD
    return dist.new_group(backend='gloo')


def gather_objects(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank (any picklable object)."""
    if not is_dist():
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def main_decides(decide):
    """decide() on rank 0 alone (e.g. taking a lock); its result, or the UserError it raised,
    reaches every rank, so all ranks go on or stop together."""
    outcome = [None, None]
    if is_main():
        try:
            outcome[0] = decide()
        except UserError as e:
            outcome[1] = e
    if is_dist():
        dist.broadcast_object_list(outcome, src=0)
    if outcome[1] is not None:
        raise outcome[1]
    return outcome[0]


@torch.no_grad()
def all_gather_cat(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """Concatenate equally shaped tensors of every rank along dim 0 (rank order); no gradient."""
    size = dist.get_world_size(group) if is_dist() else 1
    if size == 1:
        return tensor
    gathered = [torch.empty_like(tensor) for _ in range(size)]
    dist.all_gather(gathered, tensor.contiguous(), group=group)
    return torch.cat(gathered)


def node_size() -> int:
    """Processes on this node: the ranks whose batches shuffle BN mixes."""
    return dist.get_world_size(_node_group) if is_dist() else 1


@torch.no_grad()
def shuffle_across_node(x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Give this rank a random slice of the node's whole batch (MoCo's shuffle BN).

    perm: a permutation of the node batch (node_size() * B rows) on x's device, the same on every
    rank of the node (drawn from a generator seeded alike everywhere). Every rank gathers the node
    batch and keeps its slice of the permuted rows; `unshuffle` undoes it.
    """
    group = _node_group
    if node_size() == 1:
        return x[perm]
    node_batch = all_gather_cat(x, group)  # (size * B, ...)
    rank, b = dist.get_rank(group), x.shape[0]
    return node_batch[perm[rank * b:(rank + 1) * b]]


@torch.no_grad()
def unshuffle(y: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Undo `shuffle_across_node` on the output: return the rows of this rank's original inputs."""
    group = _node_group
    if node_size() == 1:
        return y[torch.argsort(perm)]
    node_out = all_gather_cat(y, group)  # rows in shuffled order
    rank, b = dist.get_rank(group), y.shape[0]
    return node_out[torch.argsort(perm)[rank * b:(rank + 1) * b]]


def _coalesced(tensors, collective):
    """Run `collective` on one flat buffer per dtype holding `tensors`, then copy back."""
    by_dtype = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for group in by_dtype.values():
        flat = torch.cat([t.reshape(-1) for t in group])
        collective(flat)
        for t, piece in zip(group, flat.split([t.numel() for t in group])):
            t.copy_(piece.view_as(t))


@torch.no_grad()
def average_gradients(parameters):
    """Mean of every parameter's gradient over the ranks, as DDP reduces them (sum / world)."""
    if not is_dist():
        return
    world = get_world_size()

    def mean(flat):
        dist.all_reduce(flat)
        flat.div_(world)
    _coalesced([p.grad for p in parameters if p.grad is not None], mean)


@torch.no_grad()
def broadcast_buffers(module):
    """Rank 0's buffers to every rank, as DDP does before each forward (broadcast_buffers=True)."""
    if is_dist():
        _coalesced(list(module.buffers()), lambda flat: dist.broadcast(flat, src=0))
