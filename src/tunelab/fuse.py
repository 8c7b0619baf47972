"""The fuse stage: base model + adapter -> one merged Hugging Face folder.

The folder holds safetensors weights, config.json (rope_theta written at the top level too,
where mlx-lm reads it), generation_config.json and the tokenizer with its chat template. It
is written under a temporary name and renamed into place only when complete.
"""

import json
from pathlib import Path

from tunelab import atomic, engines, models, outputs


def _portable_config(folder):
    """Mirror rope_parameters.rope_theta at the top level (mlx-lm and older transformers read it there)."""
    path = Path(folder) / "config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    theta = (config.get("rope_parameters") or {}).get("rope_theta")
    if theta is not None and "rope_theta" not in config:
        config["rope_theta"] = theta
        atomic.write_json(path, config)


MARKER = "tunelab_fuse.json"


def _local(reference):
    """The path behind a model reference when it names a local file or folder."""
    path = Path(reference).expanduser()
    return path if path.exists() else None


def fuse(opts, log=print):
    adapter_dir = Path(opts.adapter_path)
    save_path = Path(opts.save_path)
    inputs = [("the adapter folder", adapter_dir), ("the base model", _local(opts.model))]
    outputs.check_target(save_path, "--save-path", overwrite=opts.overwrite, inputs=inputs, marker=MARKER,
                         command="fuse")
    engine, model, model_dir = engines.load(opts.model, adapter_dir, opts.device, log=log, engine=opts.engine)
    replace = outputs.check_target(save_path, "--save-path", overwrite=opts.overwrite,
                                   inputs=inputs + [("the base model's folder", model_dir)], marker=MARKER,
                                   command="fuse")
    with atomic.atomic_dir(save_path, replace=replace) as tmp:
        write_model(engine, model, tmp, {"base_model": opts.model, "adapter": str(adapter_dir)})
    log(f"Fused model saved to {save_path}")
    return save_path


def write_model(engine, model, folder, record):
    """The engine's model, adapters merged, as a Hugging Face folder in `folder` (new), with `record` in its
    marker file; refuses non-finite weights."""
    engine.fuse(model, folder)
    _portable_config(folder)
    models.check_finite_weights(folder, fix="nothing was written; check the base model and the adapter")
    atomic.write_json(Path(folder) / MARKER, record)
