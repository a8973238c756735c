"""Decode every image of ImageFolder trees before a long run, and list every one that fails.

    python tools/check_dataset.py DATA/train DATA/val --workers=16

Stage 1 (knn_extract.py) reports every unreadable training image too, but only after loading the
teacher; stage 2 and the linear probe stop at the first one they meet. ImageNet's 1.28M training
images take a few minutes on 16 cores. Exit status 1 when any image cannot be read.
"""
import os
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data.folder import DataError, ImageFolder, unreadable_images  # noqa: E402
from utils import errors  # noqa: E402

FLAGS = flags.FlagValues()  # this script's own flags (utils/args.py)
flags.DEFINE_integer('workers', os.cpu_count(), 'Processes decoding images.', flag_values=FLAGS)


def main(argv):
    check(argv[1:], FLAGS.workers)


def check(roots, workers):
    """Decode every image below each root, print the unreadable ones and a summary per root."""
    if not roots:
        raise app.UsageError('name the folders to check, e.g. python tools/check_dataset.py DATA/train DATA/val')
    unreadable = 0
    for root in roots:
        start = time.time()
        folder = ImageFolder(root)
        problems = unreadable_images(folder, workers=workers)
        for problem in problems:
            print(problem, flush=True)
        print(f'{root}: {len(folder)} images in {len(folder.classes)} classes, {len(problems)} unreadable '
              f'({time.time() - start:.1f}s)', flush=True)
        unreadable += len(problems)
    if unreadable:
        raise DataError(f'{unreadable} images cannot be read (listed above)')


if __name__ == '__main__':
    errors.run(main, FLAGS)
