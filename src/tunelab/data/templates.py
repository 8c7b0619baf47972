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


def _render(tokenizer, messages, add_generation_prompt):
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    return tokenizer.encode(text, add_special_tokens=False)


def _chat_messages(row, fmt):
    if fmt == "chat":
        return row["messages"]
    return [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["completion"]}]


def split_answer(row, fmt):
    """(prompt messages, the answer to be generated) of a chat or completions row."""
    messages = _chat_messages(row, fmt)
    return messages[:-1], messages[-1]["content"]


def prompt_tokens(tokenizer, messages):
    """Token ids of the prompt messages rendered with the chat template, ready for the answer."""
    if not getattr(tokenizer, "chat_template", None):
        raise UserError("the model's tokenizer has no chat template, so chat rows cannot be rendered; "
                        "use a chat (instruct) model")
    return _render(tokenizer, messages, add_generation_prompt=True)


def encode_row(tokenizer, row, fmt, mask_prompt, eot_ids=None):
    """Return the Example for one row of format `fmt` ('chat', 'completions' or 'text')."""
    eot_ids = end_of_turn_ids(tokenizer) if eot_ids is None else eot_ids
    if fmt == "text":
        tokens = tokenizer.encode(row["text"], add_special_tokens=True)
        if tokenizer.eos_token_id is not None and tokens[-1] != tokenizer.eos_token_id:
            tokens.append(tokenizer.eos_token_id)
        prompt_len = 1
    else:
        if not getattr(tokenizer, "chat_template", None):
            raise UserError("the model's tokenizer has no chat template, so chat and completions rows "
                            "cannot be rendered; use a chat (instruct) model or 'text' rows")
        messages = _chat_messages(row, fmt)
        tokens = _render(tokenizer, messages, add_generation_prompt=False)
        prompt = _render(tokenizer, messages[:-1], add_generation_prompt=True)
        if tokens[:len(prompt)] != prompt:
            raise UserError("the chat template does not render the prompt as a prefix of the whole "
                            "conversation, so the prompt cannot be masked exactly")
        prompt_len = len(prompt) if mask_prompt else 1
        # Keep the sequence up to the answer's end-of-turn token; what the template adds after it
        # (a newline) is never generated.
        ends = [i for i in range(len(prompt), len(tokens)) if tokens[i] in eot_ids]
        if ends:
            tokens = tokens[:ends[0] + 1]
    tokens = np.asarray(tokens, dtype=np.int32)
    supervised = np.zeros(len(tokens), dtype=bool)
    supervised[max(prompt_len, 1):] = True
    return Example(tokens, supervised)


def encode_rows(tokenizer, rows, fmt, mask_prompt, max_seq_length, where):
    """Encode every row; truncate rows longer than max_seq_length and say how many were."""
    eot_ids = end_of_turn_ids(tokenizer)
    examples, truncated, problems = [], 0, []
    for i, row in enumerate(rows, start=1):
        try:
            ex = encode_row(tokenizer, row, fmt, mask_prompt, eot_ids)
        except UserError as e:
            raise UserError([f"{where}:{i}: {p}" for p in e.problems]) from None
        if len(ex.tokens) > max_seq_length:
            truncated += 1
            ex = Example(ex.tokens[:max_seq_length], ex.supervised[:max_seq_length])
        if not ex.supervised.any():
            problems.append(f"{where}:{i}: no token left to train on (the answer lies past "
                            f"--max-seq-length {max_seq_length}); raise --max-seq-length or shorten the row")
        examples.append(ex)
    UserError.raise_if(problems)
    return examples, truncated
