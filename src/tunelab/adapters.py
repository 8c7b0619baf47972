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

A full fine-tune (fine_tune_type full, mlx-lm's) trains whole blocks: its folder holds
adapters.safetensors with those blocks' weights under their model names (model.layers.27.mlp.up_proj.weight)
and the config, with no PEFT file (PEFT has no such layout). Its tensors travel as {name: array}.
"""

import json
import math
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open

from tunelab import atomic, models, runs
from tunelab.errors import UserError, utf8_text

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
    full: bool = False           # full fine-tuning: every weight of `layers` trains (rank, scale, keys unused)

    @property
    def kind(self):
        """mlx-lm's fine_tune_type: lora, dora or full."""
        return "full" if self.full else "dora" if self.dora else "lora"

    def modules(self):
        return [f"model.layers.{i}.{k}" for i in self.layers for k in self.keys]


def spec_for(num_layers, total_layers, rank, scale, dropout, keys=None, base_model="", kind="lora"):
    """The spec for training the top `num_layers` blocks (-1: all) of a `total_layers` model; `kind` is
    mlx-lm's fine_tune_type (lora, dora, full)."""
    n = total_layers if num_layers == -1 else min(num_layers, total_layers)
    layers = list(range(total_layers - n, total_layers))
    if kind == "full":
        return AdapterSpec(rank=0, scale=0.0, dropout=0.0, layers=layers, num_layers=n, keys=[],
                           base_model=str(base_model), full=True)
    return AdapterSpec(rank=rank, scale=float(scale), dropout=float(dropout), layers=layers, num_layers=n,
                       keys=list(keys or DEFAULT_KEYS), base_model=str(base_model), dora=kind == "dora")


def config_dict(spec, extra=None):
    if spec.full:   # mlx-lm's keys only: PEFT has no layout for whole trained blocks
        return {"fine_tune_type": "full", "num_layers": spec.num_layers, "lora_parameters": None,
                "base_model_name_or_path": spec.base_model, **(extra or {})}
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
    """Write the weight files (both layouts; a full fine-tune's one) and the config. `tensors`:
    {module: (A [r, in], B [out, r][, M])}, or {weight name: array} for a full fine-tune.

    Each file is replaced atomically; weights first, so a config never names weights that
    are not yet complete. The config records the weight files' SHA-256 (`tunelab.files`).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    check_finite(tensors, "the adapter", fix="not saved; lower --learning-rate")
    if spec.full:
        with atomic.atomic_path(folder / MLX_WEIGHTS) as tmp:
            atomic.save_safetensors({name: np.ascontiguousarray(value) for name, value in tensors.items()}, tmp,
                                    metadata={"format": "mlx"})
        _write_config(folder, config_dict(spec, extra_config), (MLX_WEIGHTS,))
        return
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
        atomic.save_safetensors(peft, tmp, metadata={"format": "pt"})
    with atomic.atomic_path(folder / MLX_WEIGHTS) as tmp:
        atomic.save_safetensors(mlx, tmp, metadata={"format": "mlx"})
    _write_config(folder, config_dict(spec, extra_config), (PEFT_WEIGHTS, MLX_WEIGHTS))


def _write_config(folder, config, weight_files):
    """The config, recording the weight files it belongs to: a folder whose files come from different saves
    is detected."""
    config.setdefault("tunelab", {})["files"] = {name: runs.file_sha256(folder / name) for name in weight_files}
    atomic.write_json(folder / CONFIG, config)


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


def pair_with_weights(tensors, weights):
    """[(weight, array)] for a full fine-tune's {name: array} and a model's trained {name: weight}: every
    name and shape must match, each mismatch reported at once."""
    pairs, problems = [], []
    for name, array in tensors.items():
        weight = weights.get(name)
        if weight is None:
            problems.append(f"fine-tuned weight {name}: the model has no such weight in the trained blocks")
        elif tuple(weight.shape) != tuple(array.shape):
            problems.append(f"fine-tuned weight {name}: shape {tuple(array.shape)} does not match the model's "
                            f"{tuple(weight.shape)}: trained on another base model?")
        else:
            pairs.append((weight, array))
    missing = sorted(set(weights) - set(tensors))
    if missing:
        problems.append(f"fine-tuned weights: {missing[0]} ({len(missing)} of the trained blocks' weights) "
                        "missing: the file is incomplete")
    UserError.raise_if(problems)
    return pairs


def check_finite(tensors, where, fix="the run that wrote it diverged; use an earlier checkpoint"):
    """Raise UserError naming every tensor of `tensors` that holds NaN or infinite values.

    `tensors`: {name: array} or {module: (A, B[, M])}; `where` names the file or folder they belong to.
    """
    parts = ("lora_A", "lora_B", "lora_magnitude_vector")
    bad = []
    for name, value in tensors.items():
        arrays = [(name, value)] if isinstance(value, np.ndarray) else \
            [(f"{name}.{parts[i] if i < len(parts) else i}", x) for i, x in enumerate(value)]
        bad += [label for label, x in arrays if not np.isfinite(x).all()]
    if bad:
        raise UserError(f"{where}: {', '.join(bad)}: holds NaN or infinite values: {fix}")


def _utf8_json(path):
    """The JSON value of a small file; UserError naming the line (and column) of what keeps it from reading."""
    text = utf8_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno}): fix the file, or "
                        "save the adapter again") from None
    except RecursionError:
        raise UserError(f"{path}: nested too deeply to read: not an adapter config") from None


def provenance(folder):
    """Which save an adapter folder holds, for the user: ' (step N, validation loss X)' or ''."""
    try:
        record = json.loads((Path(folder) / CONFIG).read_text(encoding="utf-8")).get("tunelab", {})
    except (OSError, ValueError, AttributeError):
        return ""
    parts = [f"step {record['step']}"] if isinstance(record.get("step"), int) else []
    if isinstance(record.get("val_loss"), float):
        parts.append(f"validation loss {record['val_loss']:.3f}")
    return f" ({', '.join(parts)})" if parts else ""


def _check_file_hashes(folder, config):
    """Compare each file that config["tunelab"]["files"] ({name: sha256 hex}) lists, where present, with its
    recorded hash: a mismatch means the files come from different saves."""
    recorded = config.get("tunelab", {})
    recorded = recorded.get("files", {}) if isinstance(recorded, dict) else None
    if not isinstance(recorded, dict) or not all(isinstance(v, str) for v in recorded.values()):
        raise UserError(f"{folder / CONFIG}: tunelab.files: expected {{file name: sha256 hex}}, got {recorded!r}")
    changed = [name for name, digest in recorded.items()
               if name == Path(name).name and name != CONFIG and (folder / name).is_file()
               and runs.file_sha256(folder / name) != digest.lower()]
    if changed:
        saved = sorted(p for p in (folder / "checkpoints").glob("step-*") if (p / "COMMITTED").is_file())
        use = f"use --adapter-path {saved[-1]} (the newest complete checkpoint), or " if saved else ""
        raise UserError(f"{folder / CONFIG}: tunelab.files: {', '.join(changed)}: sha256 differs from the one "
                        f"recorded: the adapter files in {folder} come from different saves (an interrupted save); "
                        f"{use}run `tunelab lora --train --resume --adapter-path {folder}` with the run's options, "
                        "which restores them")


def _number(config, key, path, problems, what, default=None, whole=False):
    """config[key] ("a/b": config["a"]["b"]) checked as a positive whole number (`whole`) or a finite number;
    None after adding its problem to `problems`. `what` says what the value is, for a missing one."""
    shown = key.replace("/", ".")
    value = config
    for part in key.split("/"):
        value = value.get(part) if isinstance(value, dict) else None
    value = default if value is None else value
    if value is None:
        problems.append(f"{path}: {shown}: missing: add {what}")
    elif whole and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        problems.append(f"{path}: {shown}: expected a whole number of at least 1 (the LoRA rank), got {value!r}")
    elif not whole and (not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value)):
        problems.append(f"{path}: {shown}: expected a number, got {value!r}")
    else:
        return value
    return None


def _hyperparameters(config, path, peft):
    """(rank, scale, dropout) from PEFT's keys (`peft`) or mlx-lm's lora_parameters, and their problems."""
    problems = []
    if peft:
        rank = _number(config, "r", path, problems, "the LoRA rank, a whole number such as 8", whole=True)
        alpha = _number(config, "lora_alpha", path, problems, "the LoRA scale times r (scale = lora_alpha / r)")
        scale = alpha / rank if rank and alpha is not None else None
        dropout = _number(config, "lora_dropout", path, problems, "", default=0.0)
    else:
        if not isinstance(config.get("lora_parameters", {}), dict):
            problems.append(f"{path}: lora_parameters: expected an object of rank, scale, dropout")
        rank = _number(config, "lora_parameters/rank", path, problems, "", default=8, whole=True)
        scale = _number(config, "lora_parameters/scale", path, problems, "", default=20.0)
        dropout = _number(config, "lora_parameters/dropout", path, problems, "", default=0.0)
    return rank, scale, dropout, problems


_NUMPY_DTYPES = {"F64", "F32", "F16", "I64", "I32", "I16", "I8", "U64", "U32", "U16", "U8", "BOOL"}


def _read_safetensors(path):
    """{name: numpy array} of a safetensors file, bfloat16 widened to float32; UserError when the file is
    truncated, not a safetensors file at all, or holds a data type numpy cannot hold."""
    header = dict(models.safetensors_header(path))
    header.pop("__metadata__", None)
    odd = [f"{name} ({info.get('dtype')})" for name, info in header.items()
           if info.get("dtype") not in _NUMPY_DTYPES | {"BF16"}]
    if odd:
        raise UserError(f"{path}: {', '.join(odd)}: a data type tunelab cannot read: save the adapter in "
                        "float32, float16 or bfloat16")
    try:
        with safe_open(str(path), framework="np") as f:
            tensors = {name: f.get_tensor(name) for name, info in header.items() if info["dtype"] != "BF16"}
    except SafetensorError as e:
        raise UserError(f"{path}: truncated or not a safetensors file ({e}): save the adapter again, or use "
                        "an earlier checkpoint") from None
    with open(path, "rb") as f:   # numpy has no bfloat16: widen its 16 bits to float32's top half
        data_start = 8 + struct.unpack("<Q", f.read(8))[0]
        for name, info in header.items():
            if info["dtype"] == "BF16":
                start, end = info["data_offsets"]
                f.seek(data_start + start)
                bits = np.frombuffer(f.read(end - start), dtype="<u2").astype(np.uint32) << 16
                tensors[name] = bits.view(np.float32).reshape(info["shape"])
    return tensors


# Each layout's tensor names: suffix -> slot in (A, B, M); whether stored transposed ([in, r], [r, out]).
_LAYOUTS = {
    PEFT_WEIGHTS: ({".lora_A.weight": 0, ".lora_B.weight": 1, ".lora_magnitude_vector": 2}, PEFT_PREFIX, False),
    MLX_WEIGHTS: ({".lora_a": 0, ".lora_b": 1, ".m": 2}, "", True),
}
_MODULE = re.compile(r"model\.layers\.\d+\..+")
_WEIGHT = re.compile(r"model\.layers\.\d+\..+\.(weight|bias)")


def _group(raw, layout, path, dora):
    """{module: (A [r, in], B [out, r][, M [out]])} from a weight file's tensors, and every problem: a
    missing partner tensor, a module outside the decoder blocks, non-float values."""
    suffixes, prefix, transposed = _LAYOUTS[layout]
    names = list(suffixes)
    found, problems = {}, []
    for name, value in raw.items():
        suffix = next((s for s in suffixes if name.endswith(s)), None)
        if suffix is None or (suffixes[suffix] == 2 and not dora):
            if suffix is not None:
                problems.append(f"{path}: {name}: a DoRA magnitude, but {CONFIG} says LoRA (use_dora false, "
                                "fine_tune_type lora): set use_dora: true and fine_tune_type: dora in it")
            continue
        module = name[:-len(suffix)]
        if not module.startswith(prefix) or not _MODULE.fullmatch(module[len(prefix):]):
            problems.append(f"{path}: {name}: expected a module inside the decoder blocks, named "
                            f"{prefix}model.layers.<n>.<module>{suffix}: not an adapter tunelab can read")
            continue
        if value.dtype.kind != "f":
            problems.append(f"{path}: {name}: expected floating-point values, got {value.dtype}")
            continue
        found.setdefault(module[len(prefix):], {})[suffixes[suffix]] = value.T if transposed and value.ndim == 2 \
            else value
    tensors = {}
    for module, slots in found.items():
        needed = range(3 if dora else 2)
        missing = [f"{prefix}{module}{names[i]}" for i in needed if i not in slots]
        if missing:
            have = ", ".join(names[i].lstrip(".") for i in sorted(slots))
            what = " (the DoRA magnitude)" if missing[-1].endswith(names[2]) else ""
            problems.append(f"{path}: {module}: has {have} but not {', '.join(missing)}{what}: the file is "
                            "incomplete; save the adapter again, or use an earlier checkpoint")
            continue
        tensors[module] = tuple(slots[i] for i in needed)
    if not raw:
        problems.append(f"{path}: no tensors at all: not a saved adapter; save it again, or use an earlier "
                        "checkpoint")
    elif not tensors and not problems:
        problems.append(f"{path}: no LoRA tensors (names ending {names[0]} / {names[1]}): not a LoRA adapter")
    return tensors, problems


def _check_shapes(tensors, rank, path, layout):
    """Problems of tensors whose shapes disagree with each other or with the config's rank."""
    suffixes, prefix, transposed = _LAYOUTS[layout]
    problems = []
    for module, (a, b, *magnitude) in tensors.items():
        a_name, b_name, m_name = (f"{prefix}{module}{suffix}" for suffix in suffixes)
        stored = [tuple(x.T.shape if transposed and x.ndim == 2 else x.shape) for x in (a, b)]
        shown = f"{a_name} {stored[0]} and {b_name} {stored[1]}"
        if a.ndim != 2 or b.ndim != 2:
            problems.append(f"{path}: {shown}: expected two dimensions each")
        elif a.shape[0] != b.shape[1]:
            problems.append(f"{path}: {shown}: their ranks differ ({a.shape[0]} and {b.shape[1]}): the file is "
                            "damaged; save the adapter again, or use an earlier checkpoint")
        elif rank is not None and a.shape[0] != rank:
            problems.append(f"{path}: {shown}: rank {a.shape[0]}, but {CONFIG} says {rank}: the config and the "
                            "weights come from different adapters")
        elif magnitude and magnitude[0].shape != (b.shape[0],):
            problems.append(f"{path}: {m_name} {tuple(magnitude[0].shape)}: expected ({b.shape[0]},), one "
                            f"magnitude per output row of {b_name}")
    return problems


def _load_full(folder, config):
    """(spec, {weight name: array}) of a full fine-tune's folder (mlx-lm's layout), every problem at once."""
    weights = folder / MLX_WEIGHTS
    if not weights.is_file():
        raise UserError(f"{folder}: no {MLX_WEIGHTS}: a full fine-tune's weights are in it")
    base_model = config.get("base_model_name_or_path") or ""
    problems = [] if isinstance(base_model, str) else \
        [f"{folder / CONFIG}: base_model_name_or_path: expected a string, got {base_model!r}"]
    raw = _read_safetensors(weights)
    for name, value in raw.items():
        if not _WEIGHT.fullmatch(name):
            problems.append(f"{weights}: {name}: expected a weight inside the decoder blocks, named "
                            "model.layers.<n>.<module>.weight (or .bias)")
        elif value.dtype.kind != "f":
            problems.append(f"{weights}: {name}: expected floating-point values, got {value.dtype}")
    if not raw:
        problems.append(f"{weights}: no tensors at all: not a saved fine-tune; save it again, or use an earlier "
                        "checkpoint")
    try:
        check_finite(raw, weights)
    except UserError as e:
        problems += e.problems
    UserError.raise_if(problems)
    layers = sorted({int(name.split(".")[2]) for name in raw})
    keys = sorted({name.split(".", 3)[3] for name in raw})
    return AdapterSpec(rank=0, scale=0.0, dropout=0.0, layers=layers, num_layers=len(layers), keys=keys,
                       base_model=base_model, full=True), raw


def load(folder):
    """Read and check an adapter folder (PEFT layout, or mlx-lm's alone, or a full fine-tune's); return
    (spec, tensors).

    A faulty folder raises UserError naming the file, the field or tensor and the fix: a config that is
    not a readable JSON object or lacks r / lora_alpha, files from different saves, a truncated weight
    file, unpaired or misshapen tensors, NaN or infinite values. Nothing in the folder is changed.
    """
    folder = Path(folder)
    config_path = folder / CONFIG
    if not config_path.is_file():
        raise UserError(f"{folder}: no {CONFIG}: not an adapter folder")
    config = _utf8_json(config_path)
    if not isinstance(config, dict):
        raise UserError(f"{config_path}: expected a JSON object of adapter settings, got "
                        f"{type(config).__name__}: save the adapter again")
    _check_file_hashes(folder, config)
    if config.get("fine_tune_type", "lora") not in ("lora", "dora", "full"):
        raise UserError(f"{config_path}: fine_tune_type: {config['fine_tune_type']!r}: expected lora, dora or full")
    if config.get("fine_tune_type") == "full":
        return _load_full(folder, config)
    dora = bool(config.get("use_dora")) or config.get("fine_tune_type") == "dora"
    layout = next((name for name in (PEFT_WEIGHTS, MLX_WEIGHTS) if (folder / name).is_file()), None)
    if layout is None:
        raise UserError(f"{folder}: neither {PEFT_WEIGHTS} nor {MLX_WEIGHTS} found")
    weights = folder / layout
    rank, scale, dropout, problems = _hyperparameters(config, config_path, peft=layout == PEFT_WEIGHTS)
    quantized = config.get("tunelab_quantization")
    if quantized is not None and not (isinstance(quantized, dict) and all(
            isinstance(quantized.get(k), int) and not isinstance(quantized.get(k), bool)
            for k in ("bits", "group_size"))):
        problems.append(f"{config_path}: tunelab_quantization: expected {{\"bits\": int, \"group_size\": int}}, "
                        f"got {quantized!r}")
    base_model = config.get("base_model_name_or_path") or ""
    if not isinstance(base_model, str):
        problems.append(f"{config_path}: base_model_name_or_path: expected a string, got {base_model!r}")
    raw = _read_safetensors(weights)
    tensors, found = _group(raw, layout, weights, dora)
    problems += found + _check_shapes(tensors, rank, weights, layout)
    try:
        check_finite(raw, weights)
    except UserError as e:
        problems += e.problems
    UserError.raise_if(problems)
    layers = sorted({int(m.split(".")[2]) for m in tensors})
    keys = sorted({m.split(".", 3)[3] for m in tensors}, key=lambda k: (k not in DEFAULT_KEYS, k))
    spec = AdapterSpec(rank=rank, scale=float(scale), dropout=float(dropout), layers=layers, num_layers=len(layers),
                       keys=keys, base_model=base_model, dora=dora,
                       quantization=(quantized["bits"], quantized["group_size"]) if quantized else None)
    return spec, tensors
