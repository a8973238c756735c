"""Stage 2: the BINGO step in process, and main_distill.py end to end on 1 and 2 gloo processes."""
import json
import os
import shutil
import socket

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision

from data.folder import ImageFolder
from data.neighbours import save_neighbours
from models import build_student
from models.distill import BingoDistiller, MoCo
from models.loss import bingo_paper_loss
from tests.helpers import distill
from utils import atomic, checkpoint, preemption, rundir


def test_step_pushes_teacher_anchor_keys_and_leaves_the_teacher_frozen():
    torch.manual_seed(0)
    student, teacher = build_student('resnet18'), build_student('resnet18')
    model = BingoDistiller(student, teacher, queue_size=8, teacher_bn='eval').train()
    assert not teacher.training  # --teacher_bn=eval keeps running statistics in train()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    views = [torch.randn(4, 3, 32, 32) for _ in range(4)]
    loss, (acc1, acc5) = model(*views)
    loss.backward()
    assert torch.isfinite(loss) and 0 <= acc1 <= acc5 <= 100
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in student.parameters())
    with torch.no_grad():
        assert torch.allclose(model.queue.keys[:4], teacher(views[1]), atol=1e-6)
    assert model.queue.ptr.item() == 4
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())


def test_paper_loss_is_both_views_against_the_teacher_anchor_key():
    torch.manual_seed(0)
    student, teacher = build_student('resnet18'), build_student('resnet18')
    model = BingoDistiller(student, teacher, queue_size=8, bag_loss='paper', teacher_bn='eval').train()
    anchor, anchor_key, neighbour = (torch.randn(4, 3, 32, 32) for _ in range(3))
    queue = model.queue.keys.clone()
    # The teacher's neighbour key is never used: any tensor there gives the same loss.
    loss, _ = model(anchor, anchor_key, neighbour, torch.full((4, 3, 32, 32), float('nan')))
    with torch.no_grad():
        expected = bingo_paper_loss(student(anchor), student(neighbour), teacher(anchor_key), queue)
    assert torch.allclose(loss, expected, atol=1e-6)


def test_moco_with_the_batch_keys_alone_contrasts_each_query_with_the_batch():
    torch.manual_seed(0)
    model = MoCo(build_student('resnet18'), queue_size=0, momentum=0.0, batch_keys=True).train()
    query, key = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
    loss, _ = model(query, key)
    # momentum 0: the key encoder is the student itself (its BatchNorm over the key batch)
    with torch.no_grad():
        s, t = model.student(query), model.teacher(key)
    expected = F.cross_entropy(s @ t.t() / model.temperature, torch.arange(4))
    assert torch.allclose(loss, expected, atol=1e-5) and model.queue.keys.shape == (0, 128)
    loss.backward()
    assert all(p.grad is None for p in model.teacher.parameters())


def test_moco_teacher_follows_the_student_by_momentum():
    torch.manual_seed(0)
    model = MoCo(build_student('resnet18'), queue_size=8, momentum=0.5)
    with torch.no_grad():
        for p in model.student.parameters():
            p.add_(1.0)
    t_before = [p.clone() for p in model.teacher.parameters()]
    model(torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32))
    for t0, t1, s in zip(t_before, model.teacher.parameters(), model.student.parameters()):
        assert torch.allclose(t1, 0.5 * t0 + 0.5 * s)


# --- main_distill.py end to end -------------------------------------------------------------

@pytest.fixture(scope='module')
def two_process_run(tiny_folder, bingo_inputs, tmp_path_factory):
    teacher, bags = bingo_inputs
    out = str(tmp_path_factory.mktemp('distill') / 'run')
    result = distill(tiny_folder, out, nproc=2, teacher=teacher, neighbours=bags)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


@pytest.mark.slow
def test_two_processes_train_gather_the_queue_and_export(two_process_run):
    out, result = two_process_run
    state = checkpoint.load(os.path.join(out, 'checkpoint.pth'))
    assert state['epoch'] == 1 and state['arch'] == 'resnet18'
    # 24 images / global batch 8 = 3 steps; each pushes the keys of BOTH ranks (8) into K = 16.
    assert state['queue']['ptr'].item() == (3 * 8) % 16
    assert torch.allclose(state['queue']['keys'].norm(dim=1), torch.ones(16), atol=1e-5)
    lines = [json.loads(line) for line in open(os.path.join(out, 'metrics.jsonl'))]
    assert [line['step'] for line in lines] == [1, 2, 3]
    assert {'loss', 'acc1', 'acc5', 'lr', 'samples_per_s', 'eta_s', 'epoch'} <= set(lines[0])
    assert '[3/3]' in result.stdout and 'eta' in result.stdout
    # The exported student loads into torchvision's own model, only the classifier missing.
    exported = torch.load(os.path.join(out, 'student_backbone.pth'))
    missing, unexpected = torchvision.models.resnet18().load_state_dict(exported, strict=False)
    assert sorted(missing) == ['fc.bias', 'fc.weight'] and not unexpected
    assert torch.equal(exported['conv1.weight'], state['student']['backbone.conv1.weight'])
    assert os.path.exists(os.path.join(out, 'checkpoint_0001.pth'))  # the last epoch is kept


def test_checkpoint_freq_writes_checkpoint_pth_every_that_many_epochs_and_at_the_last(tiny_folder, tmp_path,
                                                                                       monkeypatch):
    import main_distill
    from tests.helpers import TINY, parse
    written = []  # (epochs done, whether checkpoint_<epoch>.pth was kept) of each write
    save_run = checkpoint.save_run
    monkeypatch.setattr(checkpoint, 'save_run', lambda out, run, keep, backbone: (
        written.append((run.epoch, keep)), save_run(out, run, keep, backbone)))
    main_distill.run(parse(main_distill, TINY + [
        '--method=moco', f'--data_dir={tiny_folder}', f'--output_dir={tmp_path / "run"}', '--batch_size=8',
        '--queue_size=16', '--epochs=5', '--checkpoint_freq=2', '--save_freq=3', '--report_freq=100']))
    assert written == [(2, False), (3, True), (4, False), (5, True)]  # epoch 1 is not written
    assert checkpoint.load(str(tmp_path / 'run' / 'checkpoint.pth'))['epoch'] == 5


def test_every_flag_either_defines_the_run_or_only_how_it_runs():
    import main_distill
    names = set(main_distill.FLAGS)
    assert set(main_distill.RUN_FLAGS) | set(main_distill.HOW_FLAGS) == names
    assert not set(main_distill.RUN_FLAGS) & set(main_distill.HOW_FLAGS)


def _same_training_state(a, b):
    return torch.equal(a['queue']['keys'], b['queue']['keys']) and all(
        torch.equal(value, b['student'][key]) for key, value in a['student'].items())


@pytest.mark.slow
def test_a_run_stopped_mid_epoch_resumes_to_the_uninterrupted_result(tiny_folder, bingo_inputs, two_process_run,
                                                                       tmp_path):
    teacher, bags = bingo_inputs
    out = str(tmp_path / 'stopped')
    # Rank 0 alone gets SIGTERM after step 2 of 3: both ranks finish that step, save it and exit.
    # A loader worker per rank, where the uninterrupted run had none: the data must not differ.
    command = dict(teacher=teacher, neighbours=bags, workers=1)
    result = distill(tiny_folder, out, nproc=2, env={preemption.TEST_SIGTERM_ENV: '2'}, **command)
    # A rank ends with this line and status 75 (torchrun reports that as a failure).
    assert 'main_distill.py: stopped: SIGTERM at epoch 0 step 2/3;' in result.stderr
    assert f'exitcode  : {preemption.PREEMPTED_EXIT}' in result.stderr
    stopped = checkpoint.load(os.path.join(out, 'checkpoint.pth'))
    assert (stopped['epoch'], stopped['step'], len(stopped['rng'])) == (0, 2, 2)
    assert sorted(os.listdir(out)) == ['checkpoint.pth', 'metrics.jsonl']  # no lock, no temporary
    # The same command again resumes it (no --resume needed) and ends exactly where the
    # uninterrupted run ended.
    result = distill(tiny_folder, out, nproc=2, **command)
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'resuming it, as --resume=auto' in result.stdout and 'at epoch 0 step 2' in result.stdout
    resumed = checkpoint.load(os.path.join(out, 'checkpoint.pth'))
    assert _same_training_state(resumed, checkpoint.load(os.path.join(two_process_run[0], 'checkpoint.pth')))
    # A finished run is left as it is.
    before = {name: open(os.path.join(out, name), 'rb').read() for name in os.listdir(out)}
    result = distill(tiny_folder, out, **command)
    assert result.returncode == 0 and 'nothing to do' in result.stdout
    assert {name: open(os.path.join(out, name), 'rb').read() for name in os.listdir(out)} == before


@pytest.mark.slow
def test_resuming_with_flags_that_change_the_run_is_refused(tiny_folder, bingo_inputs, two_process_run, tmp_path):
    teacher, bags = bingo_inputs
    out = str(tmp_path / 'changed')
    shutil.copytree(two_process_run[0], out)
    result = distill(tiny_folder, out, teacher=teacher, neighbours=bags, lr=0.1, queue_size=8, workers=1,
                     resume='auto')
    assert result.returncode == 1 and len(result.stderr.splitlines()) == 1
    assert '--lr: 0.03 -> 0.1; --queue_size: 16 -> 8' in result.stderr
    assert '--workers' not in result.stderr  # how a run runs may change


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tiny_folder, bingo_inputs, two_process_run, tmp_path):
    teacher, bags = bingo_inputs
    out = str(tmp_path / 'nan')
    shutil.copytree(two_process_run[0], out)
    good = checkpoint.load(os.path.join(out, 'checkpoint.pth'))
    # The first epoch of a run whose later epochs diverge.
    good['flags'].update(lr=1e30, epochs=3)
    atomic.save_atomic(good, os.path.join(out, 'checkpoint.pth'))
    # With a loader worker: the error exit must not wait on workers that ignore SIGTERM (they leave
    # preemption to the main process), as it did before run() ended the kept workers (stop_workers).
    result = distill(tiny_folder, out, teacher=teacher, neighbours=bags, epochs=3, lr=1e30, workers=1)
    assert result.returncode != 0 and 'loss is nan' in result.stderr
    kept = checkpoint.load(os.path.join(out, 'checkpoint.pth'))
    assert kept['epoch'] == good['epoch'] == 1
    assert torch.equal(kept['student']['backbone.conv1.weight'], good['student']['backbone.conv1.weight'])


@pytest.mark.slow
@pytest.mark.parametrize('augmentation', ['moco_v2', 'greyscale'])
def test_moco_method_trains_from_scratch_with_the_device_data_pipeline(tiny_folder, tmp_path, augmentation):
    # --data_pipeline=gpu on the CPU: workers read the files, views are drawn batched on the device.
    out = str(tmp_path / 'moco')
    result = distill(tiny_folder, out, method='moco', data_pipeline='gpu', augmentation=augmentation)
    assert result.returncode == 0, result.stderr[-3000:]
    state = checkpoint.load(os.path.join(out, 'checkpoint.pth'))
    assert state['method'] == 'moco' and 'teacher' in state
    assert state['queue']['ptr'].item() == (3 * 8) % 16


@pytest.mark.slow
@pytest.mark.parametrize('flags, message', [
    (dict(queue_size=12), '--queue_size=12 must be a multiple'),
    (dict(neighbours=None), '--method=bingo needs --teacher and --neighbours'),
    (dict(batch_size=32, queue_size=32), '--batch_size=32 exceeds the 24 images'),
    (dict(queue_size=24), '--queue_size=24 is not below the 24 images'),  # each key its own negative
    (dict(queue_size=0), '--queue_size=0 leaves no negatives'),
])
def test_bad_flags_are_refused(tiny_folder, bingo_inputs, tmp_path, flags, message):
    teacher, bags = bingo_inputs
    options = {'teacher': teacher, 'neighbours': bags, **flags}
    result = distill(tiny_folder, str(tmp_path / 'run'), **{k: v for k, v in options.items() if v is not None})
    assert result.returncode != 0 and message in result.stderr and 'Traceback' not in result.stderr


@pytest.mark.slow
def test_neighbour_file_of_another_dataset_is_refused(tiny_folder, bingo_inputs, tmp_path):
    teacher, _ = bingo_inputs
    n = len(ImageFolder(os.path.join(tiny_folder, 'train')))
    bags = str(tmp_path / 'other.npy')
    save_neighbours(bags, np.stack([(np.arange(n) + 1) % n] * 3, axis=1), {'dataset_fingerprint': 'f' * 64})
    result = distill(tiny_folder, str(tmp_path / 'run'), teacher=teacher, neighbours=bags)
    assert result.returncode != 0 and 'other.npy' in result.stderr and 'f' * 12 in result.stderr


@pytest.mark.slow
def test_a_second_run_on_a_locked_output_dir_is_refused(tiny_folder, bingo_inputs, tmp_path):
    teacher, bags = bingo_inputs
    out = tmp_path / 'busy'
    out.mkdir()
    holder = {'host': socket.gethostname(), 'pid': os.getpid(), 'started': 'now', 'command': 'pytest'}
    (out / rundir.LOCK).write_text(json.dumps(holder))
    result = distill(tiny_folder, str(out), teacher=teacher, neighbours=bags)
    assert result.returncode == 1 and f'is in use by pid {os.getpid()}' in result.stderr
    assert os.listdir(out) == [rundir.LOCK]

