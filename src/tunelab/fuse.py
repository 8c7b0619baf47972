"""The fuse stage: base model + adapter -> one merged Hugging Face folder.

The folder holds safetensors weights, config.json (rope_theta written at the top level too,
where mlx-lm reads it), generation_config.json and the tokenizer with its chat template. It
is written under a temporary name and renamed into place only when complete.
"""

import json
from pathlib import Path

from tunelab import atomic, engines


def _portable_config(folder):
    """Mirror rope_parameters.rope_theta at the top level (mlx-lm and older transformers read it there)."""
    path = Path(folder) / "config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    theta = (config.get("rope_parameters") or {}).get("rope_theta")
    if theta is not None and "rope_theta" not in config:
        config["rope_theta"] = theta
        atomic.write_json(path, config)


def fuse(opts, log=print):
    adapter_dir = Path(opts.adapter_path)
    engine, model, _ = engines.load(opts.model, adapter_dir, opts.device, log=log, engine=opts.engine)
    save_path = Path(opts.save_path)
    with atomic.atomic_dir(save_path) as tmp:
        engine.fuse(model, tmp)
        _portable_config(tmp)
        atomic.write_json(tmp / "tunelab_fuse.json", {"base_model": opts.model, "adapter": str(adapter_dir)})
    log(f"Fused model saved to {save_path}")
    return save_path
