"""Checks on a CUDA device, before timing, that the fast step computes the released step.

Plain Python (no pytest): prints one PASS/FAIL line per check and exits with status 1 on any
FAIL. ResNet-18 student, ResNet-50 teacher (MoCo v2 head, random weights), 64 px, batch 16,
K = 1024; about half a minute. From the repository root:

    python3 -m benchmarks.check_gpu

1. --fast_views in fp32 against the released five passes, TF32 off in both (otherwise the two
   batch sizes' convolutions round differently): loss within 1e-5, student gradients and every
   state tensor (running statistics of student and teacher, updated weights, queue) within 1e-4
   (relative L2; cuDNN picks other algorithms for a 3x larger batch), with either teacher BatchNorm.
2. The fast mode (bf16, channels_last, --fast_views, cuDNN autotuning) against the reference as
   released (fp32, TF32 convolutions as torch defaults): loss within models.fast.BF16_LOSS_RTOL.
3. The fast step never waits on the host: after warm-up, a step under
   torch.cuda.set_sync_debug_mode('error') raises on any synchronising call.
"""
import sys

import torch

from models import build_backbone, build_student
from models.distill import build_training_module, student_optimizer, train_step
from models.fast import BF16_LOSS_RTOL
from models.heads import Embedder, moco_head

BATCH, IMAGE_SIZE, QUEUE_SIZE = 16, 64, 1024
FAST = dict(precision='bf16', channels_last=True, fast_views=True)


def relative(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def build(device, **options):
    torch.manual_seed(0)
    teacher_backbone = build_backbone('resnet50')
    teacher = Embedder(teacher_backbone, moco_head(teacher_backbone.feature_dim))
    model = build_training_module('bingo', build_student('resnet18'), teacher, queue_size=QUEUE_SIZE,
                                  **options).to(device).train()
    return model, student_optimizer(model, lr=0.03)


def views(device):
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(BATCH, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator).to(device) for _ in range(4)]


def one_step(device, **options):
    """Loss, student gradients and state after one step from fixed weights, inputs and draws."""
    model, optimizer = build(device, **options)
    torch.manual_seed(2)
    loss, _ = train_step(model, optimizer, views(device), lam=(0.5, 0.5))
    grads = torch.cat([p.grad.flatten() for p in model.student.parameters()])
    return loss.item(), grads, {k: v.clone() for k, v in model.state_dict().items()}


def report(ok, message):
    print(f'{"PASS" if ok else "FAIL"} {message}', flush=True)
    return ok


def check_views_are_exact(device, teacher_bn):
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        loss, grads, state = one_step(device, teacher_bn=teacher_bn)
        fast_loss, fast_grads, fast_state = one_step(device, teacher_bn=teacher_bn, fast_views=True)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    loss_diff = abs(fast_loss - loss) / abs(loss)
    grad_diff = relative(fast_grads, grads)
    worst_key = max(state, key=lambda k: relative(fast_state[k], state[k]))
    state_diff = relative(fast_state[worst_key], state[worst_key])
    return report(loss_diff <= 1e-5 and grad_diff <= 1e-4 and state_diff <= 1e-4,
                  f'fp32 --fast_views == released passes (teacher_bn={teacher_bn}): loss rel {loss_diff:.1e} '
                  f'(<= 1e-5), gradients rel {grad_diff:.1e} (<= 1e-4), worst state tensor {worst_key} '
                  f'rel {state_diff:.1e} (<= 1e-4)')


def check_bf16_tolerance(device):
    loss, _, _ = one_step(device)
    torch.backends.cudnn.benchmark = True
    fast_loss, _, _ = one_step(device, **FAST)
    torch.backends.cudnn.benchmark = False
    loss_diff = abs(fast_loss - loss) / abs(loss)
    return report(loss_diff <= BF16_LOSS_RTOL,
                  f'fast mode loss {fast_loss:.6f} vs reference {loss:.6f}: rel {loss_diff:.1e} '
                  f'(<= {BF16_LOSS_RTOL:.0e})')


def check_no_host_sync(device):
    torch.backends.cudnn.benchmark = True
    model, optimizer = build(device, **FAST)
    inputs = views(device)
    for _ in range(2):  # cuDNN autotuning and lazy initialisation happen here
        train_step(model, optimizer, inputs)
    torch.cuda.synchronize(device)
    torch.cuda.set_sync_debug_mode('error')
    try:
        train_step(model, optimizer, inputs)
        error = None
    except RuntimeError as e:
        error = str(e).splitlines()[0]
    finally:
        torch.cuda.set_sync_debug_mode('default')
        torch.backends.cudnn.benchmark = False
    return report(error is None, 'fast step without host synchronisation'
                  + (f': {error}' if error else ''))


def main():
    if not torch.cuda.is_available():
        print('FAIL no CUDA device', flush=True)
        return 1
    device = torch.device('cuda')
    print(f'check_gpu: {torch.cuda.get_device_name(device)}, torch {torch.__version__}', flush=True)
    results = [check_views_are_exact(device, 'train'), check_views_are_exact(device, 'eval'),
               check_bf16_tolerance(device), check_no_host_sync(device)]
    return 0 if all(results) else 1


if __name__ == '__main__':
    sys.exit(main())
