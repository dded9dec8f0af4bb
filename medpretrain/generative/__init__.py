"""Generative pretraining parts: a VAE whose encoder is the project's backbone, DCGAN modules, a small
DDPM, their losses, the KL weight (beta) schedule and a sample-diversity check for mode collapse.

Images are in [-1, 1] (``DataConfig`` mean 0.5 / std 0.5 after scaling to [0, 1]); decoders and
generators end in ``tanh``. Every module works for any square size from 8 px up (28, 33, 64, 128 ...).
One module per concern:

* :mod:`~medpretrain.generative.geometry`: :func:`upsampling_plan`, :func:`center_crop`;
* :mod:`~medpretrain.generative.vae`: :class:`VAE` (Kingma & Welling 2014), :class:`ConvDecoder`,
  :func:`kl_divergence`, :func:`reconstruction_loss`, :class:`PerceptualLoss`, :class:`BetaSchedule`;
* :mod:`~medpretrain.generative.dcgan`: :class:`DCGANGenerator` (Radford et al. 2015),
  :class:`BackboneDiscriminator`, :func:`gan_d_loss` / :func:`gan_g_loss`;
* :mod:`~medpretrain.generative.ddpm`: :func:`build_ddpm_unet`, :func:`ddpm_meta`, :func:`ddpm_sample`;
* :mod:`~medpretrain.generative.sampling`: :func:`latent_noise`, :func:`generate`, :func:`generator_meta`,
  :func:`build_generator`, :func:`sample_classes`, :func:`save_npz`;
* :mod:`~medpretrain.generative.conditioning`: class conditioning (``conditional=true``): :func:`class_seed`,
  :func:`grid_labels`, the label checks and the class embedding concatenated to a latent;
* :mod:`~medpretrain.generative.monitor`: :func:`pairwise_diversity`, :class:`CollapseMonitor`,
  :class:`ModeCollapseError`, :func:`sample_statistics`;
* :mod:`~medpretrain.generative.configs`: the entry scripts' config schemas (:class:`VAEConfig`,
  :class:`DCGANConfig`, :class:`DDPMConfig`, :class:`GenTrainConfig`);
* :mod:`~medpretrain.generative.stage`: what the entry scripts share around their loops (start-up,
  data, step bookkeeping, outputs); not re-exported here.

Image grids and 8-bit pixels: :mod:`medpretrain.images` (:func:`save_grid`, :func:`to_uint8`, re-exported).
"""

from medpretrain.generative.conditioning import class_seed, grid_labels
from medpretrain.generative.configs import (
    DCGANConfig,
    DDPMConfig,
    GenTrainConfig,
    VAEConfig,
    check_data_config,
)
from medpretrain.generative.dcgan import (
    BackboneDiscriminator,
    DCGANGenerator,
    dcgan_init_,
    gan_d_loss,
    gan_g_loss,
)
from medpretrain.generative.ddpm import build_ddpm_unet, ddpm_levels, ddpm_meta, ddpm_sample
from medpretrain.generative.geometry import MAX_CHANNELS, center_crop, upsampling_plan
from medpretrain.generative.monitor import (
    CollapseMonitor,
    ModeCollapseError,
    pairwise_diversity,
    sample_statistics,
)
from medpretrain.generative.sampling import (
    GENERATOR_KINDS,
    build_generator,
    generate,
    generator_meta,
    latent_noise,
    sample_classes,
    save_npz,
)
from medpretrain.generative.vae import (
    VAE,
    BetaSchedule,
    ConvDecoder,
    GaussianHead,
    PerceptualLoss,
    VAEOutput,
    kl_divergence,
    reconstruction_loss,
)
from medpretrain.images import save_grid, to_uint8

__all__ = [
    "GENERATOR_KINDS", "MAX_CHANNELS", "VAE", "BackboneDiscriminator", "BetaSchedule", "CollapseMonitor",
    "ConvDecoder", "DCGANConfig", "DCGANGenerator", "DDPMConfig", "GaussianHead", "GenTrainConfig",
    "ModeCollapseError", "PerceptualLoss", "VAEConfig", "VAEOutput", "build_ddpm_unet", "build_generator",
    "center_crop", "check_data_config", "class_seed", "dcgan_init_", "ddpm_levels", "ddpm_meta", "ddpm_sample",
    "gan_d_loss", "gan_g_loss", "generate", "generator_meta", "grid_labels", "kl_divergence", "latent_noise",
    "pairwise_diversity", "reconstruction_loss", "sample_classes", "sample_statistics", "save_grid", "save_npz",
    "to_uint8", "upsampling_plan",
]
