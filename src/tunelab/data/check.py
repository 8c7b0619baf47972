"""`tunelab data check`: what the model will see, before any training.

For each split of a data folder: rows, format, token lengths after templating (statistics and
a histogram), the supervised share, rows past --max-seq-length, repeated rows and prompts of
valid/test also found in train; then one row rendered with its supervised tokens marked.
Only the tokenizer is loaded, not the weights.
"""

import sys
from pathlib import Path

import numpy as np

from tunelab import models
from tunelab.data.formats import read_rows
from tunelab.data.prepare import SPLITS, describe_overlaps, overlaps
from tunelab.data.templates import encode_rows, set_chat_template
from tunelab.errors import UserError

BAR_WIDTH = 40


def histogram(lengths, bins=8):
    """Text histogram lines of token lengths."""
    counts, edges = np.histogram(lengths, bins=min(bins, max(len(set(lengths)), 1)))
    top = max(counts.max(), 1)
    return [f"  {int(lo):>6}-{int(hi):<6} {'#' * max(int(BAR_WIDTH * c / top), 1 if c else 0):<{BAR_WIDTH}} {c}"
            for lo, hi, c in zip(edges[:-1], edges[1:], counts)]


def marked(tokenizer, example, color):
    """The row's text with supervised tokens marked: green on a terminal, else between [[ and ]]."""
    start, end = ("\033[32m", "\033[0m") if color else ("[[", "]]")
    out, inside = [], False
    for token, supervised in zip(example.tokens.tolist(), example.supervised.tolist()):
        if supervised != inside:
            out.append(start if supervised else end)
            inside = supervised
        out.append(tokenizer.decode([token]))
    if inside:
        out.append(end)
    return "".join(out)


def check(opts, log=print):
    """The `tunelab data check` stage; returns {split: statistics}."""
    from transformers import AutoTokenizer

    data = Path(opts.data)
    present = [s for s in SPLITS if (data / f"{s}.jsonl").is_file()]
    if not present:
        raise UserError(f"--data {data}: no train.jsonl, valid.jsonl or test.jsonl there (make them with `tunelab prepare`)")
    tokenizer = AutoTokenizer.from_pretrained(str(models.resolve(opts.model, log=log)), trust_remote_code=False)
    if opts.chat_template:
        set_chat_template(tokenizer, opts.chat_template)
    loaded, problems, stats, encoded = {}, [], {}, {}
    for split in present:
        try:
            loaded[split] = read_rows(data / f"{split}.jsonl")
        except UserError as e:
            problems += e.problems
    UserError.raise_if(problems)

    for split, (rows, fmt) in loaded.items():
        path = data / f"{split}.jsonl"
        full, _ = encode_rows(tokenizer, rows, fmt, opts.mask_prompt, 1 << 30, str(path), train_on=opts.train_on)
        encoded[split] = full
        lengths = np.array([len(ex.tokens) for ex in full])
        supervised = sum(int(ex.supervised.sum()) for ex in full)
        too_long = int((lengths > opts.max_seq_length).sum())
        stats[split] = {"rows": len(rows), "format": fmt, "tokens": int(lengths.sum()),
                        "min": int(lengths.min()), "median": float(np.median(lengths)), "mean": float(lengths.mean()),
                        "p95": float(np.percentile(lengths, 95)), "max": int(lengths.max()),
                        "supervised_share": supervised / max(int(lengths.sum()), 1), "longer_than_max": too_long}
        policy = "truncated" if opts.long_rows == "truncate" else "dropped"
        log(f"\n{path}: {len(rows)} rows, format {fmt}")
        log(f"  tokens per row: min {stats[split]['min']}, median {stats[split]['median']:.0f}, mean "
            f"{stats[split]['mean']:.1f}, 95% {stats[split]['p95']:.0f}, max {stats[split]['max']}; "
            f"{lengths.sum():,} in all")
        log(f"  supervised: {100 * stats[split]['supervised_share']:.1f}% of tokens"
            + (" (every token after the first: pass --mask-prompt to train on answers only)" if not opts.mask_prompt
               else " (the answers and their end-of-turn tokens)"))
        log(f"  longer than --max-seq-length {opts.max_seq_length}: {too_long} (would be {policy})")
        for line in histogram(lengths.tolist()):
            log(line)
    chat_splits = {s: rows for s, (rows, fmt) in loaded.items() if fmt in ("chat", "tools")}
    if chat_splits:
        found = overlaps(chat_splits)
        stats["overlap"] = found
        log(f"\nDuplicates and leakage: {describe_overlaps(found) or 'none'}")
    first_split = "train" if "train" in loaded else present[0]
    example = encoded[first_split][0]     # no limit and no row left out: index 0 is the file's first row
    color = sys.stdout.isatty()
    log(f"\n{first_split}.jsonl row 1 as the model sees it ({example.tokens.size} tokens; supervised "
        f"{'in green' if color else 'between [[ and ]]'}):\n")
    log(marked(tokenizer, example, color))
    return stats
