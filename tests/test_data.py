import gzip
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from data import fashion_mnist
from data.bags import BagDataset, TwoViewDataset, draw_neighbour
from data.folder import (UNREADABLE, DataError, ImageFolder, MarkUnreadable, check_same_classes,
                         unreadable_error, unreadable_images)
from data.neighbours import NeighbourFileError, bag_precision, load_neighbours, save_neighbours
from data.transforms import (AUGMENTATIONS, MEAN, STD, GaussianBlur, eval_transform, linear_train_transform,
                             moco_v2_augmentation)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAVE_FASHION_MNIST = os.path.isdir(fashion_mnist.DEFAULT_SOURCE)
needs_fashion_mnist = pytest.mark.skipif(not HAVE_FASHION_MNIST,
                                         reason='apt-get install dataset-fashion-mnist')


def write_png(path, colour=(200, 30, 30), size=(8, 8), mode='RGB'):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new(mode, size, colour).save(path)


@pytest.fixture
def unsorted_tree(tmp_path):
    """Classes and files created out of name order, plus entries ImageFolder must skip."""
    for class_name in ('zebra', 'apple', 'mango'):
        for name in ('2.png', '10.png', '1.PNG'):
            write_png(str(tmp_path / class_name / name))
    (tmp_path / 'apple' / 'notes.txt').write_text('not an image')
    write_png(str(tmp_path / 'apple' / '.hidden.png'))
    write_png(str(tmp_path / '.cache' / 'x.png'))
    return tmp_path


# ---------------------------------------------------------------- ImageFolder

def test_folder_sorts_classes_and_files(unsorted_tree):
    folder = ImageFolder(unsorted_tree)
    assert folder.classes == ['apple', 'mango', 'zebra']
    assert [rel for rel, _ in folder.samples][:3] == ['apple/1.PNG', 'apple/10.png', 'apple/2.png']
    assert folder.targets == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert len(folder) == 9
    assert folder.samples[4] == ('mango/10.png', 1)


def test_fingerprint_is_the_hash_of_the_ordered_relative_paths(unsorted_tree, tmp_path_factory):
    folder = ImageFolder(unsorted_tree)
    expected = hashlib.sha256('\n'.join(rel for rel, _ in folder.samples).encode()).hexdigest()
    assert folder.fingerprint() == expected

    copy = tmp_path_factory.mktemp('copy') / 'data'
    shutil.copytree(unsorted_tree, copy)
    assert ImageFolder(copy).fingerprint() == expected  # independent of where the tree lives
    os.rename(copy / 'mango' / '2.png', copy / 'mango' / '3.png')
    assert ImageFolder(copy).fingerprint() != expected


def test_load_gives_rgb_and_getitem_applies_the_transform(tmp_path):
    write_png(str(tmp_path / 'a' / 'grey.png'), colour=77, size=(5, 7), mode='L')
    folder = ImageFolder(tmp_path, transform=T.ToTensor())
    img = folder.load(0)
    assert img.mode == 'RGB' and img.size == (5, 7)
    x, target = folder[0]
    assert x.shape == (3, 7, 5) and target == 0
    assert torch.allclose(x, torch.full_like(x, 77 / 255))


def test_missing_root(tmp_path):
    with pytest.raises(DataError, match=f'{tmp_path}/nope does not exist'):
        ImageFolder(tmp_path / 'nope')


def test_root_without_class_folders(tmp_path):
    write_png(str(tmp_path / 'loose.png'))
    with pytest.raises(DataError, match=f'{tmp_path} has no class sub-folders'):
        ImageFolder(tmp_path)


def test_class_folder_without_images_is_named(tmp_path):
    write_png(str(tmp_path / 'cat' / 'a.png'))
    (tmp_path / 'dog').mkdir()
    (tmp_path / 'dog' / 'readme.txt').write_text('no images here')
    with pytest.raises(DataError, match=f'class folder {tmp_path}/dog holds no images'):
        ImageFolder(tmp_path)


def test_corrupt_image_names_the_file(tmp_path):
    write_png(str(tmp_path / 'cat' / 'a.png'))
    (tmp_path / 'cat' / 'b.png').write_bytes(b'not a png at all')
    folder = ImageFolder(tmp_path)
    folder.load(0)
    with pytest.raises(DataError, match=f'cannot read image {tmp_path}/cat/b.png'):
        folder.load(1)
    with pytest.raises(DataError, match='b.png'):
        folder[1]


def test_symlink_loops_do_not_list_images_again(tmp_path):
    for class_name in ('cat', 'dog'):
        write_png(str(tmp_path / class_name / 'a.png'))
    os.symlink(tmp_path, tmp_path / 'cat' / 'to_root')           # back to the dataset root
    os.symlink(tmp_path / 'cat', tmp_path / 'cat' / 'to_itself')   # back to its own class folder
    os.makedirs(tmp_path / 'dog' / 'sub')
    write_png(str(tmp_path / 'dog' / 'sub' / 'b.png'))
    os.symlink(tmp_path / 'dog', tmp_path / 'dog' / 'sub' / 'up')  # to a folder above it
    os.symlink(tmp_path / 'dog' / 'sub', tmp_path / 'dog' / 'again')  # a folder listed already
    folder = ImageFolder(tmp_path)
    assert [rel for rel, _ in folder.samples] == ['cat/a.png', 'dog/a.png', 'dog/again/b.png']


def test_every_unreadable_image_is_named_in_one_error(tmp_path):
    for name in ('a.png', 'c.png', 'e.png'):
        write_png(str(tmp_path / 'cat' / name))
    (tmp_path / 'cat' / 'b.png').write_bytes(b'not a png at all')
    (tmp_path / 'cat' / 'd.png').write_bytes(b'')
    folder = ImageFolder(tmp_path, transform=T.Compose([T.Resize(4), T.ToTensor()]))
    marked = MarkUnreadable(folder)
    assert [marked[i][1] for i in range(5)] == [0, UNREADABLE, 0, UNREADABLE, 0]
    assert marked[1][0].shape == marked[0][0].shape  # a blank image, so a batch still stacks
    problems = unreadable_images(folder, workers=2)
    assert len(problems) == 2 and 'cat/b.png' in problems[0] and 'cat/d.png' in problems[1]
    message = str(unreadable_error(folder, [1, 3]))
    assert message.startswith(f'2 of the 5 images of {tmp_path} cannot be read')
    assert 'b.png' in message and 'd.png' in message and '\n' not in message


@pytest.mark.slow
def test_check_dataset_tool_lists_every_unreadable_image(tmp_path):
    write_png(str(tmp_path / 'cat' / 'a.png'))
    for name in ('b.png', 'c.png'):
        (tmp_path / 'cat' / name).write_bytes(b'torn')
    result = subprocess.run([sys.executable, 'tools/check_dataset.py', str(tmp_path), '--workers=2'], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert [line.split(':')[0] for line in result.stdout.splitlines()[:2]] == ['cannot read image ' + str(
        tmp_path / 'cat' / name) for name in ('b.png', 'c.png')]
    assert '3 images in 1 classes, 2 unreadable' in result.stdout
    assert result.stderr.strip() == 'check_dataset.py: error: 2 images cannot be read (listed above)'


def test_check_same_classes(tmp_path):
    for split, classes in (('train', 'abc'), ('val', 'abd'), ('val2', 'abc')):
        for name in classes:
            write_png(str(tmp_path / split / name / '0.png'))
    train = ImageFolder(tmp_path / 'train')
    check_same_classes(train, ImageFolder(tmp_path / 'val2'))
    with pytest.raises(DataError, match=r"only in train: \['c'\]; only in val: \['d'\]"):
        check_same_classes(train, ImageFolder(tmp_path / 'val'))


def check_tiny_tree(root):
    train, val = ImageFolder(root / 'train'), ImageFolder(root / 'val')
    check_same_classes(train, val)
    assert len(train.classes) == 3
    assert np.bincount(train.targets).tolist() == [8, 8, 8]
    assert np.bincount(val.targets).tolist() == [4, 4, 4]
    pixels = [np.asarray(train.load(i)) for i in range(len(train))]
    assert all(p.shape == (32, 32, 3) for p in pixels)
    assert len({p.tobytes() for p in pixels}) == len(pixels)  # real, distinct images


def test_tiny_folder_fixture(tiny_folder):
    check_tiny_tree(tiny_folder)


def test_rendered_folder_fixture(rendered_folder):
    check_tiny_tree(rendered_folder)
    assert ImageFolder(rendered_folder / 'train').classes == ['circle', 'square', 'triangle']


# ---------------------------------------------------------------- transforms

def test_eval_transform_resizes_in_proportion_then_crops():
    assert eval_transform(224).transforms[0].size == 256
    assert eval_transform(32).transforms[0].size == 37
    x = eval_transform(32)(Image.new('RGB', (50, 40), (255, 255, 255)))
    assert x.shape == (3, 32, 32)
    white = (1 - torch.tensor(MEAN)) / torch.tensor(STD)
    assert torch.allclose(x, white[:, None, None].expand_as(x), atol=1e-5)


def test_normalisation_centres_the_mean_colour():
    mean_image = Image.new('RGB', (20, 24), tuple(round(m * 255) for m in MEAN))
    for transform in (eval_transform(16), linear_train_transform(16)):
        x = transform(mean_image)
        assert x.shape == (3, 16, 16) and x.abs().max() < 0.01
    normalize = moco_v2_augmentation(16).transforms[-1]
    assert isinstance(normalize, T.Normalize) and (normalize.mean, normalize.std) == (MEAN, STD)


def test_augmentations_are_random_and_follow_torch_seed_only():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8))
    for augmentation in (moco_v2_augmentation(24), linear_train_transform(24)):
        torch.manual_seed(0)
        random.seed(1)
        a, b = augmentation(img), augmentation(img)
        torch.manual_seed(0)
        random.seed(2)
        assert torch.equal(augmentation(img), a)
        assert a.shape == (3, 24, 24) and not torch.equal(a, b)


def test_greyscale_views_keep_grey_images_grey_and_vary_crop_and_contrast():
    torch.manual_seed(0)
    grey = Image.fromarray(np.random.default_rng(1).integers(0, 256, (28, 28), dtype=np.uint8)).convert('RGB')
    views = torch.stack([AUGMENTATIONS['greyscale'](28, 0.2)(grey) for _ in range(16)])
    assert views.shape == (16, 3, 28, 28)
    # no hue or saturation jitter: the three channels stay one grey value (before Normalize)
    pixels = views * torch.tensor(STD)[:, None, None] + torch.tensor(MEAN)[:, None, None]
    assert (pixels - pixels.mean(dim=1, keepdim=True)).abs().max() < 1e-5
    assert len({round(v.std().item(), 4) for v in pixels}) > 8  # crops and contrast differ view to view
    assert set(AUGMENTATIONS) == {'moco_v2', 'greyscale'} and AUGMENTATIONS['moco_v2'] is moco_v2_augmentation


def test_gaussian_blur_draws_sigma_in_range_with_torch():
    checkerboard = Image.fromarray((np.indices((32, 32)).sum(0) % 2 * 255).astype(np.uint8))
    sharp = np.asarray(checkerboard).std()
    assert np.asarray(GaussianBlur((2.0, 2.0))(checkerboard)).std() < 0.2 * sharp
    blur = GaussianBlur()
    torch.manual_seed(3)
    first = [np.asarray(blur(checkerboard)).std() for _ in range(5)]
    torch.manual_seed(3)
    assert [np.asarray(blur(checkerboard)).std() for _ in range(5)] == first
    assert len(set(first)) > 1
    assert repr(blur) == 'GaussianBlur(sigma=(0.1, 2.0))'


# ---------------------------------------------------------------- neighbours

NEIGHBOURS = np.array([[1, 2], [0, 2], [3, 0], [2, 4], [5, 3], [4, 0]])


def test_neighbour_file_round_trip(tmp_path):
    path = str(tmp_path / 'knn.npy')
    save_neighbours(path, NEIGHBOURS.astype(np.int32), {'dataset_fingerprint': 'abc', 'k': 'ignored'})
    assert sorted(os.listdir(tmp_path)) == ['knn.npy', 'knn.npy.json']  # no temporary files left
    loaded = load_neighbours(path, 6, 'abc')
    assert loaded.dtype == np.int64 and np.array_equal(loaded, NEIGHBOURS)
    with open(path + '.json') as f:
        assert json.load(f) == {'dataset_fingerprint': 'abc', 'N': 6, 'k': 2}
    assert np.array_equal(load_neighbours(path, 6, None), NEIGHBOURS)


def test_bare_npy_loads_only_without_a_fingerprint(tmp_path):
    path = str(tmp_path / 'released.npy')
    np.save(path, NEIGHBOURS)
    assert np.array_equal(load_neighbours(path, 6, None), NEIGHBOURS)
    with pytest.raises(NeighbourFileError, match=f'{path} has no sidecar {path}.json'):
        load_neighbours(path, 6, 'abc')


def test_released_bare_file_loads_and_says_what_was_not_checked(tmp_path):
    path = str(tmp_path / 'imgs_corr_swav_epoch400.npy')
    np.save(path, NEIGHBOURS.astype(np.int32))  # no sidecar, as compute_knn.py writes it
    with pytest.raises(NeighbourFileError, match='--neighbours_format=released'):
        load_neighbours(path, 6, 'abc')
    lines = []
    loaded = load_neighbours(path, 6, 'abc', fmt='released', report=lines.append)
    assert loaded.dtype == np.int64 and np.array_equal(loaded, NEIGHBOURS)
    assert len(lines) == 1 and path in lines[0] and 'NOT checked' in lines[0] and 'fingerprint' in lines[0]
    for array, size, message in [(NEIGHBOURS, 7, 'has 6 rows but the dataset has 7 images'),
                                 (NEIGHBOURS.astype(np.float64), 6, 'dtype float64'),
                                 (corrupt(NEIGHBOURS, 1, 0, 6), 6, 'row 1 holds')]:
        np.save(path, array)
        with pytest.raises(NeighbourFileError, match=message):
            load_neighbours(path, size, None, fmt='released')


def test_first_k_columns_of_a_wider_file_as_the_released_clus_pos_num(tmp_path):
    path = str(tmp_path / 'wide.npy')
    wide = np.concatenate([NEIGHBOURS, np.full((6, 2), 99)], axis=1)  # columns 2, 3 never read
    np.save(path, wide)
    assert np.array_equal(load_neighbours(path, 6, None, fmt='released', k=2), NEIGHBOURS)
    assert np.array_equal(load_neighbours(path, 6, None, fmt='released', k=1), NEIGHBOURS[:, :1])
    with pytest.raises(NeighbourFileError, match='row 0 holds'):
        load_neighbours(path, 6, None, fmt='released')  # all four columns: 99 is no image
    with pytest.raises(NeighbourFileError, match='has 4 neighbours per image; the first 5 were asked for'):
        load_neighbours(path, 6, None, fmt='released', k=5)


def test_released_rows_listing_the_image_itself_are_kept_and_counted(tmp_path):
    path = str(tmp_path / 'dup.npy')
    # Images 0 and 1 are duplicates: the search put 1 first for image 0, so the release kept 0 itself.
    with_self = corrupt(corrupt(NEIGHBOURS, 0, 0, 1), 0, 1, 0)
    np.save(path, with_self)
    lines = []
    assert np.array_equal(load_neighbours(path, 6, None, fmt='released', report=lines.append), with_self)
    assert any('1 of 6 rows list the image itself' in line and 'row 0' in line for line in lines)
    with pytest.raises(NeighbourFileError, match='row 0 lists image 0 itself'):
        load_neighbours(path, 6, None)  # this project's files never do, unless made by the released rule:
    save_neighbours(path, with_self, {'dataset_fingerprint': 'abc', 'self_removal': 'first_column'})
    assert np.array_equal(load_neighbours(path, 6, 'abc', report=lines.append), with_self)
    np.save(path, np.concatenate([np.arange(6)[:, None], NEIGHBOURS], axis=1))
    with pytest.raises(NeighbourFileError, match=r'column 0 of every row is the image itself.*\[:, 1:\]'):
        load_neighbours(path, 6, None, fmt='released')


def corrupt(neighbours, row, col, value):
    neighbours = neighbours.copy()
    neighbours[row, col] = value
    return neighbours


@pytest.mark.parametrize('array, size, fingerprint, message', [
    (NEIGHBOURS, 7, 'abc', 'has 6 rows but the dataset has 7 images'),
    (corrupt(NEIGHBOURS, 3, 1, 6), 6, 'abc', r'row 3 holds \[2, 6\], outside the dataset\'s indices 0..5'),
    (corrupt(NEIGHBOURS, 4, 0, -1), 6, 'abc', r'row 4 holds \[-1, 3\]'),
    (corrupt(NEIGHBOURS, 2, 1, 2), 6, 'abc', r'row 2 lists image 2 itself'),
    (NEIGHBOURS, 6, 'def', r"fingerprint abc \(from .*knn.npy.json\) != dataset's def"),
    (NEIGHBOURS.astype(np.float32), 6, 'abc', 'dtype float32'),
    (NEIGHBOURS[:, 0], 6, 'abc', r'shape \(6,\)'),
])
def test_neighbour_file_validation(tmp_path, array, size, fingerprint, message):
    path = str(tmp_path / 'knn.npy')
    np.save(path, array)
    with open(path + '.json', 'w') as f:
        json.dump({'dataset_fingerprint': 'abc', 'N': 6, 'k': 2}, f)
    with pytest.raises(NeighbourFileError, match=message) as error:
        load_neighbours(path, size, fingerprint)
    assert path in str(error.value)


def test_missing_neighbour_file_and_sidecar_mismatch(tmp_path):
    path = str(tmp_path / 'knn.npy')
    with pytest.raises(NeighbourFileError, match=f'{path} does not exist'):
        load_neighbours(path, 6, None)
    save_neighbours(path, NEIGHBOURS, {'dataset_fingerprint': 'abc'})
    np.save(path, NEIGHBOURS[:, :1])  # the array replaced behind the sidecar's back
    with pytest.raises(NeighbourFileError, match=r'describes N=6, k=2 but .* has shape \(6, 1\)'):
        load_neighbours(path, 6, 'abc')


def test_bag_precision_hand_example():
    targets = [0, 0, 0, 1]
    neighbours = np.array([[1, 2], [0, 2], [0, 1], [0, 1]])  # rows 0-2 pure, row 3 all wrong
    assert bag_precision(neighbours, targets) == 0.75


# ---------------------------------------------------------------- bags

@pytest.fixture(scope='module')
def tiny_train(tiny_folder):
    return ImageFolder(tiny_folder / 'train')


def ring_neighbours(n, offsets=(1, 5, 9)):
    return (np.arange(n)[:, None] + np.array(offsets)) % n


def test_bag_dataset_draws_every_neighbour_of_the_row_and_only_those(tiny_train):
    neighbours = ring_neighbours(len(tiny_train))
    bags = BagDataset(tiny_train, neighbours, T.ToTensor())
    assert len(bags) == len(tiny_train)
    torch.manual_seed(0)
    drawn = []
    for _ in range(60):
        state = torch.get_rng_state()
        j = draw_neighbour(neighbours, 7)  # the draw bags[7] makes from this state
        torch.set_rng_state(state)
        q, k, pq, pk = bags[7]  # the views alone
        assert torch.equal(q, T.functional.to_tensor(tiny_train.load(7)))
        assert torch.equal(pq, T.functional.to_tensor(tiny_train.load(j)))
        drawn.append(j)
    assert set(drawn) == set(neighbours[7].tolist())
    torch.manual_seed(0)
    assert [draw_neighbour(neighbours, 7) for _ in range(60)] == drawn  # torch's RNG decides


def test_bag_dataset_four_independent_views(tiny_train):
    bags = BagDataset(tiny_train, ring_neighbours(len(tiny_train)), moco_v2_augmentation(16))
    torch.manual_seed(0)
    views = bags[3][:4]
    assert all(v.shape == (3, 16, 16) for v in views)
    for a in range(4):
        for b in range(a + 1, 4):
            assert not torch.equal(views[a], views[b])


def test_bag_dataset_rejects_rows_for_another_dataset(tiny_train):
    with pytest.raises(ValueError, match='23 neighbour rows for the 24 images'):
        BagDataset(tiny_train, ring_neighbours(23), T.ToTensor())


def test_two_view_dataset(tiny_train):
    views = TwoViewDataset(tiny_train, moco_v2_augmentation(16))
    torch.manual_seed(0)
    q, k = views[5]  # the views alone
    assert q.shape == k.shape == (3, 16, 16) and not torch.equal(q, k)


# ---------------------------------------------------------------- Fashion-MNIST

def raw_image(prefix, index):
    with gzip.open(os.path.join(fashion_mnist.DEFAULT_SOURCE, f'{prefix}-images-idx3-ubyte.gz')) as f:
        f.seek(16 + index * 784)
        return np.frombuffer(f.read(784), dtype=np.uint8).reshape(28, 28)


@needs_fashion_mnist
def test_prepare_writes_the_first_images_of_each_class(tmp_path):
    out = fashion_mnist.prepare(tmp_path / 'fm', train_per_class=2, val_per_class=3,
                                classes=['ankle_boot', 't-shirt_top'])
    assert out == str(tmp_path / 'fm')
    train, val = ImageFolder(tmp_path / 'fm' / 'train'), ImageFolder(tmp_path / 'fm' / 'val')
    # Train labels start 9, 0, 0, 3, 0, 2, 7, 2, 5, 5, 0, 9 (9 = ankle boot, 0 = T-shirt/top).
    assert train.samples == [('ankle_boot/00000.png', 0), ('ankle_boot/00011.png', 0),
                             ('t-shirt_top/00001.png', 1), ('t-shirt_top/00002.png', 1)]
    assert np.bincount(val.targets).tolist() == [3, 3]
    assert val.samples[0] == ('ankle_boot/00000.png', 0)
    assert np.array_equal(np.asarray(train.load(1))[..., 0], raw_image('train', 11))
    assert np.array_equal(np.asarray(val.load(0))[..., 1], raw_image('t10k', 0))


@needs_fashion_mnist
def test_prepare_is_idempotent_and_rebuilds_what_is_incomplete(tmp_path):
    out = tmp_path / 'fm'
    fashion_mnist.prepare(out, train_per_class=2, val_per_class=1, classes=['bag', 'trouser'])
    marker, image = out / fashion_mnist.MARKER, out / 'train' / 'bag' / '00023.png'
    before = [(os.stat(p).st_ino, os.stat(p).st_mtime_ns) for p in (marker, image)]
    fashion_mnist.prepare(out, train_per_class=2, val_per_class=1, classes=['trouser', 'bag'])
    assert [(os.stat(p).st_ino, os.stat(p).st_mtime_ns) for p in (marker, image)] == before

    marker.unlink()  # as if interrupted: a tree without its marker is rebuilt
    image.unlink()
    fashion_mnist.prepare(out, train_per_class=2, val_per_class=1, classes=['bag', 'trouser'])
    assert image.exists() and marker.exists()

    fashion_mnist.prepare(out, train_per_class=3, val_per_class=1, classes=['bag', 'trouser'])
    assert len(ImageFolder(out / 'train')) == 6
    assert json.loads(marker.read_text())['train_per_class'] == 3
    assert sorted(os.listdir(tmp_path)) == ['fm']  # no temporary trees left


@needs_fashion_mnist
@pytest.mark.parametrize('kwargs, message', [
    (dict(classes=['bag', 'hat']), r'subset of t-shirt_top, .*; got \[\'bag\', \'hat\'\]'),
    (dict(train_per_class=0), 'train_per_class must be at least 1'),
    (dict(val_per_class=1001, classes=['bag']), 'val_per_class=1001 but .*t10k-labels.* has only 1000'),
])
def test_prepare_rejects_bad_parameters(tmp_path, kwargs, message):
    with pytest.raises(DataError, match=message):
        fashion_mnist.prepare(tmp_path / 'fm', **kwargs)


@needs_fashion_mnist
def test_prepare_refuses_to_replace_foreign_folders(tmp_path):
    (tmp_path / 'photos').mkdir()
    (tmp_path / 'photos' / 'holiday.jpg').write_bytes(b'')
    with pytest.raises(DataError, match=r'holds entries prepare\(\) did not write \(holiday.jpg\)'):
        fashion_mnist.prepare(tmp_path / 'photos', train_per_class=1, val_per_class=1)
    assert os.listdir(tmp_path / 'photos') == ['holiday.jpg']


def test_prepare_without_the_package_says_how_to_install_it(tmp_path):
    with pytest.raises(DataError, match='apt-get install dataset-fashion-mnist'):
        fashion_mnist.prepare(tmp_path / 'fm', source=str(tmp_path / 'nowhere'))
    assert not (tmp_path / 'fm').exists()


@needs_fashion_mnist
@pytest.mark.slow
def test_prepare_command_line(tmp_path):
    run = subprocess.run(
        [sys.executable, '-m', 'data.fashion_mnist', '--out_dir', str(tmp_path / 'fm'),
         '--train_per_class', '1', '--val_per_class', '2', '--classes', 'sandal,coat'],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert ImageFolder(tmp_path / 'fm' / 'train').classes == ['coat', 'sandal']
    assert len(ImageFolder(tmp_path / 'fm' / 'val')) == 4
