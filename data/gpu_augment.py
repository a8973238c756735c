"""The augmentations of stage 2, drawn for a whole batch of views at once on tensors.

`data.transforms` augments one PIL image per call in a DataLoader worker, with MoCo v2's views
(SPEC.md) or the Fashion-MNIST demo's greyscale ones; this module draws the same random parameters
(a `ViewRecipe` per --augmentation) for V views in one go (`sample_view_params`, on the CPU, from
a torch.Generator or torch's global RNG) and applies them with batched tensor arithmetic
(`augment`) on whatever device the images are on: the GPU in training, the CPU in the tests.

Semantics are those of torchvision's tensor functional ops on floats in [0, 1] (clamped after each
colour op), which differ from the PIL path by rounding only, except where noted:
- crop + resize: antialiased bilinear, the filter of PIL's BILINEAR and of torch's
  interpolate(antialias=True); no rounding to uint8 (PIL path: within one grey level).
- colour jitter: PIL rounds to uint8 after every op and shifts hue in 8-bit HSV: jittered views
  differ from the PIL path by about 1.5 grey levels on average, up to 8 at a pixel.
- grayscale: 0.2989 R + 0.587 G + 0.114 B (PIL: 299/587/114 per mille, rounded to uint8).
- Gaussian blur: a true separable Gaussian with 2*ceil(3 sigma)+1 taps and reflect padding
  (torchvision.transforms.functional.gaussian_blur); PIL's GaussianBlur(radius=sigma) approximates
  it with three box blurs, so blurred views differ from the PIL path by a few grey levels at edges.
The horizontal flip is folded into the resampling matrix of the crop: flipping commutes with every
later op (they act per pixel, on the whole image, or with a symmetric kernel and padding).
"""
import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from data.transforms import MEAN, STD
from utils.dist import to_device

# The recipe of data.transforms.moco_v2_augmentation (tests/test_gpu_augment.py reads it back from there).
CROP_SCALE = (0.2, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
CROP_ATTEMPTS = 10
JITTER = (0.4, 0.4, 0.4, 0.1)  # brightness, contrast, saturation, hue
P_JITTER = 0.8
P_GRAYSCALE = 0.2
BLUR_SIGMA = (0.1, 2.0)
P_BLUR = 0.5
P_FLIP = 0.5

# Colour jitter ops, numbered as torchvision's ColorJitter numbers them in its random order (fn_idx).
BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)
_KEEP = 4  # no op in a pass of `color_jitter`

_LUMA = (0.2989, 0.587, 0.114)


@dataclass(frozen=True)
class ViewRecipe:
    """What a --augmentation draws beside the crop and the flip, as data.transforms draws it."""
    jitter: tuple        # brightness, contrast, saturation and hue spreads of ColorJitter
    p_jitter: float
    p_grayscale: float
    p_blur: float


RECIPES = {
    'moco_v2': ViewRecipe(JITTER, P_JITTER, P_GRAYSCALE, P_BLUR),
    # data.transforms.greyscale_augmentation: ColorJitter(0.4, 0.4) alone. Its saturation and hue
    # factors are then 1 and 0, identities, and the order of brightness and contrast stays uniform.
    'greyscale': ViewRecipe((0.4, 0.4, 0.0, 0.0), P_JITTER, 0.0, 0.0),
}


@dataclass
class ViewParams:
    """The random draws of V views, one row per view."""
    boxes: torch.Tensor    # (V, 4) int64: top, left, height, width of the crop in its source image
    flip: torch.Tensor     # (V,) bool: horizontal flip
    jitter: torch.Tensor   # (V,) bool: colour jitter applied
    factors: torch.Tensor  # (V, 4) float32: brightness, contrast and saturation factors, hue shift
    order: torch.Tensor    # (V, 4) int64: the order of the four jitter ops, a permutation of 0..3
    gray: torch.Tensor     # (V,) bool: converted to grayscale
    blur: torch.Tensor     # (V,) bool: blurred
    sigma: torch.Tensor    # (V,) float32: blur sigma (drawn for every view, used where blur)


def _uniform(shape, low, high, generator):
    return torch.empty(shape, dtype=torch.float64).uniform_(low, high, generator=generator)


def sample_crop_boxes(sizes, generator=None, scale=CROP_SCALE, ratio=CROP_RATIO, attempts=CROP_ATTEMPTS):
    """RandomResizedCrop.get_params for V images at once: (V, 4) int64 (top, left, height, width).

    sizes: (V, 2) heights and widths. As torchvision: up to `attempts` draws of an area share in
    `scale` and a log-uniform aspect ratio in `ratio`; the first whose rounded box fits is placed
    uniformly; when none fits, the largest centred box whose ratio is clamped to `ratio`.
    """
    sizes = torch.as_tensor(sizes, dtype=torch.float64)
    height, width = sizes[:, :1], sizes[:, 1:]  # (V, 1)
    n = sizes.shape[0]
    area = height * width * _uniform((n, attempts), scale[0], scale[1], generator)
    aspect = torch.exp(_uniform((n, attempts), math.log(ratio[0]), math.log(ratio[1]), generator))
    w = torch.round(torch.sqrt(area * aspect))  # round half to even, as Python's round
    h = torch.round(torch.sqrt(area / aspect))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)  # (V, attempts)
    first = fits.to(torch.int8).argmax(1, keepdim=True)
    w, h = w.gather(1, first), h.gather(1, first)

    image_ratio = width / height
    centre_w = torch.where(image_ratio > ratio[1], torch.round(height * ratio[1]), width)
    centre_h = torch.where(image_ratio < ratio[0], torch.round(width / ratio[0]), height)
    found = fits.any(1, keepdim=True)
    w, h = torch.where(found, w, centre_w), torch.where(found, h, centre_h)
    top = torch.where(found, torch.floor(torch.rand((n, 1), generator=generator, dtype=torch.float64)
                                         * (height - h + 1)), torch.floor((height - h) / 2))
    left = torch.where(found, torch.floor(torch.rand((n, 1), generator=generator, dtype=torch.float64)
                                          * (width - w + 1)), torch.floor((width - w) / 2))
    return torch.cat([top, left, h, w], 1).long()


def sample_view_params(sizes, generator=None, min_scale=CROP_SCALE[0], recipe=RECIPES['moco_v2']):
    """Draw the parameters of V views of `recipe`, each independently, as the PIL path draws them
    per call. sizes: (V, 2) height and width of each view's source image; min_scale: the smallest
    area share of the crop."""
    sizes = torch.as_tensor(sizes)
    n = sizes.shape[0]

    def coin(p):
        return torch.rand(n, generator=generator) < p

    spread = torch.tensor(recipe.jitter, dtype=torch.float64)
    low = torch.cat([(1 - spread[:3]).clamp(min=0), -spread[3:]])
    high = torch.cat([1 + spread[:3], spread[3:]])
    factors = low + (high - low) * torch.rand((n, 4), generator=generator, dtype=torch.float64)
    return ViewParams(
        boxes=sample_crop_boxes(sizes, generator, scale=(min_scale, CROP_SCALE[1])),
        flip=coin(P_FLIP),
        jitter=coin(recipe.p_jitter),
        factors=factors.float(),
        order=torch.rand((n, 4), generator=generator).argsort(1),  # a uniform random permutation
        gray=coin(recipe.p_grayscale),
        blur=coin(recipe.p_blur),
        sigma=_uniform(n, BLUR_SIGMA[0], BLUR_SIGMA[1], generator).float(),
    )


def _resampling_weights(start, length, in_size, out_size, resized=None, offset=None):
    """(V, out_size, in_size) weights that resize pixels [start, start + length) of a line of
    in_size pixels to `resized` pixels (default out_size) and keep out_size of them from `offset`
    (default 0), as torch's interpolate(antialias=True) and PIL's BILINEAR do: a triangle filter
    stretched by the downscale factor, renormalised over the crop."""
    start = start.to(torch.float32)[:, None, None]
    length = length.to(torch.float32)[:, None, None]
    resized = length.new_full(length.shape, out_size) if resized is None else resized.to(torch.float32)[:, None, None]
    offset = 0 if offset is None else offset.to(torch.float32)[:, None, None]
    scale = length / resized
    centre = (torch.arange(out_size, device=start.device)[:, None] + offset + 0.5) * scale  # (V, out, 1)
    pixel = torch.arange(in_size, device=start.device) + 0.5 - start  # (V, 1, in), crop coordinates
    weight = (pixel - centre).abs_().div_(scale.clamp(min=1.0)).neg_().add_(1.0).clamp_(min=0.0)
    weight.mul_((pixel > 0) & (pixel < length))
    return weight.div_(weight.sum(2, keepdim=True))


# Resampling on CUDA runs in fp16 on tensor cores: pixels 0..255 are exact in fp16, the weights
# round by 2^-11 relative and the results (< 256) by 2^-5 absolute. Error against the fp32 path:
# first pass 255 * 2^-11 + 2^-4, second pass that plus 255 * 2^-11 + 2^-4, at most 0.38 grey levels
# (tests/test_gpu_augment.py checks it on CUDA).
FP16_RESAMPLING_ERROR = (2 * 255 * 2.0 ** -11 + 2 * 2.0 ** -4) / 255  # in [0, 1] units


def _groups(shapes, max_elements):
    """Image indices in groups of equal or similar sizes: sorted by (H, W), cut where the
    zero-padded copy of a group would exceed max_elements (a lone larger image is its own group)."""
    order = sorted(range(len(shapes)), key=lambda n: tuple(shapes[n]))
    group, height, width = [], 0, 0
    for n in order:
        h, w = shapes[n]
        grown_h, grown_w = max(height, h), max(width, w)
        if group and (len(group) + 1) * 3 * grown_h * grown_w > max_elements:  # at most 3 channels
            yield group
            group, grown_h, grown_w = [], h, w
        group.append(n)
        height, width = grown_h, grown_w
    yield group


def _stacked(images, dtype):
    """(n, H, C, W) rows, channels, columns of images of one size, or zero-padded to the largest."""
    height, width = max(img.shape[1] for img in images), max(img.shape[2] for img in images)
    if all(img.shape[1:] == (height, width) for img in images):
        return torch.stack([img.permute(1, 0, 2) for img in images]).to(dtype)
    padded = torch.zeros((len(images), height, images[0].shape[0], width), dtype=dtype, device=images[0].device)
    for target, img in zip(padded, images):
        target[:img.shape[1], :, :img.shape[2]] = img.permute(1, 0, 2)
    return padded


def resized_crops(images, boxes, flip, size, views_per_image=1, max_elements=2**28, dtype=None,
                  resized=None, offset=None):
    """Crop each view's box from its source and resize it to size x size with antialiasing.

    images: list of (C, H_n, W_n) tensors, uint8 (0-255) or float (0-1), C alike, sizes may differ;
    view v comes from images[v // views_per_image]. boxes: (V, 4) top, left, height, width;
    flip: (V,) bool, mirror the view. Returns (V, C, size, size) float32 in [0, 1].

    Batched as two matrix products per group of images of similar size: a (size x H) and a
    (size x W) resampling matrix per view, applied to the group's images (zero-padded where their
    sizes differ); groups keep the padded copy under max_elements however large one image is.
    dtype: of the products; default fp16 on CUDA (FP16_RESAMPLING_ERROR), else fp32.
    resized, offset: (V, 2) heights and widths that the boxes are resized to, and where the
    size x size output starts in them (default: the box resized to size x size).
    """
    device = images[0].device
    dtype = dtype or (torch.float16 if device.type == 'cuda' else torch.float32)
    # The geometry stays on the CPU (where the parameters are drawn) until each group's rows are
    # picked, then moves without a host sync.
    boxes, flip = boxes.cpu(), flip.cpu()
    resized, offset = (None if g is None else g.cpu() for g in (resized, offset))
    k, channels = views_per_image, images[0].shape[0]
    scale = 255.0 if images[0].dtype == torch.uint8 else 1.0
    out = torch.empty((len(images), k, channels, size, size), device=device)
    for group in _groups([img.shape[1:] for img in images], max_elements):
        pixels = _stacked([images[n] for n in group], dtype)                  # (n, H, C, W)
        n, height, _, width = pixels.shape
        views = (torch.tensor(group)[:, None] * k + torch.arange(k)).view(-1)
        box = to_device(boxes[views], device)
        geometry = [None if g is None else to_device(g[views], device) for g in (resized, offset)]
        rows = _resampling_weights(box[:, 0], box[:, 2], height, size,   # (n*k, S, H)
                                   *[None if g is None else g[:, 0] for g in geometry]).to(dtype)
        cols = _resampling_weights(box[:, 1], box[:, 3], width, size,    # (n*k, S, W)
                                   *[None if g is None else g[:, 1] for g in geometry])
        cols = torch.where(to_device(flip[views], device)[:, None, None], cols.flip(1), cols).to(dtype)
        tall = torch.bmm(rows.view(n, k * size, height), pixels.view(n, height, channels * width))
        small = torch.bmm(tall.view(n * k, size * channels, width), cols.transpose(1, 2))  # (n*k, S*C, S)
        out[to_device(torch.tensor(group), device)] = (
            small.view(n, k, size, channels, size).permute(0, 1, 3, 2, 4).float().div_(scale))
    return out.view(-1, channels, size, size)


def _per_image(values):
    return values[:, None, None, None]


def rgb_to_grayscale(x):
    """(V, 3, H, W) -> (V, 1, H, W) luma, torchvision's weights. A weighted sum rather than an
    einsum: an einsum runs as a matrix-vector product on CUDA (a fifth of the views' GPU time
    measured on an H100), the sum fuses with its neighbours when compiled. A grey image (V, 1, H, W)
    stands for three equal channels: the same sum, so the same float as theirs."""
    red, green, blue = (x, x, x) if x.shape[1] == 1 else (x[:, 0:1], x[:, 1:2], x[:, 2:3])
    return _LUMA[0] * red + _LUMA[1] * green + _LUMA[2] * blue


def _blend_pass(x, ops, factors):
    """One jitter op per image, ops (V,) in BRIGHTNESS/CONTRAST/SATURATION/_KEEP, as torchvision's
    adjust_* on floats: x * f, blend with the mean luma, blend with the luma; then clamp."""
    f = factors.gather(1, ops.clamp(max=SATURATION)[:, None]).squeeze(1)
    gray = rgb_to_grayscale(x)
    a = torch.where(ops == _KEEP, 1.0, f)
    b = torch.where(ops == SATURATION, 1.0 - f, 0.0)
    c = torch.where(ops == CONTRAST, (1.0 - f) * gray.mean((1, 2, 3)), 0.0)
    offset = _per_image(b) * gray + _per_image(c)  # (V, 1, H, W): one full-size pass below
    return torch.addcmul(offset, _per_image(a), x).clamp_(0.0, 1.0)


def adjust_hue(x, shift):
    """Rotate the hue of (V, 3, H, W) floats in [0, 1] by shift (V,) turns, as torchvision's
    adjust_hue (RGB -> HSV, h + shift mod 1 -> RGB), with the closed-form HSV -> RGB
    channel = V - C * clamp(min(k, 4 - k), 0, 1), k = (n + 6h) mod 6, n = 5, 3, 1 for R, G, B.
    A grey image (V, 1, H, W) has no hue (C = 0): returned as it is, as its three channels would be."""
    if x.shape[1] == 1:
        return x
    r, g, b = x.unbind(1)
    value, low = x.amax(1), x.amin(1)
    chroma = value - low
    safe = torch.where(chroma > 0, chroma, torch.ones_like(chroma))
    sextant = torch.where(value == r, (g - b) / safe,
                          torch.where(value == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0))
    sextant = (sextant + 6.0 * shift[:, None, None]).unsqueeze(1)  # hue in sixths of a turn
    k = torch.remainder(sextant + x.new_tensor([5.0, 3.0, 1.0])[:, None, None], 6.0)
    return value.unsqueeze(1) - chroma.unsqueeze(1) * torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)


def color_jitter(x, apply, factors, order):
    """torchvision's ColorJitter per image: where `apply`, the four ops with the image's factors
    (V, 4) in the image's order (V, 4); clamped after each op.

    Every image has its hue shift at one position; the blends before it run as up to three passes
    (identity where an image has fewer), then the hue shift (by 0 where not applied: an identity
    up to float rounding), then the blends after it.
    """
    hue_at = (order == HUE).to(torch.int8).argmax(1, keepdim=True)  # (V, 1)
    slot = torch.arange(3, device=order.device)
    before = torch.where(apply[:, None] & (slot < hue_at), order[:, :3], _KEEP)  # (V, 3)
    after_at = hue_at + 1 + slot
    after = torch.where(apply[:, None] & (after_at < 4), order.gather(1, after_at.clamp(max=3)), _KEEP)
    for ops in before.unbind(1):
        x = _blend_pass(x, ops, factors)
    x = adjust_hue(x, torch.where(apply, factors[:, HUE], 0.0))
    for ops in after.unbind(1):
        x = _blend_pass(x, ops, factors)
    return x


_WIDEST = math.ceil(3 * BLUR_SIGMA[1])  # blur radius of the largest sigma: one kernel size always


def blur_kernels(sigma):
    """(V, 2 _WIDEST + 1) float64 kernels for sigmas (V,): a Gaussian of 2*ceil(3 sigma)+1 taps
    (torchvision's gaussian_blur for that kernel size), zero beyond its own radius. Built on the CPU."""
    sigma = sigma.to('cpu', torch.float64)
    radius = torch.ceil(3 * sigma)
    taps = torch.arange(-_WIDEST, _WIDEST + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (taps / sigma[:, None]) ** 2) * (taps.abs() <= radius[:, None])
    return kernel / kernel.sum(1, keepdim=True)


def gaussian_blur(x, kernel):
    """Blur each image of (V, C, H, W) with its own kernel (V, K) (blur_kernels), separably, with
    reflect padding by K // 2: a kernel zero beyond radius r reads only the r nearest padded
    pixels, which reflect padding by r gives alike. As K shifted multiply-adds per direction,
    which compile into one kernel each (cuDNN's grouped convolution took a third of the views'
    GPU time on an H100)."""
    taps = kernel.shape[1]
    widest = taps // 2
    kernel = kernel.to(x)[:, None, None, None, :]  # (V, 1, 1, 1, K)
    h, w = x.shape[2:]
    padded = F.pad(x, (widest,) * 4, mode='reflect')                   # (V, C, H + 2r, W + 2r)
    rows = sum(kernel[..., t] * padded[:, :, t:t + h, :] for t in range(taps))     # along H
    return sum(kernel[..., t] * rows[:, :, :, t:t + w] for t in range(taps))       # along W


def normalise(x):
    return (x - x.new_tensor(MEAN)[:, None, None]) / x.new_tensor(STD)[:, None, None]


def colour_blur_normalise(x, jitter, factors, order, gray, blur, kernel):
    """Colour jitter, grayscale, blur and normalisation of resized views x (V, 3, S, S) in [0, 1]:
    some sixty elementwise passes, which torch.compile fuses into a few kernels on CUDA."""
    x = color_jitter(x, jitter, factors, order)
    x = torch.where(_per_image(gray), rgb_to_grayscale(x).expand_as(x), x)
    x = torch.where(_per_image(blur), gaussian_blur(x, kernel), x)
    return normalise(x)


_COMPILED = {}


def _finishing(device):
    """colour_blur_normalise, compiled once per process for CUDA (static shapes: the batch is fixed)."""
    if device.type != 'cuda':
        return colour_blur_normalise
    if 'cuda' not in _COMPILED:
        _COMPILED['cuda'] = torch.compile(colour_blur_normalise, dynamic=False, fullgraph=True)
    return _COMPILED['cuda']


def augment(images, params, size, views_per_image=1, recipe=RECIPES['moco_v2']):
    """The views of `images` drawn with `params` (of `recipe`): (V, 3, size, size) float32, normalised.

    images: list of (3, H, W) uint8 or [0, 1] float tensors on one device; view v comes from
    images[v // views_per_image]. Order as the PIL path: crop + resize (+ flip), colour jitter,
    grayscale, blur, normalisation.
    """
    device = images[0].device
    p = ViewParams(**{f.name: to_device(getattr(params, f.name), device) for f in fields(params)})
    if not (recipe.p_grayscale or recipe.p_blur):
        # Colour jitter alone (greyscale): a few dozen passes over small views, eager in every
        # process; compiling would cost each training run more than it saves at 28 px. Grey images
        # (three equal channels, as Fashion-MNIST's) go through as one: the same floats in a third
        # of the work (tests/test_gpu_augment.py).
        channels = torch.cat([img.flatten(1) for img in images], 1)  # (3, all pixels): two syncs, not two an image
        grey = torch.equal(channels[0], channels[1]) and torch.equal(channels[0], channels[2])
        x = resized_crops([img[:1] for img in images] if grey else images, params.boxes, params.flip, size,
                          views_per_image)
        return normalise(color_jitter(x, p.jitter, p.factors, p.order).expand(-1, 3, -1, -1))
    x = resized_crops(images, params.boxes, params.flip, size, views_per_image)
    kernel = to_device(blur_kernels(params.sigma).float(), device)
    return _finishing(device)(x, p.jitter, p.factors, p.order, p.gray, p.blur, kernel)


def centre_crops(images, size, resize):
    """Stage 1's (and stage 3's val) transform on tensors: Resize(resize) (shorter side, the longer
    in proportion, as torchvision computes it), CenterCrop(size), normalisation. images: list of
    (3, H, W) uint8 tensors. Returns (N, 3, size, size) float32. Against the PIL path: no rounding
    to uint8 after the resize (within one grey level), fp16 resampling on CUDA."""
    shapes = torch.tensor([img.shape[1:] for img in images])                   # (N, 2) H, W
    short, long = shapes.amin(1), shapes.amax(1)
    new_long = (resize * long.double() / short.double()).long()                 # int(), as torchvision
    resized = torch.where((shapes[:, 0] <= shapes[:, 1])[:, None],
                          torch.stack([torch.full_like(short, resize), new_long], 1),
                          torch.stack([new_long, torch.full_like(short, resize)], 1))
    offset = torch.round((resized - size).double() / 2).long()                 # round(), as CenterCrop
    boxes = torch.cat([torch.zeros_like(shapes), shapes], 1)                     # the whole image
    x = resized_crops(images, boxes, torch.zeros(len(images), dtype=torch.bool), size,
                      resized=resized, offset=offset)
    return normalise(x)


def draw_views(images, size, views_per_image=2, generator=None, min_scale=CROP_SCALE[0], augmentation='moco_v2'):
    """`views_per_image` independent views of every image, of --augmentation's recipe:
    (len(images) * views_per_image, 3, size, size), the views of images[n] at rows n * views_per_image + t."""
    recipe = RECIPES[augmentation]
    sizes = torch.tensor([img.shape[1:] for img in images]).repeat_interleave(views_per_image, 0)
    return augment(images, sample_view_params(sizes, generator, min_scale, recipe), size, views_per_image, recipe)
