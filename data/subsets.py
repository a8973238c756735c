"""Labelled subsets of a training split, for semi-supervised evaluation on 1 % / 10 % of the labels.

A subset comes either from a list file or from a class-balanced draw. A list names one image per
line, either by file name alone, as SimCLR's published ImageNet lists do (`n01440764_10026.JPEG`,
matched against the file name of every image), or by its path below the split folder
(`n01440764/n01440764_10026.JPEG`), as `write_subset_list` does so that any drawn subset can be
named again without ambiguity.
"""
import os
import random
from collections import Counter

import torch.utils.data

from data.folder import DataError, fingerprint
from utils.atomic import write_atomic

_SHOWN = 5  # names quoted in an error message


class SubsetError(DataError):
    """A subset list or request that does not select images of the dataset."""


def _examples(names):
    names = list(names)
    more = f', ... ({len(names)} in all)' if len(names) > _SHOWN else ''
    return ', '.join(names[:_SHOWN]) + more


class LabelledSubset(torch.utils.data.Dataset):
    """The images `indices` of an ImageFolder, in folder order, with its classes and transform.

    Offers what the training loop reads from an ImageFolder (`root`, `classes`, `samples`,
    `targets`, `fingerprint()`), so either can be trained on.
    """

    def __init__(self, folder, indices):
        self.folder = folder
        self.indices = sorted(indices)
        self.root = folder.root
        self.classes = folder.classes
        self.samples = [folder.samples[i] for i in self.indices]
        self.targets = [target for _, target in self.samples]

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        return self.folder[self.indices[i]]

    def fingerprint(self):
        """data.folder.fingerprint of the selected images."""
        return fingerprint(rel for rel, _ in self.samples)


def read_subset_list(path):
    """The image names of a list file, one per line (blank lines skipped), in file order."""
    try:
        with open(path) as f:
            names = [line.strip() for line in f if line.strip()]
    except OSError as e:
        raise SubsetError(f'cannot read subset list {path}: {e}') from e
    if not names:
        raise SubsetError(f'subset list {path} names no images')
    repeated = [name for name, count in Counter(names).items() if count > 1]
    if repeated:
        raise SubsetError(f'subset list {path} names {len(repeated)} images more than once: '
                          f'{_examples(repeated)}')
    return names


def select_listed(folder, names, source):
    """Sorted indices of the images of `folder` that `names` lists (see the module docstring).

    Every name must match exactly one image: unknown names and file names shared by images of
    several class folders are SubsetErrors quoting `source` (the list file), the count and a few.
    """
    by_path = {rel: i for i, (rel, _) in enumerate(folder.samples)}
    by_file = {}
    for i, (rel, _) in enumerate(folder.samples):
        by_file.setdefault(rel.rsplit('/', 1)[-1], []).append(i)
    indices, unknown, ambiguous = [], [], []
    for name in names:
        if '/' in name:
            matches = [by_path[name]] if name in by_path else []
        else:
            matches = by_file.get(name, [])
        if not matches:
            unknown.append(name)
        elif len(matches) > 1:
            ambiguous.append(f'{name} ({" and ".join(folder.samples[i][0] for i in matches)})')
        else:
            indices.append(matches[0])
    if unknown:
        raise SubsetError(f'{len(unknown)} of the {len(names)} images listed in {source} are not in '
                          f'{folder.root}: {_examples(unknown)}')
    if ambiguous:
        raise SubsetError(f'{len(ambiguous)} file names listed in {source} match several images of '
                          f'{folder.root}: {_examples(ambiguous)}; name them as <class>/<file>')
    if len(set(indices)) != len(indices):
        raise SubsetError(f'{source} names some images of {folder.root} twice, by file name and by path')
    return sorted(indices)


def balanced_subset(folder, percent, seed):
    """Sorted indices of `percent` % of `folder`'s images, the same number from every class.

    Each class gives round(percent / 100 * images / classes) images (at least one), drawn
    without replacement by a generator seeded with `seed`: the same seed and folder always give
    the same subset. A class with fewer images than that is a SubsetError.
    """
    if not 0 < percent <= 100:
        raise SubsetError(f'a subset holds between 0 and 100 % of the images, not {percent} %')
    per_class = max(1, round(percent / 100 * len(folder) / len(folder.classes)))
    by_class = [[] for _ in folder.classes]
    for i, target in enumerate(folder.targets):
        by_class[target].append(i)
    short = [f'{folder.classes[c]} ({len(images)})' for c, images in enumerate(by_class)
             if len(images) < per_class]
    if short:
        raise SubsetError(f'{percent} % of {folder.root} with the same number of images per class '
                          f'needs {per_class} images of every class; too few in {_examples(short)}')
    rng = random.Random(seed)
    return sorted(i for images in by_class for i in rng.sample(images, per_class))


def write_subset_list(path, subset):
    """Write the relative paths of `subset`'s images, one per line, atomically: a list that
    `read_subset_list` + `select_listed` turn back into the same subset."""
    text = ''.join(f'{rel}\n' for rel, _ in subset.samples)
    write_atomic(path, lambda f: f.write(text.encode('utf-8')))


def load_subset(folder, path):
    """The LabelledSubset of `folder` named by the list file `path`."""
    return LabelledSubset(folder, select_listed(folder, read_subset_list(path), os.fspath(path)))
