"""The engines the contract suite runs on. mlx is skipped where it is not installed, except when
TUNELAB_REQUIRE_MLX=1 (CI), where a missing mlx fails instead."""

import importlib
import os

import pytest

NAMES = ["torch", "mlx"]


def engine_module(name):
    if name == "mlx" and os.environ.get("TUNELAB_REQUIRE_MLX") != "1":
        pytest.importorskip("mlx_lm", reason="mlx-lm is not installed: pip install 'tunelab[mlx]'")
    return importlib.import_module(f"tunelab.engines.{name}_engine")
