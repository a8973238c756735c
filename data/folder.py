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

from utils.errors import UserError

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.webp', '.ppm', '.pgm', '.tif', '.tiff')


class DataError(UserError, ValueError):
    """A dataset folder, image or data file that cannot be used as it is."""


def _is_image(name):
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _links_back(dirpath, name, real_dirpath):
    """Whether sub-folder `name` of `dirpath` is a link to `dirpath` itself or to a folder above it."""
    target = os.path.realpath(os.path.join(dirpath, name))
    return real_dirpath == target or real_dirpath.startswith(target.rstrip(os.sep) + os.sep)


def _list_images(class_dir, root):
    """Relative paths (to class_dir, '/'-separated) of the images below class_dir, sorted.

    Symbolic links to folders are followed, except into a folder already listed or one holding
    the dataset `root` or the folder itself (a link loop), which would list images again.
    """
    found = []
    listed = {os.path.realpath(root)}
    for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in listed:
            dirnames[:] = []
            continue
        listed.add(real)
        dirnames[:] = [d for d in dirnames if not d.startswith('.') and not _links_back(dirpath, d, real)]
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
            images = _list_images(os.path.join(self.root, name), self.root)
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
        """fingerprint() of the folder's images in index order."""
        if self._fingerprint is None:
            self._fingerprint = fingerprint(rel for rel, _ in self.samples)
        return self._fingerprint


def fingerprint(relative_paths):
    """sha256 (hex) of the ordered relative paths, '\\n'-joined: equal iff the images and their order
    are; the dataset's identity in a neighbour file's sidecar and a probe checkpoint."""
    return hashlib.sha256('\n'.join(relative_paths).encode('utf-8')).hexdigest()


def check_same_classes(train, val):
    """The linear probe needs the val split to label classes exactly as the train split does."""
    if train.classes == val.classes:
        return
    only_train = sorted(set(train.classes) - set(val.classes))
    only_val = sorted(set(val.classes) - set(train.classes))
    raise DataError(f'class folders differ between {train.root} and {val.root}: '
                    f'only in train: {only_train or "none"}; only in val: {only_val or "none"}')


UNREADABLE = -1  # the label MarkUnreadable gives an image that cannot be read
_LISTED_PROBLEMS = 50  # unreadable images named in one error; tools/check_dataset.py lists all


class MarkUnreadable(torch.utils.data.Dataset):
    """folder[i], or (a blank image through the folder's transform, UNREADABLE) when image i
    cannot be read: one pass over the dataset then finds every unreadable image, not the first."""

    def __init__(self, folder):
        self.folder = folder

    def __len__(self):
        return len(self.folder)

    def __getitem__(self, i):
        try:
            return self.folder[i]
        except DataError:
            blank = Image.new('RGB', (1, 1))
            return (self.folder.transform(blank) if self.folder.transform else blank), UNREADABLE


class _DecodeProblems(torch.utils.data.Dataset):
    """Index i -> (i, why image i cannot be decoded, or '')."""

    def __init__(self, folder, indices):
        self.folder, self.indices = folder, indices

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, position):
        i = self.indices[position]
        try:
            self.folder.load(i)
            return i, ''
        except DataError as e:
            return i, str(e)


def unreadable_images(folder, indices=None, workers=0):
    """'cannot read image <path>: <why>' for each image of `folder` (or of `indices`) that does
    not decode, in index order; `workers` processes decode in parallel."""
    indices = list(range(len(folder))) if indices is None else list(indices)
    loader = torch.utils.data.DataLoader(_DecodeProblems(folder, indices), batch_size=64,
                                         num_workers=workers, collate_fn=list)
    return [problem for batch in loader for _, problem in batch if problem]


def unreadable_error(folder, indices):
    """One DataError naming the unreadable images `indices` of `folder` and why (the first
    _LISTED_PROBLEMS are decoded again to say why)."""
    indices = list(indices)
    shown = '; '.join(unreadable_images(folder, indices[:_LISTED_PROBLEMS]))
    more = (f'; and {len(indices) - _LISTED_PROBLEMS} more (python tools/check_dataset.py {folder.root} '
            'lists them all)') if len(indices) > _LISTED_PROBLEMS else ''
    return DataError(f'{len(indices)} of the {len(folder)} images of {folder.root} cannot be read: {shown}{more}')
