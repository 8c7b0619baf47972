"""Compute engines. Each is a module implementing the contract in engines/base.py.

Engine modules are imported only when a command computes, so `tunelab --help` and the data
commands never import torch or mlx.
"""

import importlib

from tunelab import adapters, models
from tunelab.errors import UserError

ENGINES = {"torch": "tunelab.engines.torch_engine"}


def get(name="auto", log=print):
    if name == "auto":
        name = "torch"
    if name not in ENGINES:
        raise UserError(f"unknown engine {name!r} (available: {', '.join(ENGINES)})")
    try:
        return importlib.import_module(ENGINES[name])
    except ImportError as e:
        raise UserError(f"the {name} engine needs packages that are not installed ({e}): "
                        "pip install 'tunelab[torch]'") from None


def load(model_ref, adapter_path=None, device="auto", dtype="auto", log=print):
    """Resolve a model reference, load it on the engine, and apply an adapter folder if given.

    The adapter files are read first, so a bad --adapter-path fails before the model loads.
    Returns (engine, model, model_dir).
    """
    adapter = adapters.load(adapter_path) if adapter_path else None
    engine = get("auto", log=log)
    model_dir = models.resolve(model_ref, log=log)
    model = engine.load(model_dir, device=device, dtype=dtype, log=log)
    if adapter is not None:
        engine.set_adapter(model, *adapter)
    return engine, model, model_dir
