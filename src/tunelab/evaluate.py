"""Loss and perplexity, and the eval stage: how well each model does the task.

`tunelab eval` takes the rows of a split (test.jsonl by default), generates an answer to every
prompt with each model (the base, base + adapter, fused folders, .gguf files; batched, greedy
by default, stopped at the end of turn), or reads answers made elsewhere (`--predictions`),
and scores them all with the same metrics on the same rows. Accuracies get 95% Wilson
intervals; the answer loss gets a bootstrap interval over rows. It writes eval/results.json,
eval/samples.jsonl and report.html into the run folder and prints a summary.
"""

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from tunelab import atomic, distributed, endpoints, engines, metrics, runs
from tunelab.data.batching import collate, eval_batches
from tunelab.data.formats import read_json_lines, read_rows
from tunelab.data.templates import encode_rows, end_of_turn_ids, prompt_tokens, split_answer
from tunelab.errors import UserError

SQL_METRICS = ["sql-exec", "sql-canonical", metrics.LOSS]
TEXT_METRICS = ["exact", "normalized", metrics.LOSS]
BOOTSTRAP_SAMPLES = 2000


def loss_and_ppl(engine, model, examples, batch_size, max_batches=-1):
    """Mean cross-entropy per supervised token over the batches, and exp of it."""
    world = distributed.of(model)
    shared = world.size > 1 and not getattr(model, "sharded", False)   # sharded: every process runs every batch
    total, count = 0.0, 0
    for i, batch in enumerate(eval_batches(examples, batch_size, max_batches)):
        if shared and i % world.size != world.rank:    # in several processes, each takes its share of the batches
            continue
        sums, counts = engine.eval_loss(model, batch)
        total += float(sums.sum())
        count += int(counts.sum())
    if shared:
        total, count = engine.reduce_sum(model, [total, count])
    loss = total / max(count, 1)
    return loss, math.exp(loss)


def format_test(loss, ppl):
    return f"Test loss {loss:.3f}, Test ppl {ppl:.3f}."


@dataclass
class Row:
    index: int          # 0-based position in the split file
    prompt: list        # chat messages before the answer
    gold: str
    schema: str         # CREATE TABLE statements found in the prompt or the row's `context`
    question: str       # the last user message, for matching --predictions by prompt
    tools: list = None  # the tools a tools row offers


@dataclass
class Candidate:
    label: str
    reference: str              # model reference, or the predictions file, or an endpoint's URL
    adapter: str = None
    from_file: bool = False
    served: str = None          # the model name at an OpenAI-compatible endpoint (reference: its base URL)


@dataclass
class Outcome:
    answers: list                                   # one string (or None: no answer) per row
    row_losses: tuple = None                        # (loss sums [N], token counts [N]) or None
    seconds: float = 0.0
    generated_tokens: int = 0
    verdicts: list = field(default_factory=list)    # per row: {metric: metrics.Verdict}


# ---- rows and choices ----------------------------------------------------------------------

def load_rows(path, num_rows=-1):
    rows, fmt = read_rows(path)
    if fmt not in ("chat", "tools", "completions"):
        raise UserError(f"{path}: eval needs rows with a prompt and an answer (chat or completions); this file "
                        f"holds {fmt} rows: measure their loss with `tunelab lora --test`")
    if num_rows != -1:
        rows = rows[:num_rows]
    out = []
    for index, row in enumerate(rows):
        prompt, gold = split_answer(row, fmt)
        texts = [m.get("content") or "" for m in prompt] + [row.get("context") or ""]
        question = next((m["content"] for m in reversed(prompt) if m["role"] == "user"), "")
        out.append(Row(index, prompt, gold, metrics.find_schema(*texts), question, row.get("tools")))
    return rows, fmt, out


def default_metrics(data_dir, rows):
    """Text-to-SQL data (from builtin:sql, sql-create-context, or every row with a schema): SQL metrics."""
    source = str(runs.read_data_manifest(data_dir).get("source", "")).lower()
    if source == "builtin:sql" or "sql-create-context" in source or all(r.schema for r in rows):
        return list(SQL_METRICS)
    return list(TEXT_METRICS)


def _labelled(entry):
    label, sep, reference = entry.partition("=")
    if sep and label and reference and not Path(entry).exists():
        return label, reference
    return None, entry


def candidates(opts):
    """The models and prediction files to evaluate, each with a unique label."""
    out = [] if opts.no_base else [Candidate("base", opts.model)]
    if opts.adapter_path:
        out.append(Candidate("tuned", opts.model, adapter=opts.adapter_path))
    for entry in opts.compare or []:
        label, reference = _labelled(entry)
        if endpoints.is_url(reference):
            url, served = endpoints.split(reference)
            out.append(Candidate(label or served or url, url, served=served or ""))
            continue
        out.append(Candidate(label or Path(reference).name or reference, reference))
    for entry in opts.predictions or []:
        label, reference = _labelled(entry)
        out.append(Candidate(label or Path(reference).stem, reference, from_file=True))
    problems = []
    if not out:
        problems.append("nothing to evaluate: --no-base without --adapter-path, --compare or --predictions")
    seen = set()
    for c in out:
        if c.label in seen:
            problems.append(f"two models are labelled {c.label!r}: name one with NAME=REF")
        seen.add(c.label)
        if c.from_file and not Path(c.reference).is_file():
            problems.append(f"--predictions {c.reference}: file not found")
    UserError.raise_if(problems)
    return out


# ---- answers -------------------------------------------------------------------------------

def generate_answers(engine, model, rows, opts, label):
    """Answers in row order; prompts of similar length are generated together."""
    tokenizer = model.tokenizer
    stop_ids = end_of_turn_ids(tokenizer)
    prompts = [prompt_tokens(tokenizer, r.prompt, r.tools) for r in rows]
    order = sorted(range(len(rows)), key=lambda i: len(prompts[i]))
    answers, generated = [None] * len(rows), 0
    with tqdm(total=len(rows), desc=f"Generating ({label})", unit="row", dynamic_ncols=True, disable=None) as bar:
        for start in range(0, len(order), opts.batch_size):
            chunk = order[start:start + opts.batch_size]
            outputs = engine.generate_batch(model, [prompts[i] for i in chunk], max_tokens=opts.max_tokens,
                                            temp=opts.temp, top_p=opts.top_p, seed=opts.seed + start,
                                            stop_ids=stop_ids)
            for i, ids in zip(chunk, outputs):
                answers[i] = tokenizer.decode(ids, skip_special_tokens=True).strip()
                generated += len(ids)
            bar.update(len(chunk))
    return answers, generated


def _answer_losses(engine, model, rows, fmt, opts):
    """Cross-entropy of each gold answer (and its end-of-turn token) given its prompt: sums and counts [N]."""
    examples, _ = encode_rows(model.tokenizer, rows, fmt, mask_prompt=True, max_seq_length=1 << 30,
                              where=str(Path(opts.data) / f"{opts.split}.jsonl"), train_on="last")
    sums, counts = np.zeros(len(examples)), np.zeros(len(examples), dtype=np.int64)
    for start in range(0, len(examples), opts.batch_size):
        s, c = engine.eval_loss(model, collate(examples[start:start + opts.batch_size]))
        sums[start:start + len(s)], counts[start:start + len(c)] = s, c
    return sums, counts


def from_model(candidate, raw_rows, fmt, rows, metric_names, opts, log):
    engine, model, _ = engines.load(candidate.reference, candidate.adapter, opts.device, log=log,
                                     engine=opts.engine)
    started = time.perf_counter()
    answers, generated = [None] * len(rows), 0
    if any(m != metrics.LOSS for m in metric_names):
        answers, generated = generate_answers(engine, model, rows, opts, candidate.label)
    losses = _answer_losses(engine, model, raw_rows, fmt, opts) if metrics.LOSS in metric_names else None
    return Outcome(answers, losses, time.perf_counter() - started, generated)


def from_file(path, rows):
    """Answers from a JSON Lines file: {"index": i or "prompt": text, "answer": text} per line. Every bad
    line (not UTF-8, not a JSON object, no answer, an index that names no row) is reported at once."""
    path = Path(path)
    objects, problems = read_json_lines(path, what="predictions file")
    problems = [text for _, text in problems]
    if not objects and not problems:
        problems.append(f"{path}: no answers: write one {{\"index\": row number, \"answer\": text}} object a line")
    by_question = {}
    for r in rows:
        by_question.setdefault(r.question.strip(), []).append(r.index)
    answers = [None] * len(rows)
    for line_no, obj in objects:
        where = f"{path}:{line_no}"
        if not isinstance(obj.get("answer"), str):
            got = "nothing" if "answer" not in obj else json.dumps(obj["answer"])[:60]
            problems.append(f"{where}: answer: expected a string (the model's answer to the row), got {got}")
            continue
        if "index" in obj:
            index = obj["index"]
            if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(rows):
                problems.append(f"{where}: index: expected a row number from 0 to {len(rows) - 1}, got {index!r}")
                continue
        elif isinstance(obj.get("prompt"), str):
            matches = by_question.get(obj["prompt"].strip(), [])
            if len(matches) != 1:
                what = "matches no row's question" if not matches else \
                    f"matches rows {', '.join(map(str, matches[:5]))}"
                problems.append(f"{where}: prompt: {what}; give the row's \"index\" instead")
                continue
            index = matches[0]
        else:
            problems.append(f"{where}: index: missing; give the row's \"index\" (0-based) or its \"prompt\" "
                            "(the last user message)")
            continue
        if answers[index] is not None:
            problems.append(f"{where}: index: row {index} already has an answer in this file")
            continue
        answers[index] = obj["answer"]
    UserError.raise_if(problems)
    return Outcome(answers)


# ---- scores --------------------------------------------------------------------------------

def score(outcome, rows, metric_names, seed):
    verdict_names = [m for m in metric_names if m != metrics.LOSS]
    outcome.verdicts = []
    for row, answer in zip(rows, outcome.answers):
        if answer is None:
            outcome.verdicts.append({m: metrics.Verdict(False, "no answer") for m in verdict_names})
        else:
            outcome.verdicts.append({m: metrics.get(m)(answer, row.gold, row.schema, **(
                {"seed": seed} if m == "sql-exec" else {})) for m in verdict_names})


def bootstrap_loss_interval(sums, counts, seed=0):
    """95% percentile-bootstrap interval of the token-weighted mean loss, resampling rows."""
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(sums), size=(BOOTSTRAP_SAMPLES, len(sums)))
    means = sums[picks].sum(1) / np.maximum(counts[picks].sum(1), 1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def summarize(candidate, outcome, metric_names):
    source = "predictions file" if candidate.from_file else "generated"
    if candidate.served is not None:
        source = f"endpoint (model {candidate.served})" if candidate.served else "endpoint"
    result = {"reference": candidate.reference, "adapter": candidate.adapter, "source": source, "metrics": {}}
    for name in metric_names:
        if name == metrics.LOSS:
            if outcome.row_losses is None:
                continue
            sums, counts = outcome.row_losses
            loss = float(sums.sum() / max(counts.sum(), 1))
            low, high = bootstrap_loss_interval(sums, counts)
            result["metrics"]["loss"] = {"value": loss, "ci95": [low, high], "tokens": int(counts.sum())}
            result["metrics"]["ppl"] = {"value": math.exp(loss), "ci95": [math.exp(low), math.exp(high)]}
            continue
        correct = sum(v[name].correct for v in outcome.verdicts)
        total = len(outcome.verdicts)
        result["metrics"][name] = {"value": correct / max(total, 1), "correct": correct, "total": total,
                                   "ci95": list(metrics.wilson_interval(correct, total))}
    if not candidate.from_file:
        result["seconds"] = round(outcome.seconds, 2)
        result["generated_tokens"] = outcome.generated_tokens
    missing = sum(a is None for a in outcome.answers)
    if candidate.from_file and missing:
        result["rows_without_answer"] = missing
    return result


def _cell(entry):
    if entry is None:
        return "-"
    if "correct" in entry:
        low, high = entry["ci95"]
        return f"{100 * entry['value']:.1f}% [{100 * low:.0f}-{100 * high:.0f}]"
    low, high = entry["ci95"]
    return f"{entry['value']:.4g} [{low:.4g}-{high:.4g}]"


def summary_table(results):
    """The terminal summary: one line per model, one column per metric (value [95% interval])."""
    columns = [m for m in results["metrics"] if m != metrics.LOSS]
    if metrics.LOSS in results["metrics"]:
        columns += ["loss", "ppl"]
    table = [["", *columns]] + [[label, *(_cell(model["metrics"].get(c)) for c in columns)]
                                for label, model in results["models"].items()]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns) + 1)]
    return "\n".join(line[0].ljust(widths[0]) + "".join(cell.rjust(w + 3) for cell, w in zip(line[1:], widths[1:]))
                     for line in table)


# ---- the stage -----------------------------------------------------------------------------

def check_options(opts):
    problems = []
    if opts.batch_size < 1:
        problems.append(f"--batch-size: must be at least 1, got {opts.batch_size}")
    if opts.max_tokens < 1:
        problems.append(f"--max-tokens: must be at least 1, got {opts.max_tokens}")
    if opts.num_rows == 0 or opts.num_rows < -1:
        problems.append(f"--num-rows: must be -1 (all) or at least 1, got {opts.num_rows}")
    split = Path(opts.data) / f"{opts.split}.jsonl"
    if not split.is_file():
        problems.append(f"--data {opts.data}: {split.name} not found (make the splits with `tunelab prepare`)")
    if opts.adapter_path and not Path(opts.adapter_path).is_dir():
        problems.append(f"--adapter-path {opts.adapter_path}: folder not found")
    if opts.metric:
        try:
            metrics.check_names(opts.metric)
        except UserError as e:
            problems += e.problems
    UserError.raise_if(problems)


def run_dir_for(opts):
    if opts.run_dir is not None:
        return Path(opts.run_dir)
    return Path(opts.adapter_path) if opts.adapter_path else Path("tunelab-eval")


def check_outputs(run_dir):
    """eval replaces its own earlier results and report in the run folder, never a file of the same name that
    it did not write."""
    run_dir = Path(run_dir)
    signs = {runs.REPORT: b"<title>tunelab report</title>", runs.EVAL_RESULTS: b'"models"',
             runs.EVAL_SAMPLES: b'"answers"'}
    foreign = []
    for name, sign in signs.items():
        path = run_dir / name
        if path.is_dir() or (path.exists() and sign not in path.read_bytes()[:1 << 16] and path.stat().st_size):
            foreign.append(str(path))
    if foreign:
        raise UserError(f"{', '.join(foreign)}: not written by `tunelab eval`, and eval does not replace it; "
                        "choose another --run-dir")


def evaluate(opts, log=print):
    """The `tunelab eval` stage; returns the results written to eval/results.json."""
    from tunelab import report

    check_options(opts)
    check_outputs(run_dir_for(opts))
    todo = candidates(opts)
    split_path = Path(opts.data) / f"{opts.split}.jsonl"
    raw_rows, fmt, rows = load_rows(split_path, opts.num_rows)
    metric_names = list(dict.fromkeys(opts.metric or default_metrics(opts.data, rows)))
    if metrics.LOSS in metric_names and all(c.from_file or c.served is not None for c in todo):
        metric_names.remove(metrics.LOSS)
    if any(m.startswith("sql-") for m in metric_names) and not any(r.schema for r in rows):
        log(f"note: no row of {split_path} has a CREATE TABLE schema, so sql-exec counts every answer wrong")
    log(f"Evaluating {len(rows)} rows of {split_path} with {', '.join(metric_names)}: "
        + ", ".join(c.label for c in todo))

    outcomes = {}
    for c in todo:
        if c.from_file:
            outcome = from_file(c.reference, rows)
            missing = sum(a is None for a in outcome.answers)
            if missing:
                log(f"{c.reference}: {missing} of {len(rows)} rows have no answer and count as wrong")
        elif c.served is not None:
            log(f"\n{c.label}: {c.reference} (model {c.served or 'the first it lists'})")
            started = time.perf_counter()
            answers, generated = endpoints.answers(c.reference, c.served, rows, opts, c.label)
            outcome = Outcome(answers, None, time.perf_counter() - started, generated)
        else:
            log(f"\n{c.label}: {c.reference}" + (f" + adapter {c.adapter}" if c.adapter else ""))
            outcome = from_model(c, raw_rows, fmt, rows, metric_names, opts, log)
        score(outcome, rows, metric_names, opts.seed)
        outcomes[c.label] = outcome

    results = {"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "data": str(split_path), "rows": len(rows),
               "metrics": metric_names,
               "generation": {"max_tokens": opts.max_tokens, "temp": opts.temp, "top_p": opts.top_p,
                              "seed": opts.seed, "batch_size": opts.batch_size},
               "models": {c.label: summarize(c, outcomes[c.label], metric_names) for c in todo}}
    samples = [{"index": r.index, "prompt": r.prompt, "gold": r.gold,
                "answers": {label: o.answers[i] for label, o in outcomes.items()},
                "verdicts": {label: {m: {"correct": v.correct, "note": v.note} for m, v in o.verdicts[i].items()}
                             for label, o in outcomes.items()},
                "loss": {label: round(float(o.row_losses[0][i] / max(o.row_losses[1][i], 1)), 6)
                         for label, o in outcomes.items() if o.row_losses is not None}}
               for i, r in enumerate(rows)]

    run_dir = run_dir_for(opts)
    curves = runs.read_metrics(opts.adapter_path) if opts.adapter_path else []
    curves = curves or runs.read_metrics(run_dir)
    atomic.write_json(run_dir / runs.EVAL_RESULTS, results)
    atomic.write_text(run_dir / runs.EVAL_SAMPLES, "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples))
    atomic.write_text(run_dir / runs.REPORT, report.render(results, samples, curves))
    log("\n" + summary_table(results))
    log(f"\nResults: {run_dir / runs.EVAL_RESULTS}\nSamples: {run_dir / runs.EVAL_SAMPLES}\n"
        f"Report:  {run_dir / runs.REPORT}")
    return results
