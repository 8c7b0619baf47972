"""The lora stage and THE training loop.

`lora(opts)` does what `mlx_lm.lora` does: load the model and data, train an adapter
(--train) and/or report test loss and perplexity (--test). `train_loop` is the one loop for
every engine: engines supply only the step, the loop owns the cadence (reports, validation,
saving, the progress line).
"""

import contextlib
import dataclasses
import math
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path

from tqdm import tqdm

from tunelab import (adapters, atomic, checkpoints, distributed, engines, evaluate, models, optimizers, runs,
                     schedules, tracking)
from tunelab.data import hub
from tunelab.data.batching import common_start, eval_batches, training_batches
from tunelab.data.formats import quarantine, read_rows, scan_rows
from tunelab.data.templates import encode_rows, set_chat_template
from tunelab.errors import Stopped, UserError


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
    problems += [f"--{n.replace('_', '-')}: must be at least 1, got {getattr(opts, n)}"
                 for n in ("keep_checkpoints", "max_bad_steps") if getattr(opts, n) < 1]
    if opts.shard and opts.fine_tune_type == "full":
        problems.append("--shard: full fine-tuning of sharded blocks is not built yet (lora and dora are)")
    if opts.shard and opts.resume:
        problems.append("--shard: resuming a sharded run is not built yet; --resume-adapter-file starts from its "
                        "adapter")
    if opts.shard and opts.best_metric != "val_loss":
        problems.append("--shard: --best-metric other than val_loss is not built yet")
    if opts.nproc is not None and opts.nproc < 1:
        problems.append(f"--nproc: must be at least 1, got {opts.nproc}")
    if opts.nproc and opts.nproc > 1 and engines.choose(opts.engine)[0] != "torch":
        problems.append("--nproc: several processes train on the torch engine: pass --engine torch")
    if opts.resume and opts.resume_adapter_file:
        problems.append("--resume continues a run exactly from its checkpoint; --resume-adapter-file starts a new "
                        "one from an adapter's weights: pass one of them")
    if (opts.resume or opts.resume_adapter_file) and not opts.train:
        problems.append("--resume and --resume-adapter-file need --train")
    if opts.train and not opts.adapter_path:
        problems.append("--adapter-path: a folder is needed to train into")
    if opts.best_metric != "val_loss" and not (opts.keep_best or opts.early_stop):
        problems.append(f"--best-metric {opts.best_metric}: says what --keep-best and --early-stop judge by; "
                        "pass one of them")
    if opts.early_stop is not None and opts.early_stop < 1:
        problems.append(f"--early-stop: must be at least 1 validation, got {opts.early_stop}")
    if opts.epochs is not None and opts.epochs < 1:
        problems.append(f"--epochs: must be at least 1, got {opts.epochs}")
    for check in (_schedule, _optimizer):
        try:
            check(opts)
        except UserError as e:
            problems += e.problems
    try:
        tracking.parse(opts.report_to)
    except UserError as e:
        problems += e.problems
    if opts.hf_dataset:
        problems += hub.check(opts.hf_dataset)
    if opts.trust_remote_code:
        problems.append("--trust-remote-code: tunelab never runs a model's own code")
    if opts.fine_tune_type == "full" and opts.quantize:
        problems.append("--fine-tune-type full trains the weights themselves, which --quantize would make "
                        "4- or 8-bit: pass one of them")
    if opts.max_grad_norm is not None and opts.max_grad_norm <= 0:
        problems.append(f"--max-grad-norm: must be positive, got {opts.max_grad_norm}")
    if opts.learning_rate <= 0:
        problems.append(f"--learning-rate: must be positive, got {opts.learning_rate}")
    if not 0 <= opts.lora_dropout < 1:
        problems.append(f"--lora-dropout: must be in [0, 1), got {opts.lora_dropout}")
    for n in ("val_batches", "test_batches"):
        if getattr(opts, n) == 0 or getattr(opts, n) < -1:
            problems.append(f"--{n.replace('_', '-')}: must be -1 (all) or at least 1, got {getattr(opts, n)}")
    data = Path(opts.data)
    needed = (["train", "valid"] if opts.train else []) + (["test"] if opts.test else [])
    if _from_hub(opts):
        pass   # written into a data folder once the run starts (data/hub.py)
    elif not data.is_dir():
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
        if problems and distributed.of(model).main:
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


BEST = "best"        # <adapter-path>/best: the adapter of the lowest validation loss (--keep-best)
MODEL = "model"      # <adapter-path>/model: a full fine-tune's whole model folder, written when training ends
HUB_DATA = "data"    # <adapter-path>/data: the rows of hf_dataset or a --data dataset id, as a data folder
FILL_TOKENS = 4096   # positions a batch (rows times the longest row) when the frozen-prefix cache is filled
                     # ahead of training: rows that begin alike compute that beginning once a batch


class _StopRequest:
    """SIGINT / SIGTERM during training: the first asks the loop to finish its step and save a checkpoint;
    a second stops at once (atomic writes leave the last checkpoint whole)."""

    def __init__(self):
        self.signum = None
        self.previous = {}

    def __call__(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt if signum == signal.SIGINT else SystemExit(128 + signum)
        self.signum = signum
        tqdm.write(f"\n{signal.Signals(signum).name}: finishing this step, then saving a checkpoint "
                   "(again to stop at once)")

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self.previous[signum] = signal.signal(signum, self)
        return self

    def __exit__(self, *exc):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


class _NoMetrics:
    """metrics.jsonl on ranks other than 0 (which alone writes)."""

    def write(self, **record):
        pass

    def size(self):
        return 0

    def close(self):
        pass


def _stopping(engine, model, stop):
    """Whether a signal asked the run to stop; in several processes, whether it reached any of them, so that
    every rank stops after the same step."""
    asked = stop.signum is not None
    if distributed.of(model).size > 1:
        asked = engine.reduce_sum(model, [float(asked)])[0] > 0
    return asked


def _collapse(loss, start, vocab_size, loop):
    """Why `loss` shows a collapsed model (None when it does not): at ln(vocabulary size), where every
    token is equally likely, twice in a row (train reports and validations), or a validation loss far
    above where the run started (`start`)."""
    uniform = math.log(vocab_size) if vocab_size else None
    loop["uniform"] = loop["uniform"] + 1 if uniform and abs(loss - uniform) < 1e-3 * uniform else 0
    if loop["uniform"] >= 2:
        return f"is ln(vocabulary size) = {uniform:.3f}: every token is equally likely, the model has collapsed"
    if start is not None and loss > start + max(1.0, start):
        return f"is far above the {start:.3f} the run started from"
    return None


def _schedule(opts):
    """The run's learning-rate schedule, (name, arguments, warmup, warmup_init) as in schedules.py."""
    return schedules.from_options(opts.lr_schedule, opts.learning_rate, opts.iters, opts.warmup, opts.warmup_init,
                                  opts.min_lr)


def _optimizer(opts):
    """(name, settings) from --optimizer, --weight-decay and mlx-lm's optimizer_config (optimizers.py); every
    setting tunelab cannot honour is an error naming it."""
    config = (opts.optimizer_config or {}).get(opts.optimizer)
    if config is not None and not isinstance(config, dict):
        raise UserError(f"optimizer_config.{opts.optimizer}: expected a mapping of settings, got {config!r}")
    return opts.optimizer, optimizers.settings(opts.optimizer, config, opts.weight_decay)


def _task_score(engine, model, rows, opts):
    """The share of `rows` whose greedy answer the --best-metric counts correct."""
    from tunelab.config import EvalOptions

    settings = EvalOptions(max_tokens=opts.best_max_tokens, seed=opts.seed)
    answers, _ = evaluate.generate_answers(engine, model, rows, settings, "valid")
    outcome = evaluate.Outcome(answers)
    evaluate.score(outcome, rows, [opts.best_metric], opts.seed)
    return sum(v[opts.best_metric].correct for v in outcome.verdicts) / len(rows)


def _resume_command(opts):
    return f"tunelab lora --train --resume --adapter-path {opts.adapter_path} (with this run's other options)"


def train_loop(engine, model, train_set, valid_set, opts, run_dir, log=print, resume=None, vocab_size=None,
               record=None):
    """Train up to opts.iters steps; report, validate and checkpoint on the configured cadence.

    `resume`: (state arrays, state) of the checkpoint to continue from. Every step's outcome is the
    same as in a run that was never interrupted: the data order, optimizer and random states, and the
    unreported part of the loss window all come back."""
    schedule = _schedule(opts)
    learning_rate = schedules.build(*schedule)
    name, settings = _optimizer(opts)
    optimizer = engine.make_optimizer(model, learning_rate(1), name, **settings)
    task_rows = None if opts.best_metric == "val_loss" else evaluate.load_rows(Path(opts.data) / "valid.jsonl")[2]
    loop = {"step": 0, "window": [0.0, 0, 0, 0.0], "val_loss": None, "start_val": None, "last_loss": None,
            "bad": 0, "uniform": 0, "best": None, "stale": 0, "done": False}
    if resume is not None:
        arrays, saved = resume
        engine.load_training_state(model, optimizer, arrays)
        loop.update(saved["loop"])
        if distributed.of(model).main:
            checkpoints.truncate_metrics(run_dir, saved["metrics_bytes"])
        if loop["step"] >= opts.iters or loop["done"]:
            log(f"The run in {run_dir} had finished at step {loop['step']}: nothing left to train")
    micro_batches = opts.grad_accumulation_steps
    world = distributed.of(model)
    say = tqdm.write if world.main else (lambda *_: None)
    trackers = tracking.parse(opts.report_to) if world.main else []
    metrics = runs.MetricsLog(run_dir, also=tracking.Trackers(
        trackers, run_dir, opts.project_name, dataclasses.asdict(opts),
        resumed_at=loop["step"] if resume is not None else None, log=log) if trackers else None) \
        if world.main else _NoMetrics()
    batches = training_batches(train_set, opts.batch_size, opts.seed, start=loop["step"] * micro_batches)
    saved_step = loop["step"]

    def validate(step):
        loss, _ = evaluate.loss_and_ppl(engine, model, valid_set, opts.batch_size, opts.val_batches)
        metrics.write(step=step, val_loss=loss)
        say(f"Iter {step}: Val loss {loss:.3f}")
        return loss

    def checkpoint(step):
        nonlocal saved_step
        saved_step = step
        if not world.main and not opts.shard:
            return
        tensors, state = engine.adapter_tensors(model), engine.training_state(model, optimizer)   # sharded: on all
        if not world.main:
            return
        checkpoints.write(run_dir, step, model.spec, tensors, state,
                          {"step": step, "metrics_bytes": metrics.size(),
                           "loop": dict(loop, step=step), "options": dataclasses.asdict(opts), **(record or {})},
                          opts.keep_checkpoints)

    def judge(step):
        """After a validation: keep the best adapter, count validations without improvement, stop early."""
        value = [loop["val_loss"]]
        if task_rows is not None:   # a task metric: higher is better, so judged negated; ties go to the lower loss
            score = _task_score(engine, model, task_rows, opts)
            metrics.write(step=step, **{f"val_{opts.best_metric}": score})
            say(f"Iter {step}: Val {opts.best_metric} {score:.3f}")
            value = [-score, loop["val_loss"]]
        if loop["best"] is not None and value >= loop["best"][1]:
            loop["stale"] += 1
            if opts.early_stop is not None and loop["stale"] >= opts.early_stop:
                loop["done"] = True
            return
        loop["best"], loop["stale"] = [step, value], 0
        if opts.keep_best and step > 0 and (world.main or opts.shard):
            record = {"step": step, "val_loss": loop["val_loss"]}
            if task_rows is not None:
                record[opts.best_metric] = -value[0]
            tensors = engine.adapter_tensors(model)     # sharded weights are gathered by every process
            if world.main:
                with atomic.atomic_dir(run_dir / BEST) as tmp:
                    adapters.save(tmp, model.spec, tensors, extra_config={"tunelab": record})

    def refuse(step, what):
        kept = f"{run_dir} keeps the checkpoint of step {saved_step}" if saved_step else "no adapter was saved"
        raise UserError(f"step {step}: the {what}; training stopped without saving this state ({kept}); "
                        "lower --learning-rate")

    def report(step, seconds):
        window_loss, window_steps, window_tokens, window_norms = loop["window"]
        loop["last_loss"], tokens_per_s = window_loss / window_steps, window_tokens / seconds
        peak = engine.peak_memory()
        metrics.write(step=step, train_loss=loop["last_loss"], learning_rate=learning_rate(step),
                      grad_norm=window_norms / window_steps, iterations_per_s=window_steps / seconds,
                      tokens_per_s=tokens_per_s, peak_memory_gb=peak / 1e9)
        say(f"Iter {step}: Train loss {loop['last_loss']:.3f}, Learning Rate {learning_rate(step):.3e}, "
                   f"It/sec {window_steps / seconds:.3f}, Tokens/sec {tokens_per_s:.1f}, Peak mem {peak / 1e9:.3f} GB")
        loop["window"] = [0.0, 0, 0, 0.0]
        why = _collapse(loop["last_loss"], None, vocab_size, loop)
        if why:
            refuse(step, f"training loss {loop['last_loss']:.3f} {why}")
        return tokens_per_s

    with _StopRequest() as stop, contextlib.closing(metrics):
        if resume is None:
            loop["val_loss"] = loop["start_val"] = validate(0)
            judge(0)
        rows_seen = opts.iters * opts.batch_size * micro_batches
        if model.prefix is not None and rows_seen >= len(train_set):
            # Every row comes back: run the frozen blocks over all of them first, FILL_TOKENS positions a
            # batch, with a progress bar of its own (this time counts in the first report's speed).
            longest = max(len(ex.tokens) for ex in train_set)
            mine = distributed.rows_of(train_set, opts.batch_size, world) if world.size > 1 else None
            groups = list(eval_batches(train_set, max(1, FILL_TOKENS // longest), rows=mine))
            engine.fill_prefix(model, tqdm(groups, desc="Frozen blocks, once per row", unit="batch", leave=False,
                                           dynamic_ncols=True, disable=None if world.main else True))
        window_start, tokens_per_s = time.perf_counter(), 0.0
        with tqdm(total=opts.iters, initial=loop["step"], desc="Training", unit="it", dynamic_ncols=True,
                  disable=None if world.main else True,
                  bar_format="{desc} {n_fmt}/{total_fmt} |{bar}| {elapsed}<{remaining} {postfix}") as bar:
            while loop["step"] < opts.iters and not loop["done"] and not _stopping(engine, model, stop):
                step = loop["step"] + 1
                micro = [next(batches) for _ in range(micro_batches)]
                mine = [distributed.shard(b, world) for b in micro]
                result = engine.train_step(model, optimizer, mine if len(mine) > 1 else mine[0],
                                           learning_rate(step), opts.max_grad_norm)
                engine.clear_cache(opts.clear_cache_threshold)
                loop["step"] = step
                if result.finite:
                    loop["bad"] = 0
                    losses, steps, tokens, norms = loop["window"]
                    loop["window"] = [losses + result.loss, steps + 1, tokens + sum(b.real_tokens for b in micro),
                                      norms + result.grad_norm]
                else:   # the engine left the weights and the optimizer as they were
                    loop["bad"] += 1
                    metrics.write(step=step, skipped="non-finite loss or gradient")
                    say(f"Iter {step}: loss {result.loss}: a NaN or infinite loss or gradient; step skipped")
                    if loop["bad"] >= opts.max_bad_steps:
                        refuse(step, f"loss or gradients were NaN or infinite {loop['bad']} steps in a row")
                if (step % opts.steps_per_report == 0 or step == opts.iters) and loop["window"][1]:
                    tokens_per_s = report(step, time.perf_counter() - window_start)
                    window_start = time.perf_counter()
                paused = time.perf_counter()  # validation and saving do not count against tokens/s
                if step % opts.steps_per_eval == 0 or step == opts.iters:
                    loop["val_loss"] = validate(step)
                    why = _collapse(loop["val_loss"], loop["start_val"], vocab_size, loop)
                    if why:
                        refuse(step, f"validation loss {loop['val_loss']:.3f} {why}")
                    judge(step)
                if step % opts.save_every == 0 or step == opts.iters or loop["done"]:
                    checkpoint(step)
                window_start += time.perf_counter() - paused
                bar.set_postfix_str(_progress_text(step, loop["last_loss"], loop["val_loss"], tokens_per_s,
                                                   engine.peak_memory()), refresh=False)
                bar.update(1)
        if loop["step"] < opts.iters and not loop["done"]:   # stopped by a signal
            stop.signum = stop.signum or signal.SIGTERM           # (on a rank that only heard of it)
            if loop["step"] > saved_step:
                checkpoint(loop["step"])
            where = (f"the checkpoint of step {saved_step} is in {run_dir}; resume with: {_resume_command(opts)}"
                     if saved_step else "no step was finished, so there is nothing to resume")
            raise Stopped(f"stopped by {signal.Signals(stop.signum).name} at step {loop['step']} of {opts.iters}: "
                          f"{where}", 128 + stop.signum)
    if loop["best"] is not None:
        judged = "validation loss" if task_rows is None else f"validation {opts.best_metric}"
        best = f"{judged} {abs(loop['best'][1][0]):.3f} at step {loop['best'][0]}"
        if loop["done"]:
            log(f"Early stop at step {loop['step']}: no better {judged} in {loop['stale']} validations (best "
                f"{best.removeprefix(judged + ' ')})")
    log(f"Saved adapter to {run_dir}")
    if opts.keep_best and loop["best"] is not None and loop["best"][0] > 0:
        log(f"Best {best}: its adapter is in {run_dir / BEST}")
    return loop["last_loss"], loop["val_loss"]


def open_run(opts, log=print):
    """Lock the run folder and decide how this run starts in it: fresh (a new or empty folder), or from
    its newest committed checkpoint (--resume). Anything else is refused before any work.
    Returns (lock, checkpoint folder or None)."""
    run_dir = Path(opts.adapter_path)
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"--adapter-path {run_dir}: is a file, not a folder")
    lock = checkpoints.RunLock(run_dir).acquire()
    try:
        cleaned = checkpoints.clean(run_dir)
        if cleaned:
            log(f"{run_dir}: removed {cleaned} temporary file(s) left by an interrupted save")
        if opts.resume:
            done = checkpoints.committed(run_dir)
            if not done:
                hint = (f"; to start from its adapter's weights instead: --resume-adapter-file "
                        f"{run_dir / adapters.MLX_WEIGHTS} with a new --adapter-path"
                        if (run_dir / adapters.CONFIG).is_file() else "")
                raise UserError(f"--resume: {run_dir} has no complete checkpoint to resume from{hint}")
            _check_resumable(done[-1], opts)
            checkpoints.repair(run_dir, log)
            return lock, done[-1]
        held = checkpoints.run_contents(run_dir)
        if held:
            shown = ", ".join(held[:4]) + (", ..." if len(held) > 4 else "")
            raise UserError(f"--adapter-path {run_dir}: already holds {shown}, and nothing there is replaced: pass "
                            "--resume to continue its run, or choose a new --adapter-path to start fresh")
    except BaseException:
        lock.release()
        raise
    return lock, None


def _train(engine, model, model_dir, opts, resume_from, log):
    """Set the adapters up (fresh, from --resume-adapter-file, or from a checkpoint) and run the loop."""
    train_set = load_split(model, opts.data, "train", opts, log)
    valid_set = load_split(model, opts.data, "valid", opts, log)
    if opts.epochs is not None:
        per_epoch = math.ceil(math.ceil(len(train_set) / opts.batch_size) / opts.grad_accumulation_steps)
        opts = dataclasses.replace(opts, iters=opts.epochs * per_epoch)
        log(f"--epochs {opts.epochs}: {opts.iters} steps of {per_epoch} an epoch")
    config = models.read_config(model_dir)
    if opts.num_layers > config["num_hidden_layers"]:
        raise UserError(f"--num-layers {opts.num_layers}: the model has {config['num_hidden_layers']} blocks; pass "
                        f"{config['num_hidden_layers']} or -1 to train them all")
    spec = adapters.spec_for(opts.num_layers, config["num_hidden_layers"], opts.lora_rank, opts.lora_scale,
                             opts.lora_dropout, opts.lora_keys, base_model=_loadable_base(opts.model, model_dir),
                             kind=opts.fine_tune_type)
    spec.quantization = getattr(model, "quantized", None)
    engine.attach_lora(model, spec, seed=opts.seed)
    if opts.grad_checkpoint:
        engine.grad_checkpoint(model)
    run_dir = Path(opts.adapter_path)
    data_files = _data_files(opts)
    resume = None
    if resume_from is not None:
        _, tensors, arrays, state = checkpoints.read(resume_from)
        engine.set_adapter(model, spec, tensors)
        resume = (arrays, state)
        log(f"Resuming from {resume_from} (step {state['step']} of {opts.iters})")
    elif opts.resume_adapter_file:
        engine.set_adapter(model, spec, _start_weights(opts.resume_adapter_file, spec))
        log(f"Starting from the adapter weights in {opts.resume_adapter_file} (fresh optimizer, step 0)")
    if opts.shard:   # after the adapter's weights are in: sharding splits the tensors they went into
        engine.shard(model)
        log(f"Sharding: every block's weights split over the {distributed.of(model).size} processes (FSDP2); "
            "each block gathered for its own forward and backward")
    if resume is None and distributed.of(model).main:
        runs.write_manifest(run_dir, dataclasses.asdict(opts), {"engine": engine.name, "device": str(model.device),
                            "dtype": str(model.dtype).split(".")[-1]}, model_dir, data_files)
    supervised = sum(int(ex.supervised.sum()) for ex in train_set)
    tokens = sum(len(ex.tokens) for ex in train_set)
    weights, trained, trained_bytes = engine.sizes(model)
    what = (f"every weight of the top {spec.num_layers} blocks (full fine-tuning)" if spec.full else
            f"{len(spec.modules())} {'DoRA' if spec.dora else 'LoRA'} modules (rank "
            f"{spec.rank}, scale {spec.scale:g}) on the top {spec.num_layers} blocks")
    log(f"Training {what}; {len(train_set)} rows, {tokens} tokens, {100 * supervised / tokens:.0f}% supervised")
    log(f"Memory: weights {weights / 1e6:,.0f} MB; {trained / 1e6:,.2f}M trained values ({trained_bytes / 1e6:,.0f} "
        f"MB), their gradients {trained_bytes / 1e6:,.0f} MB and optimizer state about "
        f"{_optimizer_bytes(opts, trained_bytes) / 1e6:,.0f} MB; activations come on top")
    clip = f", gradients clipped to norm {opts.max_grad_norm:g}" if opts.max_grad_norm is not None else ""
    log(f"Optimizer: {optimizers.describe(*_optimizer(opts))}; learning rate: "
        f"{schedules.describe(*_schedule(opts))}{clip}")
    if opts.grad_checkpoint:
        log("Gradient checkpointing: each trained block keeps only its input for the backward pass and runs again "
            "there")
    for line in engine.savings(model, len(train_set) + len(valid_set),
                               tokens + sum(len(ex.tokens) for ex in valid_set),
                               common_start([ex.tokens for ex in train_set])):
        log(f"Saving: {line}")
    train_loop(engine, model, train_set, valid_set, opts, run_dir, log=log, resume=resume,
               vocab_size=config.get("vocab_size"), record={"data": _hashes(data_files)})
    if spec.full and distributed.of(model).main:   # the whole model, for transformers, mlx-lm, export, LM Studio
        from tunelab.fuse import write_model

        with atomic.atomic_dir(run_dir / MODEL) as tmp:
            write_model(engine, model, tmp, {"base_model": opts.model, "fine_tuned": str(run_dir)})
        log(f"Saved the fine-tuned model to {run_dir / MODEL}")


def _optimizer_bytes(opts, trained_bytes):
    """Bytes of optimizer state for `trained_bytes` of trained tensors, at most: Adam keeps two moments a value,
    SGD with momentum and Muon one, Adafactor a row and a column a matrix (counted here as one value each)."""
    name, values = _optimizer(opts)
    if name in ("adam", "adamw"):
        return 2 * trained_bytes
    if name == "adafactor":
        return trained_bytes if values["beta_1"] is not None else 0
    return trained_bytes if values.get("momentum") else 0


def _mask_prompt(opts, log):
    """--mask-prompt as given; when not given, for --test alone the adapter's own training setting (from its
    run manifest), else off (mlx-lm's default)."""
    if opts.mask_prompt is not None:
        return opts.mask_prompt
    if opts.train or not opts.adapter_path:
        return False
    trained = runs.read_manifest(opts.adapter_path).get("options", {}).get("mask_prompt")
    if trained:
        log("Test loss over the answers only, as the adapter was trained (--mask-prompt); --no-mask-prompt "
            "measures every token")
    return bool(trained)


def _loadable_base(reference, model_dir):
    """The base model as PEFT's AutoPeftModelForCausalLM can load it: a repo id or a folder as given, else
    (the embedded model, a .gguf file) the Hugging Face folder it was imported into."""
    return str(Path(model_dir).resolve()) if models.gguf_file_of(reference) else reference


def _data_files(opts):
    return [Path(opts.data) / f"{s}.jsonl" for s in ("train", "valid")]


def _hashes(files):
    return {p.name: runs.file_sha256(p) for p in files}


def _check_resumable(checkpoint, opts):
    """Refuse to resume `checkpoint` with other training options or other data than it was written with."""
    state = checkpoints.read_state(checkpoint)
    changed = checkpoints.differences(state.get("options", {}), dataclasses.asdict(opts))
    changed += [f"{opts.data}/{name}: changed since the checkpoint" for name, digest in
                _hashes(_data_files(opts)).items() if state.get("data", {}).get(name) not in (None, digest)]
    if changed:
        raise UserError([f"--resume: {checkpoint} was written with other options than this run's:"] + changed +
                        [f"run again with the checkpoint's options (they are in its {checkpoints.STATE}); to train "
                         f"on from its adapter with new ones: --resume-adapter-file {checkpoint / adapters.MLX_WEIGHTS}"
                         " and a new --adapter-path"])


def _start_weights(path, spec):
    """The adapter tensors of --resume-adapter-file (either layout, its adapter_config.json beside it), of the
    fine-tune type the run trains."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--resume-adapter-file {path}: file not found")
    if path.name not in (adapters.PEFT_WEIGHTS, adapters.MLX_WEIGHTS):
        raise UserError(f"--resume-adapter-file {path}: expected {adapters.MLX_WEIGHTS} or {adapters.PEFT_WEIGHTS} "
                        f"with its {adapters.CONFIG} beside it")
    saved, tensors = adapters.load(path.parent)
    if saved.kind != spec.kind:
        raise UserError(f"--resume-adapter-file {path}: a {saved.kind} fine-tune, but this run trains {spec.kind}: "
                        f"pass --fine-tune-type {saved.kind}")
    return tensors


def _from_hub(opts):
    """Whether the rows come from Hugging Face datasets (hf_dataset, or --data naming a dataset id)."""
    return bool(opts.hf_dataset) or hub.is_hub_id(opts.data)


def lora(opts, log=print):
    """The `tunelab lora` stage. Returns {'test_loss', 'test_ppl'} when --test is given. Under torchrun (more
    than one process), each process trains on its share of every batch and only rank 0 writes and logs."""
    world = distributed.from_env()
    if world.size > 1:
        log = log if world.main else (lambda *_: None)
    check_options(opts)
    if opts.nproc and world.size == 1:
        return _launch(opts, log)
    if opts.shard:
        _check_shard(opts, world)
    if world.size > 1:
        _join(opts, world)
    opts = dataclasses.replace(opts, mask_prompt=_mask_prompt(opts, log))
    with contextlib.ExitStack() as stack:
        if _from_hub(opts):   # the rows as a data folder: in the run folder when training, else for this call only
            folder = Path(opts.adapter_path) / HUB_DATA if opts.train else \
                Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tunelab-data-"))) / HUB_DATA
            source = {"hf_dataset": opts.hf_dataset, "data_id": None if opts.hf_dataset else opts.data}
            opts = dataclasses.replace(opts, data=str(folder))
        result = _lora(opts, log, source if _from_hub(opts) else None, world)
    if world.size > 1:
        _engine_of(world).finish_distributed()
    return result


def _launch(opts, log):
    """--nproc N: this command again in N processes on this machine, started by torchrun, its options passed
    as a config file."""
    import subprocess
    import sys

    import yaml

    values = {k: v for k, v in dataclasses.asdict(opts).items() if k != "nproc"}
    with tempfile.TemporaryDirectory(prefix="tunelab-nproc-") as folder:
        path = Path(folder) / "options.yaml"
        path.write_text(yaml.safe_dump(values), encoding="utf-8")
        log(f"Starting {opts.nproc} processes (torchrun --standalone --nproc-per-node {opts.nproc})")
        code = subprocess.call([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                f"--nproc-per-node={opts.nproc}", "-m", "tunelab", "lora", "-c", str(path)])
    if code:
        raise Stopped(f"the {opts.nproc} training processes ended with exit code {code} (their errors are above)",
                      code if code < 128 else 1)
    return {}


def _engine_of(world):
    """The engine module whose launcher started `world`: mlx for mlx.launch, torch for torchrun."""
    import importlib

    return importlib.import_module(engines.ENGINES["mlx" if isinstance(world, distributed.MlxWorld) else "torch"])


def _check_shard(opts, world):
    """--shard needs several torch processes, and a batch with a row for each (every process runs each
    block's forward and backward together with the others)."""
    problems = []
    if isinstance(world, distributed.MlxWorld) or world.size == 1:
        problems.append("--shard splits the weights over several torch processes: start them with torchrun or "
                        "--nproc (torch engine)")
    elif opts.batch_size < world.size:
        problems.append(f"--shard: --batch-size {opts.batch_size} gives some of the {world.size} processes no row")
    UserError.raise_if(problems)


def _join(opts, world):
    """Join the other processes torchrun (torch engine) or mlx.launch (mlx engine) started."""
    wanted = "mlx" if isinstance(world, distributed.MlxWorld) else "torch"
    launcher = "mlx.launch" if wanted == "mlx" else "torchrun"
    if engines.choose(opts.engine)[0] != wanted:
        raise UserError(f"several processes started by {launcher} train on the {wanted} engine: pass "
                        f"--engine {wanted}")
    if opts.best_metric != "val_loss":
        raise UserError(f"--best-metric {opts.best_metric}: in several processes only val_loss is built yet")
    _engine_of(world).init_distributed(world)


def _everyone(world, work):
    """Run `work()` on rank 0 alone (the run folder's lock and checks, writing data), and give its result to
    every rank; an error there is an error on every rank, so none waits for the others."""
    if world.size == 1:
        return work()
    share = _engine_of(world).share
    if not world.main:
        outcome = share(None)
        if "error" in outcome:
            raise UserError(outcome["error"])
        return outcome["value"]
    try:
        value = work()
    except UserError as e:
        share({"error": "rank 0: " + "; ".join(e.problems)})
        raise
    except BaseException as e:
        share({"error": f"rank 0: {type(e).__name__}: {e}"})
        raise
    share({"value": value})
    return value


def _lora(opts, log, source, world):
    created = not Path(opts.adapter_path).exists()

    held = {"lock": None}    # rank 0 holds the run folder's lock

    def start():
        held["lock"], resume_from = open_run(opts, log) if opts.train else (None, None)
        try:
            if source is not None and not Path(opts.data).is_dir():
                splits = (["train", "valid"] if opts.train else []) + (["test"] if opts.test else [])
                hub.write_folder(opts.data, splits, log=log, **source)
        except BaseException:
            if held["lock"] is not None:
                held["lock"].release()
            raise
        return resume_from

    resume_from = _everyone(world, start)
    lock = held["lock"]
    try:
        tested_adapter = opts.adapter_path if opts.test and not opts.train else None  # '' = the base model
        quantize = (opts.quantize, opts.q_group_size) if opts.quantize else None
        engine, model, model_dir = engines.load(opts.model, tested_adapter, opts.device, opts.dtype, log=log,
                                                engine=opts.engine, quantize=quantize,
                                                training=opts.train and opts.fine_tune_type != "full")
        if world.size > 1:
            model.world = world
        if opts.chat_template:
            set_chat_template(model.tokenizer, opts.chat_template)
        if opts.train:
            _train(engine, model, model_dir, opts, resume_from, log)
    except BaseException:
        if created and lock is not None and set(checkpoints.run_contents(opts.adapter_path)) <= {HUB_DATA}:
            shutil.rmtree(opts.adapter_path, ignore_errors=True)   # the folder this run made, with nothing trained
        raise
    finally:
        if lock is not None:
            lock.release()
    result = {}
    if opts.test:
        test_set = load_split(model, opts.data, "test", opts, log)
        loss, ppl = evaluate.loss_and_ppl(engine, model, test_set, opts.batch_size, opts.test_batches)
        log(evaluate.format_test(loss, ppl))
        result = {"test_loss": loss, "test_ppl": ppl}
    return result
