"""The README's first command at toy size: scripts/fashion_mnist.sh end to end on real Fashion-MNIST."""
import os
import re
import subprocess

import pytest
from PIL import Image

from data import fashion_mnist
from tests.helpers import REPO

pytestmark = pytest.mark.slow  # every test here runs the stage end to end


@pytest.mark.skipif(not os.path.isdir(fashion_mnist.DEFAULT_SOURCE),
                    reason="needs Debian's dataset-fashion-mnist (tools/setup.sh installs it as root)")
def test_pipeline_runs_every_stage_and_reports(tmp_path):
    env = dict(os.environ, DATA=str(tmp_path / 'data'), RUN=str(tmp_path / 'run'), TRAIN_PER_CLASS='26',
               VAL_PER_CLASS='6', TEACHER_EPOCHS='1', STUDENT_EPOCHS='1', PROBE_EPOCHS='1', BATCH='16',
               QUEUE='64', WORKERS='0', DEVICE='cpu', OMP_NUM_THREADS='1', CUDA_VISIBLE_DEVICES='')
    done = subprocess.run(['bash', 'scripts/fashion_mnist.sh'], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    for stage in ('1/5 teacher', '2/5 bags', '3/5 student', '4/5 baseline', '5/5 evaluation'):
        assert f'== {stage}' in done.stdout
    assert 'bag precision' in done.stdout
    report = (tmp_path / 'run' / 'results.md').read_text()
    rows = [line for line in report.splitlines() if re.match(r'\| (teacher|BINGO|MoCo|student at)', line)]
    assert len(rows) == 4, report
    assert all(len(re.findall(r'\| \d+\.\d\d ', row)) == 3 for row in rows), report  # linear 1/5, kNN
    assert report in done.stdout
    with Image.open(tmp_path / 'run' / 'bags.png') as picture:
        assert picture.height == 8 * (28 * 3 + 6) and picture.width == 6 * (28 * 3 + 6) + 12
