"""Training samples of stage 2: a bag (anchor + one neighbour), or two views for MoCo and the peers."""
import torch
import torch.utils.data


def check_rows(neighbours, folder):
    if len(neighbours) != len(folder):
        raise ValueError(f'{len(neighbours)} neighbour rows for the {len(folder)} images of {folder.root}')


def draw_neighbour(neighbours, i):
    """A neighbour of image i drawn uniformly from row i, afresh on every call, with torch's RNG so
    that the sample's seed governs it (utils.training.SeededSamples): over the epochs the student
    sees every member of the bag."""
    row = neighbours[i]
    return int(row[torch.randint(len(row), ()).item()])


class BagDataset(torch.utils.data.Dataset):
    """Sample i -> (q, k, pq, pk): two views of anchor i, two of a neighbour j (draw_neighbour)."""

    def __init__(self, folder, neighbours, augmentation):
        check_rows(neighbours, folder)
        self.folder = folder
        self.neighbours = neighbours  # (N, k) dataset indices
        self.augmentation = augmentation

    def __len__(self):
        return len(self.folder)

    def __getitem__(self, i):
        j = draw_neighbour(self.neighbours, i)
        anchor, neighbour = self.folder.load(i), self.folder.load(j)
        aug = self.augmentation
        return aug(anchor), aug(anchor), aug(neighbour), aug(neighbour)


class TwoViewDataset(torch.utils.data.Dataset):
    """Sample i -> (q, k): two independent views of image i (plain MoCo v2)."""

    def __init__(self, folder, augmentation):
        self.folder = folder
        self.augmentation = augmentation

    def __len__(self):
        return len(self.folder)

    def __getitem__(self, i):
        img = self.folder.load(i)
        return self.augmentation(img), self.augmentation(img)
