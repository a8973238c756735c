"""The peers SEED and DisCo (docs/peers.md): their training steps in process, and main_distill.py
--method=seed / --method=disco end to end on 2 gloo processes, resumed and uninterrupted."""
import json
import os
import re
import shutil
import subprocess

import pytest
import torch

from data.gpu_augment import sample_view_params
from data.transforms import moco_v2_augmentation
from models import build_student
from models.distill import SEED, DisCo
from models.loss import disco_loss, seed_loss
from tests.multiprocess import fake_torchrun, flag_value
import eval_knn
from tests.helpers import REPO, TINY, distill, outcomes
from tools import collect_results
from utils import checkpoint


def test_seed_step_scores_one_view_against_the_frozen_teacher_and_queues_its_embeddings():
    torch.manual_seed(0)
    student, teacher = build_student('resnet18', hidden_dim=0), build_student('resnet18')
    model = SEED(student, teacher, queue_size=8).train()
    assert not teacher.training and student.head[0].out_features == 512  # SEED's defaults
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    view = torch.randn(4, 3, 32, 32)
    queue = model.queue.keys.clone()
    loss, (acc1, acc5) = model(view)
    loss.backward()
    with torch.no_grad():
        t_view = teacher(view)
        expected = seed_loss(student(view), t_view, queue, 0.2, 1e-4)
    assert torch.allclose(loss, expected, atol=1e-6) and 0 <= acc1 <= acc5 <= 100
    assert torch.allclose(model.queue.keys[:4], t_view, atol=1e-6) and model.queue.ptr.item() == 4
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in student.parameters())
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())


def test_disco_step_is_moco_on_the_student_plus_consistency_with_the_teacher():
    torch.manual_seed(0)
    student, teacher = build_student('resnet18'), build_student('resnet18')
    model = DisCo(student, teacher, queue_size=8, momentum=0.5).train()
    assert teacher.training  # --teacher_bn=local: batch statistics of this process's own batch
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    key_before = [p.clone() for p in model.key_encoder.parameters()]
    query, key = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
    queue = model.queue.keys.clone()
    loss, _ = model(query, key)
    loss.backward()
    for k0, k1, s in zip(key_before, model.key_encoder.parameters(), student.parameters()):
        assert torch.allclose(k1, 0.5 * k0 + 0.5 * s)
    with torch.no_grad():
        momentum_key = model.key_encoder(key)
        expected = disco_loss(student(query), student(key), momentum_key, teacher(query), teacher(key),
                              queue, 0.2, 32.0)
    assert torch.allclose(loss, expected, rtol=1e-5)
    # The queue takes the momentum encoder's keys, not the teacher's.
    assert torch.allclose(model.queue.keys[:4], momentum_key, atol=1e-5)
    assert all(p.grad is None for p in (*teacher.parameters(), *model.key_encoder.parameters()))
    assert all(p.grad is not None for p in student.parameters())


def test_crop_min_scale_reaches_the_cpu_and_the_device_views():
    # SEED's release crops from 0.14 of the area with a SwAV teacher (--crop_min_scale=0.14).
    assert tuple(moco_v2_augmentation(32, min_scale=0.14).transforms[0].scale) == (0.14, 1.0)
    sizes = torch.tensor([[100, 100]] * 500)
    draws = {scale: sample_view_params(sizes, torch.Generator().manual_seed(0), min_scale=scale).boxes
             for scale in (0.2, 0.9)}
    area = {scale: (boxes[:, 2] * boxes[:, 3]).float() / 100 ** 2 for scale, boxes in draws.items()}
    assert area[0.9].min() > 0.88 and area[0.2].min() < 0.25  # rounding aside, the share drawn


# --- main_distill.py end to end -------------------------------------------------------------

@pytest.fixture(scope='module')
def teacher_file(tmp_path_factory):
    """A resnet18 teacher in this project's checkpoint layout."""
    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp('peer_teacher') / 'teacher.pth')
    torch.save({'student': build_student('resnet18').state_dict(), 'arch': 'resnet18'}, path)
    return path


@pytest.fixture(scope='module', params=['seed', 'disco'])
def peer_run(request, tiny_folder, teacher_file, tmp_path_factory):
    """Two epochs on 2 processes, checkpoint_0001.pth kept for the resume test."""
    method = request.param
    out = str(tmp_path_factory.mktemp(method) / 'run')
    result = distill(tiny_folder, out, nproc=2, method=method, teacher=teacher_file, epochs=2,
                     save_freq=1, queue_size=16)
    assert result.returncode == 0, result.stderr[-3000:]
    return method, out, result


@pytest.mark.slow
def test_two_processes_train_each_peer_with_its_released_defaults(peer_run):
    method, out, result = peer_run
    first = checkpoint.load(os.path.join(out, 'checkpoint_0001.pth'))
    last = checkpoint.load(os.path.join(out, 'checkpoint.pth'))
    assert first['method'] == last['method'] == method and last['epoch'] == 2
    # 24 images / global batch 8 = 3 steps an epoch, each pushing the keys of BOTH ranks into K = 16.
    assert first['queue']['ptr'].item() == 24 % 16 and last['queue']['ptr'].item() == 48 % 16
    hidden = last['student']['head.0.weight'].shape[0]
    if method == 'seed':
        assert hidden == 512 and last['flags']['teacher_bn'] == 'eval' and 'key_encoder' not in last
    else:
        assert hidden == 2048 and last['flags']['teacher_bn'] == 'local'
        assert not torch.equal(last['key_encoder']['backbone.conv1.weight'],
                               last['student']['backbone.conv1.weight'])  # it lags by momentum
    lines = [json.loads(line) for line in open(os.path.join(out, 'metrics.jsonl'))]
    assert [line['step'] for line in lines] == [1, 2, 3, 1, 2, 3]
    assert all(torch.isfinite(torch.tensor(line['loss'])) for line in lines)
    assert f'{method}: student resnet18' in result.stdout


@pytest.mark.slow
def test_resumed_peer_run_ends_like_an_uninterrupted_one(peer_run, tiny_folder, teacher_file, tmp_path):
    method, out, _ = peer_run
    resumed = str(tmp_path / 'resumed')
    os.makedirs(resumed)
    shutil.copy(os.path.join(out, 'checkpoint_0001.pth'), os.path.join(resumed, 'checkpoint.pth'))
    result = distill(tiny_folder, resumed, nproc=2, method=method, teacher=teacher_file, epochs=2,
                     save_freq=1, queue_size=16, resume='auto')
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'resumed from' in result.stdout
    a = checkpoint.load(os.path.join(resumed, 'checkpoint.pth'))
    b = checkpoint.load(os.path.join(out, 'checkpoint.pth'))
    assert a['epoch'] == b['epoch'] == 2
    assert torch.allclose(a['queue']['keys'], b['queue']['keys'], atol=1e-5)
    for part in ('student', 'key_encoder') if method == 'disco' else ('student',):
        for key, value in a[part].items():
            assert torch.allclose(value.float(), b[part][key].float(), atol=1e-5), (part, key)


@pytest.mark.slow
def test_collector_tables_a_peer_run_under_its_method_and_teacher(peer_run, tiny_folder, capsys):
    method, out, _ = peer_run
    knn = [f'--data_dir={tiny_folder}', f'--pretrained={out}/checkpoint.pth', f'--output_dir={out}/knn',
           '--knn_k=5', '--knn_backend=torch', '--batch_size=8', *TINY]
    assert outcomes(eval_knn, {'knn': knn})['knn'][0] == 'result'
    capsys.readouterr()  # the evaluation's own lines
    collect_results.main([out])
    row = [cell.strip() for cell in capsys.readouterr().out.splitlines()[2].strip('|').split('|')]
    name = collect_results.PEERS[method]
    assert row[1:4] == [f'{name}, resnet18 (teacher.pth)', 'resnet18', '2']
    # The ImageNet rows: the R-50w2 teacher's label finds the paper's number.
    label = collect_results.teacher_label({'method': method, 'teacher_arch': 'resnet50w2',
                                           'teacher': 'swav_RN50w2_400ep_pretrain.pth.tar'})
    assert label == f'{name}, SwAV R-50w2'
    assert collect_results.PAPER[(label, 'resnet18')][0] == {'seed': 63.0, 'disco': 65.2}[method]


@pytest.mark.slow
def test_a_peer_without_a_teacher_is_refused(tiny_folder, tmp_path):
    result = distill(tiny_folder, str(tmp_path / 'run'), method='disco')
    assert result.returncode != 0 and '--method=disco needs --teacher' in result.stderr


def test_row_scripts_launch_each_method_through_the_shared_launchers(tmp_path):
    env, recorded = fake_torchrun(tmp_path)
    env.pop('METHOD', None)
    defined = set(re.findall(r"DEFINE_\w+\('(\w+)'", open(os.path.join(REPO, 'main_distill.py')).read()))
    for row, method in (('r18_swav_w2_seed', 'seed'), ('r34_swav_w2_seed', 'seed'), ('r18_swav_w2_disco', 'disco'),
                        ('r34_swav_w2_disco', 'disco'), ('r18_swav_w2', 'bingo')):
        done = subprocess.run(['bash', f'scripts/unsupervised/{row}.sh', '--workers=4'], cwd=REPO, env=env,
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        [launch] = recorded()
        args = launch[launch.index('main_distill.py') + 1:]
        assert (flag_value(args, 'method'), flag_value(args, 'output_dir'), flag_value(args, 'teacher_arch')) == (
            method, f'runs/{row}', 'resnet50w2')
        assert (flag_value(args, 'neighbours') is not None) == (method == 'bingo')
        assert flag_value(args, 'crop_min_scale') == ('0.14' if method == 'seed' else None)
        assert args[-1] == '--workers=4' and {arg[2:].split('=')[0] for arg in args} <= defined
        if method != 'bingo':  # the linear probe's row reads the same run
            done = subprocess.run(['bash', f'scripts/lincls/{row}.sh'], cwd=REPO, env=env,
                                  capture_output=True, text=True)
            assert done.returncode == 0, done.stderr
            assert [flag_value(a, 'pretrained') for a in recorded()] == [f'runs/{row}/checkpoint.pth'] * 2
