"""DCGAN modules (Radford et al. 2015), the GAN losses and the BatchNorm re-estimation of an exported trunk.

* :class:`DCGANGenerator`: transposed convolutions, batch norm, ReLU, ``tanh``, the paper's initialisation;
  class-conditional with ``num_classes`` (a class embedding concatenated to z).
* :class:`RadfordDiscriminator` (the default): the paper's strided-conv discriminator with LeakyReLU, sized
  to the image: its trunk is the registered backbone ``dcgan_d<n>`` (:func:`radford_arch`), so the trained
  trunk is a contract backbone that ``finetune/run.py --init dcgan backbone.arch=dcgan_d<n>`` builds.
* :class:`BackboneDiscriminator`: any project backbone (e.g. ResNet-18) as the trunk with a linear
  real/fake head (an option: ``discriminator=backbone``); its trunk exports as that backbone. Both
  discriminators are class-conditional with ``num_classes``: the projection discriminator of Miyato & Koyama
  2018 (logit + <embed(y), pooled trunk features>).
* :func:`gan_d_loss` / :func:`gan_g_loss`: non-saturating BCE (the paper) or hinge (Miyato et al. 2018).
* :func:`reestimate_batchnorm`: running statistics from real images only, before a trunk is exported.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medpretrain.backbones import DCGAN_D_DEPTHS, build_backbone
from medpretrain.config import ConfigError
from medpretrain.generative.conditioning import check_labels, class_embedding_size, with_class
from medpretrain.generative.geometry import center_crop, check_positive, level_channels, upsampling_plan
from medpretrain.regimes import recompute_batchnorm


class DCGANGenerator(nn.Module):
    """DCGAN generator (Radford et al. 2015): ``z [B, latent_dim]`` -> ``[B, C, S, S]`` in [-1, 1].

    A transposed conv maps the 1x1 latent to a ``start x start`` map, then ``n_up - 1`` transposed convs
    (4x4, stride 2) with batch norm and ReLU, halving channels, and a last 4x4 stride-2 transposed conv
    to ``out_channels`` with ``tanh`` (no batch norm there, as in the paper). Weights drawn from
    N(0, 0.02), batch-norm scales from N(1, 0.02) (the paper's initialisation).

    ``num_classes`` > 0: class-conditional (Mirza & Osindero 2014): ``forward(z, y)`` with labels ``y [B]``
    (int64 in 0..K-1) concatenates an embedding ``[B, class_dim]`` (default ``latent_dim``; N(0, 1) like z)
    to z before the first transposed conv.
    """

    def __init__(self, latent_dim: int = 100, out_channels: int = 1, image_size: int = 28,
                 base_channels: int = 64, num_classes: int = 0, class_dim: int | None = None) -> None:
        super().__init__()
        check_positive(latent_dim=latent_dim, out_channels=out_channels, base_channels=base_channels)
        self.latent_dim, self.out_channels, self.image_size = latent_dim, out_channels, image_size
        self.num_classes, self.class_dim = class_embedding_size(num_classes, class_dim, latent_dim)
        start, n_up = upsampling_plan(image_size)
        ch = level_channels(base_channels, n_up - 1)
        layers: list[nn.Module] = [
            nn.ConvTranspose2d(latent_dim + self.class_dim, ch, start, 1, 0, bias=False),
            nn.BatchNorm2d(ch),
            nn.ReLU(inplace=True),
        ]
        for level in reversed(range(1, n_up)):
            out = level_channels(base_channels, level - 1)
            layers += [nn.ConvTranspose2d(ch, out, 4, 2, 1, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
            ch = out
        layers += [nn.ConvTranspose2d(ch, out_channels, 4, 2, 1, bias=False), nn.Tanh()]
        self.net = nn.Sequential(*layers)
        dcgan_init_(self)
        # After the paper's initialisation, so an unconditional generator draws exactly what it always drew.
        self.class_embed = nn.Embedding(num_classes, self.class_dim) if num_classes else None

    def forward(self, z: Tensor, y: Tensor | None = None) -> Tensor:
        if z.ndim != 2 or z.shape[1] != self.latent_dim:
            raise ValueError(f"generator expects z of shape [B, {self.latent_dim}], got {list(z.shape)}")
        z = with_class(z, y, self.class_embed, "generator")
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

    The ``discriminator=backbone`` option, a departure from Radford et al. 2015 (whose discriminator,
    :class:`RadfordDiscriminator`, is the default): a deep registered backbone (e.g. ResNet-18, ReLU) as the
    trunk, so that the trained trunk is the same network the other initialisations give fine-tuning
    (``finetune/run.py --init dcgan`` with that ``backbone.arch``). A deep trunk beats a small generator
    within tens of steps on this CPU budget (D(fake) 0.01 at step 40 in the issue-17 measurement). ``spectral_norm=True`` wraps every conv and linear layer in spectral normalisation
    (Miyato et al. 2018), which bounds the trunk's Lipschitz constant and stabilises training; the
    exported trunk (:meth:`export_backbone`) carries the normalised weights under the plain keys.

    ``num_classes`` > 0: the projection discriminator (Miyato & Koyama 2018, eq. 3): ``forward(x, y)`` adds
    ``<embed(y), h>`` to the head's logit, ``h`` the pooled trunk features ``[B, F]`` and ``embed`` a
    ``[K, F]`` table initialised N(0, 0.02) (spectrally normalised too with ``spectral_norm``, as the
    authors' ``SNEmbedID``). The embedding is not part of the exported trunk.
    """

    def __init__(self, backbone: nn.Module, spectral_norm: bool = False, num_classes: int = 0) -> None:
        super().__init__()
        num_features = getattr(backbone, "num_features", None)
        if not isinstance(num_features, int):
            raise ValueError("discriminator trunk must expose an integer `num_features` (a medpretrain Backbone)")
        self.num_classes, _ = class_embedding_size(num_classes, num_features, num_features)
        self.backbone = backbone
        self.head = self.make_head(backbone)
        # After the head, so an unconditional discriminator draws exactly what it always drew.
        self.class_embed = nn.Embedding(num_classes, num_features) if num_classes else None
        if self.class_embed is not None:
            nn.init.normal_(self.class_embed.weight, 0.0, 0.02)
        self.spectral_norm = spectral_norm
        # An unregistered plain copy (in a tuple, so not a submodule) to export the trunk into.
        self._plain_template: tuple[nn.Module, ...] = (copy.deepcopy(backbone).cpu(),) if spectral_norm else ()
        if spectral_norm:
            for m in list(self.modules()):
                if isinstance(m, (nn.Conv2d, nn.Linear, nn.Embedding)):
                    torch.nn.utils.parametrizations.spectral_norm(m)

    def make_head(self, backbone: nn.Module) -> nn.Module:
        """The real/fake head on the trunk: a linear layer on the pooled features."""
        return nn.Linear(int(backbone.num_features), 1)  # type: ignore[arg-type]

    def project(self, logits: Tensor, pooled: Tensor, y: Tensor | None) -> Tensor:
        """``logits [B]`` plus the projection ``<embed(y), pooled>`` (conditional), or as they are."""
        if self.class_embed is None:
            if y is not None:
                raise ValueError("this discriminator is unconditional (num_classes=0) but was given class labels")
            return logits
        y = check_labels(y, len(pooled), self.num_classes, "discriminator")
        return logits + (self.class_embed(y).to(pooled.dtype) * pooled).sum(dim=1)

    def forward(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        h = self.backbone(x)
        return self.project(self.head(h).squeeze(1), h, y)

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


def radford_arch(image_size: int) -> str:
    """The registered trunk of the :class:`RadfordDiscriminator` at ``image_size``: ``dcgan_d<n>`` with as many
    stride-2 blocks as the generator has stride-2 transposed convs (:func:`upsampling_plan`), so the last map
    is the generator's start map: 28 px -> ``dcgan_d2`` (7x7), 32 -> ``d3`` (4x4), 64 -> ``d4`` (4x4),
    128 -> ``d5`` (4x4). Raises ``ConfigError`` below 8 px and above 256 px (no trunk registered there)."""
    _, n_down = upsampling_plan(image_size)
    if n_down not in DCGAN_D_DEPTHS:
        raise ConfigError(f"the Radford discriminator is registered for 8 to {4 * 2 ** (max(DCGAN_D_DEPTHS) + 1) - 1} px "
                          f"(dcgan_d{min(DCGAN_D_DEPTHS)} .. dcgan_d{max(DCGAN_D_DEPTHS)}), got image_size={image_size}; "
                          "use discriminator=backbone")
    return f"dcgan_d{n_down}"


class RadfordDiscriminator(BackboneDiscriminator):
    """DCGAN discriminator (Radford et al. 2015): ``x [B, C, S, S]`` -> logits ``[B]``.

    Trunk: the registered backbone :func:`radford_arch` ``(S)`` (4x4 stride-2 convs, BatchNorm after all but
    the first, LeakyReLU(0.2); :class:`medpretrain.backbones.DCGANDiscriminatorBackbone`); head: the paper's
    last conv, whose kernel covers the whole last map (7x7 at 28 px, 4x4 at 32 / 64 / 128 px), to one logit,
    initialised N(0, 0.02). The sigmoid is in the loss (:func:`gan_d_loss`). ``spectral_norm=True`` wraps
    every conv (head included) as in :class:`BackboneDiscriminator`. Inputs must be ``S x S``.
    ``num_classes`` > 0: the projection term on the global mean of the last map (the trunk's pooled
    features), as in :class:`BackboneDiscriminator`.
    """

    def __init__(self, trunk: int | nn.Module, image_size: int, spectral_norm: bool = False,
                 num_classes: int = 0) -> None:
        """``trunk``: the input channels (the trunk is built here), or a built ``radford_arch(image_size)``."""
        self.image_size = image_size
        arch = radford_arch(image_size)
        if isinstance(trunk, int):
            trunk = build_backbone(arch, trunk, "auto", image_size=image_size)
        if getattr(trunk, "arch", None) != arch:
            raise ValueError(f"Radford discriminator at {image_size} px needs a {arch} trunk, got {getattr(trunk, 'arch', trunk)}")
        super().__init__(trunk, spectral_norm=spectral_norm, num_classes=num_classes)

    def make_head(self, backbone: nn.Module) -> nn.Module:
        depth = len(backbone.feature_channels)  # type: ignore[arg-type]
        last = self.image_size // 2**depth  # 4x4 stride-2 convs with padding 1 halve, rounding down
        head = nn.Conv2d(int(backbone.num_features), 1, last, 1, 0, bias=False)  # type: ignore[arg-type]
        nn.init.normal_(head.weight, 0.0, 0.02)
        return head

    def forward(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        if x.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"Radford discriminator built for {self.image_size} px, got {list(x.shape)}")
        last = self.backbone.forward_features(x)[-1]  # type: ignore[operator]
        logits = self.head(last).flatten()
        return logits if self.class_embed is None and y is None else self.project(logits, last.mean((2, 3)), y)


def dataset_batches(ds: Sequence[dict[str, Tensor]], n: int, batch_size: int,
                    device: torch.device | str = "cpu") -> Iterator[Tensor]:
    """The first ``n`` images of ``ds`` (0: all), in order, stacked in batches of ``batch_size`` on ``device``:
    the real images :func:`reestimate_batchnorm` is given."""
    n = len(ds) if n <= 0 else min(n, len(ds))
    for start in range(0, n, batch_size):
        yield torch.stack([ds[i]["image"] for i in range(start, min(start + batch_size, n))]).to(device)


@torch.no_grad()
def reestimate_batchnorm(module: nn.Module, batches: Iterable[Tensor]) -> int:
    """Replace the running statistics of every BatchNorm layer of ``module`` by those of ``batches``
    (images ``[B, C, H, W]`` on ``module``'s device); returns the number of images used.

    Why: a DCGAN discriminator sees real and generated batches separately, so its running statistics mix
    both (about two thirds fake in the loop of ``generative/dcgan.py``); a trunk exported for fine-tuning must
    carry the statistics of real images. As ``torch.optim.swa_utils.update_bn``: statistics reset,
    ``momentum=None`` (a cumulative average over the batches: with equal batch sizes the mean is the mean over
    all images, the variance the mean of the per-batch unbiased variances), the batches through ``module``
    with only the BatchNorm layers in train mode (dropout off, spectral-norm power iterations off) and no
    gradients, momenta and modes restored. Layers after the first normalise with batch statistics during the
    pass. Batches of fewer than 2 images are skipped. Weights never change. A module without BatchNorm
    returns the count untouched. Raises ``ValueError`` (statistics left as they were) when no batch of at
    least 2 images came.
    """
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    return recompute_batchnorm(module, norms, batches, module, name="reestimate_batchnorm")


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
