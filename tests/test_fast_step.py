"""The fast training step computes the released loss: per-view BatchNorm, batched views, bf16, compile."""
import json
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._dynamo.utils import counters

from benchmarks import bench_step
from models import build_student
from models.distill import build_training_module, student_optimizer
from models.fast import BF16_LOSS_RTOL, TrainStep, batch_norm_views, per_view_batch_norm
from models.heads import Embedder, moco_head
from tests.multiprocess import run_on_processes


def relative(a, b):
    """|a - b| / |b| over the whole tensor (L2)."""
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize('cls, shape, momentum', [
    (nn.BatchNorm2d, (4, 3, 5, 5), 0.1),
    (nn.BatchNorm2d, (4, 3, 5, 5), None),  # cumulative average: uses num_batches_tracked
    (nn.BatchNorm1d, (4, 6), 0.1),
])
def test_one_batched_pass_equals_three_separate_passes(cls, shape, momentum):
    torch.manual_seed(0)
    separate = cls(shape[1], momentum=momentum)
    with torch.no_grad():
        separate.weight.uniform_(0.5, 2)
        separate.bias.normal_()
        separate.running_mean.normal_()
        separate.running_var.uniform_(0.5, 2)
    batched = per_view_batch_norm(nn.Sequential(cls(shape[1], momentum=momentum)))
    batched.load_state_dict({'0.' + k: v for k, v in separate.state_dict().items()})
    views = [torch.randn(shape) * (i + 1) + i for i in range(3)]  # different statistics per view
    weights = torch.randn(3 * shape[0], *shape[1:])

    x = [v.clone().requires_grad_() for v in views]
    y_separate = torch.cat([separate(v) for v in x])
    (y_separate * weights).sum().backward()
    x_batched = torch.cat(views).requires_grad_()
    with batch_norm_views(batched, 3):
        y_batched = batched(x_batched)
    (y_batched * weights).sum().backward()

    assert torch.allclose(y_batched, y_separate, atol=1e-6)
    assert torch.allclose(x_batched.grad, torch.cat([v.grad for v in x]), atol=1e-6)
    for key, value in separate.state_dict().items():  # running stats: three updates in view order
        assert torch.allclose(batched.state_dict()['0.' + key].float(), value.float(), atol=1e-6), key
    assert batched[0].num_batches_tracked.item() == 3
    assert torch.allclose(batched[0].weight.grad, separate.weight.grad, atol=1e-5)
    assert torch.allclose(batched[0].bias.grad, separate.bias.grad, atol=1e-5)
    # A whole-batch BatchNorm would differ: the test can tell the two apart.
    assert not torch.allclose(F.batch_norm(torch.cat(views), None, None, training=True), y_separate, atol=1e-3)


def test_swap_keeps_names_tensors_and_behaviour_outside_the_context():
    torch.manual_seed(0)
    student = build_student('resnet18')
    tensors = {k: v.data_ptr() for k, v in student.state_dict().items()}
    x = torch.randn(4, 3, 16, 16)
    expected = student(x)
    per_view_batch_norm(student)
    assert {k: v.data_ptr() for k, v in student.state_dict().items()} == tensors
    assert type(student.backbone.bn1).__name__ == 'PerViewBatchNorm2d'
    assert torch.allclose(student(x), expected, atol=1e-6)  # plain BatchNorm outside the context
    assert student.backbone.bn1.views == 1
    with batch_norm_views(student, 3), pytest.raises(ValueError, match='4 rows is not 3 equal views'):
        student(x)
    assert student.backbone.bn1.views == 1  # restored after an error too


def _step(fast_views=False, precision='fp32', channels_last=False, bag_loss='released',
          teacher_bn='train', compile_backend=None, network=build_student, steps=1, size=16, batch=4,
          queue_size=32, seed=0):
    """Loss, student gradients and state after `steps` train_steps from fixed weights and inputs."""
    torch.manual_seed(seed)
    model = build_training_module('bingo', network('resnet18'), network('resnet18'), queue_size=queue_size,
                                  bag_loss=bag_loss, teacher_bn=teacher_bn, precision=precision,
                                  channels_last=channels_last, fast_views=fast_views,
                                  compile_backend=compile_backend).train()
    train_step = TrainStep(model, student_optimizer(model, lr=0.03))
    generator = torch.Generator().manual_seed(seed + 1)
    views = [torch.randn(batch, 3, size, size, generator=generator) for _ in range(4)]
    torch.manual_seed(seed + 2)  # the same CutMix box and shuffles in both paths
    losses = [train_step(views, lam=(0.5, 0.5))[0].item() for _ in range(steps)]
    grads = torch.cat([p.grad.flatten() for p in model.student.parameters()])
    return losses, grads, {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize('bag_loss', ['released', 'paper'])
@pytest.mark.parametrize('teacher_bn', ['train', 'eval'])
def test_fast_views_step_equals_the_released_step(bag_loss, teacher_bn):
    losses, grads, state = _step(bag_loss=bag_loss, teacher_bn=teacher_bn)
    fast_losses, fast_grads, fast_state = _step(fast_views=True, bag_loss=bag_loss, teacher_bn=teacher_bn)
    assert abs(fast_losses[0] - losses[0]) <= 1e-5 * abs(losses[0])
    assert relative(fast_grads, grads) <= 1e-5
    assert fast_state.keys() == state.keys()
    for key, value in state.items():  # student and teacher running stats, updated weights, queue
        assert relative(fast_state[key], value) <= 1e-5, key
    assert fast_state['student.backbone.bn1.num_batches_tracked'].item() == (2 if bag_loss == 'paper' else 3)


def test_bf16_fast_mode_loss_is_within_the_documented_tolerance():
    # The setting of the measurement documented with BF16_LOSS_RTOL.
    (loss,), _, _ = _step(size=32, batch=8, queue_size=4096)
    (fast_loss,), _, _ = _step(size=32, batch=8, queue_size=4096, fast_views=True, precision='bf16',
                               channels_last=True)
    assert fast_loss != loss  # bf16 really ran
    assert abs(fast_loss - loss) <= BF16_LOSS_RTOL * abs(loss)


def _tiny_embedder(arch=None):
    """conv -> BatchNorm -> ReLU -> pool and the MoCo head: compiles in seconds on a CPU."""
    del arch
    backbone = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return Embedder(backbone, moco_head(8, 16, 8))


def test_compiled_fast_views_step_equals_the_released_step():
    # aot_eager traces like inductor (graph capture, functionalised running-stat updates) and
    # runs the captured graph without generating code.
    losses, _, state = _step(network=_tiny_embedder, steps=3)
    torch._dynamo.reset()
    counters.clear()
    fast_losses, _, fast_state = _step(network=_tiny_embedder, steps=3, fast_views=True,
                                       compile_backend='aot_eager')
    assert dict(counters['frames']) == {'total': 2, 'ok': 2}  # student and teacher, never recompiled
    assert fast_losses == pytest.approx(losses, rel=1e-5)
    for key, value in state.items():
        assert relative(fast_state[key], value) <= 1e-5, key


# (fast_views, TrainStep mode): the released step with DDP, then the fast views with DDP and with the
# hand-made collectives that a CUDA graph replays.
_TWO_PROCESS_STEPS = [(False, 'ddp'), (True, 'ddp'), (True, 'manual')]


def _two_process_step(rank, out_dir):
    torch.set_num_threads(1)
    for fast_views, mode in _TWO_PROCESS_STEPS:
        torch.manual_seed(0)
        model = build_training_module('bingo', _tiny_embedder(), _tiny_embedder(), queue_size=16,
                                      fast_views=fast_views).train()
        if rank == 1:  # unlike rank 0's: DDP's (and the hand-made) buffer broadcast must undo it
            model.student.backbone[1].running_mean.fill_(5.0)
        train_step = TrainStep(model, student_optimizer(model, lr=0.03), mode)
        generator = torch.Generator().manual_seed(10 + rank)  # each rank its own samples
        views = [torch.randn(4, 3, 16, 16, generator=generator) for _ in range(4)]
        torch.manual_seed(1 + rank)  # each rank its own CutMix box; the shuffles are node-wide
        loss, _ = train_step(views, lam=(0.5, 0.5))
        torch.save({'loss': loss.detach(), 'queue': model.queue.keys, 'conv': model.student.backbone[0].weight,
                    'running_mean': model.student.backbone[1].running_mean},
                   os.path.join(out_dir, f'rank{rank}_{int(fast_views)}{mode}.pt'))


@pytest.mark.slow
def test_fast_views_and_graph_collectives_with_shuffle_bn_on_two_processes(tmp_path):
    run_on_processes(_two_process_step, 2, (str(tmp_path),))
    losses = []
    for rank in (0, 1):
        released, *fast_steps = (torch.load(tmp_path / f'rank{rank}_{int(f)}{m}.pt') for f, m in _TWO_PROCESS_STEPS)
        for fast in fast_steps:
            assert relative(fast['loss'], released['loss']) <= 1e-5
            assert relative(fast['queue'], released['queue']) <= 1e-5  # both ranks' anchor keys, gathered
            assert relative(fast['conv'], released['conv']) <= 1e-5  # gradients reduced across ranks alike
            assert relative(fast['running_mean'], released['running_mean']) <= 1e-5  # rank 0's, broadcast
        losses.append(released['loss'])
    assert losses[0] != losses[1]  # the ranks really had different samples


def test_moco_refuses_fast_views():
    with pytest.raises(ValueError, match='fast_views applies to method=bingo'):
        build_training_module('moco', build_student('resnet18'), fast_views=True)


def test_step_benchmark_times_and_checks_the_modes_on_cpu(tmp_path, capsys):
    status = bench_step.main(['--device=cpu', '--teacher_arch=resnet18', '--image_size=16',
                              '--batch_size=8', '--queue_size=1024', '--warmup=1', '--steps=1',
                              '--modes=views,fast', f'--json={tmp_path / "step.json"}'])
    lines = capsys.readouterr().out.splitlines()
    assert status == 0
    assert [line.split()[0] for line in lines[2:5]] == ['reference', 'views', 'fast']
    assert [line.split()[:2] for line in lines[5:]] == [['PASS', 'views:'], ['PASS', 'fast:']]
    record = json.loads((tmp_path / 'step.json').read_text())
    assert [r['mode'] for r in record['results']] == ['reference', 'views', 'fast']
    assert record['results'][2]['flags'] == '--precision=bf16 --channels_last --cudnn_benchmark --fast_views'


def test_fast_views_error_is_within_the_noise_floor_of_the_released_step():
    # benchmarks/check_gpu.py's first check, on the CPU at a small size: both paths against the
    # float64 step; the floor is the released step's own error and that of other (channels-last)
    # kernels.
    from benchmarks import check_gpu
    setup = check_gpu.Setup(student='resnet18', teacher='resnet18', batch=8, image_size=32, queue_size=256)
    assert check_gpu.check_views_against_noise_floor(torch.device('cpu'), 'train', setup)
