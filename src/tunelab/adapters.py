"""Adapter files: PEFT's layout (canonical) and an mlx-lm copy, side by side in one folder.

  adapter_model.safetensors  base_model.model.<module>.lora_A.weight [r, in]
                             base_model.model.<module>.lora_B.weight [out, r]
                             base_model.model.<module>.lora_magnitude_vector [out]  (DoRA)
  adapters.safetensors       <module>.lora_a [in, r] = lora_A^T, <module>.lora_b [r, out] = lora_B^T
                             <module>.m [out]  (DoRA)
  adapter_config.json        PEFT's keys (r, lora_alpha = scale * r, target_modules, ...) and
                             mlx-lm's keys (fine_tune_type, num_layers, lora_parameters) together;
                             each reader ignores the other's.

<module> is the module path inside the causal-LM model, e.g. model.layers.27.self_attn.q_proj.
Tensors travel as {module: (A, B)} for LoRA and {module: (A, B, M)} for DoRA, where the layer computes
(M / ||W + scale B A||) * (W + scale B A) x, the norm taken over each output row and not trained through.
Everything here is numpy: engines convert at their edge.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from tunelab import atomic
from tunelab.errors import UserError

PEFT_WEIGHTS = "adapter_model.safetensors"
MLX_WEIGHTS = "adapters.safetensors"
CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."

# Linear layers of a llama/qwen2 block: mlx-lm's default is every one of them.
DEFAULT_KEYS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@dataclass
class AdapterSpec:
    rank: int
    scale: float
    dropout: float
    layers: list            # block indices that carry adapters
    num_layers: int         # mlx-lm's count from the top (len(layers))
    keys: list = field(default_factory=lambda: list(DEFAULT_KEYS))
    base_model: str = ""
    dora: bool = False           # weight-decomposed LoRA: a trained magnitude per output row
    quantization: tuple = None   # (bits, group_size) of the quantized base it was trained on (QLoRA)

    def modules(self):
        return [f"model.layers.{i}.{k}" for i in self.layers for k in self.keys]


def spec_for(num_layers, total_layers, rank, scale, dropout, keys=None, base_model="", dora=False):
    """The spec for training the top `num_layers` blocks (-1: all) of a `total_layers` model."""
    n = total_layers if num_layers == -1 else min(num_layers, total_layers)
    return AdapterSpec(rank=rank, scale=float(scale), dropout=float(dropout),
                       layers=list(range(total_layers - n, total_layers)), num_layers=n,
                       keys=list(keys or DEFAULT_KEYS), base_model=str(base_model), dora=bool(dora))


def config_dict(spec, extra=None):
    return {
        # PEFT
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": spec.rank,
        "lora_alpha": spec.scale * spec.rank,
        "lora_dropout": spec.dropout,
        "target_modules": spec.keys,
        "layers_to_transform": spec.layers,
        "layers_pattern": "layers",
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": spec.dora,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "base_model_name_or_path": spec.base_model,
        # mlx-lm
        "fine_tune_type": "dora" if spec.dora else "lora",
        "num_layers": spec.num_layers,
        "lora_parameters": {"rank": spec.rank, "scale": spec.scale, "dropout": spec.dropout,
                            "keys": spec.keys},
        **({"tunelab_quantization": {"bits": spec.quantization[0], "group_size": spec.quantization[1]}}
           if spec.quantization else {}),
        **(extra or {}),
    }


def save(folder, spec, tensors, extra_config=None):
    """Write both weight files and the config. `tensors`: {module: (A [r, in], B [out, r])}.

    Each file is replaced atomically; weights first, so a config never names weights that
    are not yet complete.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for module, arrays in tensors.items():
        if not all(np.isfinite(x).all() for x in arrays):
            raise UserError(f"adapter tensor {module} holds NaN or infinite values: not saved; "
                            "lower --learning-rate")
    peft = {}
    mlx = {}
    for module, (a, b, *magnitude) in tensors.items():
        peft[f"{PEFT_PREFIX}{module}.lora_A.weight"] = np.ascontiguousarray(a, dtype=np.float32)
        peft[f"{PEFT_PREFIX}{module}.lora_B.weight"] = np.ascontiguousarray(b, dtype=np.float32)
        mlx[f"{module}.lora_a"] = np.ascontiguousarray(a.T, dtype=np.float32)
        mlx[f"{module}.lora_b"] = np.ascontiguousarray(b.T, dtype=np.float32)
        if magnitude:
            peft[f"{PEFT_PREFIX}{module}.lora_magnitude_vector"] = np.ascontiguousarray(magnitude[0], dtype=np.float32)
            mlx[f"{module}.m"] = np.ascontiguousarray(magnitude[0], dtype=np.float32)
    with atomic.atomic_path(folder / PEFT_WEIGHTS) as tmp:
        save_file(peft, str(tmp), metadata={"format": "pt"})
    with atomic.atomic_path(folder / MLX_WEIGHTS) as tmp:
        save_file(mlx, str(tmp), metadata={"format": "mlx"})
    atomic.write_json(folder / CONFIG, config_dict(spec, extra_config))


def pair_with_layers(tensors, layers, shapes):
    """[(layer, A, B[, M])] for adapter tensors {module: (A, B[, M])} and a model's adapted layers
    {module: layer}; `shapes(layer)` gives the layer's (A shape, B shape[, M shape]) as PEFT lays them
    out. Every mismatch is reported at once."""
    pairs, problems = [], []
    for module, arrays in tensors.items():
        layer = layers.get(module)
        if layer is None:
            problems.append(f"adapter tensor for {module}: the model has no such adapted module")
            continue
        want = [tuple(shape) for shape in shapes(layer)]
        have = [tuple(x.shape) for x in arrays]
        if want != have:
            what = "DoRA" if len(have) == 3 else "LoRA"
            problems.append(f"adapter tensor for {module}: {what} shapes {'/'.join(map(str, have))} do not match the "
                            f"model's {'/'.join(map(str, want))}: trained on another base model or fine-tune type?")
            continue
        pairs.append((layer, *arrays))
    UserError.raise_if(problems)
    return pairs


def load(folder):
    """Read an adapter folder (PEFT layout, or mlx-lm's alone); return (spec, tensors)."""
    folder = Path(folder)
    if not (folder / CONFIG).is_file():
        raise UserError(f"{folder}: no {CONFIG}: not an adapter folder")
    config = json.loads((folder / CONFIG).read_text(encoding="utf-8"))
    dora = bool(config.get("use_dora")) or config.get("fine_tune_type") == "dora"
    if config.get("fine_tune_type", "lora") not in ("lora", "dora"):
        raise UserError(f"{folder}: fine_tune_type {config['fine_tune_type']!r}: only LoRA and DoRA adapters are supported")
    tensors = {}
    if (folder / PEFT_WEIGHTS).is_file():
        raw = load_file(str(folder / PEFT_WEIGHTS))
        for name, value in raw.items():
            if name.endswith(".lora_A.weight"):
                module = name[len(PEFT_PREFIX):-len(".lora_A.weight")]
                tensors[module] = (value, raw[f"{PEFT_PREFIX}{module}.lora_B.weight"])
                if dora:
                    tensors[module] += (raw[f"{PEFT_PREFIX}{module}.lora_magnitude_vector"],)
        rank, scale = int(config["r"]), float(config["lora_alpha"]) / int(config["r"])
        dropout = float(config.get("lora_dropout", 0.0))
    elif (folder / MLX_WEIGHTS).is_file():
        raw = load_file(str(folder / MLX_WEIGHTS))
        for name, value in raw.items():
            if name.endswith(".lora_a"):
                module = name[:-len(".lora_a")]
                tensors[module] = (value.T, raw[f"{module}.lora_b"].T)
                if dora:
                    tensors[module] += (raw[f"{module}.m"],)
        params = config.get("lora_parameters", {})
        rank, scale = int(params.get("rank", 8)), float(params.get("scale", 20.0))
        dropout = float(params.get("dropout", 0.0))
    else:
        raise UserError(f"{folder}: neither {PEFT_WEIGHTS} nor {MLX_WEIGHTS} found")
    layers = sorted({int(m.split(".")[2]) for m in tensors})
    keys = sorted({m.split(".", 3)[3] for m in tensors}, key=lambda k: (k not in DEFAULT_KEYS, k))
    quantized = config.get("tunelab_quantization")
    spec = AdapterSpec(rank=rank, scale=scale, dropout=dropout, layers=layers, num_layers=len(layers),
                       keys=keys, base_model=config.get("base_model_name_or_path", ""), dora=dora,
                       quantization=(int(quantized["bits"]), int(quantized["group_size"])) if quantized else None)
    return spec, tensors
