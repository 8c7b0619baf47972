"""The demo: the tutorial's whole workflow on the embedded model and builtin:sql data.

prepare -> base test loss and answer -> train (LoRA on every block, prompt masked, warm-up and cosine
learning rate, clipped gradients: the recipe of recipes/text-to-sql.yaml; --num-layers 4 is the tutorial's) -> test loss
and answer again -> fuse -> answer from the fused folder -> export the fused model as an f16
GGUF file (with an Ollama Modelfile) -> eval of base, tuned and the GGUF file on every test
row (sql-exec, sql-canonical, loss) and the HTML report -> summary. Every step is the same
stage function the CLI command runs.
"""

import contextlib
import io
import os
import shutil
import time
from pathlib import Path

from tunelab import atomic, engines, evaluate, fuse, generate, runs, train
from tunelab.config import EvalOptions, ExportOptions, FuseOptions, GenerateOptions, LoraOptions, PrepareOptions
from tunelab.export import export
from tunelab.data.prepare import prepare
from tunelab.errors import UserError

MARKER = ".tunelab-demo"

# The tutorial's example: its schema and question.
EXAMPLE_SCHEMA = "CREATE TABLE table_13505192_3 (series_number INTEGER, season_number VARCHAR)"
EXAMPLE_QUESTION = "What is the series number for season episode 24?"


def _check_options(opts):
    problems = [f"--{n.replace('_', '-')}: must be at least 1, got {getattr(opts, n)}"
                for n in ("iters", "max_tokens") if getattr(opts, n) < 1]
    if opts.num_layers == 0 or opts.num_layers < -1:
        problems.append(f"--num-layers: must be -1 (all) or at least 1, got {opts.num_layers}")
    if opts.learning_rate <= 0:
        problems.append(f"--learning-rate: must be positive, got {opts.learning_rate}")
    UserError.raise_if(problems)


@contextlib.contextmanager
def _claimed(out):
    """The demo's folder: new, or an earlier demo's, which is set aside and comes back if this run fails."""
    previous = None
    if out.exists():
        if not (out / MARKER).is_file():
            raise UserError(f"{out}: exists and was not made by `tunelab demo`; choose another --out")
        atomic.remove_stale(out.parent, out.name)
        previous = atomic.set_aside(out)
    try:
        out.mkdir(parents=True)
        (out / MARKER).write_text("made by tunelab demo; the next demo run replaces this folder\n")
        yield out
    except BaseException:
        if previous is not None:
            shutil.rmtree(out, ignore_errors=True)
            os.replace(previous, out)
        raise
    if previous is not None:
        shutil.rmtree(previous, ignore_errors=True)


def _answer(model_ref, adapter_path, system_prompt, max_tokens, log, engine_name="auto"):
    engine, model, _ = engines.load(model_ref, adapter_path, log=lambda *_: None, engine=engine_name)
    ids = generate.prompt_ids(model.tokenizer, EXAMPLE_QUESTION, system_prompt)
    text = generate.stream_text(engine, model, ids, GenerateOptions(max_tokens=max_tokens), out=io.StringIO()).strip()
    log(f"  > {text}")
    return text


def demo(opts, log=print):
    started = time.perf_counter()
    _check_options(opts)
    with _claimed(Path(opts.out)) as out:
        return _run(opts, out, started, log)


def _run(opts, out, started, log):
    data, adapter_dir, fused_dir = out / "data", out / "adapters", out / "fused_model"
    system_prompt = PrepareOptions().system.format(context=EXAMPLE_SCHEMA)

    log("\n[1/8] Preparing data (builtin:sql, 100/25/25 rows)")
    prepare(PrepareOptions(source="builtin:sql", out=str(data), seed=opts.seed), log=log)

    # float32 throughout, so that lora's test losses are the very numbers the evaluation reports
    common = dict(model=opts.model, data=str(data), batch_size=1, mask_prompt=True, seed=opts.seed, engine=opts.engine,
                  dtype="float32")
    log("\n[2/8] Base model: test loss and the tutorial's question")
    before = train.lora(LoraOptions(test=True, adapter_path="", **common), log=log)
    base_answer = _answer(opts.model, None, system_prompt, opts.max_tokens, log, opts.engine)

    blocks = "every block" if opts.num_layers == -1 else f"top {opts.num_layers} blocks"
    log(f"\n[3/8] Training a LoRA adapter ({opts.iters} steps, {blocks}, prompt masked, warm-up and cosine "
        "learning rate, gradients clipped to norm 1)")
    after = train.lora(LoraOptions(train=True, test=True, adapter_path=str(adapter_dir), iters=opts.iters,
                                   num_layers=opts.num_layers, learning_rate=opts.learning_rate,
                                   lr_schedule="cosine", warmup=max(opts.iters // 10, 1),
                                   min_lr=opts.learning_rate / 10, max_grad_norm=1.0,
                                   steps_per_eval=max(opts.iters // 2, 1), save_every=opts.iters,
                                   steps_per_report=max(opts.iters // 20, 1), **common), log=log)

    log("\n[4/8] Tuned model (base + adapter): the same question")
    tuned_answer = _answer(opts.model, str(adapter_dir), system_prompt, opts.max_tokens, log, opts.engine)

    log("\n[5/8] Fusing the adapter into the model")
    fuse.fuse(FuseOptions(model=opts.model, adapter_path=str(adapter_dir), save_path=str(fused_dir),
                          engine=opts.engine), log=log)

    log("\n[6/8] Fused model: the same question")
    fused_answer = _answer(str(fused_dir), None, system_prompt, opts.max_tokens, log, opts.engine)

    log("\n[7/8] Exporting the fused model to GGUF (f16) for llama.cpp, LM Studio and Ollama")
    exported = export(ExportOptions(model=str(fused_dir), outtype="f16", out=str(out / "model-f16.gguf"),
                                    name="tunelab-demo-sql", ollama=True), log=log)

    log("\n[8/8] Evaluating the base model, base + adapter and the GGUF file on every test row")
    results = evaluate.evaluate(EvalOptions(model=opts.model, adapter_path=str(adapter_dir),
                                            compare=[f"gguf={exported['gguf']}"], data=str(data),
                                            run_dir=str(out), max_tokens=opts.max_tokens, seed=opts.seed,
                                            engine=opts.engine), log=log)

    width = 16
    log("\n" + "=" * 72)
    log(f"tunelab demo finished in {time.perf_counter() - started:.0f} s\n")
    log(f"{'':{width}}{'test loss':>10}{'test ppl':>10}")
    log(f"{'base model':{width}}{before['test_loss']:>10.3f}{before['test_ppl']:>10.3f}")
    log(f"{'fine-tuned':{width}}{after['test_loss']:>10.3f}{after['test_ppl']:>10.3f}\n")
    log(f"Question: {EXAMPLE_QUESTION}\nSchema:   {EXAMPLE_SCHEMA}")
    log(f"{'base model':{width}}{base_answer}")
    log(f"{'fine-tuned':{width}}{tuned_answer}")
    log(f"{'fused folder':{width}}{fused_answer}\n")
    log(evaluate.summary_table(results) + "\n")
    log(f"Data:         {data}/\nAdapter:      {adapter_dir}/ (PEFT layout + mlx-lm copy, metrics.jsonl)")
    log(f"Fused model:  {fused_dir}/ (Hugging Face folder, safetensors)")
    log(f"GGUF file:    {exported['gguf']} (Ollama: ollama create tunelab-demo-sql -f {exported['modelfile']})")
    log(f"Evaluation:   {out / runs.EVAL_RESULTS}, {out / runs.EVAL_SAMPLES}")
    log(f"Report:       {out / runs.REPORT}  (open it in a browser)")
    log(f"Try it:       tunelab generate --model {fused_dir} --prompt \"...\"")
    return {"before": before, "after": after, "answers": {"base": base_answer, "tuned": tuned_answer,
                                                           "fused": fused_answer}, "eval": results, "export": exported}
