"""The MoCo v2 augmentation of stage 2 (SPEC.md), drawn for a whole batch of views at once on tensors.

`data.transforms.moco_v2_augmentation` augments one PIL image per call in a DataLoader worker;
this module draws the same random parameters for V views in one go (`sample_view_params`, on the
CPU, from a torch.Generator or torch's global RNG) and applies them with batched tensor arithmetic
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

    def to(self, device):
        return ViewParams(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})


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


def sample_view_params(sizes, generator=None, min_scale=CROP_SCALE[0]):
    """Draw the MoCo v2 parameters of V views, each independently, as the PIL path draws them
    per call. sizes: (V, 2) height and width of each view's source image; min_scale: the smallest
    area share of the crop."""
    sizes = torch.as_tensor(sizes)
    n = sizes.shape[0]

    def coin(p):
        return torch.rand(n, generator=generator) < p

    spread = torch.tensor(JITTER, dtype=torch.float64)
    low = torch.cat([(1 - spread[:3]).clamp(min=0), -spread[3:]])
    high = torch.cat([1 + spread[:3], spread[3:]])
    factors = low + (high - low) * torch.rand((n, 4), generator=generator, dtype=torch.float64)
    return ViewParams(
        boxes=sample_crop_boxes(sizes, generator, scale=(min_scale, CROP_SCALE[1])),
        flip=coin(P_FLIP),
        jitter=coin(P_JITTER),
        factors=factors.float(),
        order=torch.rand((n, 4), generator=generator).argsort(1),  # a uniform random permutation
        gray=coin(P_GRAYSCALE),
        blur=coin(P_BLUR),
        sigma=_uniform(n, BLUR_SIGMA[0], BLUR_SIGMA[1], generator).float(),
    )


def _resampling_weights(start, length, in_size, out_size):
    """(V, out_size, in_size) weights that resize pixels [start, start + length) of a line of
    in_size pixels to out_size pixels, as torch's interpolate(antialias=True) and PIL's BILINEAR
    do: a triangle filter stretched by the downscale factor, renormalised over the crop."""
    start = start.to(torch.float32)[:, None, None]
    length = length.to(torch.float32)[:, None, None]
    scale = length / out_size
    centre = (torch.arange(out_size, device=start.device) + 0.5)[:, None] * scale  # (V, out, 1)
    pixel = torch.arange(in_size, device=start.device) + 0.5 - start  # (V, 1, in), crop coordinates
    weight = (pixel - centre).abs_().div_(scale.clamp(min=1.0)).neg_().add_(1.0).clamp_(min=0.0)
    weight.mul_((pixel > 0) & (pixel < length))
    return weight.div_(weight.sum(2, keepdim=True))


def _consecutive_groups(shapes, max_elements):
    """(start, stop) runs of consecutive images whose zero-padded float copy stays within
    max_elements (a lone larger image makes its own run)."""
    start, height, width = 0, 0, 0
    for i, (h, w) in enumerate(shapes):
        grown_h, grown_w = max(height, h), max(width, w)
        if i > start and (i + 1 - start) * 3 * grown_h * grown_w > max_elements:
            yield start, i
            start, grown_h, grown_w = i, h, w
        height, width = grown_h, grown_w
    yield start, len(shapes)


def resized_crops(images, boxes, flip, size, views_per_image=1, max_elements=2**28):
    """Crop each view's box from its source and resize it to size x size with antialiasing.

    images: list of (3, H_n, W_n) tensors, uint8 (0-255) or float (0-1), sizes may differ;
    view v comes from images[v // views_per_image]. boxes: (V, 4) top, left, height, width;
    flip: (V,) bool, mirror the view. Returns (V, 3, size, size) float32 in [0, 1].

    Batched as two matrix products per group of images: a (size x H) and a (size x W) resampling
    matrix per view, applied to the images zero-padded to the group's largest size; groups keep
    the padded copy under max_elements floats however large one image is.
    """
    device = images[0].device
    boxes, flip = boxes.to(device), flip.to(device)
    k = views_per_image
    out = []
    for start, stop in _consecutive_groups([img.shape[1:] for img in images], max_elements):
        group = images[start:stop]
        n = len(group)
        height, width = max(img.shape[1] for img in group), max(img.shape[2] for img in group)
        padded = torch.zeros((n, height, 3, width), device=device)  # rows, channels, columns
        for target, img in zip(padded, group):
            target[:img.shape[1], :, :img.shape[2]] = img.permute(1, 0, 2)
        views = slice(start * k, stop * k)
        rows = _resampling_weights(boxes[views, 0], boxes[views, 2], height, size)  # (n*k, S, H)
        if group[0].dtype == torch.uint8:
            rows.div_(255.0)
        cols = _resampling_weights(boxes[views, 1], boxes[views, 3], width, size)  # (n*k, S, W)
        cols = torch.where(flip[views, None, None], cols.flip(1), cols)
        tall = torch.bmm(rows.view(n, k * size, height), padded.view(n, height, 3 * width))
        small = torch.bmm(tall.view(n * k, size * 3, width), cols.transpose(1, 2))  # (n*k, S*3, S)
        out.append(small.view(n * k, size, 3, size).permute(0, 2, 1, 3))
    return torch.cat(out).contiguous()


def _per_image(values):
    return values[:, None, None, None]


def rgb_to_grayscale(x):
    """(V, 3, H, W) -> (V, 1, H, W) luma, torchvision's weights."""
    return torch.einsum('vchw,c->vhw', x, x.new_tensor(_LUMA)).unsqueeze(1)


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
    channel = V - C * clamp(min(k, 4 - k), 0, 1), k = (n + 6h) mod 6, n = 5, 3, 1 for R, G, B."""
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


def gaussian_blur(x, sigma):
    """Blur each image of (V, C, H, W) with its own sigma (V,): a separable Gaussian of
    2*ceil(3 sigma)+1 taps with reflect padding (torchvision's gaussian_blur for that kernel size).
    The kernels are built on the CPU (pass sigma there to avoid a device sync); the largest sets
    the padding, the others are zero beyond their own radius."""
    sigma = sigma.to('cpu', torch.float64)
    radius = torch.ceil(3 * sigma).long()  # (V,)
    widest = int(radius.max())
    taps = torch.arange(-widest, widest + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (taps / sigma[:, None]) ** 2) * (taps.abs() <= radius[:, None])
    kernel = (kernel / kernel.sum(1, keepdim=True)).to(x)  # (V, K)
    v, c, h, w = x.shape
    kernel = kernel.repeat_interleave(c, 0)  # one kernel per channel of each image
    padded = F.pad(x.reshape(1, v * c, h, w), (widest,) * 4, mode='reflect')
    padded = F.conv2d(padded, kernel[:, None, :, None], groups=v * c)  # along H
    return F.conv2d(padded, kernel[:, None, None, :], groups=v * c).view(v, c, h, w)  # along W


def augment(images, params, size, views_per_image=1):
    """The MoCo v2 views of `images` drawn with `params`: (V, 3, size, size) float32, normalised.

    images: list of (3, H, W) uint8 or [0, 1] float tensors on one device; view v comes from
    images[v // views_per_image]. Order as the PIL path: crop + resize (+ flip), colour jitter,
    grayscale, blur, normalisation.
    """
    device = images[0].device
    p = params.to(device)
    x = resized_crops(images, p.boxes, p.flip, size, views_per_image)
    x = color_jitter(x, p.jitter, p.factors, p.order)
    x = torch.where(_per_image(p.gray), rgb_to_grayscale(x).expand_as(x), x)
    x = torch.where(_per_image(p.blur), gaussian_blur(x, params.sigma), x)
    mean = torch.tensor(MEAN, device=device)[:, None, None]
    std = torch.tensor(STD, device=device)[:, None, None]
    return x.sub_(mean).div_(std)


def moco_v2_views(images, size, views_per_image=2, generator=None, min_scale=CROP_SCALE[0]):
    """`views_per_image` independent MoCo v2 views of every image: (len(images) * views_per_image,
    3, size, size), the views of images[n] at rows n * views_per_image + t."""
    sizes = torch.tensor([img.shape[1:] for img in images]).repeat_interleave(views_per_image, 0)
    return augment(images, sample_view_params(sizes, generator, min_scale), size, views_per_image)
