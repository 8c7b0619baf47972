"""What the model sees: rows rendered with the tokenizer's chat template, and the loss mask.

`encode_row` turns one validated row into token ids and a boolean `supervised` array of the
same length: supervised[i] is True when token i is a training target (predicted from the
tokens before it). Rows end at the end-of-turn token of the last trained message, which is
itself supervised, so the model learns to stop.
"""

from dataclasses import dataclass

import numpy as np

from tunelab.errors import UserError

# End-of-turn tokens of common chat templates, besides the tokenizer's own eos token.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")


@dataclass
class Example:
    tokens: np.ndarray      # [T] int32
    supervised: np.ndarray  # [T] bool; supervised[0] is always False


def end_of_turn_ids(tokenizer):
    """Token ids that end an assistant turn (for masks and for stopping generation)."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    vocab = tokenizer.get_vocab()
    ids.update(vocab[t] for t in END_OF_TURN_TOKENS if t in vocab)
    return ids


# What `encode_rows` does with a row longer than --max-seq-length.
LONG_ROWS = ("truncate", "drop")

# Named chat templates for models that have none (--chat-template NAME, or a path to a Jinja file).
CHAT_TEMPLATES = {
    "chatml": ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] "
               "+ '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
               "{% endif %}"),
}


def set_chat_template(tokenizer, name_or_path):
    """Give the tokenizer a chat template by name (CHAT_TEMPLATES) or from a Jinja file."""
    from pathlib import Path

    if name_or_path in CHAT_TEMPLATES:
        tokenizer.chat_template = CHAT_TEMPLATES[name_or_path]
    elif Path(name_or_path).is_file():
        tokenizer.chat_template = Path(name_or_path).read_text(encoding="utf-8")
    else:
        raise UserError(f"--chat-template {name_or_path}: neither a known template ({', '.join(CHAT_TEMPLATES)}) "
                        "nor a Jinja file")


def _render(tokenizer, messages, add_generation_prompt, tools=None):
    text = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)
    return tokenizer.encode(text, add_special_tokens=False)


def _chat_messages(row, fmt):
    if fmt in ("chat", "tools"):
        return row["messages"]
    return [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["completion"]}]


def check_chat_template(tokenizer):
    if not getattr(tokenizer, "chat_template", None):
        raise UserError("the model's tokenizer has no chat template, so chat and completions rows cannot be "
                        "rendered: use an instruct model, give the template with --chat-template (e.g. "
                        "--chat-template chatml), or train on 'text' rows")


def check_renders_tools(tokenizer):
    """A template that drops tool calls would train the model on empty answers: refuse it."""
    probe = [{"role": "user", "content": "x"},
             {"role": "assistant", "tool_calls": [{"type": "function", "function": {
                 "name": "tunelab_probe_call", "arguments": {"q": 1}}}]}]
    tools = [{"type": "function", "function": {"name": "tunelab_probe_tool", "description": "d",
                                                "parameters": {"type": "object", "properties": {}}}}]
    try:
        text = tokenizer.apply_chat_template(probe, tools=tools, tokenize=False)
    except Exception as e:  # templates raise their own errors on shapes they do not know
        raise UserError(f"the model's chat template cannot render tool calls ({e}); train tools rows on a model "
                        "whose template supports tools (e.g. Qwen2.5)") from None
    if "tunelab_probe_call" not in text or "tunelab_probe_tool" not in text:
        raise UserError("the model's chat template does not render tools and tool calls, so the model would learn "
                        "empty answers; train tools rows on a model whose template supports tools (e.g. Qwen2.5)")


def split_answer(row, fmt):
    """(prompt messages, the answer to be generated) of a chat, tools or completions row."""
    messages = _chat_messages(row, fmt)
    return messages[:-1], messages[-1].get("content") or ""


def prompt_tokens(tokenizer, messages, tools=None):
    """Token ids of the prompt messages rendered with the chat template, ready for the answer."""
    check_chat_template(tokenizer)
    return _render(tokenizer, messages, add_generation_prompt=True, tools=tools)


def _turn_spans(tokenizer, messages, tools, full, eot_ids, turns):
    """[start, end) of each trained assistant turn in `full`, its end-of-turn token included, from
    renderings of the conversation up to each turn; None when the template rewrites earlier turns
    (a prefix does not render as a prefix of the whole)."""
    spans = []
    for i in turns:
        prefix = _render(tokenizer, messages[:i], add_generation_prompt=True, tools=tools)
        if full[:len(prefix)] != prefix:
            return None
        end = next((j for j in range(len(prefix), len(full)) if full[j] in eot_ids), len(full) - 1)
        spans.append((len(prefix), end + 1))
    return spans


def _offset_spans(tokenizer, messages, tools, turns, eot_ids):
    """The same spans located by character offsets of each assistant text in the rendered string."""
    text = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    tokens, offsets = encoded["input_ids"], encoded["offset_mapping"]
    spans, search_from = [], 0
    for i in range(len(messages)):
        if messages[i]["role"] != "assistant":
            continue
        content = messages[i].get("content") or ""
        at = text.find(content, search_from) if content else -1
        if at < 0:
            raise UserError(f"messages[{i}]: the chat template rewrites earlier turns and this answer could not "
                            "be found in the rendered text to mask it")
        search_from = at + len(content)
        if i not in turns:
            continue
        first = next(t for t, (a, b) in enumerate(offsets) if b > at)
        last = next((t for t in range(first, len(tokens)) if tokens[t] in eot_ids), len(tokens) - 1)
        spans.append((first, last + 1))
    return tokens, spans


def encode_row(tokenizer, row, fmt, mask_prompt, eot_ids=None, train_on="all", notes=None):
    """Return the Example for one row of format `fmt` ('chat', 'tools', 'completions' or 'text').

    With mask_prompt, the supervised tokens are the assistant turns (all of them, or the last with
    train_on='last'), each with its end-of-turn token; without it, every token after the first.
    `notes` (a set) collects remarks for the user, e.g. that masks came from rendered offsets.
    """
    eot_ids = end_of_turn_ids(tokenizer) if eot_ids is None else eot_ids
    if fmt == "text":
        tokens = tokenizer.encode(row["text"], add_special_tokens=True)
        if tokenizer.eos_token_id is not None and tokens[-1] != tokenizer.eos_token_id:
            tokens.append(tokenizer.eos_token_id)
        spans = [(1, len(tokens))]
    else:
        check_chat_template(tokenizer)
        messages, tools = _chat_messages(row, fmt), row.get("tools")
        assistants = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        turns = assistants if train_on == "all" else assistants[-1:]
        tokens = _render(tokenizer, messages, add_generation_prompt=False, tools=tools)
        spans = _turn_spans(tokenizer, messages, tools, tokens, eot_ids, turns)
        if spans is None:
            tokens, spans = _offset_spans(tokenizer, messages, tools, turns, eot_ids)
            if notes is not None:
                notes.add("the chat template rewrites earlier turns, so masks were computed per assistant turn "
                          "from rendered offsets")
        # Nothing after the last answer's end-of-turn token: what the template adds there is never generated.
        tokens = tokens[:spans[-1][1]]
        if not mask_prompt:
            spans = [(1, len(tokens))]
    bos = tokenizer.bos_token_id
    extra = 0
    while bos is not None and len(tokens) > extra + 1 and tokens[extra] == tokens[extra + 1] == bos:
        extra += 1                                  # a template's BOS plus the tokenizer's: keep one
    if extra:
        tokens = tokens[extra:]
        spans = [(max(a - extra, 1), b - extra) for a, b in spans]
    tokens = np.asarray(tokens, dtype=np.int32)
    supervised = np.zeros(len(tokens), dtype=bool)
    for a, b in spans:
        supervised[max(a, 1):b] = True
    return Example(tokens, supervised)


def fit_length(ex, max_seq_length):
    """Truncate a row to max_seq_length tokens, keeping its supervised tokens where they fit: the
    window ends at the last supervised token when that is past the limit."""
    if len(ex.tokens) <= max_seq_length:
        return ex
    last = int(np.nonzero(ex.supervised)[0][-1]) + 1 if ex.supervised.any() else max_seq_length
    end = max(last, max_seq_length)
    start = end - max_seq_length
    supervised = ex.supervised[start:end].copy()
    supervised[0] = False                       # the first token of a row is never a target
    return Example(ex.tokens[start:end], supervised)


@dataclass
class EncodeReport:
    rows: int = 0
    truncated: int = 0
    dropped: int = 0
    notes: set = None


def encode_rows(tokenizer, rows, fmt, mask_prompt, max_seq_length, where, long_rows="truncate", train_on="all"):
    """Encode every row (every problem reported at once); a row longer than max_seq_length is
    truncated or dropped per `long_rows`, and counted. Returns (examples, EncodeReport)."""
    eot_ids = end_of_turn_ids(tokenizer)
    try:
        if fmt != "text":          # once for the file, not once per row
            check_chat_template(tokenizer)
        if fmt == "tools":
            check_renders_tools(tokenizer)
    except UserError as e:
        raise UserError([f"{where}: {p}" for p in e.problems]) from None
    report = EncodeReport(rows=len(rows), notes=set())
    examples, problems = [], []
    for i, row in enumerate(rows, start=1):
        try:
            ex = encode_row(tokenizer, row, fmt, mask_prompt, eot_ids, train_on, report.notes)
        except UserError as e:
            problems += [f"{where}:{i}: {p}" for p in e.problems]
            continue
        if not ex.supervised.any():
            problems.append(f"{where}:{i}: no token to train on: give the row an answer")
            continue
        if len(ex.tokens) > max_seq_length:
            if long_rows == "drop":
                report.dropped += 1
                continue
            report.truncated += 1
            ex = fit_length(ex, max_seq_length)
            if not ex.supervised.any():
                problems.append(f"{where}:{i}: no token left to train on after truncating to --max-seq-length "
                                f"{max_seq_length}; raise --max-seq-length or shorten the row")
                continue
        examples.append(ex)
    UserError.raise_if(problems)
    return examples, report
