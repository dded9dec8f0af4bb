"""The VAE (Kingma & Welling 2014) whose encoder is the project's backbone, its losses and the KL weight.

:class:`VAE`: ``encoder`` (a :class:`medpretrain.backbones.Backbone`) -> :class:`GaussianHead` -> ``z`` ->
:class:`ConvDecoder`. Loss = per-sample summed reconstruction error (:func:`reconstruction_loss`) +
``beta(step)`` * :func:`kl_divergence` (beta-VAE, Higgins et al. 2017; KL warm-up and other schedules:
:class:`BetaSchedule`), plus optional terms against blur: a :class:`PerceptualLoss` (feature distance through
a frozen network), an SSIM term (:func:`medpretrain.generative.monitor.ssim`) and an adversarial term from a
:class:`PatchDiscriminator` (VAE-GAN, Larsen et al. 2016). Images are in [-1, 1]; the decoder ends in ``tanh``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medpretrain.config import ConfigError
from medpretrain.generative.conditioning import class_embedding_size, with_class
from medpretrain.generative.geometry import center_crop, check_positive, level_channels, upsampling_plan


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

    ``num_classes`` > 0: the decoder p(x | z, y) of a conditional VAE (Sohn et al. 2015): ``forward(z, y)``
    concatenates a class embedding ``[B, class_dim]`` (default ``latent_dim``) to z before the linear layer.
    """

    def __init__(self, latent_dim: int, out_channels: int = 1, image_size: int = 28, base_channels: int = 64,
                 num_classes: int = 0, class_dim: int | None = None) -> None:
        super().__init__()
        check_positive(latent_dim=latent_dim, out_channels=out_channels, base_channels=base_channels)
        self.latent_dim, self.out_channels, self.image_size = latent_dim, out_channels, image_size
        self.num_classes, self.class_dim = class_embedding_size(num_classes, class_dim, latent_dim)
        self.start, n_up = upsampling_plan(image_size)
        ch = level_channels(base_channels, n_up - 1)
        self.fc = nn.Linear(latent_dim + self.class_dim, ch * self.start * self.start)
        self.start_channels = ch
        blocks: list[nn.Module] = []
        for level in reversed(range(n_up)):
            out = level_channels(base_channels, max(0, level - 1))
            blocks += [
                nn.Upsample(scale_factor=2, mode="nearest"),
                nn.Conv2d(ch, out, 3, padding=1, bias=False),
                nn.BatchNorm2d(out),
                nn.SiLU(inplace=True),
            ]
            ch = out
        self.blocks = nn.Sequential(*blocks)
        self.to_image = nn.Conv2d(ch, out_channels, 3, padding=1)
        # Last, so an unconditional decoder draws exactly what it always drew.
        self.class_embed = nn.Embedding(num_classes, self.class_dim) if num_classes else None

    def forward(self, z: Tensor, y: Tensor | None = None) -> Tensor:
        if z.ndim != 2 or z.shape[1] != self.latent_dim:
            raise ValueError(f"decoder expects z of shape [B, {self.latent_dim}], got {list(z.shape)}")
        x = F.silu(self.fc(with_class(z, y, self.class_embed, "decoder")))
        x = x.view(z.shape[0], self.start_channels, self.start, self.start)
        x = torch.tanh(self.to_image(self.blocks(x)))
        return center_crop(x, self.image_size)


@dataclass
class VAEOutput:
    recon: Tensor
    mu: Tensor
    logvar: Tensor
    z: Tensor
    prior: Tensor | None = None
    """Decoded prior samples ``z ~ N(0, I)`` (``forward(..., n_prior=k)``), else ``None``."""


class VAE(nn.Module):
    """Encoder (a backbone: ``forward(x) -> [B, num_features]``) + :class:`GaussianHead` + decoder.

    ``forward(x, generator=None)`` draws ``z = mu + sigma * eps`` (the reparameterisation trick) in training mode and
    uses ``z = mu`` in eval mode, so validation reconstructions are deterministic.

    A conditional decoder (``num_classes`` > 0) makes a conditional VAE (Sohn et al. 2015): q(z | x, y) by a
    class embedding (``[K, decoder.class_dim]``) concatenated to the encoder's pooled features before the
    Gaussian head (the trunk stays a plain backbone, so it still exports as one), p(x | z, y) by the
    decoder's own embedding; the prior stays N(0, I). ``forward(x, y=labels)``.
    """

    def __init__(self, encoder: nn.Module, decoder: ConvDecoder) -> None:
        super().__init__()
        num_features = getattr(encoder, "num_features", None)
        if not isinstance(num_features, int):
            raise ValueError("encoder must expose an integer `num_features` (a medpretrain Backbone)")
        self.encoder = encoder
        self.num_classes = decoder.num_classes
        self.head = GaussianHead(num_features + decoder.class_dim, decoder.latent_dim)
        self.decoder = decoder
        self.latent_dim = decoder.latent_dim
        self.class_embed = nn.Embedding(decoder.num_classes, decoder.class_dim) if decoder.num_classes else None

    def encode(self, x: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self.head(with_class(self.encoder(x), y, self.class_embed, "VAE encoder"))

    def forward(self, x: Tensor, generator: torch.Generator | None = None, n_prior: int = 0,
                y: Tensor | None = None) -> VAEOutput:
        """``generator`` (on ``x``'s device) draws the noise; a per-step seeded one makes resumes exact.

        ``n_prior > 0`` also decodes ``n_prior`` latents drawn from the prior N(0, I) (after the posterior noise,
        from the same ``generator``), in the same decoder pass as the reconstructions (one forward, so that
        data-parallel training sees every decoder parameter once): ``VAEOutput.prior``. Conditional: labels
        ``y [B]``; the prior samples take the first ``n_prior`` of them (``n_prior`` <= B).
        """
        mu, logvar = self.encode(x, y)
        if self.training:
            eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
            z = mu + torch.exp(0.5 * logvar) * eps
        else:
            z = mu
        if n_prior <= 0:
            return VAEOutput(self.decoder(z, y), mu, logvar, z)
        z_prior = torch.randn((n_prior, z.shape[1]), generator=generator, device=z.device, dtype=z.dtype)
        labels = None
        if y is not None:
            if n_prior > len(y):
                raise ValueError(f"a conditional VAE decodes at most B={len(y)} prior samples, got n_prior={n_prior}")
            labels = torch.cat([y, y[:n_prior]])
        recon, prior = self.decoder(torch.cat([z, z_prior]), labels).split([len(z), n_prior])
        return VAEOutput(recon, mu, logvar, z, prior)


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


class PatchDiscriminator(nn.Module):
    """PatchGAN discriminator (Isola et al. 2017) for the VAE-GAN term: ``x [B, C, H, W]`` -> logits
    ``[B, 1, h, w]``, one per overlapping patch.

    ``n_layers`` 4x4 stride-2 convs (channels ``channels * 2**i``, capped at 512) with LeakyReLU(0.2), a 4x4
    stride-1 conv and a 4x4 stride-1 conv to one channel, all padding 1; the receptive field of a logit is
    16 / 34 / 70 px for 1 / 2 / 3 layers (pix2pix's 70x70 PatchGAN has 3; 28 px, 2 layers: 5x5 logits).
    Spectral normalisation (Miyato et al. 2018) on every conv instead of the paper's BatchNorm, so real
    and generated batches judged separately never mix in running statistics. Needs ``2**n_layers * 4`` px
    or more.
    """

    def __init__(self, in_channels: int = 1, channels: int = 64, n_layers: int = 2) -> None:
        super().__init__()
        check_positive(in_channels=in_channels, channels=channels, n_layers=n_layers)
        self.min_size = 4 * 2**n_layers
        sn = torch.nn.utils.parametrizations.spectral_norm
        layers: list[nn.Module] = []
        prev = in_channels
        for i in range(n_layers + 1):
            out = min(512, channels * 2**i)
            layers += [sn(nn.Conv2d(prev, out, 4, 2 if i < n_layers else 1, 1)), nn.LeakyReLU(0.2, inplace=True)]
            prev = out
        layers.append(sn(nn.Conv2d(prev, 1, 4, 1, 1)))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or min(x.shape[-2:]) < self.min_size:
            raise ValueError(f"patch discriminator needs [B, C, H, W] with H, W >= {self.min_size}, got {list(x.shape)}")
        return self.net(x)


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
            raise ConfigError(f"beta schedule must be constant, linear or cyclical, got {self.kind!r}")
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
