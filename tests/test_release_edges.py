"""Stages 2 and 3 at the release's edges: main_distill.py trains the released EfficientNet-B0 student
from a bare bag file as the released compute_knn.py writes it, and main_lincls.py probes that student."""
import os

import numpy as np
import pytest
import torch
from efficientnet_pytorch import EfficientNet

from data.folder import ImageFolder
import main_lincls
from tests.helpers import TINY, distill, outcomes
from utils import checkpoint

pytestmark = pytest.mark.slow  # every test here runs the stage end to end


@pytest.fixture(scope='module')
def released_run(tiny_folder, bingo_inputs, tmp_path_factory):
    """1 epoch of an efficientnet_b0 student from a bare (N, 4) .npy with --clus_pos_num=2."""
    teacher, _ = bingo_inputs
    root = tmp_path_factory.mktemp('released')
    n = len(ImageFolder(os.path.join(tiny_folder, 'train')))
    # No sidecar. Columns 2 and 3 name no image at all: the run succeeds only if, as the released
    # trainer does (imgs_corr[:, :clus_pos_num]), it reads the first two columns alone.
    bags = np.stack([(np.arange(n) + 1) % n, (np.arange(n) + 2) % n,
                     np.full(n, 10 ** 6), np.full(n, -1)], axis=1)
    path = str(root / 'imgs_corr_toy.npy')
    np.save(path, bags)
    out = str(root / 'run')
    result = distill(tiny_folder, out, teacher=teacher, neighbours=path, neighbours_format='released',
                     clus_pos_num=2, arch='efficientnet_b0')
    assert result.returncode == 0, result.stderr[-3000:]
    return out, path, result


def test_training_from_a_bare_released_file_says_what_it_could_not_check(released_run):
    out, path, result = released_run
    assert not os.path.exists(path + '.json')
    line = next(line for line in result.stdout.splitlines() if path in line)
    assert 'released format, 24 x 4, the first 2 columns used' in line
    assert 'NOT checked' in line and 'fingerprint' in line
    state = checkpoint.load(os.path.join(out, 'checkpoint.pth'))
    assert state['epoch'] == 1 and state['arch'] == 'efficientnet_b0'
    assert state['flags']['neighbours_format'] == 'released' and state['flags']['clus_pos_num'] == 2


def test_exported_efficientnet_b0_loads_into_the_package_network(released_run):
    out, _, _ = released_run
    exported = torch.load(os.path.join(out, 'student_backbone.pth'))
    missing, unexpected = EfficientNet.from_name('efficientnet-b0').load_state_dict(exported, strict=False)
    assert sorted(missing) == ['_fc.bias', '_fc.weight'] and not unexpected
    state = checkpoint.load(os.path.join(out, 'checkpoint.pth'))
    assert torch.equal(exported['_conv_stem.weight'], state['student']['backbone._conv_stem.weight'])


def test_linear_probe_of_the_efficientnet_b0_student(released_run, tiny_folder):
    out, _, _ = released_run
    common = TINY + [f'--data_dir={tiny_folder}', '--arch=efficientnet_b0', '--batch_size=8', '--epochs=1']
    probes = outcomes(main_lincls, {
        'checkpoint': common + [f'--pretrained={out}/checkpoint.pth', f'--output_dir={out}/probe_a'],
        'exported': common + [f'--pretrained={out}/student_backbone.pth', f'--output_dir={out}/probe_b'],
    })
    assert [kind for kind, _ in probes.values()] == ['result', 'result'], probes
    # The distillation checkpoint and the exported backbone hold the same tensors: the same probe.
    a, b = (result for _, result in probes.values())
    assert (a['top1'], a['top5']) == (b['top1'], b['top5'])
