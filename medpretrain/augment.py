"""Batched, on-device view generation for contrastive pretraining on grey-scale medical images.

Why not lightly's ``SimCLRTransform``: it works per sample on PIL images inside DataLoader workers, and
its defaults (colour jitter, random greyscale, ImageNet normalisation) suit photographs, not scans.
At 28-128 px the per-sample Python overhead dominates, so the loader, not the model, sets the pace.
Here a whole batch ``[B, C, H, W]`` (in [0, 1]) is augmented with tensor ops on the training device,
with independent random parameters for every sample:

1. random resized crop + horizontal/vertical flip + small rotation, composed into one affine matrix
   per sample and applied with a single ``affine_grid``/``grid_sample`` resample (one interpolation,
   not three);
2. intensity: brightness (multiplicative), contrast (blend with the image mean) and gamma, each with
   its own per-sample factor, applied together with probability ``intensity_p``;
3. Gaussian blur with a per-sample sigma (one grouped separable convolution for the whole batch);
4. additive Gaussian noise with a per-sample standard deviation;
5. clamp to [0, 1] and normalise ``(x - mean) / std`` (the dataset's statistics, stored in the backbone).

There is deliberately no hue, saturation or random-greyscale step: the images are grey.

For patch pretraining (``train.patch_size``), :func:`random_patches` first cuts random squares out of the images
as they are (native resolution unless ``data.image_size`` resizes them), and the views are built from those.

Why not ``kornia.augmentation`` (batched, per-sample parameters, on the device too): measured slower, and
missing operations. ``benchmarks/bench_pretrain.py sections=[views]`` (2 shared CPU cores, batch 256, two
views per image, ``benchmarks/results/pretrain.md``): BatchViews 21930 / 4576 / 1069 images/s at 28 / 64 /
128 px on one core against kornia's closest composition at 4513 / 1621 / 207 (2.8x to 5.2x faster over
1 and 2 cores), because crop, flip and rotation are one resample here and blur and noise touch only the
selected samples. kornia also has no contrast around each image's own mean and no per-sample noise level,
which these views use. :class:`BatchViews` therefore stays the default.
Randomness comes from an optional ``torch.Generator`` so a run can be replayed exactly (the training
scripts seed it from the step number, which makes resumed runs draw the same views).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from medpretrain.config import ConfigError


@dataclass
class AugmentConfig:
    """Parameters of the batched views; every default carries its reason.

    Ranges are ``[low, high]`` lists so they can be overridden from the command line
    (``aug.crop_scale=[0.3,1.0]``).
    """

    crop_scale: list[float] = (0.3, 1.0)  # type: ignore[assignment]
    """Area fraction of the crop. SimCLR uses [0.08, 1] on 224 px photos; at 28-64 px a 8 % crop of a
    chest X-ray is a few pixels of lung with nothing left to match, so the floor is raised to 0.3
    (MoCo-CXR, Sowrirajan et al. 2021, also uses milder crops on X-rays)."""
    crop_ratio: list[float] = (3 / 4, 4 / 3)  # type: ignore[assignment]
    """Aspect ratio range of the crop (SimCLR/torchvision default)."""
    hflip_p: float = 0.5
    """Left-right flip: anatomy is nearly symmetric at this resolution and MoCo-CXR uses it."""
    vflip_p: float = 0.0
    """Upside-down scans do not occur in practice; learning that invariance wastes capacity."""
    rotation_deg: float = 10.0
    """Small rotations mimic patient positioning; MoCo-CXR uses +-10 degrees."""
    padding_mode: str = "reflection"
    """How ``grid_sample`` fills pixels rotated in from outside: ``reflection`` avoids black corners the
    network could use to read off the rotation angle; ``zeros`` or ``border`` are the alternatives."""
    intensity_p: float = 0.8
    """Probability that a sample gets brightness/contrast/gamma jitter (SimCLR applies colour jitter
    with p = 0.8)."""
    brightness: float = 0.4
    """Multiplicative brightness factor drawn from [1 - b, 1 + b]: exposure varies between machines."""
    contrast: float = 0.4
    """Contrast factor drawn from [1 - c, 1 + c], blended around each image's mean (torchvision's rule)."""
    gamma: list[float] = (0.7, 1.4)  # type: ignore[assignment]
    """Gamma range (log-uniform): different detector response curves and windowing."""
    blur_p: float = 0.5
    """Probability of Gaussian blur (SimCLR: 0.5)."""
    blur_sigma: list[float] = (0.1, 1.0)  # type: ignore[assignment]
    """Blur sigma in output pixels. SimCLR's [0.1, 2.0] is for 224 px; at 28-128 px a sigma above ~1 px
    erases the fine opacity texture that separates pneumonia from normal lungs."""
    noise_p: float = 0.5
    """Probability of additive Gaussian noise (quantum noise of low-dose acquisitions)."""
    noise_std: list[float] = (0.0, 0.04)  # type: ignore[assignment]
    """Noise standard deviation range on the [0, 1] intensity scale."""

    def __post_init__(self) -> None:
        for name in ("crop_scale", "crop_ratio", "gamma", "blur_sigma", "noise_std"):
            value = [float(v) for v in getattr(self, name)]
            if len(value) != 2 or value[0] > value[1]:
                raise ConfigError(f"augment {name} must be [low, high] with low <= high, got {value}")
            setattr(self, name, value)
        if not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise ConfigError(f"augment crop_scale must lie in (0, 1], got {self.crop_scale}")
        if self.crop_ratio[0] <= 0:
            raise ConfigError(f"augment crop_ratio must be positive, got {self.crop_ratio}")
        for name in ("hflip_p", "vflip_p", "intensity_p", "blur_p", "noise_p"):
            p = getattr(self, name)
            if not 0.0 <= p <= 1.0:
                raise ConfigError(f"augment {name} is a probability in [0, 1], got {p}")
        if self.brightness < 0 or self.contrast < 0 or self.rotation_deg < 0:
            raise ConfigError("augment brightness, contrast and rotation_deg must be >= 0")
        if self.gamma[0] <= 0 or self.blur_sigma[0] <= 0 or self.noise_std[0] < 0:
            raise ConfigError("augment gamma and blur_sigma must be > 0 and noise_std >= 0")
        if self.padding_mode not in ("zeros", "border", "reflection"):
            raise ConfigError(f"augment padding_mode must be zeros, border or reflection, got {self.padding_mode!r}")


def _uniform(n: int, low: float, high: float, device: torch.device, gen: torch.Generator | None) -> Tensor:
    return torch.rand(n, device=device, generator=gen) * (high - low) + low


def _bernoulli(n: int, p: float, device: torch.device, gen: torch.Generator | None) -> Tensor:
    return torch.rand(n, device=device, generator=gen) < p


def random_affine_matrices(
    n: int,
    cfg: AugmentConfig,
    aspect: float = 1.0,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> Tensor:
    """Per-sample ``[n, 2, 3]`` matrices for ``affine_grid`` combining crop, flips and rotation.

    The matrix maps output coordinates (normalised to [-1, 1]) to input coordinates: the output grid is
    scaled to the crop's half-extent, flipped, rotated (in pixel space, so non-square images rotate
    rigidly; ``aspect`` = height / width) and shifted to a random crop centre inside the image.
    Crop sizes follow torchvision's ``RandomResizedCrop`` (area fraction and log-uniform aspect ratio),
    clipped to the image instead of re-drawn so that the batch needs no Python loop.
    """
    device = torch.device(device)
    area = _uniform(n, cfg.crop_scale[0], cfg.crop_scale[1], device, generator)
    log_r = _uniform(n, math.log(cfg.crop_ratio[0]), math.log(cfg.crop_ratio[1]), device, generator)
    ratio = torch.exp(log_r)
    sw = torch.sqrt(area * ratio).clamp(max=1.0)  # crop width / image width
    sh = torch.sqrt(area / ratio).clamp(max=1.0)
    cx = (torch.rand(n, device=device, generator=generator) * 2 - 1) * (1 - sw)
    cy = (torch.rand(n, device=device, generator=generator) * 2 - 1) * (1 - sh)
    fx = torch.where(_bernoulli(n, cfg.hflip_p, device, generator), -1.0, 1.0)
    fy = torch.where(_bernoulli(n, cfg.vflip_p, device, generator), -1.0, 1.0)
    angle = _uniform(n, -cfg.rotation_deg, cfg.rotation_deg, device, generator) * (math.pi / 180)
    return _affine_matrices(angle, sw * fx, sh * fy, cx, cy, aspect)


def _affine_matrices(angle: Tensor, sx: Tensor, sy: Tensor, tx: Tensor, ty: Tensor, aspect: float) -> Tensor:
    """``[n, 2, 3]`` matrices: scale (signed: a flip) ``sx`` / ``sy``, then a rotation by ``angle`` (radians) in
    pixel space expressed in normalised coordinates (u = x / (W/2), v = y / (H/2); ``aspect`` = H / W), then a
    shift by ``tx`` / ``ty``."""
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.empty(angle.shape[0], 2, 3, device=angle.device)
    theta[:, 0, 0] = cos * sx
    theta[:, 0, 1] = -sin * aspect * sy
    theta[:, 1, 0] = sin / aspect * sx
    theta[:, 1, 1] = cos * sy
    theta[:, 0, 2] = tx
    theta[:, 1, 2] = ty
    return theta


def _affine_grid(theta: Tensor, h: int, w: int) -> Tensor:
    """``F.affine_grid(theta, [B, C, h, w], align_corners=False)`` computed as an outer product.

    Each output coordinate is ``(theta[:, k, 0] * x_j + theta[:, k, 2]) + y_i * theta[:, k, 1]``, so the
    grid is one broadcast multiply-add instead of a batched matmul with K = 3 (several times faster on a CPU).
    """
    xs = (torch.arange(w, device=theta.device, dtype=theta.dtype) * 2 + 1) / w - 1
    ys = (torch.arange(h, device=theta.device, dtype=theta.dtype) * 2 + 1) / h - 1
    # Flattened last two dims (index 2j + k): grid = (t_k0 x_j + t_k2) + y_i * t_k1, one fused addcmul
    # whose inner dimension is 2W (a [..., 2] inner dimension vectorises poorly).
    col = (theta[:, None, :, 0] * xs[None, :, None] + theta[:, None, :, 2]).reshape(-1, 1, 2 * w)  # [B, 1, 2W]
    slope = theta[:, None, :, 1].expand(-1, w, 2).reshape(-1, 1, 2 * w)  # [B, 1, 2W]
    return torch.addcmul(col, ys[None, :, None], slope).view(-1, h, w, 2)


def gaussian_blur(x: Tensor, sigma: Tensor) -> Tensor:
    """Blur each sample of ``x`` ``[B, C, H, W]`` with its own ``sigma`` ``[B]`` (pixels; 0 = identity).

    Separable, reflect-padded, with per-sample kernels applied as ``2r + 1`` shifted multiply-adds per
    axis (on a CPU this is several times faster than a grouped convolution with ``B * C`` groups). The
    kernel radius is ``ceil(3 * max(sigma))`` so the widest kernel in the batch is not truncated.
    """
    b, c, h, w = x.shape
    radius = max(1, int(math.ceil(3.0 * float(sigma.max()))))
    radius = min(radius, h - 1, w - 1)  # reflect padding needs radius < size
    coords = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    s = sigma.to(x.dtype).clamp(min=1e-6)[:, None]
    kernel = torch.exp(-(coords[None, :] ** 2) / (2 * s**2))
    kernel = kernel / kernel.sum(dim=1, keepdim=True)
    # sigma == 0 means "no blur": a delta kernel.
    delta = (coords == 0).to(x.dtype)[None, :].expand_as(kernel)
    kernel = torch.where((sigma <= 0)[:, None], delta, kernel).view(b, -1, 1, 1, 1)  # [B, k, 1, 1, 1]
    k = 2 * radius + 1
    xp = F.pad(x, (radius, radius, 0, 0), mode="reflect")
    y = xp[..., 0:w] * kernel[:, 0]
    for i in range(1, k):
        y.addcmul_(xp[..., i : i + w], kernel[:, i])
    yp = F.pad(y, (0, 0, radius, radius), mode="reflect")
    out = yp[..., 0:h, :] * kernel[:, 0]
    for i in range(1, k):
        out.addcmul_(yp[..., i : i + h, :], kernel[:, i])
    return out


def random_patches(x: Tensor, size: int, per_image: int = 1,
                   generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """``per_image`` random ``size x size`` patches of every image of ``x`` ``[B, C, H, W]``, copied from its
    pixels (no resampling: at native resolution when the images are), for patch pretraining (``train.patch_size``).

    Returns the patches ``[B * per_image, C, size, size]`` (image ``i``'s at rows ``i * per_image ...``) and their
    top-left corners ``[B * per_image, 2]`` (row, column), uniform over every position that keeps the patch
    inside the image. Raises ``ValueError`` when ``size`` exceeds ``H`` or ``W`` or ``per_image < 1``.
    """
    if x.ndim != 4:
        raise ValueError(f"random_patches expects [B, C, H, W], got shape {tuple(x.shape)}")
    b, _, h, w = x.shape
    if size < 1 or size > min(h, w):
        raise ValueError(f"patch size {size} does not fit images of {h}x{w}")
    if per_image < 1:
        raise ValueError(f"patches per image must be >= 1, got {per_image}")
    n, dev = b * per_image, x.device
    top = torch.randint(0, h - size + 1, (n,), device=dev, generator=generator)
    left = torch.randint(0, w - size + 1, (n,), device=dev, generator=generator)
    span = torch.arange(size, device=dev)
    rows = (top[:, None] + span)[:, :, None]  # [n, size, 1]
    cols = (left[:, None] + span)[:, None, :]  # [n, 1, size]
    image = torch.arange(b, device=dev).repeat_interleave(per_image)[:, None, None]
    # Advanced indexing on [B, H, W, C] gives [n, size, size, C]: one gather for the whole batch.
    patches = x.permute(0, 2, 3, 1)[image, rows, cols].permute(0, 3, 1, 2).contiguous()
    return patches, torch.stack([top, left], dim=1)


class BatchViews(torch.nn.Module):
    """Random views of a batch of grey-scale images, computed on the batch's device.

    Input: ``[B, C, H, W]`` float in [0, 1] (``build_dataset(..., normalize=False)``). Output:
    ``[B, C, size, size]`` normalised as ``(x - mean) / std`` (pass ``DataConfig.mean/std``, the
    statistics stored in the exported backbone). ``size`` defaults to the input size.
    Every sample draws its own crop, flip, rotation, intensity, blur and noise parameters.

    Example::

        views = BatchViews(AugmentConfig(), size=28, mean=0.5, std=0.5)
        x0, x1 = views.pair(images, generator=g)   # two independent views of each image
    """

    def __init__(
        self, cfg: AugmentConfig | None = None, size: int | None = None, mean: float = 0.5, std: float = 0.5
    ):
        super().__init__()
        self.cfg = cfg or AugmentConfig()
        if size is not None and size < 2:
            raise ValueError(f"view size must be >= 2 pixels, got {size}")
        if std <= 0:
            raise ValueError(f"normalisation std must be > 0, got {std}")
        self.size = size
        self.mean = float(mean)
        self.std = float(std)

    @torch.no_grad()
    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        if x.ndim != 4:
            raise ValueError(f"BatchViews expects [B, C, H, W], got shape {tuple(x.shape)}")
        cfg = self.cfg
        x = x.float()
        b, c, h, w = x.shape
        out_h = out_w = self.size or h
        if self.size is None:
            out_w = w
        dev = x.device
        theta = random_affine_matrices(b, cfg, aspect=h / w, device=dev, generator=generator)
        y = F.grid_sample(x, _affine_grid(theta, out_h, out_w), mode="bilinear",
                          padding_mode=cfg.padding_mode, align_corners=False)

        if cfg.intensity_p > 0:
            on = _bernoulli(b, cfg.intensity_p, dev, generator)
            bright = _uniform(b, 1 - cfg.brightness, 1 + cfg.brightness, dev, generator)
            contrast = _uniform(b, 1 - cfg.contrast, 1 + cfg.contrast, dev, generator)
            log_g = _uniform(b, math.log(cfg.gamma[0]), math.log(cfg.gamma[1]), dev, generator)
            bright = torch.where(on, bright, 1.0).view(b, 1, 1, 1)
            contrast = torch.where(on, contrast, 1.0).view(b, 1, 1, 1)
            gamma = torch.where(on, log_g, 0.0).exp().view(b, 1, 1, 1)
            y.mul_(bright).clamp_(0, 1)
            mean = y.mean(dim=(1, 2, 3), keepdim=True)
            y.sub_(mean).mul_(contrast).add_(mean).clamp_(1e-6, 1)
            y = y.log_().mul_(gamma).exp_()  # y ** gamma, in place

        # Blur and noise touch only the selected samples (half the batch by default): same result as a
        # masked pass over all of them at half the cost.
        if cfg.blur_p > 0:
            idx = torch.nonzero(_bernoulli(b, cfg.blur_p, dev, generator)).squeeze(1)
            sigma = _uniform(b, cfg.blur_sigma[0], cfg.blur_sigma[1], dev, generator)
            if idx.numel() > 0:
                y[idx] = gaussian_blur(y[idx], sigma[idx])

        if cfg.noise_p > 0 and cfg.noise_std[1] > 0:
            idx = torch.nonzero(_bernoulli(b, cfg.noise_p, dev, generator)).squeeze(1)
            std = _uniform(b, cfg.noise_std[0], cfg.noise_std[1], dev, generator)
            if idx.numel() > 0:
                noise = torch.randn((idx.numel(), *y.shape[1:]), device=dev, generator=generator)
                y[idx] += noise.mul_(std[idx].view(-1, 1, 1, 1))

        return y.clamp_(0, 1).sub_(self.mean).div_(self.std)

    def pair(self, x: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Two independent views of every image (one batched call over ``2B`` samples)."""
        both = self(torch.cat([x, x], dim=0), generator=generator)
        return both[: x.shape[0]], both[x.shape[0] :]


# ------------------------------------------------------------------------------------------------
# Fine-tuning augmentation
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainAugmentConfig:
    """One fine-tuning augmentation level (:data:`TRAIN_AUGMENT_LEVELS`); every sample draws its own values.

    Geometry (one affine resample): horizontal / vertical flips, rotation in ``[-rotation_deg, rotation_deg]``,
    translation by up to ``translate`` of the image side, isotropic scale in ``[1 - scale, 1 + scale]``.
    Intensity (images only, on the [0, 1] scale before normalisation): brightness factor in
    ``[1 - brightness, 1 + brightness]`` and contrast around each image's mean in ``[1 - contrast, 1 + contrast]``.
    No crop: a fine-tuning view must keep the finding the label is about.
    """

    hflip_p: float = 0.0
    vflip_p: float = 0.0
    rotation_deg: float = 0.0
    translate: float = 0.0
    scale: float = 0.0
    brightness: float = 0.0
    contrast: float = 0.0

    @property
    def geometric(self) -> bool:
        return bool(self.hflip_p or self.vflip_p or self.rotation_deg or self.translate or self.scale)

    @property
    def photometric(self) -> bool:
        return bool(self.brightness or self.contrast)


TRAIN_AUGMENT_LEVELS: dict[str, TrainAugmentConfig] = {
    "none": TrainAugmentConfig(),
    # The seed studies' fine-tuning recipe (flip, small rotation and shift, mild contrast) for every init.
    "light": TrainAugmentConfig(hflip_p=0.5, rotation_deg=10.0, translate=0.05, brightness=0.1, contrast=0.1),
    "strong": TrainAugmentConfig(hflip_p=0.5, vflip_p=0.5, rotation_deg=20.0, translate=0.1, scale=0.1,
                                 brightness=0.25, contrast=0.25),
}
"""``optim.augment`` levels of fine-tuning: ``none`` (no augmentation), ``light``, ``strong``."""


def train_affine_matrices(n: int, cfg: TrainAugmentConfig, aspect: float = 1.0, device: torch.device | str = "cpu",
                          generator: torch.Generator | None = None) -> Tensor:
    """Per-sample ``[n, 2, 3]`` ``affine_grid`` matrices: flips, rotation (rigid in pixel space, ``aspect`` =
    height / width), scale and translation (normalised coordinates, so ``translate=0.05`` is 5 % of the side)."""
    device = torch.device(device)
    fx = torch.where(_bernoulli(n, cfg.hflip_p, device, generator), -1.0, 1.0)
    fy = torch.where(_bernoulli(n, cfg.vflip_p, device, generator), -1.0, 1.0)
    angle = _uniform(n, -cfg.rotation_deg, cfg.rotation_deg, device, generator) * (math.pi / 180)
    s = 1.0 / _uniform(n, 1 - cfg.scale, 1 + cfg.scale, device, generator)  # output -> input: zoom in for s < 1
    tx = _uniform(n, -2 * cfg.translate, 2 * cfg.translate, device, generator)  # [-1, 1] spans the side: x2
    ty = _uniform(n, -2 * cfg.translate, 2 * cfg.translate, device, generator)
    return _affine_matrices(angle, s * fx, s * fy, tx, ty, aspect)


class TrainAugment(torch.nn.Module):
    """Batched fine-tuning augmentation on the batch's device, the same for every init (``optim.augment``).

    ``forward(batch, generator)`` takes a training batch (``{"image": [B, C, H, W]`` normalised as
    ``(x - mean) / std``, optionally ``"mask"`` / ``"roi"`` ``[B, 1, H, W]`` in {0, 1}, anything else passed
    through``}``) and returns a new dict: every sample gets its own random geometry, applied to the image and,
    for segmentation, to its mask and roi by the same sampling grid (so they stay aligned; masks are
    resampled bilinearly and re-binarised at 0.5, all with reflection padding so a reflected image keeps its
    reflected labels), then intensity jitter on the image only. ``level="none"`` returns the batch unchanged
    (no random numbers drawn). Raises ``ValueError`` for an unknown level.
    """

    def __init__(self, level: str = "none", mean: float = 0.5, std: float = 0.5,
                 cfg: TrainAugmentConfig | None = None):
        super().__init__()
        if cfg is None:
            if level not in TRAIN_AUGMENT_LEVELS:
                raise ValueError(f"augment level {level!r}: expected one of {list(TRAIN_AUGMENT_LEVELS)}")
            cfg = TRAIN_AUGMENT_LEVELS[level]
        if std <= 0:
            raise ValueError(f"normalisation std must be > 0, got {std}")
        self.level, self.cfg, self.mean, self.std = level, cfg, float(mean), float(std)

    @property
    def active(self) -> bool:
        return self.cfg.geometric or self.cfg.photometric

    @torch.no_grad()
    def forward(self, batch: dict, generator: torch.Generator | None = None) -> dict:
        if not self.active:
            return batch
        x = batch["image"]
        if x.ndim != 4:
            raise ValueError(f"TrainAugment expects images [B, C, H, W], got shape {tuple(x.shape)}")
        out = dict(batch)
        b, _, h, w = x.shape
        y = x.float()
        if self.cfg.geometric:
            theta = train_affine_matrices(b, self.cfg, aspect=h / w, device=x.device, generator=generator)
            grid = _affine_grid(theta, h, w)
            y = F.grid_sample(y, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
            for key in ("mask", "roi"):
                if key in batch:
                    m = F.grid_sample(batch[key].float(), grid, mode="bilinear", padding_mode="reflection",
                                      align_corners=False)
                    out[key] = (m > 0.5).to(batch[key].dtype)
        if self.cfg.photometric:
            bright = _uniform(b, 1 - self.cfg.brightness, 1 + self.cfg.brightness, x.device, generator)
            contrast = _uniform(b, 1 - self.cfg.contrast, 1 + self.cfg.contrast, x.device, generator)
            raw = (y * self.std + self.mean).mul_(bright.view(b, 1, 1, 1)).clamp_(0, 1)
            mu = raw.mean(dim=(1, 2, 3), keepdim=True)
            raw = raw.sub_(mu).mul_(contrast.view(b, 1, 1, 1)).add_(mu).clamp_(0, 1)
            y = (raw - self.mean) / self.std
        out["image"] = y.to(x.dtype)
        return out
