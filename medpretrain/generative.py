"""Generative pretraining parts: a VAE whose encoder is the project's backbone, DCGAN modules, losses,
the KL weight (beta) schedule and a sample-diversity check for mode collapse.

Images are in [-1, 1] (``DataConfig`` mean 0.5 / std 0.5 after scaling to [0, 1]); decoders and
generators end in ``tanh``. Every module works for any square size from 8 px up (28, 33, 64, 128 ...):
the upsampling stack overshoots to ``start * 2**n_up >= image_size`` and centre-crops (see
:func:`upsampling_plan`).

* :class:`VAE` (Kingma & Welling 2014): ``encoder`` (a :class:`medpretrain.backbones.Backbone`) ->
  :class:`GaussianHead` -> ``z`` -> :class:`ConvDecoder`. Loss = per-sample summed reconstruction error
  + ``beta`` * :func:`kl_divergence` (beta-VAE, Higgins et al. 2017; schedules: :class:`BetaSchedule`).
* :class:`DCGANGenerator` (Radford et al. 2015): transposed convolutions, batch norm, ReLU, ``tanh``.
* :class:`BackboneDiscriminator`: the project's backbone as the discriminator trunk with a linear
  real/fake head, so the trained trunk is a contract backbone (``--init dcgan``). Departure from the
  paper (whose discriminator is a 4-layer strided-conv net with LeakyReLU): see the class docstring.
* :func:`gan_d_loss` / :func:`gan_g_loss`: non-saturating BCE (the paper) or hinge (Miyato et al. 2018).
* :func:`pairwise_diversity` and :class:`CollapseMonitor`: mode-collapse detection.
"""

from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

GENERATOR_KINDS = ("vae_decoder", "dcgan_generator", "ddpm_unet")
MAX_CHANNELS = 512


# ------------------------------------------------------------------------------------------------
# Geometry
# ------------------------------------------------------------------------------------------------


def upsampling_plan(image_size: int) -> tuple[int, int]:
    """``(start, n_up)`` with ``start * 2**n_up >= image_size`` and ``start`` in 4..8.

    28 -> (7, 2), 64 -> (4, 4), 128 -> (4, 5), 33 -> (5, 3) (40 px, centre-cropped to 33).
    Raises ``ValueError`` below 8 px.
    """
    if image_size < 8:
        raise ValueError(f"image_size must be at least 8, got {image_size}")
    n_up = max(1, int(math.floor(math.log2(image_size / 4))))
    start = math.ceil(image_size / 2**n_up)
    return start, n_up


def center_crop(x: Tensor, size: int) -> Tensor:
    """Centre-crop the last two dimensions of ``x`` to ``size`` (no-op when already that size)."""
    h, w = x.shape[-2:]
    if h == size and w == size:
        return x
    top, left = (h - size) // 2, (w - size) // 2
    return x[..., top:top + size, left:left + size]


def _channels(base: int, level: int) -> int:
    return min(MAX_CHANNELS, base * 2**level)


# ------------------------------------------------------------------------------------------------
# VAE
# ------------------------------------------------------------------------------------------------


class GaussianHead(nn.Module):
    """Pooled features ``[B, F]`` -> ``(mu, logvar)``, each ``[B, latent_dim]``.

    ``logvar`` is clamped to [-30, 20] so ``exp`` never overflows in half precision.
    """

    def __init__(self, num_features: int, latent_dim: int) -> None:
        super().__init__()
        if num_features < 1 or latent_dim < 1:
            raise ValueError(f"num_features and latent_dim must be positive, got {num_features}, {latent_dim}")
        self.mu = nn.Linear(num_features, latent_dim)
        self.logvar = nn.Linear(num_features, latent_dim)

    def forward(self, h: Tensor) -> tuple[Tensor, Tensor]:
        return self.mu(h), self.logvar(h).clamp(-30.0, 20.0)


class ConvDecoder(nn.Module):
    """Latent ``[B, latent_dim]`` -> image ``[B, out_channels, image_size, image_size]`` in [-1, 1].

    Linear to a ``start x start`` map, then ``n_up`` blocks of (nearest upsample x2, 3x3 conv,
    batch norm, SiLU), halving channels from ``base_channels * 2**(n_up-1)`` (capped at 512), a 3x3 conv
    to ``out_channels`` and ``tanh``. Nearest upsampling + conv avoids transposed-conv checkerboards
    (Odena et al. 2016).
    """

    def __init__(self, latent_dim: int, out_channels: int = 1, image_size: int = 28, base_channels: int = 64) -> None:
        super().__init__()
        if latent_dim < 1 or out_channels < 1 or base_channels < 1:
            raise ValueError(
                f"latent_dim, out_channels, base_channels must be positive, got {latent_dim}, {out_channels}, "
                f"{base_channels}"
            )
        self.latent_dim, self.out_channels, self.image_size = latent_dim, out_channels, image_size
        self.start, n_up = upsampling_plan(image_size)
        ch = _channels(base_channels, n_up - 1)
        self.fc = nn.Linear(latent_dim, ch * self.start * self.start)
        self.start_channels = ch
        blocks: list[nn.Module] = []
        for level in reversed(range(n_up)):
            out = _channels(base_channels, max(0, level - 1))
            blocks += [
                nn.Upsample(scale_factor=2, mode="nearest"),
                nn.Conv2d(ch, out, 3, padding=1, bias=False),
                nn.BatchNorm2d(out),
                nn.SiLU(inplace=True),
            ]
            ch = out
        self.blocks = nn.Sequential(*blocks)
        self.to_image = nn.Conv2d(ch, out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        if z.ndim != 2 or z.shape[1] != self.latent_dim:
            raise ValueError(f"decoder expects z of shape [B, {self.latent_dim}], got {list(z.shape)}")
        x = F.silu(self.fc(z)).view(z.shape[0], self.start_channels, self.start, self.start)
        x = torch.tanh(self.to_image(self.blocks(x)))
        return center_crop(x, self.image_size)


@dataclass
class VAEOutput:
    recon: Tensor
    mu: Tensor
    logvar: Tensor
    z: Tensor


class VAE(nn.Module):
    """Encoder (a backbone: ``forward(x) -> [B, num_features]``) + :class:`GaussianHead` + decoder.

    ``forward(x, generator=None)`` draws ``z = mu + sigma * eps`` (the reparameterisation trick) in training mode and
    uses ``z = mu`` in eval mode, so validation reconstructions are deterministic.
    """

    def __init__(self, encoder: nn.Module, decoder: ConvDecoder) -> None:
        super().__init__()
        num_features = getattr(encoder, "num_features", None)
        if not isinstance(num_features, int):
            raise ValueError("encoder must expose an integer `num_features` (a medpretrain Backbone)")
        self.encoder = encoder
        self.head = GaussianHead(num_features, decoder.latent_dim)
        self.decoder = decoder
        self.latent_dim = decoder.latent_dim

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.head(self.encoder(x))

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> VAEOutput:
        """``generator`` (on ``x``'s device) draws the noise; a per-step seeded one makes resumes exact."""
        mu, logvar = self.encode(x)
        if self.training:
            eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
            z = mu + torch.exp(0.5 * logvar) * eps
        else:
            z = mu
        return VAEOutput(self.decoder(z), mu, logvar, z)


def kl_divergence(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) summed over latent dims, averaged over the batch.

    Closed form (Kingma & Welling 2014, appendix B): ``0.5 * sum(mu^2 + exp(logvar) - 1 - logvar)``.
    """
    if mu.shape != logvar.shape:
        raise ValueError(f"mu and logvar shapes differ: {list(mu.shape)} vs {list(logvar.shape)}")
    mu, logvar = mu.float(), logvar.float()
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).flatten(1).sum(1).mean()


def reconstruction_loss(recon: Tensor, target: Tensor, kind: Literal["mse", "l1"] = "mse") -> Tensor:
    """Per-sample summed squared (``mse``) or absolute (``l1``) error, averaged over the batch.

    Summing over pixels keeps the balance with the summed KL term independent of the image size
    (a Gaussian / Laplace likelihood with fixed scale).
    """
    if recon.shape != target.shape:
        raise ValueError(f"recon and target shapes differ: {list(recon.shape)} vs {list(target.shape)}")
    diff = recon.float() - target.float()
    if kind == "mse":
        per = diff.pow(2)
    elif kind == "l1":
        per = diff.abs()
    else:
        raise ValueError(f"reconstruction loss must be 'mse' or 'l1', got {kind!r}")
    return per.flatten(1).sum(1).mean()


class PerceptualLoss(nn.Module):
    """Feature-matching ("perceptual") loss through a frozen feature extractor.

    ``features`` is any backbone with ``forward_features(x) -> list[Tensor]`` (e.g. a contract checkpoint
    from another pretraining run, or ImageNet ResNet weights when available; Johnson et al. 2016 use
    VGG-ImageNet, which this environment cannot download). Loss = mean over maps of the mean squared
    difference. The extractor is frozen and kept in eval mode.
    """

    def __init__(self, features: nn.Module, layers: int | None = None) -> None:
        super().__init__()
        if not hasattr(features, "forward_features"):
            raise ValueError("perceptual feature extractor needs a forward_features(x) method")
        self.features = features.eval().requires_grad_(False)
        self.layers = layers

    def train(self, mode: bool = True) -> PerceptualLoss:  # the extractor always stays in eval mode
        super().train(mode)
        self.features.eval()
        return self

    def forward(self, recon: Tensor, target: Tensor) -> Tensor:
        fr = self.features.forward_features(recon)  # type: ignore[operator]
        with torch.no_grad():
            ft = self.features.forward_features(target)  # type: ignore[operator]
        if self.layers is not None:
            fr, ft = fr[: self.layers], ft[: self.layers]
        return torch.stack([F.mse_loss(a.float(), b.float()) for a, b in zip(fr, ft, strict=True)]).mean()


@dataclass
class BetaSchedule:
    """KL weight per optimiser step.

    * ``constant``: ``beta``.
    * ``linear``: ramps from 0 to ``beta`` over ``warmup_steps`` (KL annealing, Bowman et al. 2016).
    * ``cyclical``: repeats a ramp over the first half of every ``cycle_steps`` then holds ``beta``
      (Fu et al. 2019, ratio R = 0.5).
    """

    kind: Literal["constant", "linear", "cyclical"] = "linear"
    beta: float = 1.0
    warmup_steps: int = 0
    cycle_steps: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ("constant", "linear", "cyclical"):
            raise ValueError(f"beta schedule must be constant, linear or cyclical, got {self.kind!r}")
        if self.beta < 0 or self.warmup_steps < 0 or self.cycle_steps < 0:
            raise ValueError("beta, warmup_steps and cycle_steps must be non-negative")
        if self.kind == "cyclical" and self.cycle_steps < 2:
            raise ValueError("cyclical beta schedule needs cycle_steps >= 2")

    def __call__(self, step: int) -> float:
        if self.kind == "constant":
            return self.beta
        if self.kind == "linear":
            if self.warmup_steps == 0:
                return self.beta
            return self.beta * min(1.0, step / self.warmup_steps)
        ramp = self.cycle_steps / 2
        return self.beta * min(1.0, (step % self.cycle_steps) / ramp)


# ------------------------------------------------------------------------------------------------
# DCGAN
# ------------------------------------------------------------------------------------------------


class DCGANGenerator(nn.Module):
    """DCGAN generator (Radford et al. 2015): ``z [B, latent_dim]`` -> ``[B, C, S, S]`` in [-1, 1].

    A transposed conv maps the 1x1 latent to a ``start x start`` map, then ``n_up - 1`` transposed convs
    (4x4, stride 2) with batch norm and ReLU, halving channels, and a last 4x4 stride-2 transposed conv
    to ``out_channels`` with ``tanh`` (no batch norm there, as in the paper). Weights drawn from
    N(0, 0.02), batch-norm scales from N(1, 0.02) (the paper's initialisation).
    """

    def __init__(self, latent_dim: int = 100, out_channels: int = 1, image_size: int = 28,
                 base_channels: int = 64) -> None:
        super().__init__()
        if latent_dim < 1 or out_channels < 1 or base_channels < 1:
            raise ValueError(
                f"latent_dim, out_channels, base_channels must be positive, got {latent_dim}, {out_channels}, "
                f"{base_channels}"
            )
        self.latent_dim, self.out_channels, self.image_size = latent_dim, out_channels, image_size
        start, n_up = upsampling_plan(image_size)
        ch = _channels(base_channels, n_up - 1)
        layers: list[nn.Module] = [
            nn.ConvTranspose2d(latent_dim, ch, start, 1, 0, bias=False),
            nn.BatchNorm2d(ch),
            nn.ReLU(inplace=True),
        ]
        for level in reversed(range(1, n_up)):
            out = _channels(base_channels, level - 1)
            layers += [nn.ConvTranspose2d(ch, out, 4, 2, 1, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
            ch = out
        layers += [nn.ConvTranspose2d(ch, out_channels, 4, 2, 1, bias=False), nn.Tanh()]
        self.net = nn.Sequential(*layers)
        dcgan_init_(self)

    def forward(self, z: Tensor) -> Tensor:
        if z.ndim != 2 or z.shape[1] != self.latent_dim:
            raise ValueError(f"generator expects z of shape [B, {self.latent_dim}], got {list(z.shape)}")
        return center_crop(self.net(z[:, :, None, None]), self.image_size)


def dcgan_init_(module: nn.Module) -> None:
    """The paper's initialisation: conv weights ~ N(0, 0.02); batch norm weight ~ N(1, 0.02), bias 0."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, 0.02)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


class BackboneDiscriminator(nn.Module):
    """Real/fake discriminator: a project backbone as trunk + a linear head -> logits ``[B]``.

    Departure from Radford et al. 2015: the paper's discriminator is a small strided-conv net with
    LeakyReLU(0.2). Using the registered backbone (ResNet uses ReLU) instead makes its trained trunk a
    contract backbone that ``finetune/run.py --init dcgan`` can load and compare with the other
    initialisations. ``spectral_norm=True`` wraps every conv and linear layer in spectral normalisation
    (Miyato et al. 2018), which bounds the trunk's Lipschitz constant and stabilises training; the
    exported trunk (:meth:`export_backbone`) carries the normalised weights under the plain keys.
    """

    def __init__(self, backbone: nn.Module, spectral_norm: bool = False) -> None:
        super().__init__()
        num_features = getattr(backbone, "num_features", None)
        if not isinstance(num_features, int):
            raise ValueError("discriminator trunk must expose an integer `num_features` (a medpretrain Backbone)")
        self.backbone = backbone
        self.head = nn.Linear(num_features, 1)
        self.spectral_norm = spectral_norm
        # An unregistered plain copy (in a tuple, so not a submodule) to export the trunk into.
        self._plain_template: tuple[nn.Module, ...] = (copy.deepcopy(backbone).cpu(),) if spectral_norm else ()
        if spectral_norm:
            for m in list(self.modules()):
                if isinstance(m, (nn.Conv2d, nn.Linear)):
                    torch.nn.utils.parametrizations.spectral_norm(m)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.backbone(x)).squeeze(1)

    def export_backbone(self) -> nn.Module:
        """A copy of the trunk with plain (non-parametrised) weights, on the CPU, in eval mode."""
        if not self.spectral_norm:
            return copy.deepcopy(self.backbone).cpu().eval()
        from torch.nn.utils import parametrize

        # Not deepcopy + remove_parametrizations: the copy shares the parametrised class with the
        # original, and removing the property there breaks the live discriminator. Instead read the
        # normalised weights (eval mode: no power iteration) into an unparametrised copy.
        was_training = self.backbone.training
        self.backbone.eval()
        with torch.no_grad():
            state = {k: v for k, v in self.backbone.state_dict().items() if ".parametrizations." not in k}
            for name, m in self.backbone.named_modules():
                if parametrize.is_parametrized(m, "weight"):
                    state[f"{name}.weight"] = m.weight.detach().clone()
        self.backbone.train(was_training)
        trunk = copy.deepcopy(self._plain_template[0])
        trunk.load_state_dict({k: v.cpu() for k, v in state.items()}, strict=True)
        return trunk.eval()


def gan_d_loss(real_logits: Tensor, fake_logits: Tensor, kind: Literal["bce", "hinge"] = "bce") -> Tensor:
    """Discriminator loss. ``bce``: -log D(x) - log(1 - D(G(z))) (Goodfellow et al. 2014);
    ``hinge``: mean(relu(1 - D(x))) + mean(relu(1 + D(G(z)))) (Miyato et al. 2018)."""
    real_logits, fake_logits = real_logits.float(), fake_logits.float()
    if kind == "bce":
        return (F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
                + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits)))
    if kind == "hinge":
        return F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean()
    raise ValueError(f"GAN loss must be 'bce' or 'hinge', got {kind!r}")


def gan_g_loss(fake_logits: Tensor, kind: Literal["bce", "hinge"] = "bce") -> Tensor:
    """Generator loss. ``bce``: non-saturating -log D(G(z)) (the paper's choice); ``hinge``: -mean D(G(z))."""
    fake_logits = fake_logits.float()
    if kind == "bce":
        return F.binary_cross_entropy_with_logits(fake_logits, torch.ones_like(fake_logits))
    if kind == "hinge":
        return -fake_logits.mean()
    raise ValueError(f"GAN loss must be 'bce' or 'hinge', got {kind!r}")


# ------------------------------------------------------------------------------------------------
# Sampling and rebuilding generators from their checkpoint metadata
# ------------------------------------------------------------------------------------------------


def latent_noise(n: int, latent_dim: int, seed: int) -> Tensor:
    """``[n, latent_dim]`` standard normal noise from a CPU generator seeded with ``seed``.

    Drawn on the CPU so the same seed gives the same latents on every device.
    """
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, latent_dim, generator=g)


@torch.no_grad()
def generate(model: nn.Module, z: Tensor, batch_size: int = 256) -> Tensor:
    """Images ``[n, C, S, S]`` in [-1, 1] from a decoder / generator in eval mode, on the CPU as float32."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = [model(chunk.to(device)).float().cpu() for chunk in torch.split(z, batch_size)]
    model.train(was_training)
    return torch.cat(out).clamp_(-1.0, 1.0)


def generator_meta(kind: str, model: ConvDecoder | DCGANGenerator, base_channels: int) -> dict[str, Any]:
    """What :func:`build_generator` needs to rebuild ``model`` (stored in the safetensors header)."""
    if kind not in GENERATOR_KINDS:
        raise ValueError(f"generator kind must be one of {GENERATOR_KINDS}, got {kind!r}")
    return {
        "kind": kind,
        "latent_dim": model.latent_dim,
        "out_channels": model.out_channels,
        "image_size": model.image_size,
        "base_channels": base_channels,
    }


def build_generator(meta: dict[str, Any]) -> nn.Module:
    """Rebuild an (untrained) decoder, generator or DDPM UNet from its checkpoint metadata
    (:func:`generator_meta` / :func:`ddpm_meta`).

    Raises ``ValueError`` when ``kind`` is unknown or a field is missing.
    """
    if meta.get("kind") == "ddpm_unet":
        from diffusers import UNet2DModel

        if "unet" not in meta:
            raise ValueError("ddpm_unet metadata lacks 'unet' (the UNet2DModel config)")
        return UNet2DModel.from_config(meta["unet"])
    try:
        kind = meta["kind"]
        args = (int(meta["latent_dim"]), int(meta["out_channels"]), int(meta["image_size"]),
                int(meta["base_channels"]))
    except KeyError as e:
        raise ValueError(f"generator metadata lacks {e.args[0]!r}; was this file written by generative/*.py?") from None
    if kind == "vae_decoder":
        return ConvDecoder(*args)
    if kind == "dcgan_generator":
        return DCGANGenerator(*args)
    raise ValueError(f"generator kind must be one of {GENERATOR_KINDS}, got {kind!r}")


# ------------------------------------------------------------------------------------------------
# DDPM (diffusers)
# ------------------------------------------------------------------------------------------------


def ddpm_levels(image_size: int, max_levels: int = 4) -> int:
    """Resolution levels of the DDPM UNet: the most (2..``max_levels``) that divide ``image_size`` evenly
    (28 -> 3: 28, 14, 7; 64 -> 4). Raises ``ValueError`` for sizes not divisible by 2."""
    for levels in range(max_levels, 1, -1):
        if image_size % 2 ** (levels - 1) == 0 and image_size // 2 ** (levels - 1) >= 4:
            return levels
    raise ValueError(f"DDPM UNet needs an even image size of at least 8, got {image_size}")


def build_ddpm_unet(image_size: int, channels: int = 1, base_channels: int = 32) -> nn.Module:
    """A small diffusers ``UNet2DModel`` (Ho et al. 2020 style: ResNet blocks, attention at the lowest
    resolution), one ResNet block per level, channels ``base * (1, 2, 2, 2)[:levels]``."""
    from diffusers import UNet2DModel

    levels = ddpm_levels(image_size)
    widths = tuple(base_channels * m for m in (1, 2, 2, 2)[:levels])
    down = ("DownBlock2D",) * (levels - 1) + ("AttnDownBlock2D",)
    up = ("AttnUpBlock2D",) + ("UpBlock2D",) * (levels - 1)
    unet = UNet2DModel(sample_size=image_size, in_channels=channels, out_channels=channels, layers_per_block=1,
                       block_out_channels=widths, down_block_types=down, up_block_types=up,
                       norm_num_groups=min(8, base_channels))
    return cast(nn.Module, unet)


def ddpm_meta(unet: nn.Module, num_train_timesteps: int, beta_schedule: str, sample_steps: int) -> dict[str, Any]:
    """What :func:`build_generator` and :func:`ddpm_sample` need (stored in the safetensors header)."""
    model: Any = unet  # a diffusers UNet2DModel; its ``config`` is a FrozenDict
    config = dict(model.config)
    return {"kind": "ddpm_unet", "unet": {k: v for k, v in config.items() if not k.startswith("_")},
            "image_size": int(config["sample_size"]), "out_channels": int(config["out_channels"]),
            "num_train_timesteps": num_train_timesteps, "beta_schedule": beta_schedule,
            "sample_steps": sample_steps}


@torch.no_grad()
def ddpm_sample(unet: nn.Module, n: int, seed: int, meta: dict[str, Any], batch_size: int = 256,
                steps: int | None = None) -> Tensor:
    """``n`` images in [-1, 1] by deterministic DDIM sampling (eta = 0, Song et al. 2021) with ``steps``
    (default ``meta["sample_steps"]``) from noise drawn on the CPU with ``seed``."""
    from diffusers import DDIMScheduler

    scheduler: Any = DDIMScheduler(num_train_timesteps=int(meta["num_train_timesteps"]),
                              beta_schedule=meta["beta_schedule"], clip_sample=True)
    scheduler.set_timesteps(int(steps or meta["sample_steps"]))
    size, channels = int(meta["image_size"]), int(meta["out_channels"])
    noise = torch.randn(n, channels, size, size, generator=torch.Generator().manual_seed(seed))
    was_training = unet.training
    unet.eval()
    device = next(unet.parameters()).device
    out = []
    for x in torch.split(noise, batch_size):
        x = x.to(device)
        for t in scheduler.timesteps:
            eps = unet(x, t).sample
            x = scheduler.step(eps, t, x, eta=0.0).prev_sample
        out.append(x.float().cpu())
    unet.train(was_training)
    return torch.cat(out).clamp_(-1.0, 1.0)


# ------------------------------------------------------------------------------------------------
# Mode collapse
# ------------------------------------------------------------------------------------------------


def pairwise_diversity(x: Tensor) -> float:
    """Mean pairwise Euclidean distance between the images of a batch, divided by sqrt(pixels).

    The result is the root-mean-square per-pixel difference of two random images, comparable across
    image sizes; 0 for a batch of identical images. Needs at least 2 images.
    """
    if x.shape[0] < 2:
        raise ValueError(f"pairwise_diversity needs at least 2 images, got {x.shape[0]}")
    flat = x.detach().float().flatten(1)
    return float(torch.pdist(flat).mean() / math.sqrt(flat.shape[1]))


class ModeCollapseError(RuntimeError):
    """Generated samples stopped varying (see :class:`CollapseMonitor`); the run stops instead of going on."""

    def __init__(self, step: int, ratio: float, threshold: float, patience: int, last_checkpoint: str | None):
        self.step, self.ratio = step, ratio
        where = f"last checkpoint: {last_checkpoint}" if last_checkpoint else "no checkpoint was written before it"
        super().__init__(
            f"mode collapse at step {step}: generated-batch diversity stayed below {threshold:.0%} of the real "
            f"batch's for {patience} consecutive checks (last ratio {ratio:.3f}); stopping. {where}. "
            "Try loss=hinge spectral_norm=true, a lower learning rate, or on_collapse=warn to continue anyway."
        )


class CollapseMonitor:
    """Flags mode collapse: generated-batch diversity below ``threshold`` x real-batch diversity for
    ``patience`` consecutive checks. Non-finite diversity counts as collapsed.

    ``update(fake_div, real_div) -> bool`` returns whether collapse is flagged now. ``state_dict`` /
    ``load_state_dict`` make it resumable (``state=`` of ``medpretrain.training.save_checkpoint``).
    """

    def __init__(self, threshold: float = 0.2, patience: int = 3) -> None:
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"collapse threshold must be in [0, 1], got {threshold}")
        if patience < 1:
            raise ValueError(f"collapse patience must be >= 1, got {patience}")
        self.threshold, self.patience = threshold, patience
        self.strikes = 0
        self.last_ratio = float("nan")

    def update(self, fake_div: float, real_div: float) -> bool:
        ratio = fake_div / real_div if real_div > 0 else float("nan")
        self.last_ratio = ratio
        if not math.isfinite(ratio) or ratio < self.threshold:
            self.strikes += 1
        else:
            self.strikes = 0
        return self.strikes >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {"strikes": self.strikes, "last_ratio": self.last_ratio}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.strikes = int(state["strikes"])
        self.last_ratio = float(state["last_ratio"])


# ------------------------------------------------------------------------------------------------
# Writing samples
# ------------------------------------------------------------------------------------------------


def to_uint8(images: Tensor) -> Tensor:
    """``[N, C, H, W]`` in [-1, 1] -> uint8 ``[N, C, H, W]`` in 0..255 (round to nearest)."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def save_grid(images: Tensor, path: str | os.PathLike[str], nrow: int | None = None) -> Path:
    """Write ``[N, C, H, W]`` images in [-1, 1] as one PNG grid (atomically); returns the path."""
    from PIL import Image
    from torchvision.utils import make_grid

    from medpretrain.utils import atomic_path

    n = images.shape[0]
    nrow = nrow or max(1, int(math.ceil(math.sqrt(n))))
    grid = make_grid(to_uint8(images.cpu()), nrow=nrow, padding=2, pad_value=255)
    array = grid[0].numpy() if images.shape[1] == 1 else grid.permute(1, 2, 0).numpy()
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")
    return Path(path)


def save_npz(path: str | os.PathLike[str], arrays: dict[str, np.ndarray]) -> Path:
    """``np.savez_compressed`` with fixed zip timestamps, so equal arrays give byte-identical files.

    (``np.savez`` stamps every member with the current time.) Written atomically.
    """
    import io
    import zipfile

    from medpretrain.utils import atomic_path

    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name in sorted(arrays):
            buf = io.BytesIO()
            array = np.asarray(arrays[name])  # not ascontiguousarray: it turns 0-d arrays into 1-d
            np.lib.format.write_array(buf, array if array.flags.c_contiguous else array.copy(order="C"),
                                      allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, buf.getvalue())
    return Path(path)


def sample_statistics(samples: Tensor, reference: Tensor | None = None, max_pairs_images: int = 512) -> dict[str, float]:
    """Summary numbers of images in [-1, 1], reported on the [0, 1] scale.

    ``mean``, ``std`` of pixel values, ``diversity`` (:func:`pairwise_diversity` on up to
    ``max_pairs_images`` images); with ``reference`` (real images) the same for it and
    ``diversity_ratio`` = samples' / reference's diversity (near 1: as varied as real data; near 0: collapse).
    """
    def stats(x: Tensor, prefix: str) -> dict[str, float]:
        x01 = (x.float().clamp(-1, 1) + 1) / 2
        return {f"{prefix}mean": float(x01.mean()), f"{prefix}std": float(x01.std()),
                f"{prefix}diversity": pairwise_diversity(x01[:max_pairs_images])}

    out = stats(samples, "")
    if reference is not None:
        out.update(stats(reference, "real_"))
        out["diversity_ratio"] = out["diversity"] / out["real_diversity"] if out["real_diversity"] > 0 else float("nan")
    return out
