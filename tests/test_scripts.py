"""The experiment scripts: one table of teachers (scripts/teachers.sh) read by run_knn.sh and the
launchers, each row script one line. Launches are recorded by a fake torchrun, not run."""
import os
import re
import stat
import subprocess

import pytest

from tests.helpers import REPO
from tests.multiprocess import fake_torchrun, flag_value


def defined_flags(script):
    return set(re.findall(r"DEFINE_\w+\('(\w+)'", open(os.path.join(REPO, script)).read()))


def bash(script, env, *args):
    done = subprocess.run(['bash', script, *args], cwd=REPO, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done


@pytest.fixture
def launcher(tmp_path):
    """(env, launches) of a fake torchrun (tests/multiprocess.py), without the row scripts' variables."""
    env, launches = fake_torchrun(tmp_path)
    for name in ('RUN', 'TEACHER', 'TEACHER_ARCH', 'NEIGHBOURS', 'OUTPUT', 'ARCH', 'KNN_FLAGS', 'RUNS', 'PYTHON'):
        env.pop(name, None)
    return env, launches


def script_args(launch, script):
    return launch[launch.index(script) + 1:]


def test_run_knn_writes_every_bag_file_the_rows_read(launcher):
    env, launches = launcher
    read = set()  # (checkpoint, backbone, bag file) of every BINGO row
    rows = sorted(name for name in os.listdir(os.path.join(REPO, 'scripts/unsupervised'))
                  if name not in ('distill.sh', 'moco_baseline.sh'))
    for row in rows:
        bash(f'scripts/unsupervised/{row}', env)
        [launch] = launches()
        args = script_args(launch, 'main_distill.py')
        if flag_value(args, 'method') == 'bingo':
            read.add((flag_value(args, 'teacher'), flag_value(args, 'teacher_arch'), flag_value(args, 'neighbours')))
    assert len(read) == 4  # MoCo v2 200 / 800 ep, R-152, SwAV R-50w2
    bash('run_knn.sh', env, 'moco200', 'moco800', 'r152', 'swav_w2', '--knn_backend=torch')
    written = launches()
    assert {(flag_value(a, 'teacher'), flag_value(a, 'teacher_arch'), flag_value(a, 'output')) for a in written} == read
    assert all(a[-1] == '--knn_backend=torch' for a in written)
    # The variables of the README's command name any other teacher.
    env.update(TEACHER='t.pth', TEACHER_ARCH='resnet152', OUTPUT='bags/t.npy')
    bash('run_knn.sh', env)
    [launch] = launches()
    assert (flag_value(launch, 'teacher'), flag_value(launch, 'teacher_arch'), flag_value(launch, 'output')) == (
        't.pth', 'resnet152', 'bags/t.npy')
    done = subprocess.run(['bash', 'run_knn.sh', 'moco900'], cwd=REPO, env=env, capture_output=True, text=True)
    assert done.returncode != 0 and "unknown teacher 'moco900'" in done.stderr and not launches()


def test_moco_baseline_calls_the_launcher(launcher):
    env, launches = launcher
    env['ARCH'] = 'resnet34'
    bash('scripts/unsupervised/moco_baseline.sh', env, '--workers=4')
    [launch] = launches()
    args = script_args(launch, 'main_distill.py')
    assert (flag_value(args, 'method'), flag_value(args, 'arch'), flag_value(args, 'output_dir')) == (
        'moco', 'resnet34', 'runs/r34_moco_alone')
    assert flag_value(args, 'teacher') is None and flag_value(args, 'neighbours') is None
    assert args[-1] == '--workers=4' and {arg[2:].split('=')[0] for arg in args} <= defined_flags('main_distill.py')


def test_probe_flags_reach_the_probe_alone(launcher):
    env, launches = launcher
    env['KNN_FLAGS'] = '--knn_backend=torch'
    bash('scripts/lincls/effb0_swav_w2.sh', env, '--workers=4')
    knn, probe = launches()
    knn_args, probe_args = script_args(knn, 'eval_knn.py'), script_args(probe, 'main_lincls.py')
    assert {arg[2:].split('=')[0] for arg in knn_args} <= defined_flags('eval_knn.py')
    assert flag_value(knn_args, 'lr') is None and flag_value(knn_args, 'knn_backend') == 'torch'
    assert (flag_value(probe_args, 'lr'), flag_value(probe_args, 'min_lr'), probe_args[-1]) == (
        '3.0', '0.001', '--workers=4')
    assert flag_value(knn_args, 'pretrained') == flag_value(probe_args, 'pretrained') == (
        'runs/effb0_swav_w2/checkpoint.pth')


def test_collect_takes_the_runs_folder_and_python_from_variables(tmp_path):
    fake_python = tmp_path / 'python'
    fake_python.write_text('#!/usr/bin/env bash\necho "$@"\n')
    fake_python.chmod(fake_python.stat().st_mode | stat.S_IEXEC)
    env = dict(os.environ, PYTHON=str(fake_python), RUNS=str(tmp_path / 'runs'))
    done = bash('scripts/lincls/collect.sh', env, 'more')
    assert done.stdout.split() == [os.path.join(REPO, 'tools/collect_results.py'), str(tmp_path / 'runs'), 'more']
    del env['RUNS']  # the repository's runs/, wherever it is called from
    done = subprocess.run(['bash', os.path.join(REPO, 'scripts/lincls/collect.sh')], cwd=tmp_path, env=env,
                          capture_output=True, text=True)
    assert done.stdout.split() == [os.path.join(REPO, 'tools/collect_results.py'), os.path.join(REPO, 'runs')]
    del env['PYTHON']  # the project's python (or python3) runs the collector
    (tmp_path / 'empty').mkdir()
    env['RUNS'] = str(tmp_path / 'empty')
    done = subprocess.run(['bash', 'scripts/lincls/collect.sh'], cwd=REPO, env=env, capture_output=True, text=True)
    assert done.returncode == 1 and f'result_semi.json below {tmp_path / "empty"}' in done.stderr
