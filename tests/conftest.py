"""Shared fixtures: tiny ImageFolder trees of real pixels for every stage's tests, and stage 2's inputs."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from data import fashion_mnist
from data.folder import ImageFolder
from data.neighbours import save_neighbours
from models import build_student
from tests.helpers import TINY_CLASSES, TINY_IMAGE_SIZE, TINY_TRAIN_PER_CLASS, TINY_VAL_PER_CLASS, render_shapes_tree

# The test machine's cores are shared; one thread each keeps runs polite and steady.
torch.set_num_threads(1)

def _fashion_mnist_tree(root, scratch):
    """Fashion-MNIST's first images of TINY_CLASSES, padded from 28x28 grey to 32x32 RGB."""
    prepared = fashion_mnist.prepare(scratch, train_per_class=TINY_TRAIN_PER_CLASS,
                                     val_per_class=TINY_VAL_PER_CLASS, classes=TINY_CLASSES)
    for split in ('train', 'val'):
        for class_name in TINY_CLASSES:
            src = os.path.join(prepared, split, class_name)
            dst = os.path.join(root, split, class_name)
            os.makedirs(dst)
            for name in sorted(os.listdir(src)):
                with Image.open(os.path.join(src, name)) as img:
                    padded = Image.new('RGB', (TINY_IMAGE_SIZE, TINY_IMAGE_SIZE))
                    offset = (TINY_IMAGE_SIZE - img.width) // 2
                    padded.paste(img.convert('RGB'), (offset, offset))
                padded.save(os.path.join(dst, name))


@pytest.fixture(scope='session')
def rendered_folder(tmp_path_factory):
    """Root of a rendered-shapes tree (train/, val/): 3 classes x 8 train + 4 val, 32x32 RGB."""
    root = tmp_path_factory.mktemp('rendered')
    render_shapes_tree(root)
    return root


@pytest.fixture(scope='session')
def tiny_folder(tmp_path_factory):
    """Root of a real-pixel tree (train/, val/): 3 classes x 8 train + 4 val, 32x32 RGB PNGs.

    Fashion-MNIST when Debian's dataset-fashion-mnist is installed, rendered shapes otherwise.
    """
    root = tmp_path_factory.mktemp('tiny')
    if os.path.isdir(fashion_mnist.DEFAULT_SOURCE):
        _fashion_mnist_tree(root, tmp_path_factory.mktemp('fashion_mnist') / 'prepared')
    else:
        render_shapes_tree(root)
    return root


@pytest.fixture(scope='module')
def bingo_inputs(tiny_folder, tmp_path_factory):
    """A resnet18 teacher in this project's checkpoint layout and a valid neighbour file."""
    root = tmp_path_factory.mktemp('bingo_inputs')
    torch.manual_seed(0)
    teacher = str(root / 'teacher.pth')
    torch.save({'student': build_student('resnet18').state_dict(), 'arch': 'resnet18'}, teacher)
    folder = ImageFolder(os.path.join(tiny_folder, 'train'))
    n = len(folder)
    neighbours = np.stack([(np.arange(n) + s) % n for s in (1, 2, 3)], axis=1)
    bags = str(root / 'bags.npy')
    save_neighbours(bags, neighbours, {'dataset_fingerprint': folder.fingerprint()})
    return teacher, bags
