"""Stage 2 samples as file bytes, decoded and augmented a whole batch at a time on the GPU.

With `--data_pipeline=gpu` the DataLoader workers only read the files and draw the bag
neighbour; `gpu_views` then decodes the batch (one batched torchvision.io.decode_jpeg call,
nvJPEG on CUDA) and draws the views with data.gpu_augment. Files that nvJPEG cannot decode as
colour (PNG and other formats, greyscale or CMYK JPEGs, lossless or arithmetic-coded JPEGs) are
decoded by the workers with PIL, exactly as ImageFolder.load decodes them, and travel as pixels.

Workers return each file as a flat uint8 tensor (its bytes, or its pixels) with a flag saying
whether nvJPEG decodes it and the pixels' shape, and `collate_encoded` joins a batch into one flat
tensor (shared memory, pinned by the DataLoader) with the files' lengths, so the main process
neither unpickles bytes nor parses JPEG headers.

Both pipelines meet here: `training_dataset` is stage 2's dataset for either, and
`views_on_device` hands the training step its views from either.
"""
import io

import numpy as np
import torch
import torch.utils.data
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from data.bags import BagDataset, TwoViewDataset, check_rows, draw_neighbour
from data.folder import DataError
from data.gpu_augment import CROP_SCALE, centre_crops, draw_views

_STANDALONE_MARKERS = {0x01, *range(0xD0, 0xD8)}  # TEM, RST0-7: no length field
_NOT_FRAME_MARKERS = {0xC4, 0xC8, 0xCC}  # DHT, JPG, DAC share the SOFn range
_HUFFMAN_FRAMES = {0xC0, 0xC1, 0xC2}  # baseline, extended sequential, progressive


def _read(path):
    """A file as a flat uint8 tensor, whether nvJPEG decodes it (is_colour_jpeg), and (H, W):
    a colour JPEG's bytes and (0, 0); any other file's RGB pixels (H, W, 3), decoded here by PIL."""
    try:
        with open(path, 'rb') as f:
            data = f.read()
    except OSError as e:
        raise DataError(f'cannot read image {path}: {e}') from e
    if is_colour_jpeg(data):
        return torch.frombuffer(bytearray(data), dtype=torch.uint8), True, (0, 0)
    pixels = _decode_with_pil(data, path)
    return pixels.permute(1, 2, 0).reshape(-1), False, tuple(pixels.shape[1:])


def _sample(paths, indices):
    encoded, jpeg, shape = zip(*(_read(path) for path in paths))
    return {'encoded': encoded, 'jpeg': jpeg, 'shape': shape, 'path': paths, 'index': indices}


def collate_encoded(samples):
    """Samples of the datasets below -> one batch: 'data' (all files' bytes or pixels, role by
    role: every sample's first file, then every sample's second), 'lengths', 'jpeg' and 'shapes'
    (F, 2) per file, 'path' (list), 'index' (B, roles) and 'roles'."""
    roles = len(samples[0]['encoded'])
    order = [(sample, role) for role in range(roles) for sample in samples]
    files = [sample['encoded'][role] for sample, role in order]
    return {'data': torch.cat(files), 'lengths': torch.tensor([len(f) for f in files]),
            'jpeg': torch.tensor([sample['jpeg'][role] for sample, role in order]),
            'shapes': torch.tensor([sample['shape'][role] for sample, role in order]),
            'path': [sample['path'][role] for sample, role in order],
            'index': torch.tensor([sample['index'] for sample in samples]), 'roles': roles}


class EncodedBagDataset(torch.utils.data.Dataset):
    """Sample i -> {'encoded': (anchor, neighbour) uint8 tensors of the files (_read), 'jpeg': (..),
    'shape': (..), 'path': (..), 'index': (i, j)}; batch with `collate` (collate_encoded).

    j is drawn as data.bags.BagDataset draws it (draw_neighbour); `gpu_views` turns a batch into
    (q, k, pq, pk).
    """

    collate = staticmethod(collate_encoded)

    def __init__(self, folder, neighbours):
        check_rows(neighbours, folder)
        self.folder = folder
        self.neighbours = neighbours  # (N, k) dataset indices

    def __len__(self):
        return len(self.folder)

    def __getitem__(self, i):
        j = draw_neighbour(self.neighbours, i)
        return _sample((self.folder.path(i), self.folder.path(j)), (i, j))


class EncodedTwoViewDataset(torch.utils.data.Dataset):
    """Sample i -> {'encoded': (file,), 'jpeg': (..), 'shape': (..), 'path': (path,), 'index': (i,)};
    `gpu_views` makes (q, k)."""

    collate = staticmethod(collate_encoded)

    def __init__(self, folder):
        self.folder = folder

    def __len__(self):
        return len(self.folder)

    def __getitem__(self, i):
        return _sample((self.folder.path(i),), (i,))


def training_dataset(folder, neighbours, pipeline, augmentation):
    """Stage 2's dataset of `folder`: bags when `neighbours` (N, k) is given (BINGO), else two views of
    each image. pipeline 'cpu': the views, augmented by `augmentation` in the loader's workers;
    'gpu': the files' bytes, which views_on_device decodes and augments on the device."""
    if pipeline == 'gpu':
        return EncodedTwoViewDataset(folder) if neighbours is None else EncodedBagDataset(folder, neighbours)
    if neighbours is None:
        return TwoViewDataset(folder, augmentation)
    return BagDataset(folder, neighbours, augmentation)


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


def _decode_list(tensors, device):
    """decode_jpeg on a list; when the batch call fails, image by image with None for failures,
    so that one odd file costs a CPU decode, not the run."""
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


_DECODE_STREAMS = {}


def _decode_jpegs(tensors, device):
    """decode_jpeg of uint8 tensors on `device`, safe from nvJPEG's stream hazard on CUDA.

    nvJPEG's hardware decoder writes its outputs without waiting for the work already queued on
    the stream it is given, and torchvision allocates those outputs from the caching allocator
    while the caller's stream is current (pytorch/vision#9606). A block that the training step
    freed while its kernels are still queued can be handed to the decoder and overwritten: wrong
    numbers, NaN losses. So the decode runs with a private stream current, whose memory pool no
    queued kernel uses: it first waits for that stream's own work (a host wait on decode work
    only, already finished), the outputs are then ordered before the caller's stream and marked
    as used by it, so the allocator never hands them back while the caller may still read them.
    """
    if device.type != 'cuda':
        return _decode_list(tensors, device)
    caller = torch.cuda.current_stream(device)
    private = _DECODE_STREAMS.setdefault(device, torch.cuda.Stream(device))
    private.synchronize()
    with torch.cuda.stream(private):
        images = _decode_list(tensors, device)
    caller.wait_stream(private)
    for image in images:
        if image is not None:
            image.record_stream(caller)
    return images


def decode_images(encoded, paths, device, jpeg=None, shapes=None):
    """Files (uint8 tensors or bytes) -> list of (3, H, W) uint8 RGB tensors on `device`, in order.

    Files with a shape (H, W) in `shapes` are pixels already (_read) and go to `device` in one
    copy. Colour JPEGs (`jpeg`, per file; is_colour_jpeg when None) go through one batched
    torchvision.io.decode_jpeg call on `device`; the rest, and any JPEG it rejects, through PIL on
    the CPU. DataError names a file PIL cannot read either.
    """
    device = torch.device(device)
    encoded = [torch.frombuffer(bytearray(f), dtype=torch.uint8) if isinstance(f, bytes) else f
               for f in encoded]
    if jpeg is None:
        jpeg = [is_colour_jpeg(f.numpy().tobytes()) for f in encoded]
    images = [None] * len(encoded)
    decoded = [n for n, (height, _) in enumerate(shapes or []) if height]
    if decoded:
        pixels = torch.cat([encoded[n] for n in decoded]).to(device, non_blocking=True)
        for n, flat in zip(decoded, pixels.split([len(encoded[n]) for n in decoded])):
            images[n] = flat.view(*shapes[n], 3).permute(2, 0, 1)
    colour = [n for n, is_jpeg in enumerate(jpeg) if is_jpeg]
    if colour:
        for n, image in zip(colour, _decode_jpegs([encoded[n] for n in colour], device)):
            images[n] = image
    for n, image in enumerate(images):
        if image is None:  # not a colour JPEG, or one decode_jpeg rejects
            images[n] = _decode_with_pil(encoded[n].numpy().tobytes(), paths[n]).to(device)
    return images


def _batch_images(batch, device):
    encoded = list(batch['data'].split(batch['lengths'].tolist()))
    return decode_images(encoded, batch['path'], device, batch['jpeg'].tolist(), batch['shapes'].tolist())


def gpu_views(batch, device, image_size, generator=None, min_scale=CROP_SCALE[0], augmentation='moco_v2'):
    """A collate_encoded batch -> the views the training step takes: [q, k, pq, pk] (bags) or
    [q, k] (two views), each (B, 3, S, S) float32 on `device`, normalised. Random parameters of
    --augmentation come from `generator` or torch's global RNG; min_scale is the smallest area
    share of the crops."""
    images = _batch_images(batch, device)
    views = draw_views(images, image_size, 2, generator, min_scale, augmentation)
    roles = batch['roles']
    size = len(images) // roles
    views = views.view(roles, size, 2, 3, image_size, image_size).transpose(1, 2)
    return list(views.reshape(roles * 2, size, 3, image_size, image_size).unbind(0))


def views_on_device(batches, pipeline, device, image_size, n_views, view_seed=None, min_scale=CROP_SCALE[0],
                    augmentation='moco_v2'):
    """(step, batch) pairs of a loader -> (step, the views the training step takes, on `device`).

    pipeline 'cpu': the loader's augmented tensors (the first n_views of each sample), copied
    without blocking. 'gpu': the loader's files, decoded and augmented by gpu_views, with
    parameters drawn from a generator seeded with view_seed(step) (torch's global RNG when None)
    and crops of at least min_scale of the image, the first n_views of them (of --augmentation);
    on CUDA each batch's views are made on a side stream one batch ahead, so that decoding and
    augmenting the next batch overlap the current training step.
    """
    def views(step, batch):
        generator = None if view_seed is None else torch.Generator().manual_seed(view_seed(step))
        return gpu_views(batch, device, image_size, generator, min_scale, augmentation)[:n_views]

    if pipeline == 'cpu':
        for step, batch in batches:
            yield step, [view.to(device, non_blocking=True) for view in batch[:n_views]]
        return
    if device.type != 'cuda':
        for step, batch in batches:
            yield step, views(step, batch)
        return
    main = torch.cuda.current_stream(device)
    side = torch.cuda.Stream(device)
    ahead = None
    for step, batch in batches:
        with torch.cuda.stream(side):
            made = views(step, batch)
            ready = side.record_event()
        if ahead is not None:
            yield _handed_over(*ahead, main)
        ahead = step, made, ready
    if ahead is not None:
        yield _handed_over(*ahead, main)


def _handed_over(step, views, ready, stream):
    """Views made on a side stream, ready for `stream`: it waits for them, and the allocator keeps
    their memory until `stream` is done with them."""
    stream.wait_event(ready)
    for view in views:
        view.record_stream(stream)
    return step, views


class EncodedEvalBatches:
    """Batches of an EncodedTwoViewDataset loader as (images, targets): decoded on `device` and
    resized and centre-cropped there (gpu_augment.centre_crops), the stage 1 transform."""

    def __init__(self, loader, targets, device, image_size, resize):
        self.loader, self.targets = loader, torch.as_tensor(targets)
        self.device, self.image_size, self.resize = device, image_size, resize

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            images = _batch_images(batch, self.device)
            yield centre_crops(images, self.image_size, self.resize), self.targets[batch['index'][:, 0]]
