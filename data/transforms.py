"""Image transforms of the three stages (SPEC.md), for any square image_size.

All randomness comes from torch's RNG, so a seed makes a run reproducible (in training each
sample is drawn from a seed of its own: utils.training.SeededSamples).
"""
import torch
from PIL import ImageFilter
from torchvision import transforms

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def resize_size(image_size):
    """The short side before the centre crop: 256 for 224, in proportion otherwise."""
    return round(image_size * 256 / 224)


class GaussianBlur:
    """PIL Gaussian blur with sigma drawn uniformly from [sigma[0], sigma[1]] on every call."""

    def __init__(self, sigma=(0.1, 2.0)):
        self.sigma = sigma

    def __call__(self, img):
        sigma = torch.empty(1).uniform_(self.sigma[0], self.sigma[1]).item()
        return img.filter(ImageFilter.GaussianBlur(radius=sigma))

    def __repr__(self):
        return f'{type(self).__name__}(sigma={self.sigma})'


def eval_transform(image_size=224):
    """Stage 1 features and the stage 3 val split: Resize(256) -> CenterCrop(224) at 224."""
    return transforms.Compose([
        transforms.Resize(resize_size(image_size)),
        transforms.CenterCrop(image_size),
        transforms.ToTensor(),
        transforms.Normalize(MEAN, STD),
    ])


def moco_v2_augmentation(image_size=224, min_scale=0.2):
    """Stage 2: each of the four views of a bag sample is one independent call. min_scale: the
    smallest area share of the crop (SEED's release crops from 0.14 with a SwAV teacher)."""
    return transforms.Compose([
        transforms.RandomResizedCrop(image_size, scale=(min_scale, 1.0)),
        transforms.RandomApply([transforms.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        transforms.RandomGrayscale(p=0.2),
        transforms.RandomApply([GaussianBlur((0.1, 2.0))], p=0.5),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(MEAN, STD),
    ])


def greyscale_augmentation(image_size=224, min_scale=0.2):
    """Stage 2 views of small greyscale images (the Fashion-MNIST demo): MoCo v2's crop, flip and
    brightness/contrast jitter. Its saturation and hue jitter and random grayscale do nothing to a
    grey image, and its blur (sigma up to 2 px) erases most of a 28 px one, so they are left out."""
    return transforms.Compose([
        transforms.RandomResizedCrop(image_size, scale=(min_scale, 1.0)),
        transforms.RandomApply([transforms.ColorJitter(0.4, 0.4)], p=0.8),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(MEAN, STD),
    ])


# --augmentation of main_distill.py: how the views of stage 2 are drawn.
AUGMENTATIONS = {'moco_v2': moco_v2_augmentation, 'greyscale': greyscale_augmentation}


def linear_train_transform(image_size=224):
    """Stage 3 training split of the linear probe."""
    return transforms.Compose([
        transforms.RandomResizedCrop(image_size),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(MEAN, STD),
    ])
