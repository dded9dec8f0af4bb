"""DCGAN modules (Radford et al. 2015) and the GAN losses.

* :class:`DCGANGenerator`: transposed convolutions, batch norm, ReLU, ``tanh``, the paper's initialisation.
* :class:`BackboneDiscriminator`: the project's backbone as the discriminator trunk with a linear
  real/fake head, so the trained trunk is a contract backbone (``--init dcgan``). Departure from the
  paper (whose discriminator is a 4-layer strided-conv net with LeakyReLU): see the class docstring.
* :func:`gan_d_loss` / :func:`gan_g_loss`: non-saturating BCE (the paper) or hinge (Miyato et al. 2018).
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medpretrain.generative.geometry import center_crop, check_positive, level_channels, upsampling_plan


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
        check_positive(latent_dim=latent_dim, out_channels=out_channels, base_channels=base_channels)
        self.latent_dim, self.out_channels, self.image_size = latent_dim, out_channels, image_size
        start, n_up = upsampling_plan(image_size)
        ch = level_channels(base_channels, n_up - 1)
        layers: list[nn.Module] = [
            nn.ConvTranspose2d(latent_dim, ch, start, 1, 0, bias=False),
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
