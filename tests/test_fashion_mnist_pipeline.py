"""The README's first command at toy size: scripts/fashion_mnist.sh end to end on real Fashion-MNIST."""
import json
import os
import re
import shutil
import subprocess

import pytest
from PIL import Image

from data import fashion_mnist
from tests.helpers import REPO
from tools import fashion_report
from utils import errors



@pytest.mark.slow  # the README's first command end to end
@pytest.mark.skipif(not os.path.isdir(fashion_mnist.DEFAULT_SOURCE),
                    reason="needs Debian's dataset-fashion-mnist (tools/setup.sh installs it as root)")
def test_pipeline_runs_every_stage_and_reports(tmp_path):
    env = dict(os.environ, DATA=str(tmp_path / 'data'), RUN=str(tmp_path / 'run'),
               TEACHERS=str(tmp_path / 'teachers'), SEEDS='0', TRAIN_PER_CLASS='26', VAL_PER_CLASS='6',
               TEACHER_EPOCHS='1', STUDENT_EPOCHS='1', MOCO_EPOCHS='1', PROBE_EPOCHS='1', BATCH='16', QUEUE='64',
               WORKERS='0', DEVICE='cpu', OMP_NUM_THREADS='1', CUDA_VISIBLE_DEVICES='')
    done = subprocess.run(['bash', 'scripts/fashion_mnist.sh'], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    for stage in ('1/5 teacher', '2/5 bags', '3/5 seed 0 students', '4/5 seed 0 baseline', '5/5 seed 0 evaluation'):
        assert re.search(rf'^== \d+s {stage}', done.stdout, re.M), stage  # with the seconds since the start
    assert 'bag precision' in done.stdout
    report = (tmp_path / 'run' / 'results.md').read_text()
    rows = [line for line in report.splitlines()
            if re.match(r'\| (teacher|BINGO|SEED|DisCo|MoCo|student at) ', line)]
    assert len(rows) == 4 and 'SEED' not in report, report  # the peers only with PEERS=
    assert all(len(re.findall(r'\| \d+\.\d\d ', row)) == 3 for row in rows), report  # linear, kNN k=20, 200
    assert len(re.findall(r'top-1( \(k=\d+\))?: [01] of 1 seeds', report)) == 7, report  # each kNN claim at each k
    assert report in done.stdout and (tmp_path / 'run' / 'seed0' / 'results.md').exists()
    with Image.open(tmp_path / 'run' / 'bags.png') as picture:
        assert picture.height == 8 * (28 * 3 + 6) and picture.width == 6 * (28 * 3 + 6) + 12

    # A second run with the same teacher settings finds the teacher and its bags and trains neither,
    # however it runs (WORKERS, DEVICE: not in the teacher's hash).
    again = subprocess.run(['bash', 'scripts/fashion_mnist.sh'], cwd=REPO, text=True, capture_output=True,
                           env={**env, 'STOP_AFTER': 'bags', 'WORKERS': '1'}, timeout=600)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-3000:]
    assert 'trained before' in again.stdout and 'made before' in again.stdout


@pytest.mark.parametrize('eval_jobs', ['1', '4'])
def test_a_failed_evaluation_names_its_network_after_the_others_finish(tmp_path, eval_jobs):
    # A stand-in for Python that runs nothing: every stage "succeeds" but the teacher's kNN (evaluated first).
    python = tmp_path / 'python'
    python.write_text('#!/bin/bash\necho "ran $* with $OMP_NUM_THREADS threads"\n'
                      'case "$*" in eval_knn.py*--pretrained=*/checkpoint_0*) echo "error: broken" >&2; exit 3;; esac\n')
    python.chmod(0o755)
    env = dict(os.environ, PY=str(python), RUN=str(tmp_path / 'run'), TEACHERS=str(tmp_path / 'teachers'),
               DATA=str(tmp_path / 'data'), EVAL_JOBS=eval_jobs, OMP_NUM_THREADS='8', PEERS='seed,disco')
    done = subprocess.run(['bash', 'scripts/fashion_mnist.sh'], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 1, done.stdout + done.stderr
    assert 'error: seed 0: the evaluation of teacher failed' in done.stderr
    assert '[teacher] error: broken' in done.stdout  # its own message, named
    for network in ('bingo', 'seed', 'disco', 'moco_alone', 'random_init'):  # every other network evaluated
        assert re.search(rf'^\[{network}\] ran main_lincls.py .*--output_dir=\S*/eval/{network}/linear', done.stdout,
                         re.M), network
    assert '[teacher] ran main_lincls.py' not in done.stdout and 'ran tools/fashion_report.py' not in done.stdout
    assert re.search(r'^ran main_distill.py --method=disco .*--output_dir=\S*/seed0/disco ', done.stdout, re.M)
    # The evaluations running at once share the threads; training keeps them all.
    threads = 8 // int(eval_jobs)
    assert re.search(rf'^\[bingo\] ran eval_knn.py .* with {threads} threads$', done.stdout, re.M), done.stdout
    assert re.search(r'^ran main_distill.py --method=bingo .* with 8 threads$', done.stdout, re.M), done.stdout


def test_report_gives_mean_and_std_over_seeds_and_counts_each_claim(tmp_path):
    for seed, (bingo_knn, moco_knn) in enumerate([(70.0, 68.0), (66.0, 67.0)]):
        for name in ('teacher', 'bingo', 'seed', 'disco', 'moco_alone', 'random_init'):
            knn = {'bingo': bingo_knn, 'moco_alone': moco_knn}.get(name, 60.0)
            by_k = {'200': {'top1': 100.0 - knn}, '20': {'top1': knn}}  # as eval_knn.py writes it (sorted keys)
            for protocol, top1, extra in (('linear', 50.0 + seed, {}), ('knn', knn, {'by_k': by_k})):
                folder = tmp_path / f'seed{seed}' / 'eval' / name / protocol
                folder.mkdir(parents=True)
                result = {'top1': top1, 'arch': 'resnet18', 'method': name, 'distill_epochs': 3, **extra}
                (folder / f'result_{protocol}.json').write_text(json.dumps(result))
    runs = [fashion_report.read_run(str(tmp_path / f'seed{seed}')) for seed in (0, 1)]
    table = fashion_report.table(runs)
    bingo = next(line for line in table.splitlines() if line.startswith('| BINGO'))
    assert '| 50.50 +- 0.71 | 68.00 +- 2.83 | 32.00 +- 2.83 |' in bingo  # sample std, n - 1 = 1; k=20 first
    claims = fashion_report.claims(runs)
    assert 'BINGO student > MoCo student alone, kNN top-1 (k=20): 1 of 2 seeds' in claims
    assert 'BINGO student > MoCo student alone, kNN top-1 (k=200): 1 of 2 seeds' in claims  # 30 > 32, 34 > 33
    assert 'BINGO student > MoCo student alone, linear top-1: 0 of 2 seeds' in claims

    # Without the peers' evaluations (PEERS= , the CPU default) their rows go; any other missing is an error.
    for seed in (0, 1):
        for peer in fashion_report.PEERS:
            shutil.rmtree(tmp_path / f'seed{seed}' / 'eval' / peer)
    runs = [fashion_report.read_run(str(tmp_path / f'seed{seed}')) for seed in (0, 1)]
    rows = fashion_report.table(runs).splitlines()[2:]
    assert [row.split(' | ')[0] for row in rows] == ['| teacher', '| BINGO student', '| MoCo student alone',
                                                     '| student at random init']
    (tmp_path / 'seed1' / 'eval' / 'moco_alone' / 'knn' / 'result_knn.json').unlink()
    with pytest.raises(errors.UserError, match=r'seed1/eval/moco_alone/knn/result_knn.json is missing'):
        fashion_report.read_run(str(tmp_path / 'seed1'))
