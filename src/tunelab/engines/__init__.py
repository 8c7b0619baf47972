"""Compute engines. Each is a module implementing the contract in engines/base.py.

Engine modules are imported only when a command computes, so `tunelab --help` and the data
commands never import torch or mlx.
"""

import importlib

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
