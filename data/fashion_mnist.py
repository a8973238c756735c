"""Fashion-MNIST as an ImageFolder tree: a small real dataset for end-to-end runs.

Reads the IDX files of Debian's `dataset-fashion-mnist` package and writes
    out_dir/train/<class>/<index:05d>.png   (from train-*, index in that file)
    out_dir/val/<class>/<index:05d>.png     (from t10k-*)
as 28x28 greyscale PNGs (ImageFolder converts them to RGB). The tree is built in a
temporary folder and renamed into place; the marker file, written last, records the
parameters, so a second call with the same parameters does nothing.

    python -m data.fashion_mnist --out_dir datasets/fashion_mnist --train_per_class 500 --val_per_class 100
"""
import gzip
import json
import os
import shutil
import struct
import sys
from concurrent.futures import ProcessPoolExecutor

import numpy as np
from absl import app, flags
from PIL import Image

from data.folder import DataError

DEFAULT_SOURCE = '/usr/share/datasets/fashion-mnist'
# Folder names of labels 0..9.
CLASSES = ('t-shirt_top', 'trouser', 'pullover', 'dress', 'coat',
           'sandal', 'shirt', 'sneaker', 'bag', 'ankle_boot')
SPLITS = (('train', 'train'), ('val', 't10k'))  # (output folder, source file prefix)
MARKER = 'prepared.json'
_IDX_UBYTE = 0x08


def _source_files(source):
    return {prefix: (os.path.join(source, f'{prefix}-images-idx3-ubyte.gz'),
                     os.path.join(source, f'{prefix}-labels-idx1-ubyte.gz'))
            for _, prefix in SPLITS}


def _check_source(source):
    missing = [path for pair in _source_files(source).values() for path in pair if not os.path.isfile(path)]
    if missing:
        raise DataError(f'Fashion-MNIST not found in {source} (missing {", ".join(missing)}); '
                        f'install it with `apt-get install dataset-fashion-mnist` or pass its folder '
                        f'as source')


def _read_idx(path, ndim, count=None):
    """First `count` items (all when None) of a gzipped IDX file of unsigned bytes.

    Returns (number of items in the file, array of shape (count, *item_shape)).
    """
    try:
        with gzip.open(path, 'rb') as f:
            magic, = struct.unpack('>I', f.read(4))
            if magic >> 8 != _IDX_UBYTE or magic & 0xFF != ndim:
                raise DataError(f'{path} is not an IDX file of {ndim}-D unsigned bytes '
                                f'(magic {magic:#010x})')
            dims = struct.unpack(f'>{ndim}I', f.read(4 * ndim))
            count = dims[0] if count is None else min(count, dims[0])
            item_size = int(np.prod(dims[1:]))
            data = f.read(count * item_size)
    except (OSError, EOFError, struct.error) as e:
        raise DataError(f'cannot read {path}: {e}') from e
    if len(data) != count * item_size:
        raise DataError(f'{path} is truncated: expected {count} items of {item_size} bytes')
    return dims[0], np.frombuffer(data, dtype=np.uint8).reshape(count, *dims[1:])


def _select(labels_path, class_labels, per_class, flag):
    """(number of labels, {label: indices of its first per_class images, in file order})."""
    num_labels, labels = _read_idx(labels_path, ndim=1)
    if labels.size and labels.max() >= len(CLASSES):
        raise DataError(f'{labels_path} holds label {labels.max()}; Fashion-MNIST has {len(CLASSES)} classes')
    chosen = {}
    for label in class_labels:
        indices = np.flatnonzero(labels == label)
        if per_class is not None:
            if per_class > len(indices):
                raise DataError(f'{flag}={per_class} but {labels_path} has only {len(indices)} '
                                f'images of class {CLASSES[label]}')
            indices = indices[:per_class]
        chosen[label] = indices
    return num_labels, chosen


def _write_class(folder, images, indices):
    os.makedirs(folder)
    for image, i in zip(images, indices):
        Image.fromarray(image).save(os.path.join(folder, f'{i:05d}.png'))


def _write_split(images_path, num_labels, chosen, out, pool):
    needed = max((int(indices[-1]) + 1 for indices in chosen.values() if len(indices)), default=0)
    num_images, images = _read_idx(images_path, ndim=3, count=needed)
    if num_images != num_labels:
        raise DataError(f'{images_path} holds {num_images} images but its labels file {num_labels}')
    # One class a process: PNG encoding is most of the time (70 000 images: 22 s on one core).
    writes = [pool.submit(_write_class, os.path.join(out, CLASSES[label]), images[indices], indices)
              for label, indices in chosen.items()]
    for write in writes:
        write.result()


def _read_marker(out_dir):
    try:
        with open(os.path.join(out_dir, MARKER)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _check_replaceable(out_dir):
    """Only a tree this function wrote (possibly half-written) may be replaced."""
    if not os.path.exists(out_dir):
        return
    if not os.path.isdir(out_dir):
        raise DataError(f'out_dir {out_dir} exists and is not a folder')
    foreign = sorted(set(os.listdir(out_dir)) - {name for name, _ in SPLITS} - {MARKER})
    if foreign:
        raise DataError(f'out_dir {out_dir} holds entries prepare() did not write ({", ".join(foreign)}); '
                        f'pass a new or empty folder')


def prepare(out_dir, source=DEFAULT_SOURCE, train_per_class=None, val_per_class=None, classes=None):
    """Write the ImageFolder tree (see the module docstring) unless it is already there.

    train_per_class / val_per_class: keep only the first N images of each class (file
    order); None keeps all. classes: names from CLASSES to keep (default all ten).
    Returns out_dir.
    """
    out_dir = os.path.abspath(os.fspath(out_dir))
    requested = list(CLASSES if classes is None else classes)
    if not requested or any(name not in CLASSES for name in requested):
        raise DataError(f'classes must be a non-empty subset of {", ".join(CLASSES)}; got {requested}')
    classes = [name for name in CLASSES if name in requested]  # label order, for the marker
    for flag, value in (('train_per_class', train_per_class), ('val_per_class', val_per_class)):
        if value is not None and value < 1:
            raise DataError(f'{flag} must be at least 1 (or None for all images), got {value}')
    params = {'source': os.path.abspath(source), 'classes': classes,
              'train_per_class': train_per_class, 'val_per_class': val_per_class}
    if _read_marker(out_dir) == params:
        return out_dir
    _check_source(source)
    _check_replaceable(out_dir)

    class_labels = [CLASSES.index(name) for name in classes]
    per_class = {'train': train_per_class, 'val': val_per_class}
    files = _source_files(source)
    # Every parameter is checked against the labels before any image is written.
    selections = {split: _select(files[prefix][1], class_labels, per_class[split], f'{split}_per_class')
                  for split, prefix in SPLITS}
    tmp = f'{out_dir}.{os.getpid()}.tmp'
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with ProcessPoolExecutor(min(len(class_labels), os.cpu_count())) as pool:
            for split, prefix in SPLITS:
                _write_split(files[prefix][0], *selections[split], os.path.join(tmp, split), pool)
        with open(os.path.join(tmp, MARKER), 'w') as f:
            json.dump(params, f, indent=2)
        old = f'{out_dir}.{os.getpid()}.old'
        if os.path.exists(out_dir):
            os.rename(out_dir, old)
        os.rename(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def main(argv):
    del argv
    FLAGS = flags.FLAGS
    try:
        out_dir = prepare(FLAGS.out_dir, FLAGS.source, FLAGS.train_per_class, FLAGS.val_per_class,
                          FLAGS.classes)
    except DataError as e:
        sys.exit(f'error: {e}')
    print(f'Fashion-MNIST ImageFolder tree ready in {out_dir} (train/, val/)')


if __name__ == '__main__':
    # Defined here, not at import, so importing data.fashion_mnist never clashes with
    # the flags of the training scripts.
    flags.DEFINE_string('out_dir', None, 'Folder to write train/ and val/ into.')
    flags.DEFINE_string('source', DEFAULT_SOURCE, 'Folder with the gzipped IDX files.')
    flags.DEFINE_integer('train_per_class', None, 'First N train images of each class (all if unset).')
    flags.DEFINE_integer('val_per_class', None, 'First N val (t10k) images of each class (all if unset).')
    flags.DEFINE_list('classes', None, f'Subset of {",".join(CLASSES)} (all if unset).')
    flags.mark_flag_as_required('out_dir')
    app.run(main)
