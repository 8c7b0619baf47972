"""The export stage: a model (fused, or base + adapter fused on the way) or an adapter alone as GGUF.

Every file is written under a temporary name, read back and checked (`gguf_file.verify`), and
only then renamed into place, so an interrupted or failed export leaves nothing that looks
complete. Before the first file is written, the adapter is checked against the base model's
weight shapes, the weights for NaN and inf, and the chat template by rendering it. `--lmstudio`
copies the result into LM Studio's models folder; `--ollama` writes a Modelfile beside it.
"""

import json
from pathlib import Path

from tunelab import adapters, atomic, models, runs
from tunelab.data.formats import read_rows
from tunelab.errors import UserError
from tunelab.export import chat_template, gguf_file, places


def default_out(opts):
    if opts.to == "gguf-lora":
        return Path(f"{Path(opts.adapter_path).resolve().name}-lora-{opts.outtype}.gguf")
    stem = Path(opts.adapter_path).resolve().name if opts.adapter_path else Path(opts.model).name.removesuffix(".gguf")
    return Path(f"{stem}-{opts.outtype}.gguf")


def check_options(opts, out):
    problems = []
    if opts.to == "gguf-lora" and not opts.adapter_path:
        problems.append("--to gguf-lora exports an adapter: pass --adapter-path")
    if opts.adapter_path and not (Path(opts.adapter_path) / adapters.CONFIG).is_file():
        problems.append(f"--adapter-path {opts.adapter_path}: no adapter there ({adapters.CONFIG} is missing)")
    elif opts.to == "gguf-lora" and adapters.load(opts.adapter_path)[0].dora:
        problems.append(f"--to gguf-lora: {opts.adapter_path} is a DoRA adapter, whose magnitudes rescale whole weight "
                        "rows, which a llama.cpp LoRA file cannot hold; export the merged model with --to gguf")
    elif opts.to == "gguf-lora" and adapters.load(opts.adapter_path)[0].full:
        problems.append(f"--to gguf-lora: {opts.adapter_path} is a full fine-tune, whole weights rather than a "
                        "low-rank adapter; export the model with --to gguf")
    if out.suffix != ".gguf":
        problems.append(f"--out {out}: the file name should end in .gguf")
    if out.exists() and not opts.overwrite:
        problems.append(f"--out {out}: exists; choose another name or pass --overwrite")
    if out.is_dir():
        problems.append(f"--out {out}: is a folder; give a file name ending in .gguf")
    if out.exists() and Path(opts.model).expanduser().exists() and out.resolve() == Path(opts.model).resolve():
        problems.append(f"--out {out}: is the model this command reads; choose another name")
    if opts.to == "gguf-lora" and opts.outtype not in gguf_file.LORA_OUTTYPES:
        problems.append(f"--outtype {opts.outtype}: a GGUF LoRA file is written as "
                        f"{', '.join(gguf_file.LORA_OUTTYPES)}")
    UserError.raise_if(problems)


def training_system_prompt(adapter_path):
    """The system message every training row shared, per the adapter's run manifest; else None."""
    if not adapter_path:
        return None
    try:
        manifest = json.loads((Path(adapter_path) / runs.MANIFEST).read_text(encoding="utf-8"))
        rows, _ = read_rows(Path(manifest["options"]["data"]) / "train.jsonl")
    except (OSError, ValueError, KeyError, TypeError, UserError):
        return None
    systems = {r["messages"][0]["content"] if r.get("messages") and r["messages"][0].get("role") == "system" else None
               for r in rows}
    return systems.pop() if len(systems) == 1 else None


def _write_checked(out, write, log, replace=False):
    """Write through `write(tmp) -> summary` into a temporary file; rename it to `out` only if it checks out
    (and, unless `replace`, only if no `out` appeared meanwhile)."""
    with atomic.atomic_path(out, replace=replace) as tmp:
        summary = write(tmp)
    log(f"Wrote {out} ({out.stat().st_size / 1e6:,.1f} MB); verified: {summary}")


def export(opts, log=print):
    """The `tunelab export` stage; returns the paths written. Everything that can be checked is checked before
    the first file is written: names, the adapter against the base, finite weights, the chat template."""
    out = Path(opts.out) if opts.out else default_out(opts)
    check_options(opts, out)
    lmstudio = places.lmstudio_target(out, opts.lmstudio) if opts.lmstudio is not None else None
    if lmstudio is not None:
        places.refuse_existing(lmstudio, opts.overwrite)   # before any work, not after the export
    adapter = adapters.load(opts.adapter_path) if opts.adapter_path else None   # refuses NaN and inf too
    model_dir = models.resolve(opts.model, log=log)
    config = models.read_config(model_dir)
    arch = gguf_file.check_architecture(config, model_dir)
    if adapter is not None:
        gguf_file.check_adapter_fits(model_dir, config, adapter[1], opts.adapter_path, full=adapter[0].full)
    name = opts.name or out.stem
    modelfile = out.with_suffix(".Modelfile") if opts.ollama else None
    modelfile_text = _modelfile_text(opts, model_dir, out, modelfile) if opts.ollama else None
    written = {"gguf": out}

    if opts.to == "gguf":
        log(f"Reading {model_dir}" + (f" and merging the adapter {opts.adapter_path}" if adapter else ""))
        source = gguf_file.read_source(model_dir, adapter)

        def write(tmp):
            tensors = gguf_file.write_model(tmp, source, opts.outtype, name)
            return gguf_file.verify(tmp, tensors, gguf_file.expected_model_metadata(source, opts.outtype))
    else:
        spec, tensors = adapter

        def write(tmp):
            lora = gguf_file.write_lora(tmp, config, arch, spec, tensors, opts.outtype, name)
            return gguf_file.verify(tmp, lora, {"general.type": "adapter", "adapter.type": "lora",
                                                "adapter.lora.alpha": float(spec.scale * spec.rank),
                                                "general.architecture": arch})

    log(f"Writing {opts.to} ({opts.outtype}) to {out} ...")
    _write_checked(out, write, log, replace=opts.overwrite)

    if modelfile is not None:
        atomic.write_text(modelfile, modelfile_text)
        written["modelfile"] = modelfile
        log(f"Wrote {modelfile}\nCreate the Ollama model with:\n  ollama create {_ollama_name(name)} -f {modelfile}")

    if lmstudio is not None:
        places.place_in_lmstudio(out, lmstudio, opts.overwrite)
        written["lmstudio"] = lmstudio
        log(f"Placed a copy for LM Studio: {lmstudio}")
    return written


def _modelfile_text(opts, model_dir, out, modelfile):
    """The text of `modelfile`, the Ollama Modelfile for `out`, built (and the chat template checked) before any
    file is written."""
    from transformers import AutoTokenizer

    from tunelab.data.templates import end_of_turn_ids

    if modelfile.exists() and not opts.overwrite:
        raise UserError(f"{modelfile}: exists; pass --overwrite to replace it")
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False)
    chat_template.check(tokenizer, model_dir)
    stops = sorted(tokenizer.convert_ids_to_tokens(sorted(end_of_turn_ids(tokenizer))))
    system = opts.system_prompt if opts.system_prompt is not None else training_system_prompt(opts.adapter_path)
    if opts.to == "gguf":
        return places.modelfile(out.name, tokenizer, stops, system)
    base = models.gguf_file_of(opts.model)
    if base is None:
        raise UserError(f"--ollama with --to gguf-lora needs the base model as a GGUF file; export "
                        f"{opts.model} with --to gguf first and pass that file as --model")
    return places.modelfile(base.resolve(), tokenizer, stops, system, adapter_name=out.name)


def _ollama_name(name):
    return "".join(c if c.isalnum() or c in "._-" else "-" for c in name.lower())
