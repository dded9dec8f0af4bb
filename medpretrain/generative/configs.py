"""Config schemas of the generative entry scripts (``generative/vae.py``, ``dcgan.py``, ``ddpm.py``).

They live in the library so that the experiment runner can validate a stage's config against them
(:attr:`medpretrain.methods.registry.StageInfo.schema`) without importing a script. ``configs/vae.yaml``
and ``configs/dcgan.yaml`` go on top of these defaults; ``key=value`` overrides on top of those.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Literal

from medpretrain.config import BackboneConfig, ConfigError, DataConfig


@dataclasses.dataclass
class GenTrainConfig:
    """Optimisation, precision, logging, watching and fault-tolerance options shared by VAE, DCGAN and DDPM."""

    epochs: int = 1
    """Passes over the training split (ignored when ``max_steps`` > 0)."""
    max_steps: int = 0
    """> 0: stop after exactly this many optimizer steps (a step budget for tests and benchmarks)."""
    batch_size: int = 64
    lr: float = 2e-4
    weight_decay: float = 0.0
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    seed: int = 0
    cache_on_device: bool = True
    """Keep the decoded split as one tensor on the training device (:func:`medpretrain.data.loader.image_loader`)."""
    class_balance: bool = False
    """Conditional runs: draw the training batches with every class equally likely (with replacement, weights
    1 / class count), so a minority class gets as many generator and discriminator updates as the majority;
    an epoch is still ``len(split)`` images. Samples for the audit keep the data's class mix
    (``sample.py mix=data``)."""
    log_every: int = 5
    """Optimizer steps between CSV / tracker rows and NaN checks."""
    checkpoint_every: int = 50
    """Optimizer steps between ``accelerator.save_state`` checkpoints (0: only at the end)."""
    checkpoint_total_limit: int = 2
    resume: str = ""
    """``auto``: continue the newest unfinished run (or ``run_name``); a checkpoint path; empty: fresh."""
    sample_every: int = 1
    """Epochs between sample grids ``samples_epochXXX.png`` (a grid is always written at the end)."""
    grid_size: int = 64
    """Images in each sample grid (fixed latents, so grids of successive epochs are comparable)."""
    log_with: str = "tensorboard"
    """accelerate tracker (``tensorboard``, ``wandb`` ...) or ``none``; metrics.csv is always written."""


def check_data_config(data: DataConfig) -> None:
    """Generators end in ``tanh``: the data must be normalised to [-1, 1] (mean 0.5, std 0.5)."""
    if data.mean != 0.5 or data.std != 0.5:
        raise ConfigError(
            f"generative models output [-1, 1] (tanh), so data.mean and data.std must be 0.5 "
            f"(got mean={data.mean}, std={data.std})"
        )


@dataclasses.dataclass
class VAEConfig:
    """``generative/vae.py``: a VAE whose encoder is the project's backbone (exported as ``vae``).

    The weights of the optional terms (``perceptual_weight``, ``ssim_weight``, ``adversarial_weight``) are per
    pixel: each term is multiplied by the pixels of an image (``C * H * W``), as the reconstruction error is
    summed over them, so weight 1 weighs a term like a squared error of 1 on every pixel.
    """

    ALIASES: ClassVar[dict[str, str]] = {"resume": "train.resume",  # `--resume auto`
                                         "kl_warmup_steps": "beta_warmup_steps"}

    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    backbone: BackboneConfig = dataclasses.field(default_factory=BackboneConfig)
    train: GenTrainConfig = dataclasses.field(default_factory=lambda: GenTrainConfig(lr=1e-3))
    latent_dim: int = 64
    decoder_channels: int = 32
    """Channels of the decoder's last block (doubling towards the latent, capped at 512)."""
    recon_loss: Literal["mse", "l1"] = "mse"
    beta: float = 1.0
    beta_schedule: Literal["constant", "linear", "cyclical"] = "linear"
    """``linear``: KL warm-up from 0 to ``beta`` over ``beta_warmup_steps`` optimizer steps (Bowman et al. 2016)."""
    beta_warmup_steps: int = 100
    """KL warm-up length in optimizer steps (alias ``kl_warmup_steps``; 0: ``beta`` from the first step)."""
    beta_cycle_steps: int = 0
    perceptual_weight: float = 0.0
    """> 0 adds a feature distance through a frozen network (:class:`~medpretrain.generative.vae.PerceptualLoss`)."""
    perceptual_init: str = "random"
    """The frozen network: ``random`` (randomly initialised with ``train.seed``, BatchNorm statistics of real
    training images; needs no download), or a :func:`medpretrain.init.init_backbone` spec: a contract
    checkpoint (e.g. a SimCLR export), ``simclr`` (newest export), ``imagenet`` (weights must be present)."""
    perceptual_arch: str = ""
    """Architecture of the frozen network (empty: ``backbone.arch``)."""
    ssim_weight: float = 0.0
    """> 0 adds ``1 - SSIM(recon, x)`` (:func:`~medpretrain.generative.monitor.ssim`, [0, 1] scale)."""
    adversarial_weight: float = 0.0
    """> 0 adds the VAE-GAN term (Larsen et al. 2016): a :class:`~medpretrain.generative.vae.PatchDiscriminator`
    judges real images against reconstructions (and prior samples, ``adversarial_prior``), hinge loss; the
    decoder and encoder minimise its generator loss."""
    adversarial_start: int = 0
    """Optimizer steps before the discriminator and the adversarial term start (the decoder learns to
    reconstruct first)."""
    adversarial_prior: bool = True
    """Also judge decoded prior samples z ~ N(0, I), as Larsen et al. (the samples are what must not be blur)."""
    adversarial_lr: float = 0.0
    """Discriminator learning rate (0: ``train.lr``); Adam with betas (0.5, 0.999)."""
    adversarial_channels: int = 64
    adversarial_layers: int = 2
    """Stride-2 layers of the patch discriminator (receptive field 16 / 34 / 70 px for 1 / 2 / 3)."""
    grad_clip: float = 5.0
    """Max gradient norm (0: off)."""
    conditional: bool = False
    """Learn p(x | class) on the labelled training split (the same images with their single labels; a source
    without binary / multiclass labels is refused): a conditional VAE (Sohn et al. 2015), a class embedding
    joined to the encoder's pooled features before the Gaussian head and another concatenated to the latent
    for the decoder. The decoder's metadata then holds ``num_classes`` and ``class_names``, and
    ``generative/sample.py per_class=<n>`` draws per class."""
    split: Literal["train", "all"] = "train"
    """Training split; ``train`` keeps the validation split unseen for the reconstruction metrics."""
    out_dir: str = "runs/generative/vae"
    run_name: str = ""

    def __post_init__(self) -> None:
        weights = {"perceptual_weight": self.perceptual_weight, "ssim_weight": self.ssim_weight,
                   "adversarial_weight": self.adversarial_weight, "adversarial_lr": self.adversarial_lr,
                   "adversarial_start": self.adversarial_start, "beta_warmup_steps": self.beta_warmup_steps}
        bad = [f"{k}={v}" for k, v in weights.items() if v < 0]
        if bad:
            raise ConfigError(f"{', '.join(bad)}: must be >= 0")
        if self.adversarial_layers < 1 or self.adversarial_channels < 1:
            raise ConfigError(f"adversarial_layers and adversarial_channels must be >= 1, got "
                              f"{self.adversarial_layers} and {self.adversarial_channels}")


@dataclasses.dataclass
class DCGANConfig:
    """``generative/dcgan.py``: DCGAN (Radford et al. 2015); its discriminator trunk is exported as ``dcgan``."""

    ALIASES: ClassVar[dict[str, str]] = {"resume": "train.resume"}  # `--resume auto`

    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    backbone: BackboneConfig = dataclasses.field(default_factory=BackboneConfig)
    """Discriminator trunk with ``discriminator=backbone`` (exported as that backbone); unused with ``radford``."""
    train: GenTrainConfig = dataclasses.field(default_factory=lambda: GenTrainConfig(lr=2e-4))
    """``train.lr`` is the generator's learning rate (``d_lr`` the discriminator's)."""
    discriminator: Literal["radford", "backbone"] = "radford"
    """``radford``: the paper's strided-conv LeakyReLU discriminator sized to the image, trunk exported as the
    registered backbone ``dcgan_d<n>`` (28 px: ``dcgan_d2``, 32: ``d3``, 64: ``d4``, 128: ``d5``);
    ``backbone``: ``backbone.arch`` (e.g. ResNet-18) as trunk with a linear head, exported as that arch."""
    latent_dim: int = 100
    generator_channels: int = 64
    """Channels of the generator's last hidden layer (doubling towards the latent, capped at 512)."""
    d_lr: float = 0.0
    """Discriminator learning rate (0: same as ``train.lr``); two timescales (Heusel et al. 2017) e.g.
    ``train.lr=1e-4 d_lr=4e-4``."""
    adam_beta1: float = 0.5
    adam_beta2: float = 0.999
    loss: Literal["bce", "hinge"] = "bce"
    spectral_norm: bool = False
    """Spectral normalisation (Miyato et al. 2018) of every discriminator conv and linear layer."""
    export_bn_images: int = 0
    """Real training images the exported trunk's BatchNorm statistics are re-estimated on, in batches of
    ``train.batch_size`` (0: the whole training split); generated images never enter them."""
    collapse_check_every: int = 10
    """Optimizer steps between diversity checks (0: never)."""
    collapse_threshold: float = 0.2
    """Collapse when generated diversity < this fraction of real diversity ..."""
    collapse_patience: int = 5
    """... for this many consecutive checks."""
    on_collapse: Literal["stop", "warn"] = "stop"
    conditional: bool = False
    """Learn p(x | class) on the labelled training split (the same images with their single labels; a source
    without binary / multiclass labels is refused): a class embedding concatenated to z for the generator, a
    projection term for the discriminator of either kind (Miyato & Koyama 2018: logit + <embed(y), pooled
    features>). The generator's metadata then holds ``num_classes`` and ``class_names``, and
    ``generative/sample.py per_class=<n>`` draws per class."""
    split: Literal["train", "all"] = "train"
    out_dir: str = "runs/generative/dcgan"
    run_name: str = ""

    def __post_init__(self) -> None:
        if self.d_lr < 0 or self.export_bn_images < 0:
            raise ConfigError(f"d_lr and export_bn_images must be >= 0, got {self.d_lr} and {self.export_bn_images}")


@dataclasses.dataclass
class DDPMConfig:
    """``generative/ddpm.py``: a small diffusers DDPM (samples only; no backbone is exported), with an
    exponential moving average of its weights for the grids and the export."""

    ALIASES: ClassVar[dict[str, str]] = {"resume": "train.resume"}  # `--resume auto`

    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    train: GenTrainConfig = dataclasses.field(
        default_factory=lambda: GenTrainConfig(lr=2e-4, max_steps=100, batch_size=64, checkpoint_every=50))
    base_channels: int = 32
    num_train_timesteps: int = 1000
    beta_schedule: Literal["linear", "squaredcos_cap_v2"] = "linear"
    sample_steps: int = 50
    """DDIM steps for grids and sample.py."""
    ema_decay: float = 0.999
    """Largest decay of the exponential moving average of the UNet's weights (diffusers' ``EMAModel``), updated
    after every optimizer step; the grids and ``unet.safetensors`` use the average. 0: no average (the raw
    weights are exported)."""
    ema_power: float = 0.75
    """EMA warm-up (``EMAModel(use_ema_warmup=True)``, inv_gamma 1): the decay after ``t`` updates is
    ``min(ema_decay, 1 - t ** -ema_power)`` (the first update copies the weights), so a short run averages over
    its recent steps, not over its initialisation: 0.75 reaches 0.99 at 464 steps and 0.999 at 10^4."""
    grad_clip: float = 1.0
    conditional: bool = False
    """Learn p(x | class) on the labelled training split (the same images with their single labels; a source
    without binary / multiclass labels is refused): diffusers' ``UNet2DModel(num_class_embeds=K)``, given
    ``class_labels`` in its forward. The UNet's metadata then holds ``num_classes`` and ``class_names``, and
    ``generative/sample.py per_class=<n>`` draws per class."""
    class_dropout: float = 0.0
    """Conditional only: the probability that a training label is replaced by a learned null class (one more
    embedding), so the same UNet also learns p(x) and classifier-free guidance (Ho & Salimans 2022) can be
    used; 0: no null class."""
    guidance_scale: float = 1.0
    """Classifier-free guidance weight w of the grids and the default of ``generative/sample.py``:
    ``eps = eps(x, null) + w * (eps(x, y) - eps(x, null))``; 1: plain conditional sampling (needs
    ``class_dropout`` > 0 otherwise)."""
    split: Literal["train", "all"] = "train"
    out_dir: str = "runs/generative/ddpm"
    run_name: str = ""

    def __post_init__(self) -> None:
        if not 0.0 <= self.ema_decay < 1.0 or self.ema_power <= 0:
            raise ConfigError(f"ema_decay must be in [0, 1) and ema_power > 0, got ema_decay={self.ema_decay}, "
                              f"ema_power={self.ema_power}")
        if self.sample_steps < 1 or self.base_channels < 1:
            raise ConfigError(f"sample_steps and base_channels must be >= 1, got {self.sample_steps} and "
                              f"{self.base_channels}")
        if not 0.0 <= self.class_dropout < 1.0 or self.guidance_scale < 0:
            raise ConfigError(f"class_dropout must be in [0, 1) and guidance_scale >= 0, got class_dropout="
                              f"{self.class_dropout}, guidance_scale={self.guidance_scale}")
        if (self.class_dropout > 0 or self.guidance_scale != 1.0) and not self.conditional:
            raise ConfigError("class_dropout and guidance_scale need conditional=true")
        if self.guidance_scale != 1.0 and self.class_dropout == 0:
            raise ConfigError(f"guidance_scale={self.guidance_scale} needs class_dropout > 0 (the null class "
                              "classifier-free guidance compares with)")
