"""The loss of Llama-family models (llama, qwen2), computed with only the work it needs.

The plain computation runs every block at every position and the output projection at every
position. The loss reads the last hidden state only at the supervised positions, so:

- the top block computes keys and values at every position (the supervised queries attend to
  them) but its queries, attention output, output projection and MLP only at supervised positions;
- the final norm, the output projection and the cross-entropy run at supervised positions, in one
  pass over the output weight for the forward and backward pass (`SupervisedCrossEntropy`): at a
  few dozen positions the output layer is bound by reading its weight (113 MB for SmolLM2 in
  float32), and the plain computation reads it twice; on SmolLM2 at 24 positions, forward and
  backward take 33 ms this way against 44 ms on 2 CPU cores;
- on a CPU, attention is two batched products and a float32 softmax, keys and values shared by
  their query heads without copies: PyTorch's fused CPU attention kernel takes 2x as long forward
  and backward in bfloat16, and 1-1.3x in float32 (GPUs keep the fused kernel);
- on a CPU in float32, products with the frozen weights go through oneDNN's matmul (`_dense`):
  PyTorch's own float32 products call MKL, which took 10-20% longer at a W1 row (~130 positions),
  5-14% at a W2 batch and 25% longer for the output layer at a few dozen positions on the AMD CPUs
  measured (bfloat16 products already use oneDNN). oneDNN builds a product for each exact shape,
  so on a CPU, in float32 and in bfloat16, positions (and the top block's supervised rows) are
  padded with zeros to a multiple of 8 (`_padding`);
- on a CPU, the frozen weights of the adapted blocks and the output layer, read at every step, are
  laid out once in oneDNN's own order for its products (`plan_packing`, `_packed`), within a memory
  budget, instead of being rearranged by every product;
- LoRA layers that read the same input (q/k/v, gate/up) share one autograd function and one pass
  over the input for their low-rank products; in bfloat16 on a CPU those products run in bfloat16
  on oneDNN, as autocast would run them (`LoraLinearBf16`), not in float32 as PEFT runs them;
- positions at the start that every row of a batch has in common (a fixed system prompt) are
  computed once for the batch (`shared_length`, `_pack`): with causal attention their hidden
  states are the same in every row.

Each is the same arithmetic as the plain computation at the positions that matter, but for the
bfloat16 low-rank products (tests compare losses and gradients with transformers' and PEFT's own
forward). A plain LoRA layer (no dropout, no DoRA) runs as one autograd function, `LoraLinear` or
`LoraLinearBf16`; other layers PEFT put in are called as they are.
"""

import functools
import os

import torch
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary

from tunelab.data.batching import common_start

FAMILIES = ("llama", "qwen2")
HEAD_CHUNK_BYTES = 4_718_592   # output-layer weight a step on CPUs (2048 float32 or 4096 bfloat16 rows of
                               # SmolLM2's: stays in cache; 2-4x as much took 2-19% longer)
DEVICE_HEAD_CHUNK = 16384     # output-layer rows a chunk on GPUs: logits [N, 16384] at a time, not [N, vocabulary]
ROW_BUCKET = 8      # products on CPUs take a multiple of this many rows (see `_padding`)
PACKED_BUDGET = 256 * 2**20   # bytes of frozen weights laid out for oneDNN a model may keep (`plan_packing`)
SHARED_MIN = 16     # positions a batch's rows must have in common at their start to compute them once (`shared_length`)


@functools.cache
def _onednn_linear():
    """oneDNN's linear op (the one PyTorch's compiler emits for CPU linear layers), where this build
    has it and it computes x W^T + b. Looked up at the first product, after `cap_onednn_caches`."""
    op = getattr(torch.ops.mkldnn, "_linear_pointwise", None) if torch.backends.mkldnn.is_available() else None
    if op is None:
        return None
    try:
        x, weight, bias = torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, 4.0], [5.0, 6.0], [7.0, 8.0]]), torch.ones(3)
        return op if torch.equal(op(x, weight, bias, "none", [], ""), F.linear(x, weight, bias)) else None
    except (RuntimeError, NotImplementedError):
        return None


def cap_onednn_caches(entries=256):
    """Keep oneDNN's caches of built products (its primitive cache and PyTorch's cache around it)
    to `entries` each, for float32 work on a CPU. Each float32 product shape is built once (~0.5 ms)
    and kept (~0.6 MB); `_padding` holds a W1 run to ~125 shapes, and the cap bounds the rest (with
    the default 1024 entries a run over many lengths kept ~0.3 GB more). In bfloat16 caps made
    steps 10-25% slower, so it stays off there. Takes effect only before oneDNN's first product
    in the process; a value the user set in the environment wins."""
    for name in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY"):
        os.environ.setdefault(name, str(entries))


def _padding(size, like):
    """Zero rows (or positions) to add to `size` of them so that `like`'s products see few distinct
    shapes: on a CPU, oneDNN builds each float32 (through `_dense`) and bfloat16 product for its
    exact shape (~0.5 ms and ~0.6 MB of generated code each, kept in its caches), and every row
    length and supervised count of a data set is a new shape. A multiple of ROW_BUCKET costs ~3%
    more rows at ~130 rows and keeps the caches' hits. In bfloat16, whose caches are not capped
    (`cap_onednn_caches`), W2 without it kept building shapes all epoch: its resident memory grew
    from 1.6 to 3.3 GB and its tokens/s fell by a quarter (to ~270 from ~380), where with it both
    stay flat (2.3 GB, ~395 tokens/s). Added rows are zeros placed after the real ones, where no
    real position reads them (causal attention, row-wise products), and their outputs are dropped.
    The output layer's two products per supervised count are not padded: at ~24 rows they are
    bound by their arithmetic, and 32 rows took 4-5 ms longer a step than 24 (float32, SmolLM2)."""
    if like.device.type != "cpu" or (like.dtype == torch.float32 and _onednn_linear() is None):
        return 0
    return -size % ROW_BUCKET


def _pad_rows(x, extra, dim=0):
    """x with `extra` zero rows appended along `dim`."""
    if extra == 0:
        return x
    shape = list(x.shape)
    shape[dim] = extra
    return torch.cat((x, x.new_zeros(shape)), dim)


def _dense(x, weight, bias=None):
    """x W^T + b with no autograd record (frozen W and b, inside an autograd function or no_grad).
    Any strides: the backward pass passes W^T as a view. On a CPU, weights `plan_packing` chose
    are read in oneDNN's own layout (`_packed`)."""
    if x.device.type == "cpu" and x.dtype == weight.dtype:
        packed = _packed(weight)
        if packed is not None:
            return _onednn_linear()(x, packed, bias, "none", [], "")
        if x.dtype == torch.float32 and _onednn_linear() is not None:
            return _onednn_linear()(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


_PACKED = WeakIdKeyDictionary()     # frozen weight -> ((address, version), {view: oneDNN layout of it})
_PACKABLE = WeakIdKeyDictionary()   # frozen weight -> True: chosen by `plan_packing`


def plan_packing(lm, first, budget=PACKED_BUDGET):
    """Choose the frozen weights whose products run on oneDNN's own layout (`_packed`): those of the
    adapted blocks (body.layers[first:]) from the top block down, then the output layer's, each
    block (and the output layer) whole while its copies fit in `budget` bytes (two a weight: W for
    the forward pass, W^T for the input gradient). Returns (bytes, blocks chosen, output layer
    chosen); nothing where this device and dtype have no such layout."""
    head = lm.lm_head.weight
    if head.device.type != "cpu" or _packing(head.dtype) is None:
        return 0, 0, False
    used, chosen, blocks = 0, [], 0
    for layer in reversed(list(lm.model.layers)[first:]):
        weights = [module.weight for module in layer.modules()
                   if type(module) is torch.nn.Linear and not module.weight.requires_grad]
        size = 2 * sum(weight.nbytes for weight in weights)
        if used + size > budget:
            break
        used += size
        chosen += weights
        blocks += 1
    whole_head = not head.requires_grad and used + 2 * head.nbytes <= budget
    if whole_head:
        used += 2 * head.nbytes
        chosen.append(head)
    for weight in chosen:
        _PACKABLE[weight] = True
    return used, blocks, whole_head


def forget_packing(module):
    """Drop the layouts of `module`'s weights and their choice: for weights about to change in a way
    `_packed` does not see (PEFT's merge adds to `weight.data`, which leaves the version as it was)."""
    for param in module.parameters():
        _PACKABLE.pop(param, None)
        _PACKED.pop(param, None)


@functools.cache
def _packing(dtype):
    """oneDNN's weight reorder for linear products in `dtype` on this CPU, where it gives F.linear's
    values (up to the order of the sums), else None."""
    reorder = getattr(torch.ops.mkldnn, "_reorder_linear_weight", None)
    if (_onednn_linear() is None or reorder is None or dtype not in (torch.float32, torch.bfloat16)
            or (dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported())):
        return None
    try:
        gen = torch.Generator().manual_seed(0)
        x, weight = torch.randn(3, 32, generator=gen).to(dtype), torch.randn(24, 32, generator=gen).to(dtype)
        out = _onednn_linear()(x, reorder(weight, None), None, "none", [], "")
        close = torch.allclose(out.float(), F.linear(x.float(), weight.float()), rtol=1e-2, atol=1e-1)
    except (RuntimeError, NotImplementedError):
        return None
    return reorder if close else None


def _packed(weight):
    """`weight` (a frozen tensor or a view of one: rows of it, its transpose) in oneDNN's own layout
    for linear products, made at its first product and kept while the tensor it views is alive and
    unchanged; None where this build or CPU has no such layout. With the weight in the layout its
    kernel reads, a product skips rearranging it at every call: on the 2-core AMD CPU measured,
    the output layer's chunks at 24 rows took 288-300 us instead of 375-381 (bfloat16) and 533-576
    instead of 701-729 (float32), block products at 136 rows 5-25% less. Costs one copy of each
    weight so kept, for each way it is read (W forward, W^T for the input gradient). A change in
    place is seen through the tensor's version, one through `.data` is not (`forget_packing`)."""
    reorder = _packing(weight.dtype)
    base = weight if weight._base is None else weight._base
    if reorder is None or base not in _PACKABLE:
        return None
    state = (base.data_ptr(), base._version)
    kept = _PACKED.get(base)
    if kept is None or kept[0] != state:
        kept = _PACKED[base] = (state, {})
    view = (weight.storage_offset(), tuple(weight.shape), weight.stride())
    if view not in kept[1]:
        kept[1][view] = reorder(weight.contiguous(), None)
    return kept[1][view]


def supported(lm):
    """Whether `lm` (a transformers causal LM) is a model these functions compute exactly."""
    config = lm.config
    body = getattr(lm, "model", None)
    if config.model_type not in FAMILIES or body is None or not hasattr(body, "rotary_emb"):
        return False
    if getattr(config, "attention_dropout", 0.0) or "sliding_attention" in (getattr(config, "layer_types", None) or ()):
        return False
    head = getattr(lm, "lm_head", None)
    if head is None or head.bias is not None:
        return False
    needs = {"": ("input_layernorm", "post_attention_layernorm", "mlp", "self_attn"),
             "self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"), "mlp": ("gate_proj", "up_proj", "down_proj", "act_fn")}
    return all(all(hasattr(getattr(layer, part) if part else layer, name) for name in names)
               and not hasattr(layer.self_attn, "q_norm") for layer in body.layers for part, names in needs.items())


def shared_length(inputs, lengths):
    """How many positions at the start all rows of a batch have in common (the same input tokens), when
    there are at least SHARED_MIN of them and two rows or more, else 0. With causal attention those
    positions' hidden states are the same in every row, in every block, so `run_blocks` and
    `supervised_hidden` compute them once for the batch (`_pack`): a fixed system prompt, 43 of the
    ~124 tokens of a builtin:sql row, is then computed once per batch instead of once per row.
    inputs: [B, T] numpy token ids, right-padded; lengths: [B] real positions of each row."""
    if inputs.shape[0] < 2:
        return 0
    common = common_start([row[:size] for row, size in zip(inputs, lengths)])
    common = min(common, int(lengths.min()) - 1)          # every row keeps one position of its own
    return common if common >= SHARED_MIN else 0


def run_blocks(body, blocks, hidden, shared=0):
    """Output [B, T, H] of body.layers[blocks] (a slice) for their input [B, T, H], rows right-padded;
    the first `shared` positions are the same in every row (`shared_length`) and computed once."""
    size = hidden.shape[1]
    hidden = _pad_rows(hidden, _padding(size, hidden), 1)
    hidden, shape = _run_blocks(body, blocks, hidden, _positions(body, hidden), shared)
    return (hidden if shape is None else hidden[_places(shape, hidden.device)])[:, :size]


def _run_blocks(body, blocks, hidden, context, shared):
    """body.layers[blocks] over hidden [B, T, H]: (their output [B, T, H], None), or with the first
    `shared` positions computed once, (its rows laid out by `_pack`, the layout's shape)."""
    shape = None
    if shared:
        hidden, shape = _pack(hidden, shared)
    for layer in list(body.layers)[blocks]:
        if shape is None:
            hidden = _checkpointed(body, _block, layer, hidden, *context)
        else:
            hidden = _checkpointed(body, _shared_block, layer, hidden, shape, *context)
    return hidden, shape


def _checkpointed(body, function, layer, hidden, *args):
    """function(layer, hidden, *args); with gradient checkpointing on (body.tunelab_checkpoint) and a
    backward pass to come, only its input is kept and the block runs again in the backward pass."""
    if getattr(body, "tunelab_checkpoint", False) and torch.is_grad_enabled():
        from torch.utils.checkpoint import checkpoint

        return checkpoint(function, layer, hidden, *args, use_reentrant=False)
    return function(layer, hidden, *args)


def supervised_hidden(body, first, hidden, targeted, shared=0):
    """Final-norm hidden states [N, H] at the targeted positions (row-major order, as `x[targeted]`).

    hidden: the input of block `first` [B, T, H], rows right-padded; targeted: [B, T] bool, the
    positions whose next token is supervised; shared: positions at the start that are the same in
    every row (`shared_length`), computed once."""
    if not targeted.any():
        return body.norm(hidden[targeted])
    extra = _padding(hidden.shape[1], hidden)
    hidden, targeted = _pad_rows(hidden, extra, 1), _pad_rows(targeted, extra, 1)
    top = len(body.layers) - 1
    cos, sin, on_cpu = _positions(body, hidden)
    hidden, shape = _run_blocks(body, slice(first, top), hidden, (cos, sin, on_cpu), shared)
    return body.norm(_checkpointed(body, _top_block, body.layers[top], hidden, cos, sin, targeted, on_cpu, shape))


def _pack(hidden, shared):
    """Rows [B, T, H] whose first `shared` positions are the same -> ([R, H]: those positions once (row
    0's), then each row's other T - shared positions, then zero rows to a whole bucket (`_padding`)),
    and the layout's shape (B, shared, T - shared). Every op of a block but attention is row-wise, so
    it runs on these R rows as on any others."""
    batch, size = hidden.shape[:2]
    flat = torch.cat((hidden[0, :shared], hidden[:, shared:].flatten(0, 1)))
    return _pad_rows(flat, _padding(flat.shape[0], flat)), (batch, shared, size - shared)


def _places(shape, device):
    """[B, T]: the row of `_pack`'s layout that holds each row's position."""
    batch, shared, rest = shape
    at = torch.arange(shared + rest, device=device).expand(batch, -1)
    return torch.where(at < shared, at, at + rest * torch.arange(batch, device=device)[:, None])


def _split_heads(x, shape, head_dim):
    """`_pack`ed rows [R, n * d] -> the shared positions [1, n, P, d] and each row's others [B, n, S, d]."""
    batch, shared, rest = shape
    rows = x[shared:shared + batch * rest].unflatten(0, (batch, rest))
    return _heads(x[None, :shared], head_dim), _heads(rows, head_dim)


def _whole_rows(head, rest):
    """Keys or values of every row at every position [B, n, T, d], from the shared positions' [1, n, P, d]
    and each row's others [B, n, S, d]."""
    return torch.cat((head.expand(rest.shape[0], -1, -1, -1), rest), 2)


def _shared_block(layer, flat, shape, cos, sin, on_cpu):
    """`_block` over `_pack`ed rows: the shared positions attend among themselves once, each row's
    other positions to the shared ones and to its own up to themselves."""
    batch, shared, rest = shape
    attn = layer.self_attn
    x = layer.input_layernorm(flat)
    (q_head, q), (k_head, k), (v_head, v) = (_split_heads(out, shape, attn.head_dim)
                                             for out in _project_all((attn.q_proj, attn.k_proj, attn.v_proj), x))
    at_head, at_rest = (cos[:, :shared], sin[:, :shared]), (cos[:, shared:], sin[:, shared:])
    q_head, k_head = _rotate(q_head, *at_head), _rotate(k_head, *at_head)
    q, k = _rotate(q, *at_rest), _rotate(k, *at_rest)
    head = _attend(q_head, k_head, v_head, None, attn.scaling, on_cpu)                      # [1, nh, P, d]
    keys = torch.arange(shared + rest, device=flat.device)
    allowed = (keys[None, :] <= shared + torch.arange(rest, device=flat.device)[:, None])[None]  # [1, S, T]
    out = _attend(q, _whole_rows(k_head, k), _whole_rows(v_head, v), allowed, attn.scaling, on_cpu)  # [B, nh, S, d]
    out = torch.cat((head[0].transpose(0, 1).flatten(1), out.transpose(1, 2).flatten(2).flatten(0, 1)))
    flat = flat + _project(attn.o_proj, _pad_rows(out, flat.shape[0] - out.shape[0]))
    return flat + _mlp(layer.mlp, layer.post_attention_layernorm(flat))


def _positions(body, hidden):
    """Rotary cos/sin [1, T, d] and whether on a CPU."""
    positions = torch.arange(hidden.shape[1], device=hidden.device)
    cos, sin = body.rotary_emb(hidden, positions[None])
    return cos, sin, hidden.device.type == "cpu"


def _block(layer, hidden, cos, sin, on_cpu):
    """One block at every position. Causal attention alone keeps padding out of every real position
    (padding comes after it)."""
    attn = layer.self_attn
    x = layer.input_layernorm(hidden)
    q, k, v = (_heads(out, attn.head_dim) for out in _project_all((attn.q_proj, attn.k_proj, attn.v_proj), x))
    q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
    out = _attend(q, k, v, None, attn.scaling, on_cpu)           # [B, nh, T, d]
    hidden = hidden + _project(attn.o_proj, out.transpose(1, 2).flatten(2))
    return hidden + _mlp(layer.mlp, layer.post_attention_layernorm(hidden))


def _top_block(layer, hidden, cos, sin, targeted, on_cpu, shape=None):
    """The last block at the targeted positions only: [N, H]. hidden: [B, T, H], or rows laid out by
    `_pack` with its `shape`."""
    attn = layer.self_attn
    rows, cols = targeted.nonzero(as_tuple=True)
    slot = (targeted.cumsum(1) - 1)[rows, cols]          # each query's place among its row's queries
    width = int(targeted.sum(1).max())
    x = layer.input_layernorm(hidden)
    k, v = _project_all((attn.k_proj, attn.v_proj), x)
    if shape is None:
        k, v, at = _heads(k, attn.head_dim), _heads(v, attn.head_dim), (rows, cols)
    else:
        k, v = (_whole_rows(*_split_heads(t, shape, attn.head_dim)) for t in (k, v))
        at = (_places(shape, x.device)[rows, cols],)
    k = _rotate(k, cos, sin)
    size = rows.shape[0]
    extra = _padding(size, x)                                    # rows of the [N, ...] products
    q = _project(attn.q_proj, _pad_rows(x[at], extra))[:size].unflatten(-1, (-1, attn.head_dim))  # [N, nh, d]
    q = q * cos[0, cols, None] + _rotate_half(q) * sin[0, cols, None]
    grid = q.new_zeros((targeted.shape[0], width) + q.shape[1:]).index_put((rows, slot), q)   # [B, S, nh, d]
    where = torch.zeros(grid.shape[:2], dtype=torch.long, device=q.device).index_put((rows, slot), cols)
    keys = torch.arange(targeted.shape[1], device=q.device)
    allowed = keys[None, None, :] <= where[:, :, None]      # [B, S, T]
    out = _attend(grid.transpose(1, 2), k, v, allowed, attn.scaling, on_cpu)
    out = out.transpose(1, 2)[rows, slot].flatten(1)                           # [N, nh * d]
    # the added rows run on through o_proj and the MLP (every op row-wise) and are dropped at the end
    picked = _pad_rows(hidden[at], extra) + _project(attn.o_proj, _pad_rows(out, extra))
    return (picked + _mlp(layer.mlp, layer.post_attention_layernorm(picked)))[:size]


def _mlp(mlp, x):
    """The gated MLP of llama and qwen2 (down(act(gate(x)) * up(x)))."""
    gate, up = _project_all((mlp.gate_proj, mlp.up_proj), x)
    return _project(mlp.down_proj, mlp.act_fn(gate) * up)


def _project_all(modules, x):
    """[module(x) for each module]; plain LoRA layers (no dropout, no DoRA) as one autograd function."""
    loras = [_plain_lora(module) for module in modules]
    if all(lora is not None for lora in loras):
        return _lora_function(x).apply(x, *(value for lora in loras for value in lora))
    return [_project(module, x) for module in modules]


def _project(module, x):
    """module(x) for an nn.Linear or a PEFT LoRA layer; plain LoRA (no dropout, no DoRA) as one
    autograd function."""
    lora = _plain_lora(module)
    if lora is not None:
        return _lora_function(x).apply(x, *lora)[0]
    if type(module) is torch.nn.Linear and not (
            torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in module.parameters()))):
        return _dense(x, module.weight, module.bias)     # a frozen block (the prefix, evaluation)
    return module(x)


def _plain_lora(module):
    """(base weight, base bias, A, B, scale) of a PEFT LoRA layer with one active plain adapter, else None."""
    lora_a = getattr(module, "lora_A", None)
    if (lora_a is None or list(getattr(module, "active_adapters", ())) != ["default"] or "default" not in lora_a
            or module.merged or module.disable_adapters or "default" in getattr(module, "lora_variant", {})
            or not isinstance(module.lora_dropout["default"], torch.nn.Identity)
            or type(module.base_layer) is not torch.nn.Linear):
        return None
    base = module.base_layer
    return base.weight, base.bias, lora_a["default"].weight, module.lora_B["default"].weight, module.scaling["default"]


class LoraLinear(torch.autograd.Function):
    """Plain LoRA layers that read the same input x (one layer, or q/k/v, or gate/up): for each,
    x W^T + b + ((x A^T) B^T) * scale, frozen W and b, as PEFT computes it: the low-rank branch in
    A's dtype (float32), added before rounding to the base output's dtype. Keeps x as it comes for
    the backward pass (PEFT keeps a float32 copy of it for every adapted layer).

    The layers' A matrices are stacked, so the products with the long side of x run once for
    the group: x A^T forward, and the A gradients and the branch's input gradient backward.

    apply(x, W, b, A, B, scale, W, b, A, B, scale, ...) -> one output a layer."""

    @staticmethod
    def forward(ctx, x, *layers):
        layers = [layers[at:at + 5] for at in range(0, len(layers), 5)]
        stacked = _stack([lora_a for _, _, lora_a, _, _ in layers])               # [R, in]
        flat = x.flatten(0, -2)
        low = flat.to(stacked.dtype) @ stacked.t()                                  # [N, R]
        ctx.ranks = [lora_a.shape[0] for _, _, lora_a, _, _ in layers]
        outputs = []
        for (weight, bias, _, lora_b, scale), part in zip(layers, low.split(ctx.ranks, 1)):
            base = _dense(flat, weight, bias)
            # scale * (low @ B^T) added in place to the base output, or to its float32 copy: no
            # other [N, out] buffer (each pass over one costs memory traffic, fresh ones page faults)
            out = base.to(low.dtype).addmm_(part, lora_b.t(), alpha=scale)
            outputs.append(out.to(base.dtype).view(*x.shape[:-1], -1))
        ctx.save_for_backward(x, low, stacked, *(t for weight, _, _, lora_b, _ in layers for t in (weight, lora_b)))
        ctx.scales = [scale for *_, scale in layers]
        return tuple(outputs)

    @staticmethod
    def backward(ctx, *grads):
        x, low, stacked, *saved = ctx.saved_tensors
        weights, lora_bs = saved[0::2], saved[1::2]
        grad_bs, through = [], []
        for grad, lora_b, scale, part in zip(grads, lora_bs, ctx.scales, low.split(ctx.ranks, 1)):
            flat = grad.flatten(0, -2).to(lora_b.dtype)                              # [N, out]
            # the rank-r products with the long side inner: (low^T g)^T, (B^T g^T)^T; the scale goes
            # on their [out, r] and [N, r] results, not on the [N, out] gradient
            grad_bs.append((part.t() @ flat).t().mul_(scale))
            through.append((lora_b.t() @ flat.t()).t().mul(scale))                   # [N, r]
        through = _stack(through, 1)                                                  # [N, R]
        grad_as = (through.t() @ x.flatten(0, -2).to(stacked.dtype)).split(ctx.ranks)
        grad_x = None
        if ctx.needs_input_grad[0]:
            dtype = grads[0].dtype
            if dtype != through.dtype:    # the branch's part in float32, rounded once, then the base parts
                grad_x = (through @ stacked).to(dtype).view(*grads[0].shape[:-1], -1)
            grad_x = _frozen_input_grad(grads, weights, grad_x)
            if dtype == through.dtype:    # the branch's part added in place: no [N, in] buffer of its own
                grad_x.view(-1, grad_x.shape[-1]).addmm_(through, stacked)
        return _layer_grads(grad_x, grad_as, grad_bs)


def _frozen_input_grad(grads, weights, grad_x=None):
    """sum of g W over the layers' output gradients and frozen weights, added into grad_x if given."""
    for grad, weight in zip(grads, weights):
        part = _dense(grad, weight.to(grad.dtype).t())
        grad_x = part if grad_x is None else grad_x.add_(part)
    return grad_x


def _layer_grads(grad_x, grad_as, grad_bs):
    """A LoRA autograd function's gradients: x's, then (None, None, A's, B's, None) a layer."""
    return (grad_x,) + tuple(t for grad_a, grad_b in zip(grad_as, grad_bs) for t in (None, None, grad_a, grad_b, None))


def _lora_function(x):
    """The autograd function for plain LoRA layers reading x: `LoraLinearBf16` for bfloat16 on a CPU
    where oneDNN has it, else `LoraLinear`."""
    return LoraLinearBf16 if x.dtype == torch.bfloat16 and x.device.type == "cpu" and _onednn_add() else LoraLinear


@functools.cache
def _onednn_add():
    """Whether this build's oneDNN linear op adds a tensor to a bfloat16 product (x W^T + other) on
    this CPU and gives F.linear's values to bfloat16 rounding."""
    op = _onednn_linear()
    if op is None or not hasattr(op, "binary") or not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return False
    try:
        gen = torch.Generator().manual_seed(0)
        x, weight, other = (torch.randn(shape, generator=gen) for shape in ((5, 8), (24, 8), (5, 24)))
        out = op.binary(x.bfloat16(), other.bfloat16(), weight.bfloat16(), None, "add")
        expected = other.bfloat16().float() + F.linear(x.bfloat16().float(), weight.bfloat16().float())
        return out.dtype == torch.bfloat16 and torch.allclose(out.float(), expected, rtol=1e-2, atol=1e-2)
    except (RuntimeError, NotImplementedError):
        return False


class LoraLinearBf16(torch.autograd.Function):
    """`LoraLinear` for bfloat16 inputs on a CPU: the low-rank products in bfloat16 through oneDNN
    (float32 sums inside each product, rounded to bfloat16 at its end), as PyTorch's bfloat16
    autocast runs them, and the branch added to the base product inside oneDNN's (`_onednn_add`).
    Float32 products of rank 8 are slow on 2 CPU cores (MKL's x [136, 8] @ [8, 1536] took ~100 us,
    memory-bound work of ~10 us), and the float32 branch adds two conversions of every [N, out]
    output; this way W1 steps in bfloat16 took ~5% less, W2 steps ~11%. A and B and their gradients
    stay float32 (the gradients are rounded to bfloat16 at the end of their products, as under
    autocast).

    apply(x, W, b, A, B, scale, W, b, A, B, scale, ...) -> one output a layer."""

    @staticmethod
    def forward(ctx, x, *layers):
        layers = [layers[at:at + 5] for at in range(0, len(layers), 5)]
        linear = _onednn_linear()
        flat = x.flatten(0, -2)
        stacked = _stack([lora_a for _, _, lora_a, _, _ in layers]).to(x.dtype)                # [R, in]
        low = linear(flat, stacked, None, "none", [], "")                                     # [N, R]
        ranks = [lora_a.shape[0] for _, _, lora_a, _, _ in layers]
        parts = [part.contiguous() for part in low.split(ranks, 1)] if len(layers) > 1 else [low]
        scaled = [(lora_b * scale).to(x.dtype) for _, _, _, lora_b, scale in layers]           # [out, r]
        outputs = [linear.binary(part, _dense(flat, weight, bias), lora_b, None, "add").view(*x.shape[:-1], -1)
                   for (weight, bias, *_), part, lora_b in zip(layers, parts, scaled)]
        ctx.save_for_backward(x, stacked, *parts, *(t for (weight, *_), lora_b in zip(layers, scaled)
                                                    for t in (weight, lora_b)))
        ctx.ranks, ctx.scales = ranks, [scale for *_, scale in layers]
        return tuple(outputs)

    @staticmethod
    def backward(ctx, *grads):
        x, stacked, *saved = ctx.saved_tensors
        count = len(ctx.ranks)
        parts, weights, lora_bs = saved[:count], saved[count::2], saved[count + 1::2]
        linear = _onednn_linear()
        grads = [grad.flatten(0, -2) for grad in grads]
        grad_bs = [(part.t() @ grad).t().float().mul_(scale) for grad, part, scale in zip(grads, parts, ctx.scales)]
        through = _stack([linear(grad, lora_b.t().contiguous(), None, "none", [], "")     # g (B scale): [N, r]
                          for grad, lora_b in zip(grads, lora_bs)], 1)
        grad_as = (through.t() @ x.flatten(0, -2)).float().split(ctx.ranks)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = linear.binary(through, _frozen_input_grad(grads, weights), stacked.t().contiguous(), None,
                                   "add").view(*x.shape[:-1], -1)
        return _layer_grads(grad_x, grad_as, grad_bs)


def _stack(tensors, dim=0):
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim)


def _heads(x, head_dim):
    """[B, T, n * d] -> [B, n, T, d]"""
    return x.unflatten(-1, (-1, head_dim)).transpose(1, 2)


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rotate(x, cos, sin):
    """Rotary position embedding of [B, n, T, d] with cos/sin [B or 1, T, d]."""
    return x * cos[:, None] + _rotate_half(x) * sin[:, None]


def _attend(q, k, v, allowed, scale, on_cpu):
    """Attention of q [B, nh, S, d] over k, v [B, nkv, T, d] where allowed [B, S, T] (None: causal,
    S = T): [B, nh, S, d]."""
    batch, heads, size, dim = q.shape
    groups = heads // k.shape[1]
    if not on_cpu:     # the fused kernel
        if groups > 1:   # each key/value head beside its query heads (expand: no wait for the device)
            k, v = (t[:, :, None].expand(-1, -1, groups, -1, -1).flatten(1, 2) for t in (k, v))
        mask = None if allowed is None else allowed[:, None]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=allowed is None, scale=scale)
    if allowed is None:
        where = torch.arange(size, device=q.device)
        allowed = (where[None, :] <= where[:, None])[None]
    # 0 where allowed and -inf elsewhere, added to the scores: the scores and gradients of masked_fill_
    # on them, one pass fewer over [B, nh, S, T] backward (W2 steps 1-2% shorter, fp32 and bf16)
    bias = torch.zeros(allowed.shape, device=q.device).masked_fill_(~allowed, float("-inf"))
    # query heads of one key/value head side by side: [B, nkv, groups * S, d], no copies of k or v
    q = q.reshape(batch, k.shape[1], groups * size, dim)
    scores = (q @ k.transpose(-1, -2)).float().mul_(scale).unflatten(2, (groups, size)).add_(bias[:, None, None])
    weights = scores.softmax(-1).to(v.dtype).flatten(2, 3)
    return (weights @ v).reshape(batch, heads, size, dim)


class SupervisedCrossEntropy(torch.autograd.Function):
    """Cross-entropy [N] of logits `hidden @ weight.T` against `targets`, for a frozen weight [V, H].

    One pass over the weight, `chunk` rows at a time, does the forward and the backward pass: each
    chunk's logits [N, chunk] go into a running log-sum-exp (rescaled when the running maximum
    grows) and, while the chunk is still in cache, into the running sum of softmax-weighted rows
    that the gradient needs (d hidden = sum_v p_v W_v - W_target). The plain computation reads the
    weight twice and keeps the [N, V] probabilities for the backward pass; this keeps an [N, H]
    gradient. Logits are float32 whatever the weight's dtype, as `.float()` on the plain logits."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk, on_host=None):
        wanted = ctx.needs_input_grad[0]
        device, size = hidden.device, hidden.shape[0]
        top = torch.full((size, 1), float("-inf"), device=device)
        total = torch.zeros((size, 1), device=device)
        picked = torch.zeros(size, device=device)
        weighted = torch.zeros((size, hidden.shape[1]), device=device) if wanted else None
        # chunk -> rows whose target lies in it, listed on the host (CPUs); elsewhere each chunk's
        # logits are gathered at every target, masked (no wait for the device)
        rows_of = None
        if on_host is None:
            on_host = device.type == "cpu"
        if on_host:
            rows_of = {}
            for row, target in enumerate(targets.tolist()):
                rows_of.setdefault(target // chunk, []).append(row)
        for start in range(0, weight.shape[0], chunk):
            part = weight[start:start + chunk]
            logits = _dense(hidden, part).float()                              # [N, chunk]
            if rows_of is None:
                inside = (targets >= start) & (targets < start + part.shape[0])
                at = (targets - start).clamp(0, part.shape[0] - 1)
                picked += torch.where(inside, logits.gather(1, at[:, None])[:, 0], 0.0)
            elif start // chunk in rows_of:
                rows = torch.tensor(rows_of[start // chunk], device=device)
                picked[rows] = logits[rows, targets[rows] - start]
            grown = torch.maximum(top, logits.amax(1, keepdim=True))
            rescale = torch.exp(top - grown)
            probs = logits.sub_(grown).exp_()
            total.mul_(rescale).add_(probs.sum(1, keepdim=True))
            if wanted:
                weighted.mul_(rescale).add_(_dense(probs.to(part.dtype), part.t()))
            top = grown
        if wanted:
            ctx.save_for_backward(weighted / total - weight[targets].float())   # d loss_n / d hidden_n
            ctx.dtype = hidden.dtype
        return (top + torch.log(total)).squeeze(1) - picked

    @staticmethod
    def backward(ctx, grad):
        (unit,) = ctx.saved_tensors
        return (unit * grad[:, None]).to(ctx.dtype), None, None, None, None


def supervised_losses(head, hidden, targets):
    """Cross-entropy of each supervised target [N] from final hidden states [N, H]."""
    if head.weight.requires_grad:
        return F.cross_entropy(head(hidden).float(), targets, reduction="none")
    weight = head.weight
    chunk = DEVICE_HEAD_CHUNK
    if hidden.device.type == "cpu":
        chunk = max(1, HEAD_CHUNK_BYTES // (weight.shape[1] * weight.element_size()))
    return SupervisedCrossEntropy.apply(hidden, weight, targets, chunk)
