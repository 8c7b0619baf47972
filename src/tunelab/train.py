"""The lora stage and THE training loop.

`lora(opts)` does what `mlx_lm.lora` does: load the model and data, train an adapter
(--train) and/or report test loss and perplexity (--test). `train_loop` is the one loop for
every engine: engines supply only the step, the loop owns the cadence (reports, validation,
saving, the progress line).
"""

import dataclasses
import time
from pathlib import Path

from tqdm import tqdm

from tunelab import adapters, engines, evaluate, models, runs
from tunelab.data.batching import common_start, eval_batches, training_batches
from tunelab.data.formats import quarantine, read_rows, scan_rows
from tunelab.data.templates import encode_rows, set_chat_template
from tunelab.errors import UserError


def check_options(opts):
    """Every contradiction in the options, reported at once."""
    problems = []
    if not (opts.train or opts.test):
        problems.append("nothing to do: pass --train to train an adapter and/or --test to measure test loss")
    positive = ("batch_size", "grad_accumulation_steps", "iters", "steps_per_report", "steps_per_eval", "save_every",
                "max_seq_length", "lora_rank")
    problems += [f"--{n.replace('_', '-')}: must be at least 1, got {getattr(opts, n)}"
                 for n in positive if getattr(opts, n) < 1]
    if opts.num_layers == 0 or opts.num_layers < -1:
        problems.append(f"--num-layers: must be -1 (all) or at least 1, got {opts.num_layers}")
    if opts.learning_rate <= 0:
        problems.append(f"--learning-rate: must be positive, got {opts.learning_rate}")
    if not 0 <= opts.lora_dropout < 1:
        problems.append(f"--lora-dropout: must be in [0, 1), got {opts.lora_dropout}")
    for n in ("val_batches", "test_batches"):
        if getattr(opts, n) == 0 or getattr(opts, n) < -1:
            problems.append(f"--{n.replace('_', '-')}: must be -1 (all) or at least 1, got {getattr(opts, n)}")
    data = Path(opts.data)
    needed = (["train", "valid"] if opts.train else []) + (["test"] if opts.test else [])
    if not data.is_dir():
        problems.append(f"--data {data}: folder not found (it should hold {', '.join(n + '.jsonl' for n in needed)}; "
                        "make one with `tunelab prepare`)")
    else:
        problems += [f"--data {data}: {n}.jsonl is missing" for n in needed if not (data / f"{n}.jsonl").is_file()]
    if opts.test and not opts.train and opts.adapter_path:
        if not (Path(opts.adapter_path) / adapters.CONFIG).is_file():
            problems.append(f"--adapter-path {opts.adapter_path}: no adapter there to test; train one with "
                            "--train, or pass --adapter-path '' to test the base model")
    UserError.raise_if(problems)


def load_split(model, data_dir, split, opts, log):
    path = Path(data_dir) / f"{split}.jsonl"
    if opts.skip_invalid:
        scanned, fmt, problems = scan_rows(path)
        if problems:
            dest = Path(opts.adapter_path or ".") / f"rejected-{split}.jsonl"
            dest.parent.mkdir(parents=True, exist_ok=True)
            skipped = quarantine(path, problems, dest)
            log(f"{path.name}: skipped {skipped} invalid rows; they and their problems are in {dest}")
        rows = [row for _, row in scanned]
        if not rows:
            raise UserError(f"{path}: no valid rows")
    else:
        rows, fmt = read_rows(path)
    examples, report = encode_rows(model.tokenizer, rows, fmt, opts.mask_prompt, opts.max_seq_length, str(path),
                                   long_rows=opts.long_rows, train_on=opts.train_on)
    if report.truncated or report.dropped:
        what = f"truncated {report.truncated}" if report.truncated else f"dropped {report.dropped}"
        log(f"{path.name}: {what} of {len(rows)} rows longer than --max-seq-length {opts.max_seq_length}")
    for note in sorted(report.notes):
        log(f"{path.name}: note: {note}")
    if not examples:
        raise UserError(f"{path}: no rows left (all longer than --max-seq-length {opts.max_seq_length})")
    return examples


def _progress_text(step, loss, val_loss, tokens_per_s, peak):
    parts = [f"loss {loss:.3f}" if loss is not None else "loss -"]
    if val_loss is not None:
        parts.append(f"val {val_loss:.3f}")
    parts += [f"{tokens_per_s:,.0f} tok/s", f"peak {peak / 1e9:.2f} GB"]
    return ", ".join(parts)


FILL_TOKENS = 4096   # positions a batch (rows times the longest row) when the frozen-prefix cache is filled
                     # ahead of training: rows that begin alike compute that beginning once a batch


def train_loop(engine, model, train_set, valid_set, opts, run_dir, log=print):
    """Train for opts.iters steps; report, validate and save on the configured cadence."""
    optimizer = engine.make_optimizer(model, opts.learning_rate)
    metrics = runs.MetricsLog(run_dir)
    batches = training_batches(train_set, opts.batch_size, opts.seed)

    def validate(step):
        loss, _ = evaluate.loss_and_ppl(engine, model, valid_set, opts.batch_size, opts.val_batches)
        metrics.write(step=step, val_loss=loss)
        tqdm.write(f"Iter {step}: Val loss {loss:.3f}")
        return loss

    def save(step):
        adapters.save(run_dir, model.spec, engine.adapter_tensors(model),
                      extra_config={"tunelab": {"step": step}})

    val_loss = validate(0)
    window_loss, window_steps, window_tokens, window_start = 0.0, 0, 0, time.perf_counter()
    rows_seen = opts.iters * opts.batch_size * opts.grad_accumulation_steps
    if model.prefix is not None and rows_seen >= len(train_set):
        # Every row comes back: run the frozen blocks over all of them first, FILL_TOKENS positions a
        # batch, with a progress bar of its own (this time counts in the first report's speed).
        longest = max(len(ex.tokens) for ex in train_set)
        groups = list(eval_batches(train_set, max(1, FILL_TOKENS // longest)))
        engine.fill_prefix(model, tqdm(groups, desc="Frozen blocks, once per row", unit="batch", leave=False,
                                       dynamic_ncols=True, disable=None))
    last_loss, tokens_per_s = None, 0.0
    bar = tqdm(total=opts.iters, desc="Training", unit="it", dynamic_ncols=True, disable=None,
               bar_format="{desc} {n_fmt}/{total_fmt} |{bar}| {elapsed}<{remaining} {postfix}")
    try:
        for step in range(1, opts.iters + 1):
            micro = [next(batches) for _ in range(opts.grad_accumulation_steps)]
            result = engine.train_step(model, optimizer, micro if len(micro) > 1 else micro[0])
            window_loss += result.loss
            window_steps += 1
            window_tokens += sum(b.real_tokens for b in micro)
            if step % opts.steps_per_report == 0 or step == opts.iters:
                seconds = time.perf_counter() - window_start
                last_loss, tokens_per_s = window_loss / window_steps, window_tokens / seconds
                peak = engine.peak_memory()
                metrics.write(step=step, train_loss=last_loss, learning_rate=opts.learning_rate,
                              iterations_per_s=window_steps / seconds, tokens_per_s=tokens_per_s,
                              peak_memory_gb=peak / 1e9)
                tqdm.write(f"Iter {step}: Train loss {last_loss:.3f}, It/sec {window_steps / seconds:.3f}, "
                           f"Tokens/sec {tokens_per_s:.1f}, Peak mem {peak / 1e9:.3f} GB")
                window_loss, window_steps, window_tokens, window_start = 0.0, 0, 0, time.perf_counter()
            paused = time.perf_counter()  # validation and saving do not count against tokens/s
            if step % opts.steps_per_eval == 0 or step == opts.iters:
                val_loss = validate(step)
            if step % opts.save_every == 0 or step == opts.iters:
                save(step)
            window_start += time.perf_counter() - paused
            bar.set_postfix_str(_progress_text(step, last_loss, val_loss, tokens_per_s, engine.peak_memory()),
                                refresh=False)
            bar.update(1)
    finally:
        bar.close()
        metrics.close()
    log(f"Saved adapter to {run_dir}")
    return last_loss, val_loss


def lora(opts, log=print):
    """The `tunelab lora` stage. Returns {'test_loss', 'test_ppl'} when --test is given."""
    check_options(opts)
    tested_adapter = opts.adapter_path if opts.test and not opts.train else None  # '' = the base model
    quantize = (opts.quantize, opts.q_group_size) if opts.quantize else None
    engine, model, model_dir = engines.load(opts.model, tested_adapter, opts.device, opts.dtype, log=log,
                                            engine=opts.engine, quantize=quantize, training=opts.train)
    if opts.chat_template:
        set_chat_template(model.tokenizer, opts.chat_template)
    result = {}
    if opts.train:
        train_set = load_split(model, opts.data, "train", opts, log)
        valid_set = load_split(model, opts.data, "valid", opts, log)
        total_layers = models.read_config(model_dir)["num_hidden_layers"]
        spec = adapters.spec_for(opts.num_layers, total_layers, opts.lora_rank, opts.lora_scale,
                                 opts.lora_dropout, opts.lora_keys, base_model=opts.model,
                                 dora=opts.fine_tune_type == "dora")
        spec.quantization = getattr(model, "quantized", None)
        engine.attach_lora(model, spec, seed=opts.seed)
        run_dir = Path(opts.adapter_path)
        run_dir.mkdir(parents=True, exist_ok=True)
        data_files = [Path(opts.data) / f"{s}.jsonl" for s in ("train", "valid")]
        runs.write_manifest(run_dir, dataclasses.asdict(opts), {"engine": engine.name, "device": str(model.device),
                            "dtype": str(model.dtype).split(".")[-1]}, model_dir, data_files)
        supervised = sum(int(ex.supervised.sum()) for ex in train_set)
        tokens = sum(len(ex.tokens) for ex in train_set)
        kind = "DoRA" if spec.dora else "LoRA"
        log(f"Training {len(spec.modules())} {kind} modules (rank {spec.rank}, scale {spec.scale:g}) on the top "
            f"{spec.num_layers} blocks; {len(train_set)} rows, {tokens} tokens, "
            f"{100 * supervised / tokens:.0f}% supervised")
        for line in engine.savings(model, len(train_set) + len(valid_set),
                                   tokens + sum(len(ex.tokens) for ex in valid_set),
                                   common_start([ex.tokens for ex in train_set])):
            log(f"Saving: {line}")
        train_loop(engine, model, train_set, valid_set, opts, run_dir, log=log)
    if opts.test:
        test_set = load_split(model, opts.data, "test", opts, log)
        loss, ppl = evaluate.loss_and_ppl(engine, model, test_set, opts.batch_size, opts.test_batches)
        log(evaluate.format_test(loss, ppl))
        result = {"test_loss": loss, "test_ppl": ppl}
    return result
