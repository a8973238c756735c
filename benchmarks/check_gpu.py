"""Checks on a CUDA device, before timing, that the fast step computes the released step.

Plain Python (no pytest): prints one PASS/FAIL line per check and exits with status 1 on any
FAIL. ResNet-18 student, ResNet-50 teacher (MoCo v2 head, random weights), 64 px, batch 16,
K = 1024; about a minute. From the repository root:

    python3 -m benchmarks.check_gpu

1. --fast_views in fp32 against the released five passes, held to the GPU's own noise floor.
   Both are compared with the same step in float64 (the truth, up to 1e-15). The floor is the
   error of the released step itself and of the released step with channels-last tensors (other
   cuDNN kernels: the same arithmetic, re-associated); --fast_views passes when its error in the
   loss, the student gradients and every state tensor is at most FLOOR_MULTIPLE times the floor.
   (A fixed bound does not work here: cuDNN picks other algorithms for a 3x larger batch, and at
   64 px BatchNorm over 2 x 2 maps amplifies their rounding to ~1e-3 in the gradients: measured
   on an H100 in BENCHMARKS.md.)
2. The fast mode (bf16, channels_last, --fast_views, cuDNN autotuning) against the reference as
   released (fp32, TF32 convolutions as torch defaults): loss within models.fast.BF16_LOSS_RTOL.
3. The CUDA-graph step (--cuda_graphs) replays what the eager step computes: fp32, TF32 off,
   cuDNN deterministic, five steps (three eager warm-up steps, the capture, replays) from the
   same weights and draws. Its losses and final state may differ from the eager step's by at most
   FLOOR_MULTIPLE times what two eager runs differ by (atomics in some kernels), or 1e-6.
4. The fast steps never wait on the host: after warm-up, an eager fast step and a replayed graph
   step under torch.cuda.set_sync_debug_mode('error') raise on any synchronising call.
"""
import dataclasses
import sys

import torch

from models import build_backbone, build_student
from models.distill import build_training_module, student_optimizer
from models.fast import BF16_LOSS_RTOL, TrainStep
from models.heads import Embedder, moco_head

FAST = dict(precision='bf16', channels_last=True, fast_views=True)
FLOOR_MULTIPLE = 4  # --fast_views may be this many times further from float64 than the floor
GRAPH_RTOL = 1e-6  # where two eager runs agree exactly


@dataclasses.dataclass
class Setup:
    student: str = 'resnet18'
    teacher: str = 'resnet50'
    batch: int = 16
    image_size: int = 64
    queue_size: int = 1024


def relative(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def build(setup, device, dtype=torch.float32, mode='ddp', **options):
    torch.manual_seed(0)
    teacher_backbone = build_backbone(setup.teacher)
    teacher = Embedder(teacher_backbone, moco_head(teacher_backbone.feature_dim))
    model = build_training_module('bingo', build_student(setup.student), teacher,
                                  queue_size=setup.queue_size, **options)
    model.to(device, dtype).train()
    return TrainStep(model, student_optimizer(model, lr=0.03), mode)


def views(setup, device, dtype=torch.float32):
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(setup.batch, 3, setup.image_size, setup.image_size, generator=generator)
            .to(device, dtype) for _ in range(4)]


def run_steps(setup, device, steps=1, dtype=torch.float32, mode='ddp', **options):
    """Losses, student gradients and state after `steps` steps from fixed weights, inputs and draws."""
    train_step = build(setup, device, dtype, mode, **options)
    inputs = views(setup, device, dtype)
    torch.manual_seed(2)
    losses = [train_step(inputs, lam=(0.5, 0.5))[0].item() for _ in range(steps)]
    model = train_step.model
    grads = torch.cat([p.grad.flatten() for p in model.student.parameters()])
    state = {k: v.clone() for k, v in model.state_dict().items() if v.is_floating_point()}
    return losses, grads, state


def errors(result, truth):
    """Relative errors of (loss, gradients, each state tensor) against the float64 truth."""
    (loss,), grads, state = result
    (true_loss,), true_grads, true_state = truth
    return (abs(loss - true_loss) / abs(true_loss), relative(grads, true_grads),
            {k: relative(v, true_state[k]) for k, v in state.items()})


def report(ok, message):
    print(f'{"PASS" if ok else "FAIL"} {message}', flush=True)
    return ok


@torch.backends.cudnn.flags(enabled=True, benchmark=False)
def check_views_against_noise_floor(device, teacher_bn, setup=Setup()):
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        truth = run_steps(setup, device, dtype=torch.float64, teacher_bn=teacher_bn)
        released = errors(run_steps(setup, device, teacher_bn=teacher_bn), truth)
        other_kernels = errors(run_steps(setup, device, teacher_bn=teacher_bn, channels_last=True), truth)
        fast = errors(run_steps(setup, device, teacher_bn=teacher_bn, fast_views=True), truth)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    tiny = 1e-12  # where both are exact, the comparison is 0 <= 0
    floor_loss = max(released[0], other_kernels[0], tiny)
    floor_grads = max(released[1], other_kernels[1], tiny)
    floor_state = {k: max(released[2][k], other_kernels[2][k], tiny) for k in released[2]}
    worst = max(fast[2], key=lambda k: fast[2][k] / floor_state[k])
    ok = (fast[0] <= FLOOR_MULTIPLE * floor_loss and fast[1] <= FLOOR_MULTIPLE * floor_grads
          and fast[2][worst] <= FLOOR_MULTIPLE * floor_state[worst])
    return report(ok, f'fp32 --fast_views vs float64 (teacher_bn={teacher_bn}), error / noise floor '
                      f'(<= {FLOOR_MULTIPLE}): loss {fast[0]:.1e} / {floor_loss:.1e}, gradients '
                      f'{fast[1]:.1e} / {floor_grads:.1e}, worst state tensor {worst} {fast[2][worst]:.1e} / '
                      f'{floor_state[worst]:.1e}; the released step itself: gradients {released[1]:.1e}, '
                      f'channels-last kernels {other_kernels[1]:.1e}')


def check_bf16_tolerance(device, setup=Setup()):
    (loss,), _, _ = run_steps(setup, device)
    with torch.backends.cudnn.flags(enabled=True, benchmark=True):
        (fast_loss,), _, _ = run_steps(setup, device, **FAST)
    loss_diff = abs(fast_loss - loss) / abs(loss)
    return report(loss_diff <= BF16_LOSS_RTOL,
                  f'fast mode loss {fast_loss:.6f} vs reference {loss:.6f}: rel {loss_diff:.1e} '
                  f'(<= {BF16_LOSS_RTOL:.0e})')


@torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True)
def check_graph_replays_the_eager_step(device, setup=Setup(), steps=5):
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        eager = run_steps(setup, device, steps, mode='manual', fast_views=True)
        again = run_steps(setup, device, steps, mode='manual', fast_views=True)
        graph = run_steps(setup, device, steps, mode='graph', fast_views=True)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32

    def differences(run):
        return (max(abs(a - e) / abs(e) for a, e in zip(run[0], eager[0])),
                max(relative(run[2][k], v) for k, v in eager[2].items()))
    (loss_floor, state_floor), (loss_diff, state_diff) = differences(again), differences(graph)
    ok = (loss_diff <= max(FLOOR_MULTIPLE * loss_floor, GRAPH_RTOL)
          and state_diff <= max(FLOOR_MULTIPLE * state_floor, GRAPH_RTOL))
    return report(ok, f'CUDA-graph step == eager step over {steps} steps (fp32, TF32 off, cuDNN deterministic): '
                      f'losses rel {loss_diff:.1e}, state rel {state_diff:.1e}; two eager runs: {loss_floor:.1e}, '
                      f'{state_floor:.1e} (<= {FLOOR_MULTIPLE}x that, or {GRAPH_RTOL:.0e})')


def check_no_host_sync(device, mode, setup=Setup()):
    with torch.backends.cudnn.flags(enabled=True, benchmark=True):
        train_step = build(setup, device, mode=mode, **FAST)
        inputs = views(setup, device)
        for _ in range(train_step.warmup_steps + 1):  # autotuning, lazy initialisation, capture
            train_step(inputs, lam=(0.5, 0.5))
        torch.cuda.synchronize(device)
        torch.cuda.set_sync_debug_mode('error')
        try:
            train_step(inputs, lam=(0.5, 0.5))
            error = None
        except RuntimeError as e:
            error = str(e).splitlines()[0]
        finally:
            torch.cuda.set_sync_debug_mode('default')
    return report(error is None, f'{mode} fast step without host synchronisation'
                  + (f': {error}' if error else ''))


def main():
    if not torch.cuda.is_available():
        print('FAIL no CUDA device', flush=True)
        return 1
    device = torch.device('cuda')
    print(f'check_gpu: {torch.cuda.get_device_name(device)}, torch {torch.__version__}', flush=True)
    results = [check_views_against_noise_floor(device, 'train'),
               check_views_against_noise_floor(device, 'eval'),
               check_bf16_tolerance(device), check_graph_replays_the_eager_step(device),
               check_no_host_sync(device, 'ddp'), check_no_host_sync(device, 'graph')]
    return 0 if all(results) else 1


if __name__ == '__main__':
    sys.exit(main())
