"""Stage 1 end to end: knn_extract.py on real pixels, 1 and 2 processes, and its bad inputs."""
import json
import os
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from data.folder import ImageFolder
from data.transforms import eval_transform
from models import build_backbone, load_pretrained
from tests.helpers import run_script

pytestmark = pytest.mark.slow  # every test here runs the stage end to end


def extract(data_dir, teacher, output, nproc=1, **flags):
    options = dict(data_dir=data_dir, teacher=teacher, teacher_arch='resnet18', output=output,
                   image_size=32, batch_size=6, workers=0, device='cpu', clus_pos_num=3)
    return run_script('knn_extract.py', nproc, **{**options, **flags})


@pytest.fixture(scope='module')
def teacher_file(tmp_path_factory):
    """A resnet18 backbone in the plain torchvision layout (fc included, as torchvision saves it)."""
    torch.manual_seed(0)
    backbone = build_backbone('resnet18')
    state = dict(backbone.state_dict(), **{'fc.weight': torch.zeros(10, 512), 'fc.bias': torch.zeros(10)})
    path = tmp_path_factory.mktemp('teacher') / 'resnet18_teacher.pth'
    torch.save(state, path)
    return str(path)


@pytest.fixture(scope='module')
def one_process_result(tiny_folder, teacher_file, tmp_path_factory):
    output = str(tmp_path_factory.mktemp('bags') / 'bags.npy')
    result = extract(tiny_folder, teacher_file, output)
    assert result.returncode == 0, result.stderr[-3000:]
    return output, result.stdout


def test_neighbours_are_the_exact_nearest_by_index(tiny_folder, teacher_file, one_process_result):
    output, stdout = one_process_result
    neighbours = np.load(output)
    folder = ImageFolder(os.path.join(tiny_folder, 'train'), transform=eval_transform(32))
    assert neighbours.shape == (len(folder), 3) and neighbours.dtype.kind == 'i'
    teacher = load_pretrained('resnet18', teacher_file).eval()
    with torch.no_grad():
        features = F.normalize(teacher(torch.stack([folder[i][0] for i in range(len(folder))])), dim=1)
    similarity = features @ features.t()
    similarity.fill_diagonal_(-float('inf'))
    expected = similarity.topk(3, dim=1).indices.numpy()
    assert (neighbours == expected).mean() > 0.98  # float ties between runs aside
    assert not (neighbours == np.arange(len(folder))[:, None]).any()
    sidecar = json.load(open(output + '.json'))
    assert sidecar['dataset_fingerprint'] == folder.fingerprint()
    assert sidecar['teacher_arch'] == 'resnet18' and sidecar['feature_dim'] == 512
    assert sidecar['backend'] in ('faiss', 'torch')  # the engine used, not the flag's 'auto'
    assert 'bag precision' in stdout


def test_two_processes_write_the_same_file(tiny_folder, teacher_file, one_process_result, tmp_path):
    output = str(tmp_path / 'bags2.npy')
    result = extract(tiny_folder, teacher_file, output, nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert np.array_equal(np.load(output), np.load(one_process_result[0]))


def test_global_batch_split_across_processes_released_self_removal_and_quiet_faiss(
        tiny_folder, teacher_file, one_process_result, tmp_path):
    output = str(tmp_path / 'released_rule.npy')
    result = extract(tiny_folder, teacher_file, output, nproc=2, batch_size=4, knn_backend='faiss',
                     self_removal='first_column')
    assert result.returncode == 0, result.stderr[-3000:]
    # --batch_size is global, as main_distill.py and main_lincls.py read it: 24 images in 6 steps
    # of 4, each of the 2 processes loading 2 images a step.
    assert 'embedding 24 images: 6 steps of 4 (2 per process) on 2 x cpu' in result.stdout
    # Without duplicate images the image itself is the nearest, so the released rule (drop column 0
    # of the k+1 nearest) gives the same bags as removing the image wherever it appears.
    assert np.array_equal(np.load(output), np.load(one_process_result[0]))
    assert json.load(open(output + '.json'))['self_removal'] == 'first_column'
    # faiss was imported and searched, yet none of its loader's lines reached the user.
    log = result.stdout + result.stderr
    assert not any(line in log for line in ('Loading faiss', 'Could not load library', 'ModuleNotFoundError'))


def test_global_batch_not_divisible_by_processes_is_refused(tiny_folder, teacher_file, tmp_path):
    result = extract(tiny_folder, teacher_file, str(tmp_path / 'x.npy'), nproc=2, batch_size=5)
    assert result.returncode != 0
    assert '--batch_size=5 (global) is not divisible by 2 processes' in result.stderr


def test_k_not_below_dataset_size_is_refused(tiny_folder, teacher_file, tmp_path):
    result = extract(tiny_folder, teacher_file, str(tmp_path / 'x.npy'), clus_pos_num=24)
    assert result.returncode != 0 and '--clus_pos_num=24' in result.stderr
    assert not os.path.exists(tmp_path / 'x.npy')


def test_wrong_architecture_checkpoint_names_the_file(tiny_folder, teacher_file, tmp_path):
    result = extract(tiny_folder, teacher_file, str(tmp_path / 'x.npy'), teacher_arch='resnet34')
    assert result.returncode != 0
    assert 'resnet18_teacher.pth' in result.stderr and 'layer1.2' in result.stderr


def test_every_unreadable_image_is_named_in_one_line(tiny_folder, teacher_file, tmp_path):
    data = tmp_path / 'data'
    shutil.copytree(tiny_folder, data)
    victims = sorted((data / 'train').glob('*/*'))[5:16:10]
    for victim in victims:
        victim.write_bytes(b'not an image')
    result = extract(str(data), teacher_file, str(tmp_path / 'x.npy'), workers=1)
    assert result.returncode == 1 and len(result.stderr.splitlines()) == 1
    assert '2 of the 24 images' in result.stderr and all(v.name in result.stderr for v in victims)
    assert not os.path.exists(tmp_path / 'x.npy')


def test_an_output_that_cannot_be_written_is_refused_before_any_work(tiny_folder, tmp_path):
    (tmp_path / 'a_folder').mkdir()
    # The teacher does not exist: the output is checked first.
    result = extract(tiny_folder, str(tmp_path / 'no_teacher.pth'), str(tmp_path / 'a_folder'))
    assert result.returncode == 1 and f'--output={tmp_path / "a_folder"} is a folder' in result.stderr


def test_missing_data_dir_is_named(teacher_file, tmp_path):
    result = extract(str(tmp_path / 'nowhere'), teacher_file, str(tmp_path / 'x.npy'))
    assert result.returncode != 0 and 'nowhere' in result.stderr


def test_gpu_decoding_and_bf16_teacher_opt_ins_report_agreement(tiny_folder, teacher_file, one_process_result,
                                                               tmp_path):
    # The opt-ins of stage 1 (decode, resize and crop on the device; bf16, channels-last teacher)
    # run on the CPU too, and compare their bags with the default run's.
    reference, _ = one_process_result
    output = str(tmp_path / 'fast.npy')
    result = extract(tiny_folder, teacher_file, output, data_pipeline='gpu', precision='bf16',
                     channels_last=True, reference_neighbours=reference)
    assert result.returncode == 0, result.stderr[-3000:]
    share = float(result.stdout.split(f'rows equal to {reference}: ')[1].split()[0])
    assert 0.5 <= share <= 1.0  # PNGs decoded alike; bf16 moves near-ties only
    assert np.load(output).shape == np.load(reference).shape
    sidecar = json.load(open(output + '.json'))
    assert (sidecar['data_pipeline'], sidecar['precision'], sidecar['channels_last']) == ('gpu', 'bf16', True)
