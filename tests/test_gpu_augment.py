"""The batched tensor augmentation and the bytes pipeline of `--data_pipeline=gpu`, on the CPU
(and on CUDA where there is a device: benchmarks/run_gpu_data.sh runs those tests).

Tolerances (documented in data/gpu_augment.py):
- against torchvision's tensor functional ops with the same parameters: 1e-5 per op, 1e-4 for a
  whole view (float rounding only);
- against the PIL path with the same parameters: crop + resize (+ grayscale, flip) within one
  grey level; with colour jitter about 1.5 levels on average, up to 8 at a pixel (PIL rounds to
  uint8 after every op and shifts hue in 8-bit HSV); PIL's box-blur approximation of the
  Gaussian within 1.5 levels on average, up to about 25 at sharp edges;
- on CUDA against the CPU: 1e-4 without TF32, 1e-2 (normalised units) with TF32 convolutions;
  nvJPEG against PIL: 3 grey levels on average (IDCT and chroma upsampling differ).
The random parameters are compared with the PIL path's own draws (torchvision's get_params) by
two-sample Kolmogorov-Smirnov tests at the 0.1 % level with fixed seeds, and the probabilities
with 4.5-sigma binomial bounds; the recipe's numbers are read from moco_v2_augmentation itself.
"""
import io
import math

import numpy as np
import pytest
import torch
import torch.utils.data
import torchvision.transforms.functional as TF
from PIL import Image, ImageFilter
from torchvision import transforms as T
from torchvision.io import decode_jpeg

from data import gpu_augment as ga
from data.folder import DataError, ImageFolder
from data.jpeg_bags import (EncodedBagDataset, EncodedTwoViewDataset, collate_encoded, decode_images,
                            gpu_views, is_colour_jpeg)
from data.transforms import MEAN, STD, GaussianBlur, greyscale_augmentation, moco_v2_augmentation

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')


def smooth_image(generator, height, width):
    """A (3, H, W) float image in [0, 1] with structure at several scales (not white noise)."""
    coarse = torch.rand(1, 3, max(2, height // 6), max(2, width // 6), generator=generator)
    fine = torch.rand(1, 3, height, width, generator=generator)
    up = torch.nn.functional.interpolate(coarse, size=(height, width), mode='bicubic', align_corners=False)
    return (0.8 * up + 0.2 * fine).clamp(0, 1)[0]


def to_uint8(x):
    return (x * 255).round().to(torch.uint8)


def to_pil(img_uint8):
    return Image.fromarray(img_uint8.permute(1, 2, 0).numpy())


def from_pil(pil):
    return torch.from_numpy(np.array(pil)).permute(2, 0, 1).float() / 255


def ks_statistic(a, b):
    """Two-sample Kolmogorov-Smirnov statistic of 1-D samples."""
    a, b = np.sort(np.asarray(a, float)), np.sort(np.asarray(b, float))
    grid = np.concatenate([a, b])
    return np.abs(np.searchsorted(a, grid, 'right') / len(a) - np.searchsorted(b, grid, 'right') / len(b)).max()


def assert_same_law(a, b, what):
    critical = 1.949 * math.sqrt((len(a) + len(b)) / (len(a) * len(b)))  # alpha = 0.001
    d = ks_statistic(a, b)
    assert d < critical, f'{what}: KS statistic {d:.4f} >= {critical:.4f}'


def assert_rate(hits, p, what):
    n = len(hits)
    rate = float(np.mean(hits))
    assert abs(rate - p) < 4.5 * math.sqrt(p * (1 - p) / n), f'{what}: rate {rate:.4f}, expected {p}'


def reference_view(img, params, v, size):
    """One view through torchvision's tensor functional ops, in the PIL path's order."""
    top, left, h, w = params.boxes[v].tolist()
    x = TF.resized_crop(img, top, left, h, w, [size, size], antialias=True)
    if params.jitter[v]:
        b, c, s, hue = params.factors[v].tolist()
        ops = {ga.BRIGHTNESS: lambda y: TF.adjust_brightness(y, b),
               ga.CONTRAST: lambda y: TF.adjust_contrast(y, c),
               ga.SATURATION: lambda y: TF.adjust_saturation(y, s),
               ga.HUE: lambda y: TF.adjust_hue(y, hue)}
        for op in params.order[v].tolist():
            x = ops[op](x)
    if params.gray[v]:
        x = TF.rgb_to_grayscale(x, num_output_channels=3)
    if params.blur[v]:
        sigma = params.sigma[v].item()
        k = 2 * math.ceil(3 * sigma) + 1
        x = TF.gaussian_blur(x, [k, k], [sigma, sigma])
    if params.flip[v]:
        x = TF.hflip(x)
    return TF.normalize(x, MEAN, STD)


def select(params, rows):
    return ga.ViewParams(**{name: getattr(params, name)[rows] for name in params.__dataclass_fields__})


@pytest.fixture
def images():
    g = torch.Generator().manual_seed(0)
    return [smooth_image(g, 40, 56), smooth_image(g, 23, 31), smooth_image(g, 64, 48)]


# ------------------------------------------------------------ fixed parameters vs torchvision

def test_resized_crops_match_torchvision_resized_crop(images):
    boxes = torch.tensor([[3, 5, 30, 41], [0, 0, 40, 56],  # downscale, whole image
                          [2, 4, 10, 7], [1, 1, 22, 30],  # upscale
                          [60, 40, 4, 8], [0, 0, 64, 48]])  # corner strip, whole image
    flip = torch.tensor([False, True, False, True, True, False])
    out = ga.resized_crops(images, boxes, flip, 16, views_per_image=2)
    assert out.shape == (6, 3, 16, 16)
    for v in range(6):
        top, left, h, w = boxes[v].tolist()
        ref = TF.resized_crop(images[v // 2], top, left, h, w, [16, 16], antialias=True)
        ref = TF.hflip(ref) if flip[v] else ref
        torch.testing.assert_close(out[v], ref, atol=1e-5, rtol=0)


def test_resized_crops_of_uint8_match_pil_within_one_level(images):
    img = to_uint8(images[2])
    boxes = torch.tensor([[5, 3, 50, 40], [0, 0, 64, 48], [10, 20, 12, 9]])
    out = ga.resized_crops([img], boxes, torch.zeros(3, dtype=torch.bool), 24, views_per_image=3)
    for v in range(3):
        top, left, h, w = boxes[v].tolist()
        ref = from_pil(TF.resized_crop(to_pil(img), top, left, h, w, [24, 24]))  # PIL BILINEAR
        assert (out[v] - ref).abs().max() <= 1 / 255


def test_resized_crops_grouping_does_not_change_views(images):
    g = torch.Generator().manual_seed(1)
    sizes = torch.tensor([img.shape[1:] for img in images]).repeat_interleave(2, 0)
    boxes = ga.sample_crop_boxes(sizes, g)
    flip = torch.rand(6, generator=g) < 0.5
    together = ga.resized_crops(images, boxes, flip, 12, views_per_image=2)
    apart = ga.resized_crops(images, boxes, flip, 12, views_per_image=2, max_elements=1)  # one image a group
    torch.testing.assert_close(together, apart, atol=1e-6, rtol=0)


def test_colour_ops_match_torchvision_per_image(images):
    x = torch.stack([TF.resize(img, [20, 20], antialias=True) for img in images])
    factors = torch.tensor([[0.6, 1.4, 0.7, -0.1], [1.4, 0.6, 1.4, 0.05], [1.0, 1.2, 0.6, 0.1]])
    for op, adjust in ((ga.BRIGHTNESS, TF.adjust_brightness), (ga.CONTRAST, TF.adjust_contrast),
                       (ga.SATURATION, TF.adjust_saturation)):
        out = ga._blend_pass(x, torch.full((3,), op), factors)
        for n in range(3):
            torch.testing.assert_close(out[n], adjust(x[n], factors[n, op].item()), atol=1e-5, rtol=0)
    out = ga.adjust_hue(x, factors[:, ga.HUE])
    for n in range(3):
        torch.testing.assert_close(out[n], TF.adjust_hue(x[n], factors[n, ga.HUE].item()), atol=1e-5, rtol=0)
    gray = torch.tensor([[0.5, 0.5, 0.5], [0.2, 0.9, 0.1]])[:, :, None, None].expand(2, 3, 4, 4)
    torch.testing.assert_close(ga.adjust_hue(gray, torch.tensor([0.3, 0.0])), gray, atol=1e-6, rtol=0)


def test_color_jitter_follows_each_images_order(images):
    x = torch.stack([TF.resize(img, [16, 16], antialias=True) for img in images] * 2)  # 6 images
    factors = torch.tensor([[1.4, 1.3, 1.4, 0.1]] * 3 + [[0.6, 0.7, 0.6, -0.08]] * 3)  # clamping bites
    order = torch.tensor([[3, 0, 1, 2], [0, 1, 2, 3], [2, 3, 0, 1], [1, 0, 3, 2], [0, 3, 2, 1], [2, 1, 0, 3]])
    apply = torch.tensor([True, True, True, True, False, True])
    out = ga.color_jitter(x, apply, factors, order)
    adjust = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    for n in range(6):
        ref = x[n]
        for op in order[n].tolist() if apply[n] else []:
            ref = adjust[op](ref, factors[n, op].item())
        torch.testing.assert_close(out[n], ref, atol=1e-5, rtol=0)
    # The order matters for these factors, so a wrong order could not pass by chance.
    swapped = ga.color_jitter(x, apply, factors, order.flip(1))
    assert (swapped - out).abs().max() > 0.05


def test_gaussian_blur_matches_torchvision_kernel_of_six_sigma(images):
    x = torch.stack([TF.resize(img, [24, 24], antialias=True) for img in images])
    sigma = torch.tensor([0.1, 0.9, 2.0])
    out = ga.gaussian_blur(x, ga.blur_kernels(sigma))
    for n in range(3):
        k = 2 * math.ceil(3 * sigma[n].item()) + 1
        ref = TF.gaussian_blur(x[n], [k, k], [sigma[n].item()] * 2)
        torch.testing.assert_close(out[n], ref, atol=1e-5, rtol=0)


def test_gaussian_blur_is_within_a_grey_level_of_pil_on_average(images):
    img = to_uint8(images[2])
    for sigma in (0.5, 1.0, 2.0):
        ours = ga.gaussian_blur(img.float()[None] / 255, ga.blur_kernels(torch.tensor([sigma])))[0]
        pil = from_pil(to_pil(img).filter(ImageFilter.GaussianBlur(radius=sigma)))
        assert (ours - pil).abs().mean() < 1.5 / 255, sigma


def test_augment_matches_torchvision_functional_ops_view_by_view(images):
    g = torch.Generator().manual_seed(2)
    k = 8  # views per image, 24 views: every op on and off somewhere
    sizes = torch.tensor([img.shape[1:] for img in images]).repeat_interleave(k, 0)
    params = ga.sample_view_params(sizes, g)
    for flag in ('jitter', 'gray', 'blur', 'flip'):
        assert getattr(params, flag).any() and not getattr(params, flag).all(), flag
    out = ga.augment(images, params, 16, views_per_image=k)
    assert out.shape == (24, 3, 16, 16)
    for v in range(24):
        torch.testing.assert_close(out[v], reference_view(images[v // k], params, v, 16), atol=1e-4, rtol=0)
    # Batching mixes nothing between views: one view alone gives the same result.
    alone = ga.augment([images[1]], select(params, [k + 3]), 16)
    torch.testing.assert_close(alone[0], out[k + 3], atol=1e-6, rtol=0)


def assert_close_to_the_pil_view(view, img, params, v):
    """view (3, S, S) against the PIL path's view v of the uint8 image img with the same parameters
    (no blur), within the module's rounding bounds."""
    top, left, h, w = params.boxes[v].tolist()
    size = view.shape[-1]
    pil = TF.resized_crop(to_pil(img), top, left, h, w, [size, size])
    if params.jitter[v]:
        b, c, s, hue = params.factors[v].tolist()
        adjust = [lambda p: TF.adjust_brightness(p, b), lambda p: TF.adjust_contrast(p, c),
                  lambda p: TF.adjust_saturation(p, s), lambda p: TF.adjust_hue(p, hue)]
        for op in params.order[v].tolist():
            pil = adjust[op](pil)
    if params.gray[v]:
        pil = TF.to_grayscale(pil, num_output_channels=3)
    if params.flip[v]:
        pil = TF.hflip(pil)
    ref = TF.normalize(TF.to_tensor(pil), MEAN, STD)
    diff = (view - ref).abs() * torch.tensor(STD)[:, None, None] * 255  # grey levels
    mean_bound, max_bound = (2.5, 12.0) if params.jitter[v] else (0.5, 1.01)
    assert diff.mean() < mean_bound and diff.max() < max_bound, (v, diff.mean().item(), diff.max().item())


def test_augment_of_uint8_is_close_to_the_pil_path_with_the_same_parameters(images):
    g = torch.Generator().manual_seed(3)
    img = to_uint8(images[2])
    params = ga.sample_view_params(torch.tensor([img.shape[1:]] * 12), g)
    params.blur[:] = False  # PIL's blur is an approximation: tested on its own above
    out = ga.augment([img], params, 24, views_per_image=12)
    for v in range(12):
        assert_close_to_the_pil_view(out[v], img, params, v)


# ------------------------------------------------------------ parameter distributions vs the PIL path

def test_recipe_constants_are_the_pil_paths():
    crop, jitter, gray, blur, flip = moco_v2_augmentation(32).transforms[:5]
    assert tuple(crop.scale) == ga.CROP_SCALE and tuple(crop.ratio) == pytest.approx(ga.CROP_RATIO)
    assert jitter.p == ga.P_JITTER and gray.p == ga.P_GRAYSCALE and blur.p == ga.P_BLUR and flip.p == ga.P_FLIP
    color = jitter.transforms[0]
    b, c, s, h = ga.JITTER
    ranges = [*color.brightness, *color.contrast, *color.saturation, *color.hue]
    assert ranges == pytest.approx([1 - b, 1 + b, 1 - c, 1 + c, 1 - s, 1 + s, -h, h])
    assert isinstance(blur.transforms[0], GaussianBlur) and tuple(blur.transforms[0].sigma) == ga.BLUR_SIGMA


def test_greyscale_recipe_is_the_pil_paths():
    crop, jitter, flip, *rest = greyscale_augmentation(32).transforms
    assert isinstance(crop, T.RandomResizedCrop) and isinstance(flip, T.RandomHorizontalFlip)
    assert [type(t) for t in rest] == [T.ToTensor, T.Normalize]  # no grayscale, no blur
    recipe = ga.RECIPES['greyscale']
    assert jitter.p == recipe.p_jitter and flip.p == ga.P_FLIP and recipe.p_grayscale == recipe.p_blur == 0
    color, = jitter.transforms
    b, c, s, h = recipe.jitter
    assert [*color.brightness, *color.contrast] == pytest.approx([1 - b, 1 + b, 1 - c, 1 + c])
    assert color.saturation is None and color.hue is None and s == h == 0


def test_greyscale_views_are_the_pil_paths_with_the_same_parameters(images):
    # A grey image (R = G = B), as ImageFolder gives Fashion-MNIST's.
    grey = to_uint8(images[2].mean(0, keepdim=True).expand(3, -1, -1))
    recipe = ga.RECIPES['greyscale']
    params = ga.sample_view_params(torch.tensor([grey.shape[1:]] * 16), torch.Generator().manual_seed(15),
                                   recipe=recipe)
    assert not params.gray.any() and not params.blur.any() and params.jitter.any()
    assert (params.factors[:, 2] == 1).all() and (params.factors[:, 3] == 0).all()  # saturation, hue: identities
    out = ga.augment([grey], params, 24, views_per_image=16, recipe=recipe)
    pixels = out * torch.tensor(STD)[:, None, None] + torch.tensor(MEAN)[:, None, None]
    assert (pixels - pixels[:, :1]).abs().max() < 1e-5  # grey stays grey
    for v in range(16):  # PIL's saturation 1 and hue 0 leave a grey image as it is
        assert_close_to_the_pil_view(out[v], grey, params, v)


def test_grey_images_go_through_as_one_channel_with_the_same_floats_as_three(images, monkeypatch):
    recipe = ga.RECIPES['greyscale']
    cropped, crop = [], ga.resized_crops  # the channels of each call's images
    monkeypatch.setattr(ga, 'resized_crops',
                        lambda imgs, *a, **k: (cropped.append(imgs[0].shape[0]), crop(imgs, *a, **k))[1])
    grey = [to_uint8(img.mean(0, keepdim=True).expand(3, -1, -1)) for img in images]  # sizes differ
    params = ga.sample_view_params(torch.tensor([img.shape[1:] for img in grey]).repeat_interleave(8, 0),
                                   torch.Generator().manual_seed(3), recipe=recipe)
    three_channels = ga.normalise(ga.color_jitter(ga.resized_crops(grey, params.boxes, params.flip, 24, 8),
                                                  params.jitter, params.factors, params.order))
    assert torch.equal(ga.augment(grey, params, 24, views_per_image=8, recipe=recipe), three_channels)
    assert cropped == [3, 1]  # the reference above, then augment's one channel
    # One image in colour, and every image takes the three-channel path: the same views as before.
    coloured = [to_uint8(images[0]), *grey[1:]]
    three_channels = ga.normalise(ga.color_jitter(ga.resized_crops(coloured, params.boxes, params.flip, 24, 8),
                                                  params.jitter, params.factors, params.order))
    assert torch.equal(ga.augment(coloured, params, 24, views_per_image=8, recipe=recipe), three_channels)
    assert not torch.equal(three_channels[:8, 0], three_channels[:8, 1]) and cropped[2:] == [3, 3]


@pytest.mark.parametrize('height, width', [(48, 64), (16, 100), (100, 16)])  # thin ones often need the centre crop
def test_crop_boxes_follow_random_resized_crop(height, width):
    n = 4000
    ours = ga.sample_crop_boxes(torch.tensor([[height, width]] * n), torch.Generator().manual_seed(4))
    torch.manual_seed(5)
    pil = Image.new('RGB', (width, height))
    theirs = torch.tensor([T.RandomResizedCrop.get_params(pil, list(ga.CROP_SCALE), list(ga.CROP_RATIO))
                           for _ in range(n)])
    for name, column in (('area', lambda b: b[:, 2] * b[:, 3]), ('log ratio', lambda b: torch.log(b[:, 3] / b[:, 2])),
                         ('top', lambda b: b[:, 0]), ('left', lambda b: b[:, 1])):
        assert_same_law(column(ours.double()).numpy(), column(theirs.double()).numpy(), f'{name} {height}x{width}')
    assert (ours[:, 0] + ours[:, 2] <= height).all() and (ours[:, 1] + ours[:, 3] <= width).all()
    assert (ours >= 0).all() and (ours[:, 2:] > 0).all()


def test_colour_and_blur_parameters_follow_the_pil_path():
    n = 4000
    params = ga.sample_view_params(torch.tensor([[32, 32]] * n), torch.Generator().manual_seed(6))
    torch.manual_seed(7)
    color = T.ColorJitter(*ga.JITTER)
    draws = [color.get_params(color.brightness, color.contrast, color.saturation, color.hue) for _ in range(n)]
    theirs = np.array([[b, c, s, h] for _, b, c, s, h in draws])
    for op, name in enumerate(('brightness', 'contrast', 'saturation', 'hue')):
        assert_same_law(params.factors[:, op].numpy(), theirs[:, op], name)
    # Each op equally likely at each position, as torch.randperm gives torchvision.
    their_order = torch.stack([fn_idx for fn_idx, *_ in draws])
    for position in range(4):
        assert_same_law(params.order[:, position].numpy(), their_order[:, position].numpy(), f'op at {position}')
    assert (params.order.sort(1).values == torch.arange(4)).all()
    blur = GaussianBlur()
    their_sigma = [torch.empty(1).uniform_(*blur.sigma).item() for _ in range(n)]
    assert_same_law(params.sigma.numpy(), their_sigma, 'sigma')
    for flag, p in (('jitter', ga.P_JITTER), ('gray', ga.P_GRAYSCALE), ('blur', ga.P_BLUR), ('flip', ga.P_FLIP)):
        assert_rate(getattr(params, flag).numpy(), p, flag)
    # The coins are independent of each other.
    assert_rate((params.gray & params.blur).numpy(), ga.P_GRAYSCALE * ga.P_BLUR, 'gray and blur')


def test_view_params_are_reproducible_with_a_generator():
    sizes = torch.tensor([[40, 30]] * 16)
    a = ga.sample_view_params(sizes, torch.Generator().manual_seed(8))
    b = ga.sample_view_params(sizes, torch.Generator().manual_seed(8))
    c = ga.sample_view_params(sizes, torch.Generator().manual_seed(9))
    assert all(torch.equal(getattr(a, f), getattr(b, f)) for f in a.__dataclass_fields__)
    assert not torch.equal(a.boxes, c.boxes)


# ------------------------------------------------------------ bytes, decoding and fallback

def encode(pixels, **save):
    buffer = io.BytesIO()
    pixels.save(buffer, **save)
    return buffer.getvalue()


@pytest.fixture(scope='module')
def encoded_kinds():
    """The same small photo-like image as every kind of file the pipeline meets."""
    img = to_pil(to_uint8(smooth_image(torch.Generator().manual_seed(10), 24, 32)))
    return {
        'baseline': encode(img, format='JPEG', quality=90),
        'progressive': encode(img, format='JPEG', quality=90, progressive=True),
        'greyscale': encode(img.convert('L'), format='JPEG'),
        'cmyk': encode(img.convert('CMYK'), format='JPEG'),
        'png': encode(img, format='PNG'),
    }


def test_is_colour_jpeg_sends_only_ycbcr_jpegs_to_nvjpeg(encoded_kinds):
    assert {name: is_colour_jpeg(data) for name, data in encoded_kinds.items()} == {
        'baseline': True, 'progressive': True, 'greyscale': False, 'cmyk': False, 'png': False}
    assert not is_colour_jpeg(b'')
    assert not is_colour_jpeg(encoded_kinds['baseline'][:20])  # cut before the frame header


def test_decode_images_falls_back_to_pil_for_other_files(encoded_kinds):
    names = list(encoded_kinds)
    decoded = decode_images([encoded_kinds[n] for n in names], names, 'cpu')
    for name, img in zip(names, decoded):
        ref = torch.from_numpy(np.array(Image.open(io.BytesIO(encoded_kinds[name])).convert('RGB'))).permute(2, 0, 1)
        assert img.dtype == torch.uint8 and img.shape == (3, 24, 32), name
        assert (img.int() - ref.int()).abs().max() <= 2, name


def test_undecodable_file_is_a_data_error_naming_it(encoded_kinds):
    truncated = encoded_kinds['baseline'][:len(encoded_kinds['baseline']) // 2]
    assert is_colour_jpeg(truncated)  # the header is intact: only decoding finds out
    with pytest.raises(DataError, match='broken.jpg'):
        decode_images([encoded_kinds['png'], truncated], ['fine.png', 'broken.jpg'], 'cpu')


@pytest.fixture
def mixed_folder(tmp_path, encoded_kinds):
    """Class 'a': a black PNG (a fixed point of every colour op); class 'b': the other kinds."""
    (tmp_path / 'a').mkdir()
    (tmp_path / 'b').mkdir()
    Image.new('RGB', (20, 28)).save(tmp_path / 'a' / 'black.png')
    for name in ('baseline', 'cmyk', 'greyscale', 'progressive'):
        (tmp_path / 'b' / f'{name}.jpg').write_bytes(encoded_kinds[name])
    return ImageFolder(tmp_path)


def test_encoded_bag_dataset_reads_bytes_and_draws_neighbours(mixed_folder):
    neighbours = np.array([[1, 2], [0, 2], [3, 4], [4, 0], [1, 3]])
    dataset = EncodedBagDataset(mixed_folder, neighbours)
    torch.manual_seed(11)
    drawn = set()
    for _ in range(30):
        sample = dataset[2]
        i, j = sample['index']
        assert i == 2 and j in (3, 4)
        drawn.add(j)
        data = open(mixed_folder.path(j), 'rb').read()
        if is_colour_jpeg(data):  # the file's bytes, for nvJPEG
            assert sample['encoded'][1].numpy().tobytes() == data and sample['shape'][1] == (0, 0)
        else:  # decoded by the worker, as ImageFolder.load decodes it
            pixels = np.array(mixed_folder.load(j))
            assert sample['encoded'][1].numpy().tobytes() == pixels.tobytes()
            assert sample['shape'][1] == pixels.shape[:2]
        assert sample['jpeg'] == tuple(is_colour_jpeg(open(mixed_folder.path(n), 'rb').read()) for n in (i, j))
        assert sample['path'] == (mixed_folder.path(2), mixed_folder.path(j))
    assert drawn == {3, 4}
    with pytest.raises(ValueError, match='neighbour rows'):
        EncodedBagDataset(mixed_folder, neighbours[:3])


def test_gpu_views_turn_a_loader_batch_into_bag_views(mixed_folder):
    neighbours = np.array([[1, 2], [2, 3], [3, 4], [4, 1], [1, 2]])
    dataset = EncodedBagDataset(mixed_folder, neighbours)  # image 0 (black) is nobody's neighbour
    loader = torch.utils.data.DataLoader(dataset, batch_size=5, num_workers=0, collate_fn=collate_encoded)
    batch = next(iter(loader))
    views = gpu_views(batch, 'cpu', 16, torch.Generator().manual_seed(12))
    assert len(views) == 4 and all(v.shape == (5, 3, 16, 16) and v.is_contiguous() for v in views)
    q, k, pq, pk = views
    black = ((0 - torch.tensor(MEAN)) / torch.tensor(STD))[:, None, None].expand(3, 16, 16)
    for view in (q, k):  # the anchor views of sample 0 are views of the black image
        torch.testing.assert_close(view[0], black, atol=1e-5, rtol=0)
    for view in (pq, pk, q[1:]):
        assert (view - black).abs().amax((1, 2, 3)).min() > 0.1
    assert not torch.equal(q, k) and not torch.equal(pq, pk)
    again = gpu_views(batch, 'cpu', 16, torch.Generator().manual_seed(12))
    assert all(torch.equal(a, b) for a, b in zip(views, again))


def test_gpu_views_of_two_view_batches(mixed_folder):
    loader = torch.utils.data.DataLoader(EncodedTwoViewDataset(mixed_folder), batch_size=5, num_workers=2,
                                         collate_fn=collate_encoded)
    batch = next(iter(loader))
    assert batch['index'][:, 0].tolist() == [0, 1, 2, 3, 4]
    views = gpu_views(batch, 'cpu', 12)
    assert len(views) == 2 and all(v.shape == (5, 3, 12, 12) and torch.isfinite(v).all() for v in views)


# ------------------------------------------------------------ on a GPU (benchmarks/run_gpu_data.sh)

def test_colour_blur_normalise_traces_as_one_graph(images):
    # On CUDA it runs compiled with fullgraph=True: a graph break would fail there. aot_eager
    # traces the same graph on the CPU without generating code.
    x = ga.resized_crops(images, *_boxes_and_flips(images, 2), 16, views_per_image=2)
    params = ga.sample_view_params(torch.tensor([[16, 16]] * x.shape[0]), torch.Generator().manual_seed(14))
    args = (x, params.jitter, params.factors, params.order, params.gray, params.blur,
            ga.blur_kernels(params.sigma).float())
    compiled = torch.compile(ga.colour_blur_normalise, backend='aot_eager', dynamic=False, fullgraph=True)
    torch.testing.assert_close(compiled(*args), ga.colour_blur_normalise(*args), atol=1e-6, rtol=0)


def _boxes_and_flips(images, k):
    params = ga.sample_view_params(torch.tensor([img.shape[1:] for img in images]).repeat_interleave(k, 0),
                                   torch.Generator().manual_seed(13))
    return params.boxes, params.flip


@needs_cuda
def test_cuda_resampling_in_fp32_and_fp16_against_the_cpu(images, monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, 'allow_tf32', False)
    uint8 = [to_uint8(img) for img in images]
    boxes, flip = _boxes_and_flips(images, 4)
    cpu = ga.resized_crops(uint8, boxes, flip, 32, views_per_image=4)
    on_cuda = [img.cuda() for img in uint8]
    fp32 = ga.resized_crops(on_cuda, boxes, flip, 32, views_per_image=4, dtype=torch.float32).cpu()
    torch.testing.assert_close(fp32, cpu, atol=1e-5, rtol=0)
    fp16 = ga.resized_crops(on_cuda, boxes, flip, 32, views_per_image=4).cpu()  # the default on CUDA
    error = (fp16 - cpu).abs().max().item()
    assert 0 < error <= ga.FP16_RESAMPLING_ERROR, error


@needs_cuda
def test_cuda_views_equal_cpu_views_for_the_same_decoded_images(images, monkeypatch):
    params = ga.sample_view_params(torch.tensor([img.shape[1:] for img in images]).repeat_interleave(4, 0),
                                   torch.Generator().manual_seed(13))
    uint8 = [to_uint8(img) for img in images]
    cpu = ga.augment(uint8, params, 32, views_per_image=4)
    on_cuda = [img.cuda() for img in uint8]
    # fp16 resampling (FP16_RESAMPLING_ERROR in [0, 1]) through colour ops whose factors are at
    # most 1.4 (amplify by at most 3) and the normalisation (1 / 0.225), and TF32 in the blur.
    torch.testing.assert_close(ga.augment(on_cuda, params, 32, views_per_image=4).cpu(), cpu,
                               atol=3 * ga.FP16_RESAMPLING_ERROR / min(STD) + 1e-2, rtol=0)
    # The compiled colour, blur and normalisation on CUDA against the CPU's eager ones, TF32 off.
    monkeypatch.setattr(torch.backends.cudnn, 'allow_tf32', False)
    monkeypatch.setattr(torch.backends.cuda.matmul, 'allow_tf32', False)
    x = ga.resized_crops(uint8, params.boxes, params.flip, 32, views_per_image=4)
    args = (params.jitter, params.factors, params.order, params.gray, params.blur, ga.blur_kernels(params.sigma).float())
    compiled = ga._finishing(torch.device('cuda'))(x.cuda(), *(a.cuda() for a in args)).cpu()
    torch.testing.assert_close(compiled, ga.colour_blur_normalise(x, *args), atol=1e-4, rtol=0)


def _luma(rgb):
    return rgb.float().mul(torch.tensor([0.299, 0.587, 0.114])[:, None, None]).sum(0)


@needs_cuda
def test_nvjpeg_decodes_close_to_pil_and_falls_back_on_cuda(encoded_kinds):
    # nvJPEG and libjpeg (PIL) decode the same coefficients with their own IDCT and their own
    # chroma upsampling: libjpeg interpolates 4:2:0 chroma ("fancy upsampling"), nvJPEG does not.
    # So where chroma is not subsampled (4:4:4) the two agree to IDCT rounding, and on 4:2:0 files
    # their difference lies in the colour, not in the luma; its size in RGB depends on how much
    # colour detail the image has at the pixel level (this test image: 20 % pixel noise).
    img = to_pil(to_uint8(smooth_image(torch.Generator().manual_seed(10), 24, 32)))
    kinds = dict(encoded_kinds, baseline_444=encode(img, format='JPEG', quality=90, subsampling=0))
    names = list(kinds)
    decoded = decode_images([kinds[n] for n in names], names, 'cuda')
    for name, img in zip(names, decoded):
        ref = torch.from_numpy(np.array(Image.open(io.BytesIO(kinds[name])).convert('RGB'))).permute(2, 0, 1)
        assert img.is_cuda and img.dtype == torch.uint8 and img.shape == ref.shape, name
        diff = (img.cpu().int() - ref.int()).abs().float()
        luma = (_luma(img.cpu()) - _luma(ref)).abs()
        measured = f'{name}: mean |RGB diff| {diff.mean():.2f}, max {diff.max():.0f}; mean |luma diff| {luma.mean():.2f}'
        if name == 'baseline_444':
            assert diff.mean() <= 1.0, measured
        elif is_colour_jpeg(kinds[name]):
            assert luma.mean() <= 1.0, measured
        else:  # decoded by PIL, as the cpu pipeline does
            assert diff.max() == 0, name
        print(measured)


def hazard_trials(decode, trials=40, side=256):
    """How many of `trials` decodes overwrote memory that queued kernels were still reading
    (pytorch/vision#9606): tensors of the decoded image's size are filled, reductions of them
    are queued behind a long kernel, the tensors freed, then `decode` runs and is handed their
    blocks by the caching allocator."""
    img = to_pil(to_uint8(smooth_image(torch.Generator().manual_seed(11), side, side)))
    data = torch.frombuffer(bytearray(encode(img, format='JPEG', quality=90)), dtype=torch.uint8)
    size = 3 * side * side
    corrupted = 0
    for _ in range(trials):
        blocks = [torch.full((size,), n + 1, dtype=torch.uint8, device='cuda') for n in range(8)]
        torch.cuda.synchronize()
        torch.cuda._sleep(20_000_000)  # some 10 ms of queued work before the reductions
        sums = [block.sum(dtype=torch.int64) for block in blocks]
        del blocks
        decode([data])
        torch.cuda.synchronize()
        corrupted += any(total.item() != (n + 1) * size for n, total in enumerate(sums))
    return corrupted


@needs_cuda
def test_cuda_decode_never_overwrites_memory_that_queued_kernels_read():
    ours = hazard_trials(lambda data: decode_images(data, ['hazard.jpg'], 'cuda', [True]))
    raw = hazard_trials(lambda data: decode_jpeg(data, device='cuda'))
    print(f'nvJPEG stream hazard: torchvision decode_jpeg corrupted {raw}/40 trials, decode_images {ours}/40')
    assert ours == 0


@pytest.mark.parametrize('shape', [(40, 56), (64, 48), (23, 31)])
def test_centre_crops_match_the_stage_one_pil_transform(shape):
    from data.transforms import eval_transform
    img = to_uint8(smooth_image(torch.Generator().manual_seed(15), *shape))
    ours = ga.centre_crops([img], 16, 18)[0]
    pil = eval_transform(16)  # Resize(round(16 * 256 / 224) = 18) + CenterCrop(16)
    expected = pil(to_pil(img))
    # PIL rounds the resized image to uint8: within one grey level, in normalised units.
    torch.testing.assert_close(ours, expected, atol=1.0 / 255 / min(STD) + 1e-5, rtol=0)
