"""Self-supervised methods as parts: one module per method, registered by name (see :mod:`.registry`).

Until the method modules land, SimCLR and MoCo are registered here with their entry scripts.
"""

from medpretrain.methods.registry import StageInfo, register, selfsup_methods, stage, stages

register(StageInfo("simclr", "selfsup", "pretrain/simclr.py", "configs/simclr.yaml", "runs/pretrain/simclr",
                   description="SimCLR (Chen et al. 2020)"))
register(StageInfo("moco", "selfsup", "pretrain/moco.py", "configs/moco.yaml", "runs/pretrain/moco",
                   description="MoCo v2 (Chen et al. 2020)"))

__all__ = ["StageInfo", "register", "selfsup_methods", "stage", "stages"]
