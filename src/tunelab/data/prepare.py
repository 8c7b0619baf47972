"""The prepare stage: source rows -> chat rows -> shuffled, selected, split into train/valid/test.jsonl."""

import json
import random
import string
from pathlib import Path

from tunelab import atomic, outputs, runs
from tunelab.data.sources import read_source
from tunelab.errors import UserError

SPLITS = ("train", "valid", "test")


def _template_fields(template):
    return {name for _, name, _, _ in string.Formatter().parse(template) if name}


def _check_options(opts):
    problems = []
    for name in ("num_rows", "valid_rows", "test_rows"):
        value = getattr(opts, name)
        if value < 0 and not (name == "num_rows" and value == -1):
            problems.append(f"--{name.replace('_', '-')}: must be >= 0, got {value}")
    for name in ("valid_rows", "test_rows"):
        value = getattr(opts, name)
        if value >= 1 and value != int(value):
            problems.append(f"--{name.replace('_', '-')}: a count (25) or a share below 1 (0.1), got {value}")
    sizes = split_sizes(opts.num_rows, opts.valid_rows, opts.test_rows) if opts.num_rows != -1 else (0, 0)
    if opts.num_rows != -1 and not opts.keep_splits and sum(sizes) >= opts.num_rows:
        problems.append(f"--valid-rows {opts.valid_rows} + --test-rows {opts.test_rows} leave no training rows "
                        f"out of --num-rows {opts.num_rows}")
    if opts.keep_splits and (opts.source.startswith("builtin:") or Path(opts.source).is_file()):
        problems.append(f"--keep-splits: {opts.source} has no splits of its own (use a Hugging Face dataset or a "
                        "dataset folder), or leave it out to split by --valid-rows/--test-rows")
    for role in ("system", "user", "assistant"):
        try:
            _template_fields(getattr(opts, role))
        except ValueError as e:
            problems.append(f"--{role}: not a valid template ({e}); write fields as {{name}} and "
                            "literal braces as {{ and }}")
    UserError.raise_if(problems)


def to_chat(row, opts, where):
    """Map one source row onto a chat row with the system/user/assistant templates."""
    messages, problems = [], []
    for role in ("system", "user", "assistant"):
        template = getattr(opts, role)
        if role == "system" and not template:
            continue
        missing = sorted(_template_fields(template) - row.keys())
        if missing:
            problems.append(f"{where}: {', '.join(missing)}: field missing from the source row "
                            f"(it has: {', '.join(sorted(map(str, row))) or 'nothing'}); "
                            f"change --{role} to use these fields")
            continue
        messages.append({"role": role, "content": template.format_map({k: "" if v is None else v
                                                                         for k, v in row.items()})})
    if not problems and not messages[-1]["content"].strip():
        problems.append(f"{where}: assistant: the answer is empty")
    chat = {"messages": messages}
    if isinstance(row.get("context"), str):  # kept for metrics that need it (SQL schemas); trainers ignore it
        chat["context"] = row["context"]
    return chat, problems


def _key(messages):
    return json.dumps(messages, sort_keys=True, ensure_ascii=False)


def overlaps(splits):
    """Exact duplicates inside each split, and valid/test rows whose prompt (or whole row) is in train."""
    counts = {}
    train_prompts = {_key(r["messages"][:-1]) for r in splits.get("train", [])}
    train_rows = {_key(r["messages"]) for r in splits.get("train", [])}
    for name, rows in splits.items():
        keys = [_key(r["messages"]) for r in rows]
        counts[f"{name}_duplicates"] = len(keys) - len(set(keys))
        if name != "train":
            counts[f"{name}_prompt_in_train"] = sum(_key(r["messages"][:-1]) in train_prompts for r in rows)
            counts[f"{name}_row_in_train"] = sum(k in train_rows for k in keys)
    return counts


def dedupe(splits):
    """Drop repeated rows inside each split (the first stays) and valid/test rows whose prompt is in train."""
    train_prompts = {_key(r["messages"][:-1]) for r in splits["train"]}
    out = {}
    for name, rows in splits.items():
        seen, kept = set(), []
        for r in rows:
            key = _key(r["messages"])
            if key in seen or (name != "train" and _key(r["messages"][:-1]) in train_prompts):
                continue
            seen.add(key)
            kept.append(r)
        out[name] = kept
    return out


def describe_overlaps(counts):
    parts = [f"{counts[f'{n}_duplicates']} repeated rows in {n}" for n in SPLITS if counts.get(f"{n}_duplicates")]
    parts += [f"{counts[f'{n}_prompt_in_train']} {n} prompts also in train ({counts[f'{n}_row_in_train']} "
              "with the same answer)" for n in ("valid", "test") if counts.get(f"{n}_prompt_in_train")]
    return "; ".join(parts)


def split_sizes(n, valid, test):
    """(valid, test) row counts: a value below 1 is a share of the n rows, else a count."""
    def size(v):
        return int(round(v * n)) if 0 < v < 1 else int(v)
    return size(valid), size(test)


def _map_rows(rows, order, opts, where):
    """Chat rows of rows[i] for i in order; (chat rows, problems, rejected rows)."""
    chat_rows, problems, rejected = [], [], []
    for index in order:
        chat, row_problems = to_chat(rows[index], opts, f"{where}: row {index + 1}")
        if row_problems and opts.skip_invalid:
            rejected.append({"source": where, "source_row": index + 1, "problems": row_problems, "row": rows[index]})
            continue
        chat_rows.append(chat)
        problems += row_problems
    return chat_rows, problems, rejected


# The source's own split names that --keep-splits maps onto train/valid/test.
SOURCE_SPLITS = {"train": ("train",), "valid": ("validation", "valid", "dev"), "test": ("test",)}


def _source_splits(opts):
    """{split: rows} from the source's own splits (a Hugging Face dataset or a local dataset folder)."""
    found = {}
    for name, candidates in SOURCE_SPLITS.items():
        for candidate in candidates:
            try:
                found[name] = read_source(opts.source, split=candidate, dataset_config=opts.dataset_config,
                                          revision=opts.revision)
                break
            except UserError:
                continue
    if "train" not in found:
        raise UserError(f"{opts.source}: --keep-splits needs a dataset with a train split")
    return found


def prepare(opts, log=print):
    """Write train/valid/test.jsonl into opts.out; returns {split: row count}."""
    _check_options(opts)
    out = Path(opts.out)
    source = Path(opts.source).expanduser()
    replace = outputs.check_target(out, "--out", overwrite=opts.overwrite,
                                   inputs=[("the source", source if source.exists() else None)],
                                   marker=runs.DATA_MANIFEST, command="prepare")
    problems, rejected = [], []
    if opts.keep_splits:
        splits = {}
        for name, rows in _source_splits(opts).items():
            order = list(range(len(rows)))
            random.Random(opts.seed).shuffle(order)
            if name == "train" and opts.num_rows != -1:
                order = order[:opts.num_rows]
            splits[name], p, r = _map_rows(rows, order, opts, f"{opts.source}[{name}]")
            problems, rejected = problems + p, rejected + r
        for name in SPLITS:
            splits.setdefault(name, [])
    else:
        rows = read_source(opts.source, split=opts.split, seed=opts.seed, num_rows=opts.num_rows,
                           dataset_config=opts.dataset_config, revision=opts.revision)
        order = list(range(len(rows)))
        random.Random(opts.seed).shuffle(order)
        if opts.num_rows != -1:
            if len(rows) < opts.num_rows:
                raise UserError(f"{opts.source}: has {len(rows)} rows, fewer than --num-rows {opts.num_rows}")
            order = order[:opts.num_rows]
        chat_rows, problems, rejected = _map_rows(rows, order, opts, opts.source)
        n_valid, n_test = split_sizes(len(chat_rows), opts.valid_rows, opts.test_rows)
        if not problems and n_valid + n_test >= len(chat_rows):
            raise UserError(f"{opts.source}: {len(chat_rows)} usable rows leave none for training after "
                            f"{n_valid} valid and {n_test} test rows")
        splits = {"test": chat_rows[:n_test], "valid": chat_rows[n_test:n_test + n_valid],
                  "train": chat_rows[n_test + n_valid:]}
    if problems:
        more = [f"... and {len(problems) - 20} more"] if len(problems) > 20 else []
        raise UserError(problems[:20] + more + ["(--skip-invalid sets such rows aside in rejected.jsonl instead)"])
    if rejected:
        log(f"Skipped {len(rejected)} invalid rows of {opts.source}; they are in {out}/rejected.jsonl")
    found = overlaps(splits)
    if describe_overlaps(found):
        log(f"Overlap: {describe_overlaps(found)}" + ("; dropping them (--dedupe)" if opts.dedupe else
                                                      "; --dedupe drops them"))
    if opts.dedupe:
        splits = dedupe(splits)
    with atomic.atomic_dir(out, replace=replace) as tmp:
        for name in SPLITS:
            with open(tmp / f"{name}.jsonl", "w", encoding="utf-8") as f:
                for row in splits[name]:
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
        if rejected:
            with open(tmp / "rejected.jsonl", "w", encoding="utf-8") as f:
                for r in rejected:
                    f.write(json.dumps(r, ensure_ascii=False, default=str) + "\n")
        atomic.write_json(tmp / runs.DATA_MANIFEST, {"source": opts.source, "split": opts.split, "seed": opts.seed,
                                                     "rows": {name: len(splits[name]) for name in SPLITS},
                                                     "overlap_before_dedupe": found, "deduped": opts.dedupe,
                                                     "rejected": len(rejected)})
    counts = {name: len(splits[name]) for name in SPLITS}
    log(f"Wrote {out}/: " + ", ".join(f"{name}.jsonl {counts[name]} rows" for name in SPLITS))
    return counts
