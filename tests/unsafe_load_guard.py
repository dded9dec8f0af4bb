"""Run a Python script with every unpickling loader replaced by one that refuses (a test helper).

    python tests/unsafe_load_guard.py LOG script.py [args...]

``torch.load`` passes only with ``weights_only=True`` and no ``pickle_module``; ``pickle.load``,
``pickle.loads`` and ``pickle.Unpickler`` (what ``torch.load(weights_only=False)`` unpickles with) always
raise :class:`UnsafeLoad`. Every attempt is appended to ``LOG`` as a JSON line ``{"file", "weights_only",
"refused"}`` before anything is read, so a test sees refusals that a caller swallowed (accelerate loads the
RNG states inside ``try: ... except Exception``) and can check the guard was active at all.

The script runs as ``__main__`` in this process (``runpy``), with ``sys.argv`` and ``sys.path[0]`` set as
``python script.py args...`` would set them.
This file imports ``pickle`` only to replace its loaders.
"""

from __future__ import annotations

import json
import os
import pickle
import runpy
import sys
from typing import Any

import torch


class UnsafeLoad(RuntimeError):
    """A loader that can run code from the file was called."""


def install(log: str) -> None:
    real_load = torch.load

    def note(what: Any, weights_only: Any, refused: bool) -> None:
        with open(log, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"file": str(what), "weights_only": weights_only, "refused": refused}) + "\n")

    def guarded_load(f: Any, *args: Any, **kwargs: Any) -> Any:
        weights_only = kwargs.get("weights_only")
        # positional args after f: map_location, pickle_module
        refused = weights_only is not True or len(args) > 1 or kwargs.get("pickle_module") is not None
        note(f, weights_only, refused)
        if refused:
            raise UnsafeLoad(f"torch.load({f!s}) with weights_only={weights_only!r}: could run code from the file")
        return real_load(f, *args, **kwargs)

    def refuse(name: str) -> Any:
        def loader(*args: Any, **kwargs: Any) -> Any:
            note(f"pickle.{name}", None, True)
            raise UnsafeLoad(f"pickle.{name} called: could run code from the data")
        return loader

    class RefusingUnpickler:
        def __init__(self, file: Any, *args: Any, **kwargs: Any) -> None:
            note(getattr(file, "name", "pickle.Unpickler"), False, True)
            raise UnsafeLoad("pickle.Unpickler created: could run code from the data")

    torch.load = torch.serialization.load = guarded_load
    pickle.load = refuse("load")
    pickle.loads = refuse("loads")
    pickle.Unpickler = RefusingUnpickler  # type: ignore[misc, assignment]


if __name__ == "__main__":
    log_path, script, *script_args = sys.argv[1:]
    install(log_path)
    sys.argv = [script, *script_args]
    sys.path[0] = os.path.dirname(os.path.abspath(script))  # as ``python script.py`` sets it
    runpy.run_path(script, run_name="__main__")
