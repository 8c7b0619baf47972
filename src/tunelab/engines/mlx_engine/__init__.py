"""The MLX engine: mlx-lm models and LoRA layers; Apple silicon (Metal) and, for correctness, Linux CPUs.

Same contract as the torch engine (engines/base.py), on the same numpy batches and adapter files.
The loss is computed the same way: the body runs over the batch, the output projection and the
cross-entropy only at supervised positions (their indices come from the numpy mask, so no dynamic
shapes reach MLX). Gradients flow only where a trainable array depends on them: nothing is
computed backwards below the lowest adapted block.

On Linux, `mlx[cpu]` links a reference BLAS tens of times slower than OpenBLAS: this engine is
correct there, not fast. Use it for real training on Apple silicon.
"""

import contextlib
import json
import os
import shutil
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from tunelab import adapters, models, optimizers
from tunelab.engines.base import StepResult, resident_peak
from tunelab.errors import UserError

name = "mlx"

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


PREFIX_CACHE_BUDGET = 2 * 1024**3   # bytes of cached activations; rows beyond it are recomputed
PREFIX_CACHE_MODELS = ("llama", "qwen2")   # block call signature known: block(h, mask, cache)


@dataclass
class PrefixCache:
    """Output of blocks [0, first) for each row, computed once (those blocks are frozen and have no
    dropout), as the torch engine keeps it."""
    first: int
    budget: int = PREFIX_CACHE_BUDGET
    rows: dict = field(default_factory=dict)   # batch key -> array [T, H]
    used: int = 0
    full: bool = False


@dataclass
class Model:
    model: nn.Module          # an mlx-lm Model (body at .model, head tied or .lm_head)
    tokenizer: object         # the Hugging Face tokenizer, as the torch engine has it
    device: str
    dtype: object
    model_dir: Path
    spec: object = None       # adapters.AdapterSpec when adapters are attached
    quantized: tuple = None   # (bits, group_size) when the base weights are quantized
    prefix: PrefixCache = None
    seed: int = 0             # attach_lora's seed: with dropout, step k draws its masks from seed and k
    steps: int = 0            # training steps taken (saved in checkpoints, so a resumed run draws the same masks)
    world: object = None      # distributed.World when training in several processes (mlx.launch)


def pick_device(device="auto"):
    if device == "cuda":
        raise UserError("--device cuda: the mlx engine runs on Apple GPUs (Metal) and CPUs; "
                        "use --engine torch for CUDA")
    has_gpu = mx.metal.is_available()
    if device == "mps" and not has_gpu:
        raise UserError("--device mps: no Metal GPU is available here")
    if device == "cpu" or not has_gpu:
        return mx.cpu, "cpu", "as asked" if device == "cpu" else "no Metal GPU found"
    return mx.gpu, "gpu", "as asked" if device == "mps" else "a Metal GPU is available"


def pick_dtype(device_name, dtype="auto"):
    if dtype != "auto":
        if dtype not in DTYPES:
            raise UserError(f"--dtype {dtype}: the mlx engine computes in {', '.join(DTYPES)}")
        return DTYPES[dtype], "as asked"
    if device_name == "gpu":
        return mx.bfloat16, "the Metal GPU computes bfloat16 fastest"
    return mx.float32, "float32 is exact on CPU"


def _mlx_overrides(config):
    """What config.json needs for mlx-lm: it reads rope_theta only at the top level, where transformers 5
    writes it under rope_parameters (mlx-lm would silently use its default otherwise)."""
    extra = {}
    rope = config.get("rope_parameters") or {}
    if "rope_theta" not in config and "rope_theta" in rope:
        extra["rope_theta"] = rope["rope_theta"]
    if rope.get("rope_type", "default") not in ("default", None) and "rope_scaling" not in config:
        extra["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    extra.setdefault("tie_word_embeddings", config.get("tie_word_embeddings", False))
    return extra


def load(model_dir, device="auto", dtype="auto", log=print, training=False, quantize=None):
    """Load an HF folder with mlx-lm; `quantize` = (bits, group_size) quantizes the linear layers (QLoRA)."""
    from mlx_lm.utils import load_model
    from transformers import AutoTokenizer

    stream, dev_name, dev_reason = pick_device(device)
    mx.set_default_device(stream)
    dt, dt_reason = pick_dtype(dev_name, dtype)
    log(f"Device: mlx {dev_name} ({dev_reason}); dtype: {_dtype_name(dt)} ({dt_reason})")
    config = models.read_config(model_dir)
    try:
        model, _ = load_model(Path(model_dir), model_config=_mlx_overrides(config))
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False)
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"{model_dir}: mlx-lm could not load this model: {e}") from None
    quantized = None
    if _is_quantized(model):                  # a model saved quantized (e.g. an mlx-community 4-bit one)
        saved = config.get("quantization", {})
        quantized = (saved.get("bits"), saved.get("group_size"))
    else:
        model.set_dtype(dt)
    if quantize and quantized:
        if tuple(quantize) != tuple(quantized):
            raise UserError(f"--quantize {quantize[0]} (groups of {quantize[1]}): {model_dir} is already quantized "
                            f"({quantized[0]} bits, groups of {quantized[1]}); leave --quantize out")
        quantize = None                       # already as asked
    if quantize:
        bits, group_size = quantize
        nn.quantize(model, group_size=group_size, bits=bits,
                    class_predicate=lambda _, m: isinstance(m, nn.Linear) and m.weight.shape[-1] % group_size == 0)
        quantized = (bits, group_size)
        taken = _blocks_from_gguf(model, model_dir, config, bits, group_size, dt)
        source = f"; {taken} taken as they are from the GGUF file's own blocks" if taken else ""
        log(f"Quantized the linear layers to {bits} bits (groups of {group_size}){source}; "
            f"adapters stay {_dtype_name(dt)}")
    model.freeze()
    model.eval()
    mx.eval(model.parameters())
    if mx.metal.is_available() and dev_name == "gpu":
        _wire_memory()
    return Model(model, tokenizer, dev_name, dt, Path(model_dir), quantized=quantized)


def _blocks_from_gguf(model, model_dir, config, bits, group_size, dtype):
    """Where the model was imported from a GGUF file whose blocks already are `bits`-bit affine groups of
    `group_size` (Q4_1 is 4-bit, group 32: w = d * q + m), load those blocks into the quantized layers
    as they are, instead of quantizing the dequantized weights again (which would round a second time).
    Returns how many layers were taken from the file."""
    record = Path(model_dir) / "tunelab_import.json"
    if not record.is_file():
        return 0
    source = Path(json.loads(record.read_text(encoding="utf-8"))["source"])
    if not source.is_file():
        return 0
    arrays = mx.load(str(source))
    permuted = config.get("model_type") == "llama"        # llama.cpp interleaves llama's Q/K rows
    heads = {"self_attn.q_proj": config["num_attention_heads"], "self_attn.k_proj": config["num_key_value_heads"]}
    gguf_names = {v.removesuffix(".weight"): k.removesuffix(".weight") for k, v in models.BLOCK_TENSORS.items()
                  if k.endswith(".weight")}
    taken = 0
    for path, layer in model.named_modules():
        if not isinstance(layer, nn.QuantizedLinear) or not path.startswith("model.layers."):
            continue
        _, _, block, key = path.split(".", 3)
        stem = f"blk.{block}.{gguf_names.get(key, '?')}"
        if f"{stem}.scales" not in arrays:
            continue
        weight, scales, biases = arrays[f"{stem}.weight"], arrays[f"{stem}.scales"], arrays[f"{stem}.biases"]
        if weight.shape != layer.weight.shape or scales.shape != layer.scales.shape:
            continue                                        # other bits or group size in the file
        if permuted and key in heads:
            order = mx.array(models.unpermute_rows(np.arange(weight.shape[0]), heads[key]))
            weight, scales, biases = weight[order], scales[order], biases[order]
        layer.weight, layer.scales, layer.biases = weight, scales.astype(dtype), biases.astype(dtype)
        taken += 1
    return taken


def _wire_memory():
    """Keep the model's memory wired on Apple silicon, as mlx-lm does (unified memory would page it)."""
    limit = mx.metal.device_info().get("max_recommended_working_set_size")
    if limit:
        mx.set_wired_limit(limit)


def _is_quantized(model):
    return any(isinstance(m, nn.QuantizedLinear) for _, m in model.named_modules())


def _dtype_name(dt):
    return str(dt).replace("mlx.core.", "")


def _get(module, dotted):
    for part in dotted.split("."):
        module = getattr(module, part)
    return module


def attach_lora(m, spec, seed=0):
    """Replace spec's linear layers with LoRA layers (A uniform in +-1/sqrt(in), B zero: PEFT's
    Kaiming-uniform bound), scale = spec.scale. Only the adapters train; for a full fine-tune
    (spec.full), every weight of spec's blocks does, as mlx-lm's `fine_tune_type: full`."""
    from mlx_lm.tuner.dora import DoRALinear
    from mlx_lm.tuner.lora import LoRALinear

    layer_type = DoRALinear if spec.dora else LoRALinear
    mx.random.seed(seed)
    m.seed, m.steps = seed, 0
    m.model.freeze()
    if spec.full:
        _attach_full(m, spec)
        return
    layers = m.model.layers
    missing = []
    for module in spec.modules():
        _, _, block, key = module.split(".", 3)
        block = int(block)
        if block >= len(layers):
            missing.append(module)
            continue
        try:
            linear = _get(layers[block], key)
        except AttributeError:
            missing.append(module)
            continue
        if not isinstance(linear, (nn.Linear, nn.QuantizedLinear)):
            missing.append(module)
            continue
        lora = layer_type.from_base(linear, r=spec.rank, dropout=spec.dropout, scale=spec.scale)
        layers[block].update_modules(tree_unflatten([(key, lora)]))
    if missing:
        raise UserError(f"the model has no module {missing[0]} to adapt ({len(missing)} missing); "
                        "check --lora-keys and --num-layers")
    m.model.freeze()
    m.model.unfreeze(keys=["lora_a", "lora_b", "m"] if spec.dora else ["lora_a", "lora_b"], strict=False)
    m.spec = spec
    first = min(spec.layers)
    if first > 0 and getattr(m.model.args, "model_type", "") in PREFIX_CACHE_MODELS:
        m.prefix = PrefixCache(first)


def _attach_full(m, spec):
    layers = m.model.layers
    if m.quantized:
        raise UserError("full fine-tuning trains the weights themselves, which a quantized base cannot: leave "
                        "--quantize out, or use --fine-tune-type lora")
    if max(spec.layers) >= len(layers):
        raise UserError(f"the model has {len(layers)} blocks; the fine-tune trains block {max(spec.layers)}")
    for i in spec.layers:
        layers[i].unfreeze()
    m.spec = spec
    first = min(spec.layers)
    if first > 0 and getattr(m.model.args, "model_type", "") in PREFIX_CACHE_MODELS:
        m.prefix = PrefixCache(first)


def _full_weights(m):
    """{name: array} of the weights a full fine-tune trains (every one of its blocks')."""
    blocks = tuple(f"model.layers.{i}." for i in m.spec.layers)
    return {n: v for n, v in tree_flatten(m.model.parameters()) if n.startswith(blocks)}


def grad_checkpoint(m):
    """Gradient checkpointing, as mlx-lm's: each trained block keeps only its input for the backward pass
    (mx.checkpoint), which runs it again. Only this model's blocks change (each gets a class of its own),
    not every model of their class."""
    for i in m.spec.layers:
        layer = m.model.layers[i]
        kind = type(layer)
        layer.__class__ = type(kind.__name__, (kind,), {"__call__": _checkpointed(kind.__call__)})


def _checkpointed(call):
    def checkpointed(self, *args, **kwargs):
        def inner(params, *args, **kwargs):
            self.update(params)
            return call(self, *args, **kwargs)
        return mx.checkpoint(inner)(self.trainable_parameters(), *args, **kwargs)
    return checkpointed


def sizes(m):
    """(bytes of all weights, number of trained values, bytes of the trained arrays)."""
    every = [v for _, v in tree_flatten(m.model.parameters())]
    trained = [v for _, v in tree_flatten(m.model.trainable_parameters())]
    return sum(v.nbytes for v in every), sum(v.size for v in trained), sum(v.nbytes for v in trained)


def _lora_modules(m):
    """{module path inside the causal LM: mlx-lm LoRALinear or DoRALinear}."""
    from mlx_lm.tuner.dora import DoRALinear
    from mlx_lm.tuner.lora import LoRALinear

    return {path: module for path, module in m.model.named_modules() if isinstance(module, (LoRALinear, DoRALinear))}


def set_adapter(m, spec, tensors):
    """Attach adapters (if not yet) and load numpy (A [r, in], B [out, r]) tensors into them."""
    if m.spec is None:
        attach_lora(m, spec)
    if spec.full:
        pairs = adapters.pair_with_weights(tensors, _full_weights(m))
        names = {id(weight): name for name, weight in _full_weights(m).items()}
        m.model.load_weights([(names[id(weight)], mx.array(np.asarray(array)).astype(weight.dtype))
                              for weight, array in pairs], strict=False)
        mx.eval(m.model.parameters())
        return

    def shapes(layer):
        return [layer.lora_a.shape[::-1], layer.lora_b.shape[::-1]] + ([layer.m.shape] if m.spec.dora else [])

    for layer, a, b, *magnitude in adapters.pair_with_layers(tensors, _lora_modules(m), shapes):
        layer.lora_a = mx.array(np.ascontiguousarray(np.asarray(a, dtype=np.float32).T))
        layer.lora_b = mx.array(np.ascontiguousarray(np.asarray(b, dtype=np.float32).T))
        if magnitude:
            layer.m = mx.array(np.asarray(magnitude[0], dtype=np.float32))
    mx.eval(m.model.parameters())


def adapter_tensors(m):
    if m.spec.full:
        return {n: np.array(v.astype(mx.float32)) for n, v in _full_weights(m).items()}

    def arrays(layer):
        out = (np.array(layer.lora_a.astype(mx.float32)).T.copy(), np.array(layer.lora_b.astype(mx.float32)).T.copy())
        return out + ((np.array(layer.m.astype(mx.float32)),) if m.spec.dora else ())

    return {module: arrays(layer) for module, layer in _lora_modules(m).items()}


def savings(m, rows, tokens, common=0):
    lines = ["output projection and loss only at supervised positions; no backward below the lowest adapted block"]
    if m.prefix is not None:
        need = tokens * m.model.args.hidden_size * m.dtype.size
        fits = "" if need <= m.prefix.budget else f"; only about {m.prefix.budget / need:.0%} of rows fit the budget"
        lines.append(f"frozen-prefix cache: blocks 0-{m.prefix.first - 1} run once per row, not once per epoch "
                     f"({need / 1e6:,.0f} MB for {rows} rows{fits})")
    return lines


def make_optimizer(m, learning_rate, name="adam", **settings):
    """MLX's optimizer `name` (optimizers.NAMES) with `settings` (as optimizers.settings completes them; MLX's
    defaults for what is left out); Adam and AdamW with bias_correction: the update torch.optim's make (MLX's
    default leaves it out)."""
    settings = {**optimizers.settings(name), **settings}
    if name in ("adam", "adamw"):
        settings.update(betas=list(settings["betas"]), bias_correction=True)
    if name == "adafactor":
        settings["eps"] = tuple(settings["eps"])
    kinds = {"adam": optim.Adam, "adamw": optim.AdamW, "sgd": optim.SGD, "adafactor": optim.Adafactor,
             "muon": optim.Muon}
    return kinds[name](learning_rate=learning_rate, **settings)


def training_state(m, optimizer):
    """Adam's state (moments and step count), by the trained arrays' names, and the steps taken (MLX's
    global random key cannot be read back, so each step's dropout masks come from the seed and the step)."""
    mx.eval(optimizer.state)
    state = {f"optimizer/{name}": np.array(value) for name, value in tree_flatten(optimizer.state)}
    return {**state, "rng/steps": np.array([m.steps], dtype=np.int64)}


def load_training_state(m, optimizer, arrays):
    """Put `training_state`'s arrays back into the optimizer."""
    if "rng/steps" in arrays:
        m.steps = int(arrays["rng/steps"][0])
    saved = {k[len("optimizer/"):]: v for k, v in arrays.items() if k.startswith("optimizer/")}
    if not saved:
        return
    optimizer.init(m.model.trainable_parameters())
    names = [name for name, _ in tree_flatten(optimizer.state)]
    missing = [n for n in names if n not in saved]
    if missing:
        raise UserError(f"the checkpoint's optimizer state lacks {missing[0]} ({len(missing)} missing)")
    optimizer.state = tree_unflatten([(n, mx.array(saved[n])) for n in names])
    mx.eval(optimizer.state)


def _head(m, hidden):
    lm = m.model
    if getattr(lm.args, "tie_word_embeddings", False) or not hasattr(lm, "lm_head"):
        return lm.model.embed_tokens.as_linear(hidden)
    return lm.lm_head(hidden)


def _blocks(h, layers):
    from mlx_lm.models.base import create_attention_mask

    mask = create_attention_mask(h, None)
    for layer in layers:
        h = layer(h, mask, cache=None)
    return h


def _prefix_hidden(m, body, inputs, batch):
    """Output of the frozen blocks below the adapted ones [B, T, H], from the cache where it has the rows."""
    cache, keys = m.prefix, batch.keys
    if keys is None or any(k not in cache.rows for k in keys):
        hidden = mx.stop_gradient(_blocks(body.embed_tokens(inputs), body.layers[:cache.first]))
        mx.eval(hidden)
        if keys is not None and not cache.full:
            for row, key in enumerate(keys):
                value = hidden[row, :int(batch.lengths[row]) - 1]
                if cache.used + value.nbytes > cache.budget:
                    cache.full = True
                    break
                cache.rows[key] = value
                cache.used += value.nbytes
        return hidden
    width = inputs.shape[1]
    return mx.stack([mx.pad(cache.rows[k], [(0, width - cache.rows[k].shape[0]), (0, 0)]) for k in keys])


def fill_prefix(m, batches):
    """Put each row's frozen-prefix output into the cache, several rows a product; stops when it is full."""
    for batch in batches:
        if m.prefix.full:
            break
        _prefix_hidden(m, m.model.model, mx.array(batch.tokens[:, :-1]), batch)


def _hidden(m, inputs, batch):
    """The body's final hidden states [B, T, H]. Right padding: every real position attends only to
    earlier real ones under the causal mask, so padding changes nothing that is scored."""
    body = m.model.model
    if m.prefix is None:
        return body(inputs)
    start = _prefix_hidden(m, body, inputs, batch)
    return body.norm(_blocks(start, body.layers[m.prefix.first:]))


def _token_losses(m, batch):
    """Cross-entropy of each supervised target [N] (logits only where there is a label), and its row [N]."""
    inputs = mx.array(batch.tokens[:, :-1])
    targeted = batch.supervised[:, 1:]
    rows, cols = np.nonzero(targeted)
    width = inputs.shape[1]
    hidden = _hidden(m, inputs, batch)                                       # [B, T-1, H]
    picked = hidden.reshape(-1, hidden.shape[-1])[mx.array(rows * width + cols)]
    logits = _head(m, picked).astype(mx.float32)                             # [N, V]
    targets = mx.array(batch.tokens[:, 1:][targeted])
    return nn.losses.cross_entropy(logits, targets, reduction="none"), rows


def train_step(m, optimizer, batches, learning_rate=None, max_grad_norm=None):
    """One optimizer step over one batch or several micro-batches (gradients accumulated, one backward each),
    at `learning_rate` when given, the gradients' global norm clipped to `max_grad_norm` when given."""
    m.model.train()
    if m.spec.dropout:
        mx.random.seed(m.seed * 1_000_003 + m.steps)
    m.steps += 1
    batches = batches if isinstance(batches, (list, tuple)) else [batches]
    total = sum(int(b.supervised[:, 1:].sum()) for b in batches)
    distributed = m.world is not None and m.world.size > 1
    if distributed:   # this process's rows of the global batch: the loss is over every process's tokens
        total = int(reduce_sum(m, [total])[0])
    loss_sum, grads = 0.0, None
    for batch in batches:
        if not batch.tokens.shape[0]:    # no rows in this process in this batch
            continue

        def loss_fn(model):        # `model` is m.model, its trainable arrays swapped in by value_and_grad
            losses, _ = _token_losses(m, batch)
            return losses.sum() / total

        part, part_grads = nn.value_and_grad(m.model, loss_fn)(m.model)
        grads = part_grads if grads is None else tree_map(mx.add, grads, part_grads)
        mx.eval(grads, part)
        loss_sum += float(part) * total
    if distributed:
        if grads is None:
            grads = tree_map(mx.zeros_like, m.model.trainable_parameters())
        grads = tree_map(lambda g: mx.distributed.all_sum(g, stream=mx.cpu), grads)
        with _deadline():
            mx.eval(grads)
        loss_sum = reduce_sum(m, [loss_sum])[0]
    value = loss_sum / total
    norm = float(mx.sqrt(sum((g.astype(mx.float32) ** 2).sum() for _, g in tree_flatten(grads))))
    finite = bool(np.isfinite(value)) and bool(np.isfinite(norm))
    if finite:   # a step with a non-finite loss or gradient changes nothing
        if max_grad_norm is not None and norm > max_grad_norm:
            grads = tree_map(lambda g: g * (max_grad_norm / (norm + 1e-6)), grads)
        if learning_rate is not None:
            optimizer.learning_rate = learning_rate
        optimizer.update(m.model, grads)
        mx.eval(m.model.trainable_parameters(), optimizer.state)
    return StepResult(value, total, finite, norm)


def eval_loss(m, batch):
    """Summed cross-entropy and supervised-token count of each row: two numpy arrays [B]."""
    m.model.eval()
    losses, rows = _token_losses(m, batch)
    values = np.array(losses.astype(mx.float32)).astype(np.float64)
    size = batch.tokens.shape[0]
    return np.bincount(rows, weights=values, minlength=size), np.bincount(rows, minlength=size)


def logits(m, tokens):
    """Full logits [B, T, V] as float32 numpy (for tests and checks)."""
    m.model.eval()
    return np.array(m.model(mx.array(np.asarray(tokens))).astype(mx.float32))


def _pick(scores, temp, top_p, rng):
    """Next token from float32 scores [V]: argmax, or a sample at `temp` within top_p."""
    if temp <= 0:
        return int(np.argmax(scores))
    z = scores / temp
    probs = np.exp(z - z.max())
    probs /= probs.sum()
    if top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        sorted_p = probs[order]
        keep = np.cumsum(sorted_p) - sorted_p < top_p
        probs = np.zeros_like(probs)
        probs[order[keep]] = sorted_p[keep]
        probs /= probs.sum()
    return int(rng.choice(len(probs), p=probs))


def generate(m, prompt_ids, max_tokens=256, temp=0.0, top_p=1.0, seed=0, stop_ids=()):
    """Yield generated token ids one at a time (mlx-lm's KV cache), stopping at a stop id (not yielded)."""
    for token, _, _ in _steps(m, prompt_ids, dict(max_tokens=max_tokens, temp=temp, top_p=top_p, seed=seed,
                                                    stop_ids=stop_ids)):
        yield token


def _steps(m, prompt_ids, settings, top_logprobs=None):
    """(token, logprob, top) for one prompt, as generate_steps describes them."""
    from mlx_lm.models.cache import make_prompt_cache

    m.model.eval()
    rng = np.random.default_rng(settings["seed"])
    cache = make_prompt_cache(m.model)
    ids = mx.array([[int(t) for t in prompt_ids]])
    for _ in range(settings["max_tokens"]):
        out = m.model(ids, cache=cache)
        scores = np.array(out[0, -1].astype(mx.float32))
        token = _pick(scores, settings["temp"], settings["top_p"], rng)
        if token in settings["stop_ids"]:
            return
        logprob, top = None, None
        if top_logprobs is not None:
            shifted = scores.astype(np.float64) - scores.max()
            logprobs = shifted - np.log(np.exp(shifted).sum())
            order = np.argsort(-logprobs, kind="stable")[:top_logprobs]
            logprob, top = float(logprobs[token]), [(int(t), float(logprobs[t])) for t in order]
        yield token, logprob, top
        ids = mx.array([[token]])


def generate_batch(m, prompts, max_tokens=256, temp=0.0, top_p=1.0, seed=0, stop_ids=()):
    """Answers for several prompts, one prompt at a time (each exactly what `generate` gives)."""
    return [list(generate(m, p, max_tokens, temp, top_p, seed, stop_ids)) for p in prompts]


def generate_steps(m, prompts, rows, top_logprobs=None, cancelled=frozenset()):
    """The torch engine's generate_steps, a prompt at a time: {row: (token, logprob, top)} per token."""
    for row, prompt in enumerate(prompts):
        for entry in _steps(m, prompt, rows[row], top_logprobs):
            if row in cancelled:
                break
            yield {row: entry}


def remove_adapter(m):
    """Take the adapters off, leaving the base model as it was loaded (nothing merged)."""
    if m.spec is None:
        return
    plain = [(path, layer.linear) for path, layer in _lora_modules(m).items()]
    if plain:
        m.model.update_modules(tree_unflatten(plain))
    m.model.freeze()
    m.spec = None
    m.prefix = None


def fuse(m, save_dir, dequantize=True):
    """Merge the adapters into the weights and save an HF folder (safetensors + config + tokenizer)."""
    from mlx_lm.utils import save_model

    fused = [(path, layer.fuse(dequantize=dequantize)) for path, layer in _lora_modules(m).items()]
    if fused:
        m.model.update_modules(tree_unflatten(fused))
    if dequantize and _is_quantized(m.model):
        from mlx_lm.utils import dequantize_model

        m.model = dequantize_model(m.model)
        m.quantized = None
    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    save_model(save_dir, m.model, donate_model=False)
    config = models.read_config(m.model_dir)
    config.update(_mlx_overrides(config))
    config["torch_dtype"] = config["dtype"] = _dtype_name(m.dtype)
    config.pop("quantization", None)
    config.pop("quantization_config", None)
    if m.quantized:
        bits, group_size = m.quantized
        config["quantization"] = {"bits": bits, "group_size": group_size}
    (save_dir / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    m.tokenizer.save_pretrained(str(save_dir))
    for extra in ("generation_config.json", "chat_template.jinja"):
        if (m.model_dir / extra).is_file() and not (save_dir / extra).is_file():
            shutil.copy(m.model_dir / extra, save_dir / extra)
    m.spec = None
    m.prefix = None


def init_distributed(world):
    """Join mlx.launch's group (ring, MPI or another backend MLX picked from the launch)."""
    mx.distributed.init()


def finish_distributed():
    """Nothing to close: MLX's group ends with the process."""


@contextlib.contextmanager
def _deadline():
    """MLX's collectives wait for ever for a process that died (and mlx.launch leaves the others running):
    past distributed.TIMEOUT seconds in one, this process says so and exits."""
    from tunelab import distributed

    def give_up():
        rank = mx.distributed.init().rank()
        print(f"tunelab: rank {rank}: no answer from the other processes in {distributed.timeout()} s (one of "
              f"them has stopped?); stopping", file=sys.stderr, flush=True)
        os._exit(1)

    timer = threading.Timer(distributed.timeout(), give_up)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def _all_sum(array):
    """The sum over every process of `array`, evaluated (within the deadline)."""
    summed = mx.distributed.all_sum(array, stream=mx.cpu)
    with _deadline():
        mx.eval(summed)
    return summed


def reduce_sum(m, values):
    """The sums over every process of `values` (floats; counts stay exact below 2^24); the values themselves
    in one process."""
    if m.world is None or m.world.size == 1:
        return [float(v) for v in values]
    return [float(v) for v in np.array(_all_sum(mx.array([float(v) for v in values], dtype=mx.float32)))]


def share(value):
    """Rank 0's `value` (any picklable object) on every process: its bytes summed with zeros elsewhere."""
    import pickle

    group = mx.distributed.init()
    raw = pickle.dumps(value) if group.rank() == 0 else b""
    size = int(np.array(_all_sum(mx.array([len(raw)], dtype=mx.int32)))[0])
    mine = np.zeros(size, dtype=np.int32)
    if group.rank() == 0:
        mine[:] = np.frombuffer(raw, dtype=np.uint8)
    return pickle.loads(np.array(_all_sum(mx.array(mine))).astype(np.uint8).tobytes())


def clear_cache(threshold=None):
    """Free MLX's cache of buffers when it holds more than `threshold` bytes (None: 0, mlx-lm's default,
    which frees it after every step)."""
    if mx.get_cache_memory() > (threshold or 0):
        mx.clear_cache()


def peak_memory():
    peak = mx.get_peak_memory() if hasattr(mx, "get_peak_memory") else 0
    if peak:
        return int(peak)
    return resident_peak()
