"""Shared fixtures: tiny ImageFolder trees of real pixels for every stage's tests."""
import os
import random

import pytest
import torch
from PIL import Image, ImageDraw

from data import fashion_mnist

# The test machine's cores are shared; one thread each keeps runs polite and steady.
torch.set_num_threads(1)

TINY_CLASSES = ('trouser', 'sneaker', 'bag')  # Fashion-MNIST classes that look least alike
TINY_TRAIN_PER_CLASS = 8
TINY_VAL_PER_CLASS = 4
TINY_IMAGE_SIZE = 32
SHAPES = ('circle', 'square', 'triangle')


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


def render_shapes_tree(root, seed=0):
    """One class per shape: a filled circle, square or triangle of random colour, size and
    position on a dark background, TINY_*_PER_CLASS images per class and split."""
    rng = random.Random(seed)
    size = TINY_IMAGE_SIZE
    for split, per_class in (('train', TINY_TRAIN_PER_CLASS), ('val', TINY_VAL_PER_CLASS)):
        for shape in SHAPES:
            folder = os.path.join(root, split, shape)
            os.makedirs(folder)
            for i in range(per_class):
                background = tuple(rng.randrange(0, 64) for _ in range(3))
                img = Image.new('RGB', (size, size), background)
                draw = ImageDraw.Draw(img)
                colour = tuple(rng.randrange(96, 256) for _ in range(3))
                side = rng.randrange(size // 3, size * 3 // 4)
                x, y = rng.randrange(0, size - side), rng.randrange(0, size - side)
                if shape == 'circle':
                    draw.ellipse((x, y, x + side, y + side), fill=colour)
                elif shape == 'square':
                    draw.rectangle((x, y, x + side, y + side), fill=colour)
                else:
                    draw.polygon([(x + side / 2, y), (x, y + side), (x + side, y + side)], fill=colour)
                img.save(os.path.join(folder, f'{i:02d}.png'))


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
