"""Training samples of stage 2: a bag (anchor + one neighbour), or two views for MoCo."""
import torch
import torch.utils.data


class BagDataset(torch.utils.data.Dataset):
    """Sample i -> (q, k, pq, pk, i, j): two views of anchor i, two of a neighbour j.

    j is drawn uniformly from neighbours[i] afresh on every call, with torch's RNG so
    that the sample's seed governs it (utils.training.SeededSamples); over the epochs
    the student sees every member of the bag.
    """

    def __init__(self, folder, neighbours, augmentation):
        if len(neighbours) != len(folder):
            raise ValueError(f'{len(neighbours)} neighbour rows for the {len(folder)} images '
                             f'of {folder.root}')
        self.folder = folder
        self.neighbours = neighbours  # (N, k) dataset indices
        self.augmentation = augmentation

    def __len__(self):
        return len(self.folder)

    def __getitem__(self, i):
        row = self.neighbours[i]
        j = int(row[torch.randint(len(row), ()).item()])
        anchor, neighbour = self.folder.load(i), self.folder.load(j)
        aug = self.augmentation
        return aug(anchor), aug(anchor), aug(neighbour), aug(neighbour), i, j


class TwoViewDataset(torch.utils.data.Dataset):
    """Sample i -> (q, k, i): two independent views of image i (plain MoCo v2)."""

    def __init__(self, folder, augmentation):
        self.folder = folder
        self.augmentation = augmentation

    def __len__(self):
        return len(self.folder)

    def __getitem__(self, i):
        img = self.folder.load(i)
        return self.augmentation(img), self.augmentation(img), i
