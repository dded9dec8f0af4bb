"""medpretrain: compare ImageNet, scratch, self-supervised and generative initialisations on medical images.

Shared parts live in one module per concern: :mod:`medpretrain.data`, :mod:`medpretrain.backbones`,
:mod:`medpretrain.checkpoint`, :mod:`medpretrain.config`, :mod:`medpretrain.metrics`,
:mod:`medpretrain.report`. Entry scripts in ``pretrain/``, ``generative/`` and ``finetune/`` wire them.
"""

__version__ = "0.1.0"
