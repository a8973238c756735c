"""Stage 2 samples as file bytes, decoded and augmented a whole batch at a time on the GPU.

With `--data_pipeline=gpu` the DataLoader workers only read the files and draw the bag
neighbour; `gpu_views` then decodes the batch (one batched torchvision.io.decode_jpeg call,
nvJPEG on CUDA) and draws the views with data.gpu_augment. Files that nvJPEG cannot decode as
colour (PNG and other formats, greyscale or CMYK JPEGs, lossless or arithmetic-coded JPEGs) are
decoded with PIL on the CPU, exactly as ImageFolder.load decodes them, and joined to the batch.

Samples are dicts of tuples of bytes, paths and indices, which torch's default collate turns
into lists without copying the bytes into tensors (their lengths differ).
"""
import io

import numpy as np
import torch
import torch.utils.data
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from data.folder import DataError
from data.gpu_augment import CROP_SCALE, moco_v2_views

_STANDALONE_MARKERS = {0x01, *range(0xD0, 0xD8)}  # TEM, RST0-7: no length field
_NOT_FRAME_MARKERS = {0xC4, 0xC8, 0xCC}  # DHT, JPG, DAC share the SOFn range
_HUFFMAN_FRAMES = {0xC0, 0xC1, 0xC2}  # baseline, extended sequential, progressive


def _read(path):
    try:
        with open(path, 'rb') as f:
            return f.read()
    except OSError as e:
        raise DataError(f'cannot read image {path}: {e}') from e


class EncodedBagDataset(torch.utils.data.Dataset):
    """Sample i -> {'encoded': (anchor bytes, neighbour bytes), 'path': (..), 'index': (i, j)}.

    j is drawn uniformly from neighbours[i] afresh on every call with torch's RNG, as
    data.bags.BagDataset draws it; `gpu_views` turns a batch into (q, k, pq, pk).
    """

    def __init__(self, folder, neighbours):
        if len(neighbours) != len(folder):
            raise ValueError(f'{len(neighbours)} neighbour rows for the {len(folder)} images '
                             f'of {folder.root}')
        self.folder = folder
        self.neighbours = neighbours  # (N, k) dataset indices

    def __len__(self):
        return len(self.folder)

    def __getitem__(self, i):
        row = self.neighbours[i]
        j = int(row[torch.randint(len(row), ()).item()])
        paths = (self.folder.path(i), self.folder.path(j))
        return {'encoded': tuple(_read(p) for p in paths), 'path': paths, 'index': (i, j)}


class EncodedTwoViewDataset(torch.utils.data.Dataset):
    """Sample i -> {'encoded': (bytes,), 'path': (path,), 'index': (i,)}; `gpu_views` makes (q, k)."""

    def __init__(self, folder):
        self.folder = folder

    def __len__(self):
        return len(self.folder)

    def __getitem__(self, i):
        path = self.folder.path(i)
        return {'encoded': (_read(path),), 'path': (path,), 'index': (i,)}


def is_colour_jpeg(data: bytes) -> bool:
    """Whether nvJPEG decodes `data` to the colours PIL gives: a Huffman-coded (baseline or
    progressive) 8-bit JPEG with three YCbCr components. Reads the markers up to the frame header."""
    if data[:2] != b'\xff\xd8':
        return False
    adobe_rgb = False  # an Adobe APP14 segment with transform 0: the components are R, G, B
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return False
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in _STANDALONE_MARKERS:
            pos += 2
            continue
        length = int.from_bytes(data[pos + 2:pos + 4], 'big')
        segment = data[pos + 4:pos + 2 + length]
        if marker == 0xEE and segment[:5] == b'Adobe' and len(segment) >= 12:
            adobe_rgb = segment[11] == 0
        elif 0xC0 <= marker <= 0xCF and marker not in _NOT_FRAME_MARKERS:
            return (marker in _HUFFMAN_FRAMES and len(segment) >= 6 and segment[0] == 8
                    and segment[5] == 3 and not adobe_rgb)
        elif marker in (0xDA, 0xD9):  # a scan or the end before any frame header
            return False
        pos += 2 + length
    return False


def _decode_with_pil(data, path):
    try:
        with Image.open(io.BytesIO(data)) as img:
            rgb = np.array(img.convert('RGB'))
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f'cannot read image {path}: {e}') from e
    return torch.from_numpy(rgb).permute(2, 0, 1)


def _decode_jpegs(encoded, device):
    """decode_jpeg on a list; when the batch call fails, image by image with None for failures,
    so that one odd file costs a CPU decode, not the run."""
    tensors = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in encoded]
    try:
        return decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        decoded = []
        for tensor in tensors:
            try:
                decoded.append(decode_jpeg(tensor, mode=ImageReadMode.RGB, device=device))
            except RuntimeError:
                decoded.append(None)
        return decoded


def decode_images(encoded, paths, device):
    """File bytes -> list of (3, H, W) uint8 RGB tensors on `device`, in order.

    Colour JPEGs go through one batched torchvision.io.decode_jpeg call on `device`; the rest,
    and any JPEG it rejects, through PIL on the CPU. DataError names a file PIL cannot read either.
    """
    device = torch.device(device)
    images = [None] * len(encoded)
    jpeg = [n for n, data in enumerate(encoded) if is_colour_jpeg(data)]
    if jpeg:
        for n, image in zip(jpeg, _decode_jpegs([encoded[n] for n in jpeg], device)):
            images[n] = image
    for n, image in enumerate(images):
        if image is None:
            images[n] = _decode_with_pil(encoded[n], paths[n]).to(device)
    return images


def gpu_views(batch, device, image_size, generator=None, min_scale=CROP_SCALE[0]):
    """A collated batch of EncodedBagDataset / EncodedTwoViewDataset samples -> the views the
    training step takes: [q, k, pq, pk] (bags) or [q, k] (two views), each (B, 3, S, S) float32
    on `device`, normalised. Random parameters come from `generator` or torch's global RNG;
    min_scale is the smallest area share of the crops."""
    encoded = [data for role in batch['encoded'] for data in role]  # roles one after the other
    paths = [path for role in batch['path'] for path in role]
    images = decode_images(encoded, paths, device)
    views = moco_v2_views(images, image_size, views_per_image=2, generator=generator, min_scale=min_scale)
    roles, size = len(batch['encoded']), len(batch['encoded'][0])
    views = views.view(roles, size, 2, 3, image_size, image_size).transpose(1, 2)
    return list(views.reshape(roles * 2, size, 3, image_size, image_size).unbind(0))
