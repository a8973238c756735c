"""An ImageFolder whose index i names the same image in every stage.

Stage 1 writes neighbour lists as dataset indices and stage 2 reads them back, so
the order of images must depend only on the files on disk: class folders and the
files inside them are sorted by name. `fingerprint()` summarises that order so a
neighbour file can be checked against the dataset it is used with.
"""
import hashlib
import os

import torch.utils.data
from PIL import Image

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.webp', '.ppm', '.pgm', '.tif', '.tiff')


class DataError(ValueError):
    """A dataset folder, image or data file that cannot be used as it is."""


def _is_image(name):
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _list_images(class_dir):
    """Relative paths (to class_dir, '/'-separated) of the images below class_dir, sorted."""
    found = []
    for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith('.')]
        rel = os.path.relpath(dirpath, class_dir)
        for name in filenames:
            if _is_image(name) and not name.startswith('.'):
                found.append(name if rel == '.' else f'{rel}/{name}'.replace(os.sep, '/'))
    return sorted(found)


class ImageFolder(torch.utils.data.Dataset):
    """root/<class>/<image>; classes and files sorted by name, hidden entries skipped.

    `samples[i]` is (path relative to root, class index); `load(i)` decodes it as RGB.
    """

    def __init__(self, root, transform=None):
        self.root = os.fspath(root)
        self.transform = transform
        if not os.path.isdir(self.root):
            raise DataError(f'dataset folder {self.root} does not exist or is not a folder')
        self.classes = sorted(
            entry.name for entry in os.scandir(self.root)
            if entry.is_dir() and not entry.name.startswith('.'))
        if not self.classes:
            raise DataError(f'dataset folder {self.root} has no class sub-folders '
                            f'(expected {self.root}/<class>/<image>)')
        self.samples = []
        for class_idx, name in enumerate(self.classes):
            images = _list_images(os.path.join(self.root, name))
            if not images:
                raise DataError(f'class folder {os.path.join(self.root, name)} holds no images '
                                f'(looked for {", ".join(IMAGE_EXTENSIONS)})')
            self.samples.extend((f'{name}/{image}', class_idx) for image in images)
        self.targets = [class_idx for _, class_idx in self.samples]
        self._fingerprint = None

    def __len__(self):
        return len(self.samples)

    def path(self, i):
        return os.path.join(self.root, self.samples[i][0])

    def load(self, i):
        path = self.path(i)
        try:
            with Image.open(path) as img:
                return img.convert('RGB')
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise DataError(f'cannot read image {path}: {e}') from e

    def __getitem__(self, i):
        img = self.load(i)
        if self.transform is not None:
            img = self.transform(img)
        return img, self.targets[i]

    def fingerprint(self):
        """sha256 (hex) of the ordered relative paths, '\\n'-joined: equal iff the index order is."""
        if self._fingerprint is None:
            paths = '\n'.join(rel for rel, _ in self.samples)
            self._fingerprint = hashlib.sha256(paths.encode('utf-8')).hexdigest()
        return self._fingerprint


def check_same_classes(train, val):
    """The linear probe needs the val split to label classes exactly as the train split does."""
    if train.classes == val.classes:
        return
    only_train = sorted(set(train.classes) - set(val.classes))
    only_val = sorted(set(val.classes) - set(train.classes))
    raise DataError(f'class folders differ between {train.root} and {val.root}: '
                    f'only in train: {only_train or "none"}; only in val: {only_val or "none"}')
