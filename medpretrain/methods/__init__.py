"""Self-supervised methods as parts: one module per method, registered by name (see :mod:`.registry`).

Importing this package imports every method module in it (SimCLR and MoCo first, then the others in
alphabetical order); each registers itself with :func:`medpretrain.methods.base.register_method`. A new
method is one new module here plus its YAML: nothing else lists the methods.
"""

import importlib
import pkgutil

from medpretrain.methods.registry import StageInfo, register, selfsup_methods, stage, stages

_NOT_METHODS = {"base", "registry"}
_FIRST = ("simclr", "moco")  # the documented entry points keep their place at the top of every list

for _name in [*_FIRST, *sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name not in _FIRST)]:
    if _name not in _NOT_METHODS and not _name.startswith("_"):
        importlib.import_module(f"{__name__}.{_name}")

__all__ = ["StageInfo", "register", "selfsup_methods", "stage", "stages"]
