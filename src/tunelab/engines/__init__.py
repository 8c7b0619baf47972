"""Compute engines. Each is a module implementing the contract in engines/base.py.

Engine modules are imported only when a command computes, so `tunelab --help` and the data
commands never import torch or mlx.
"""

import importlib
import importlib.util
import platform
import sys

from tunelab import adapters, models
from tunelab.errors import UserError

ENGINES = {"torch": "tunelab.engines.torch_engine", "mlx": "tunelab.engines.mlx_engine"}
EXTRAS = {"torch": "pip install 'tunelab[torch]'", "mlx": "pip install 'tunelab[mlx]'"}


def choose(name="auto"):
    """(engine name, why): `auto` is mlx on Apple silicon when mlx-lm is importable, torch elsewhere."""
    if name != "auto":
        if name not in ENGINES:
            raise UserError(f"unknown engine {name!r} (available: auto, {', '.join(ENGINES)})")
        return name, "as asked"
    if sys.platform == "darwin" and platform.machine() == "arm64":
        if importlib.util.find_spec("mlx") and importlib.util.find_spec("mlx_lm"):
            return "mlx", "Apple silicon, mlx installed"
        return "torch", f"Apple silicon, but mlx is not installed ({EXTRAS['mlx']} to use it)"
    return "torch", "not Apple silicon"


def get(name="auto", log=print):
    name, why = choose(name)
    try:
        engine = importlib.import_module(ENGINES[name])
    except ImportError as e:
        raise UserError(f"the {name} engine needs packages that are not installed ({e}): {EXTRAS[name]}") from None
    log(f"Engine: {name} ({why})")
    return engine


def load(model_ref, adapter_path=None, device="auto", dtype="auto", log=print, engine="auto", quantize=None,
         training=False):
    """Resolve a model reference, load it on the engine, and apply an adapter folder if given.

    `training`: the model is for `lora` (dtype auto may then pick a faster training dtype).
    `quantize` = (bits, group_size) loads the linear layers quantized (QLoRA; mlx engine).
    The adapter files are read first, so a bad --adapter-path fails before the model loads.
    Returns (engine, model, model_dir).
    """
    adapter = adapters.load(adapter_path) if adapter_path else None
    module = get(engine, log=log)
    if adapter is not None:
        log(f"Adapter: {adapter_path}{adapters.provenance(adapter_path)}")
    if adapter is not None and adapter[0].quantization and not quantize:
        if module.name == "mlx":
            quantize = adapter[0].quantization   # the base as the adapter was trained on it
        else:
            log(f"note: the adapter was trained on a {adapter[0].quantization[0]}-bit base (mlx engine); "
                f"the {module.name} engine applies it to the unquantized base")
    if quantize and module.name != "mlx":
        raise UserError(f"--quantize needs the mlx engine (this run uses {module.name}): pass --engine mlx")
    model_dir = models.resolve(model_ref, log=log)
    extra = {"quantize": quantize} if quantize else {}
    model = module.load(model_dir, device=device, dtype=dtype, log=log, training=training, **extra)
    if adapter is not None:
        module.set_adapter(model, *adapter)
    return module, model, model_dir
