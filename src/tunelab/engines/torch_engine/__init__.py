"""The PyTorch engine: transformers models, PEFT LoRA layers; CPU, CUDA and MPS.

The loss is computed exactly, on supervised positions only: the output projection (28M of
SmolLM2's 135M parameters) runs on the ~15-25% of positions that have a label, not on all. For
Llama-family models blocks.py goes further (the top block at those positions too).
"""

import contextlib
import ctypes
import inspect
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tunelab import adapters, optimizers
from tunelab.engines.base import StepResult, resident_peak
from tunelab.engines.torch_engine import blocks, graphs, optim
from tunelab.errors import UserError

name = "torch"


@dataclass
class Model:
    model: torch.nn.Module       # the causal LM, wrapped by PEFT once adapters are attached
    tokenizer: object
    device: torch.device
    dtype: torch.dtype
    spec: object = None          # adapters.AdapterSpec when adapters are attached
    prefix: "PrefixCache" = None  # outputs of the frozen blocks below the lowest adapted one, per row
    lean: bool = False           # blocks.py computes the loss (a llama-family model); else transformers' forward
    graphs: object = None        # graphs.Replays of the training step (CUDA), False when steps run eagerly
    training: object = None      # the mode `_set_mode` last put the model in (True, False), None when unknown
    world: object = None         # distributed.World when training in several processes (torchrun)
    sharded: bool = False        # the blocks' weights are split over the processes (FSDP2)


PREFIX_CACHE_BUDGET = 2 * 1024**3   # bytes of cached activations kept in memory
DISK_HEADROOM = 1024**3             # free disk space left untouched when the cache spills to disk


@dataclass
class PrefixCache:
    """Output of blocks [0, first) for each row, computed once: those blocks are frozen and have no
    dropout, so every epoch would compute exactly the same values again. Rows go to memory up to
    `budget` bytes, then to a memory-mapped file (unlinked at once, so nothing is left behind);
    when neither has room, the remaining rows are recomputed each time."""
    first: int                   # index of the lowest block with adapters
    budget: int = PREFIX_CACHE_BUDGET
    rows: dict = field(default_factory=dict)      # key -> tensor [T, H] in memory
    used: int = 0
    disk: object = None                           # np.memmap of bytes, when rows spill to disk
    spilled: dict = field(default_factory=dict)   # key -> (offset, shape, dtype) in `disk`
    disk_used: int = 0
    full: bool = False

    def plan(self, need, folder):
        """Make room for `need` bytes: memory up to the budget, a file in `folder` for the rest.
        Returns the bytes placed on disk, or the bytes that fit nowhere as a negative number."""
        beyond = need - self.budget
        if beyond <= 0:
            return 0
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if shutil.disk_usage(folder).free < beyond + DISK_HEADROOM:
            return -beyond
        handle = tempfile.TemporaryFile(dir=folder, prefix="prefix-cache-")
        self.disk = np.memmap(handle, dtype=np.uint8, mode="w+", shape=(beyond,))
        return beyond

    def __contains__(self, key):
        return key in self.rows or key in self.spilled

    def get(self, key):
        if key in self.rows:
            return self.rows[key]
        offset, shape, dtype = self.spilled[key]
        size = int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()
        return torch.from_numpy(self.disk[offset:offset + size]).view(dtype).reshape(shape)

    def put(self, key, value):
        """Keep one row's activations; False once there is no room left anywhere."""
        size = value.numel() * value.element_size()
        if self.used + size <= self.budget:
            self.rows[key] = value.clone()
            self.used += size
            return True
        if self.disk is not None and self.disk_used + size <= self.disk.shape[0]:
            raw = value.detach().contiguous().cpu().view(-1).view(torch.uint8).numpy()
            self.disk[self.disk_used:self.disk_used + size] = raw
            self.spilled[key] = (self.disk_used, tuple(value.shape), value.dtype)
            self.disk_used += size
            return True
        self.full = True
        return False


def init_distributed(world):
    """Join torchrun's process group: gloo between CPU processes, NCCL between GPUs. A rank that stops
    answering makes the others fail after distributed.timeout() seconds instead of waiting for ever (torchrun
    itself also stops the others when one dies)."""
    import datetime

    import torch.distributed as dist

    from tunelab import distributed

    timeout = distributed.timeout()
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(world.local_rank)
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout))


def finish_distributed():
    """Leave the process group once every process is done (gloo's threads abort the process when it exits
    with the group still open)."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def share(value):
    """Rank 0's `value` (any picklable object), on every rank of the process group."""
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shard(m):
    """FSDP2 (`fully_shard`) on every decoder block: its weights, adapters and their optimizer state are split
    over the processes and gathered for the block's forward and backward. The loss then runs through
    transformers' forward (blocks.py computes from the weights directly) and without the frozen-prefix cache
    (every process must run every block, in step). FSDP2 averages the gradients over the processes (a plain
    sum, its PREMUL_SUM, is not in gloo): train_step scales each process's loss up by their number, so the
    average is the sum the loss over the global batch needs."""
    from torch.distributed.fsdp import fully_shard

    blocks.forget_packing(m.model)
    for layer in _base_lm(m).model.layers:
        fully_shard(layer)
    m.lean, m.prefix, m.graphs, m.sharded = False, None, False, True


def _local(tensor):
    """A tensor's own part: a sharded one's local shard."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def _whole(tensor):
    """A tensor whole: a sharded one gathered from every process (all must call this together)."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def reduce_sum(m, values):
    """The sums over every rank of `values` (floats), as float64; the values themselves in one process."""
    world = m.world
    if world is None or world.size == 1:
        return [float(v) for v in values]
    import torch.distributed as dist

    tensor = torch.tensor([float(v) for v in values], dtype=torch.float64,
                          device=m.device if m.device.type == "cuda" else "cpu")
    dist.all_reduce(tensor)
    return tensor.cpu().tolist()


def _reduce_gradients(m, grads):
    """Sum every rank's gradients, in one buffer (one collective a step)."""
    import torch.distributed as dist

    flat = torch.cat([g.reshape(-1).float() for g in grads])
    dist.all_reduce(flat)
    at = 0
    for g in grads:
        g.copy_(flat[at:at + g.numel()].view_as(g))
        at += g.numel()


def pick_device(device="auto"):
    if device != "auto":
        if device == "cuda" and not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA GPU is available here")
        if device == "mps" and not torch.backends.mps.is_available():
            raise UserError("--device mps: MPS is not available here")
        return torch.device(device), "as asked"
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0")) if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 else 0
        return torch.device("cuda", local), "a CUDA GPU is available"
    if torch.backends.mps.is_available():
        return torch.device("mps"), "Apple MPS is available"
    return torch.device("cpu"), "no GPU found"


def cpu_has_fast_bf16():
    """Whether this CPU multiplies bfloat16 matrices in hardware (AVX512-BF16 or AMX)."""
    checks = [getattr(torch.cpu, n, None) for n in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    return any(check() for check in checks if check is not None)


def pick_dtype(device, dtype="auto", training=False):
    """The compute dtype and why. Training on a CPU with bfloat16 matrix instructions computes in
    bfloat16 (adapters and optimizer state stay float32); everything else on a CPU is float32."""
    if dtype != "auto":
        return getattr(torch, dtype), "as asked"
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16, "the GPU supports bfloat16"
    if device.type == "cpu" and training and cpu_has_fast_bf16():
        return torch.bfloat16, ("this CPU multiplies bfloat16 matrices in hardware, about 1.6x faster training; "
                                "adapters and optimizer state stay float32 (their products run in bfloat16); "
                                "--dtype float32 for exact float32")
    return torch.float32, "float32 is exact and fastest at this size on CPU"


def _quiet_transformers():
    import warnings

    import transformers

    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def keep_freed_memory():
    """On Linux with glibc, keep freed memory in the process for the next tensors of its size (up to
    32 MB) instead of handing it back to the system: a returned buffer comes back as fresh pages,
    and each page costs a fault on first write. Filling the frozen-prefix cache (~7 MB activations,
    freed block by block) took ~16,000 faults a row and ~15% longer on 2 CPU cores without this.
    Peak memory is what it was (the process already held it); it is not given back before exit.
    Whether it took effect; a MALLOC_* setting in the environment wins."""
    if not sys.platform.startswith("linux") or any(k.startswith("MALLOC_") for k in os.environ):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):      # another C library (musl)
        return False
    trim_threshold, mmap_threshold = -1, -3       # glibc's M_TRIM_THRESHOLD, M_MMAP_THRESHOLD
    return bool(mallopt(mmap_threshold, 32 * 1024**2)) and bool(mallopt(trim_threshold, 1024**3))


def load(model_dir, device="auto", dtype="auto", log=print, training=False):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()
    dev, dev_reason = pick_device(device)
    dt, dt_reason = pick_dtype(dev, dtype, training)
    log(f"Device: {dev.type} ({dev_reason}); dtype: {str(dt).replace('torch.', '')} ({dt_reason})")
    if dev.type == "cpu":
        keep_freed_memory()
        if dt == torch.float32:
            blocks.cap_onednn_caches()
    try:
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dt, use_safetensors=True,
                                                     trust_remote_code=False)
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False)
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"{model_dir}: transformers could not load this model: {e}") from None
    model.to(dev)
    model.eval()
    return Model(model, tokenizer, dev, dt, lean=blocks.supported(model), training=False)


def _lora_config(spec):
    from peft import LoraConfig

    return LoraConfig(r=spec.rank, lora_alpha=spec.scale * spec.rank, lora_dropout=spec.dropout,
                      target_modules=list(spec.keys), layers_to_transform=list(spec.layers),
                      layers_pattern="layers", bias="none", task_type="CAUSAL_LM", use_dora=spec.dora)


def attach_lora(m, spec, seed=0):
    """Wrap the model with fresh LoRA layers (A Kaiming-uniform, B zero) on spec's modules; for a full
    fine-tune (spec.full), make every weight of spec's blocks trainable instead."""
    from peft import get_peft_model

    torch.manual_seed(seed)
    for p in m.model.parameters():
        p.requires_grad_(False)
    if spec.full:
        _attach_full(m, spec)
        return
    def no_module(missing):
        return UserError(f"the model has no module {missing[0]} to adapt ({len(missing)} missing); "
                         "check --lora-keys and --num-layers")

    try:
        m.model = get_peft_model(m.model, _lora_config(spec))
    except ValueError:   # PEFT found none of the modules
        raise no_module(spec.modules()) from None
    m.spec = spec
    m.graphs = None
    m.training = None     # PEFT's new layers start in training mode, the rest as they were
    found = set(_lora_modules(m))
    missing = [mod for mod in spec.modules() if mod not in found]
    if missing:
        raise no_module(missing)
    first = min(spec.layers)
    config = _base_lm(m).config
    if first > 0 and not getattr(config, "attention_dropout", 0.0):
        m.prefix = PrefixCache(first)


def _attach_full(m, spec):
    layers = _base_lm(m).model.layers
    if max(spec.layers) >= len(layers):
        raise UserError(f"the model has {len(layers)} blocks; the fine-tune trains block {max(spec.layers)}")
    for i in spec.layers:
        layers[i].requires_grad_(True)
    m.spec = spec
    m.graphs = None
    m.training = None
    first = min(spec.layers)
    if first > 0 and not getattr(_base_lm(m).config, "attention_dropout", 0.0):
        m.prefix = PrefixCache(first)


def _full_weights(m):
    """{name: tensor} of the weights a full fine-tune trains (every one of its blocks')."""
    blocks_ = tuple(f"model.layers.{i}." for i in m.spec.layers)
    return {n: p for n, p in _base_lm(m).named_parameters() if n.startswith(blocks_)}


def grad_checkpoint(m):
    """Gradient checkpointing: each block keeps only its input for the backward pass, which runs it again
    (blocks.py's loss and transformers' forward alike; the values are the same)."""
    lm = _base_lm(m)
    lm.model.tunelab_checkpoint = True
    lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    m.graphs = False     # recorded CUDA steps replay one forward and backward as they were captured


def sizes(m):
    """(bytes of all weights, number of trained values, bytes of the trained tensors)."""
    params = list(m.model.parameters())
    trained = [p for p in params if p.requires_grad]
    return (sum(p.numel() * p.element_size() for p in params), sum(p.numel() for p in trained),
            sum(p.numel() * p.element_size() for p in trained))


def savings(m, rows, tokens, common=0):
    """What the training step saves, and what that costs in memory and disk, in lines for the user.
    Also sets the frozen-prefix cache up for `tokens` tokens over `rows` rows; `common`: tokens every
    training row begins with."""
    from tunelab import models

    recorded = _recordable(m)
    lean = ", forward and backward in one pass over the output weight" if m.lean else ""
    if m.lean and not recorded:
        lean += "; the top block's queries and MLP only there"
    lines = [f"output projection and loss only at supervised positions{lean}; no backward below the lowest adapted block"]
    if recorded:
        lines.append(f"CUDA graphs: each batch shape's step recorded once, then replayed in one launch (positions and "
                     f"targets padded to buckets of {graphs.POSITION_FLOOR} or more, up to {graphs.MAX_GRAPHS} "
                     f"shapes; {graphs.SWITCH}=0 turns this off)")
    if m.lean and common >= blocks.SHARED_MIN:
        fill = " and per batch of the frozen-prefix cache's fill" if m.prefix is not None else ""
        lines.append(f"the first {common} tokens, the same in every row, computed once per batch of 2 rows or "
                     f"more{fill}, not once per row")
    first = _first_computed(m)
    packed, packed_blocks, head = blocks.plan_packing(_base_lm(m), first) if m.lean else (0, 0, False)
    if packed:
        also = " and the output layer's" if head else ""
        lines.append(f"frozen weights of the top {packed_blocks} adapted block(s){also} laid out once for the CPU's "
                     f"matrix products, not at every product ({packed / 1e6:,.0f} MB at most)")
    if m.prefix is not None:
        need = tokens * _base_lm(m).config.hidden_size * torch.empty((), dtype=m.dtype).element_size()
        on_disk = m.prefix.plan(need, models.cache_dir() / "prefix-cache")
        where = f"{need / 1e6:,.0f} MB in memory"
        if on_disk > 0:
            where = (f"{m.prefix.budget / 1e6:,.0f} MB in memory, {on_disk / 1e6:,.0f} MB in a memory-mapped file "
                     f"under {models.cache_dir() / 'prefix-cache'} (removed at exit)")
        elif on_disk < 0:
            where = (f"{m.prefix.budget / 1e6:,.0f} MB in memory; the other {-on_disk / 1e6:,.0f} MB fit neither "
                     f"the memory budget nor the free disk, so about {-on_disk / need:.0%} of rows are recomputed")
        lines.append(f"frozen-prefix cache: blocks 0-{m.prefix.first - 1} run once per row, not once per epoch "
                     f"({rows} rows: {where})")
    return lines


def _lora_modules(m):
    """{module path inside the causal LM: PEFT LoRA layer}."""
    out = {}
    for path, module in m.model.named_modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            out[path.removeprefix("base_model.model.")] = module
    return out


def set_adapter(m, spec, tensors):
    """Attach adapters (if not yet) and load numpy (A [r, in], B [out, r]) tensors into them; for a full
    fine-tune, load {weight name: array} into the model's weights."""
    if m.spec is None:
        attach_lora(m, spec)
    if spec.full:
        with torch.no_grad():
            for weight, array in adapters.pair_with_weights(tensors, _full_weights(m)):
                weight.copy_(torch.from_numpy(np.asarray(array)))
        return

    pairs = adapters.pair_with_layers(tensors, _lora_modules(m),
                                      lambda layer: [w.shape for w in _adapter_weights(m, layer)])
    with torch.no_grad():
        for layer, *arrays in pairs:
            for weight, array in zip(_adapter_weights(m, layer), arrays):
                weight.copy_(torch.from_numpy(np.asarray(array)))


def _adapter_weights(m, layer):
    """A PEFT layer's trained tensors in the adapters.py order: A, B (and DoRA's magnitude)."""
    weights = [layer.lora_A["default"].weight, layer.lora_B["default"].weight]
    if m.spec is not None and m.spec.dora:
        weights.append(layer.lora_magnitude_vector["default"].weight)
    return weights


def adapter_tensors(m):
    """Numpy copies of the trained tensors (sharded ones gathered: every process must call this together)."""
    if m.spec.full:
        return {n: _numpy(p) for n, p in _full_weights(m).items()}
    return {module: tuple(_numpy(w) for w in _adapter_weights(m, layer)) for module, layer in _lora_modules(m).items()}


def _numpy(tensor):
    """A float32 numpy copy of a tensor (gathered when sharded). The copy is made by torch first: `.numpy()`
    pins the storage it views, and FSDP2 must be able to free a gathered weight's storage later."""
    return _whole(tensor.detach()).float().cpu().clone().numpy()


def make_optimizer(m, learning_rate, name="adam", **settings):
    """Optimizer `name` (optimizers.NAMES) over the trained tensors, with `settings` (as optimizers.settings
    completes them; MLX's defaults for what is left out): torch.optim's Adam and AdamW, and for sgd,
    adafactor and muon optim.py's, which make MLX's updates."""
    params = [p for p in m.model.parameters() if p.requires_grad]
    settings = {**optimizers.settings(name), **settings}
    if name == "muon":   # LoRA's matrices, which mlx-lm stores transposed, in a group of their own
        lora = {id(p) for n, p in m.model.named_parameters() if p.requires_grad and ".lora_" in n and p.ndim == 2}
        params = [{"params": [p for p in params if id(p) not in lora]},
                  {"params": [p for p in params if id(p) in lora], "transposed": True}]
    if name in optim.CLASSES:
        optimizer = optim.CLASSES[name](params, lr=learning_rate, **settings)
    else:
        kind = torch.optim.AdamW if name == "adamw" else torch.optim.Adam
        try:   # one kernel per tensor instead of a dozen small ops (CPUs and GPUs)
            optimizer = kind(params, lr=learning_rate, fused=not m.sharded, **settings)
        except RuntimeError:
            optimizer = kind(params, lr=learning_rate, **settings)
    optimizer.tunelab_names = _trained_names(m)
    return optimizer


def _trained_names(m):
    """{id(tensor): name} of the trained tensors, the keys of their optimizer state in a checkpoint; taken when
    the optimizer is made (FSDP2 registers other tensors under the same names while a block is gathered)."""
    return {id(p): n for n, p in m.model.named_parameters() if p.requires_grad}


def _names(m, optimizer):
    return getattr(optimizer, "tunelab_names", None) or _trained_names(m)


def training_state(m, optimizer):
    """What a resumed run needs besides the adapter, as numpy arrays: Adam's moments and step count of
    each trained tensor (by name) and the random generators' states (dropout)."""
    names = _names(m, optimizer)
    out = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                value = _whole(value) if torch.is_tensor(value) else value
                out[f"optimizer/{names[id(p)]}/{key}"] = torch.as_tensor(value).detach().cpu().clone().numpy()
    out["rng/torch"] = torch.get_rng_state().numpy().copy()
    if m.device.type == "cuda":
        out["rng/cuda"] = torch.cuda.get_rng_state(m.device).numpy().copy()
    return out


def load_training_state(m, optimizer, arrays):
    """Put `training_state`'s arrays back into the optimizer and the random generators."""
    state = optimizer.state_dict()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    names = _names(m, optimizer)
    restored = {}
    for i, p in enumerate(params):
        prefix = f"optimizer/{names[id(p)]}/"
        values = {k[len(prefix):]: torch.from_numpy(v.copy()) for k, v in arrays.items() if k.startswith(prefix)}
        if values:
            restored[i] = values
    if restored and len(restored) != len(params):
        raise UserError(f"the checkpoint's optimizer state covers {len(restored)} of {len(params)} trained tensors")
    state["state"] = restored
    optimizer.load_state_dict(state)
    if "rng/torch" in arrays:
        torch.set_rng_state(torch.from_numpy(arrays["rng/torch"].copy()))
    if "rng/cuda" in arrays and m.device.type == "cuda":
        torch.cuda.set_rng_state(torch.from_numpy(arrays["rng/cuda"].copy()), m.device)


def _first_computed(m):
    """Index of the lowest block a step computes: the lowest adapted one when the blocks below it
    come from the frozen-prefix cache, else 0."""
    return 0 if m.prefix is None else m.prefix.first


def _base_lm(m):
    """The causal LM inside a PEFT wrapper (or the model itself when there is none)."""
    return m.model.get_base_model() if hasattr(m.model, "get_base_model") else m.model


def _causal_lm(m):
    """The (possibly PEFT-wrapped) causal LM's transformer body and output projection."""
    lm = _base_lm(m)
    return lm.model, lm.lm_head


@contextlib.contextmanager
def _only_blocks(body, blocks, final_norm=True):
    """Run the transformer body over `blocks` only (and without its final norm when final_norm is False)."""
    layers, norm = body.layers, body.norm
    body.layers = torch.nn.ModuleList(list(layers)[blocks])
    if not final_norm:
        body.norm = torch.nn.Identity()
    try:
        yield
    finally:
        body.layers, body.norm = layers, norm


def _prefix_hidden(m, body, batch, tokens, attention):
    """Output of the frozen blocks below the adapted ones [B, T, H], from the cache where it has the rows."""
    cache, keys = m.prefix, batch.keys
    if keys is None or any(k not in cache for k in keys):
        with torch.no_grad():
            if m.lean:
                hidden = blocks.run_blocks(body, slice(0, cache.first), body.embed_tokens(tokens), _shared(batch))
            else:
                with _only_blocks(body, slice(0, cache.first), final_norm=False):
                    hidden = body(input_ids=tokens, attention_mask=attention).last_hidden_state
        if keys is not None and not cache.full:
            for row, key in enumerate(keys):
                if key not in cache and not cache.put(key, hidden[row, :int(batch.lengths[row]) - 1]):
                    break
        return hidden
    hidden = torch.zeros((len(keys), tokens.shape[1], body.config.hidden_size), dtype=m.dtype, device=m.device)
    for row, key in enumerate(keys):
        cached = cache.get(key)
        hidden[row, :cached.shape[0]] = cached
    return hidden


@torch.no_grad()
def fill_prefix(m, batches):
    """Put each row's frozen-prefix output into the cache, several rows a batch; stops when the cache
    is full. Rows that begin alike compute that beginning once a batch (blocks.shared_length): on 2
    CPU cores builtin:sql's 100 W1 rows take ~5.6 s in bfloat16 and ~10.3 s in float32 at 26 rows a
    batch, against ~8.2 and ~14.6 s at 8 rows without sharing. Steps then all cost the same, so the
    progress bar's estimate holds from the start."""
    for batch in batches:
        if m.prefix.full:
            break
        _batch_prefix(m, batch)


def _batch_prefix(m, batch):
    """`_prefix_hidden` of a numpy batch's inputs (every position but the last)."""
    body, _ = _causal_lm(m)
    return _prefix_hidden(m, body, batch, torch.from_numpy(batch.tokens[:, :-1]).to(m.device),
                          torch.from_numpy(batch.attention_mask[:, :-1]).to(m.device))


def _shared(batch):
    """Input positions at the start that every row of `batch` has in common (blocks.shared_length)."""
    return blocks.shared_length(batch.tokens[:, :-1], batch.lengths - 1)


def _token_losses(m, batch):
    """Cross-entropy of each supervised target [N] and its row [N]; logits only where there is a label."""
    tokens = torch.from_numpy(batch.tokens).to(m.device)
    attention = torch.from_numpy(batch.attention_mask).to(m.device)
    targeted = torch.from_numpy(batch.supervised[:, 1:]).to(m.device)   # [B, T-1]
    body, head = _causal_lm(m)
    inputs, mask = tokens[:, :-1], attention[:, :-1]
    first = _first_computed(m)
    start = _prefix_hidden(m, body, batch, inputs, mask) if m.prefix is not None else None
    targets = tokens[:, 1:][targeted]
    if m.lean:
        start = body.embed_tokens(inputs) if start is None else start
        hidden = blocks.supervised_hidden(body, first, start, targeted, _shared(batch))
        losses = blocks.supervised_losses(head, hidden, targets)
    else:
        if start is not None:
            with _only_blocks(body, slice(first, None)):
                hidden = body(inputs_embeds=start, attention_mask=mask).last_hidden_state
        else:
            hidden = body(input_ids=inputs, attention_mask=mask).last_hidden_state
        losses = F.cross_entropy(head(hidden[targeted]).float(), targets, reduction="none")
    return losses, targeted.nonzero()[:, 0]


def _replays(m):
    """The recorded training steps (graphs.Replays) when this model's steps are recorded, else None:
    on CUDA, for blocks.py's loss with plain LoRA layers only (dropout, DoRA and full fine-tuning run
    eagerly)."""
    if m.graphs is None:
        m.graphs = _recordable(m) and graphs.Replays(graphs.CudaRecorder(),
                                                     log=lambda text: print(text, file=sys.stderr))
    return m.graphs or None


def _recordable(m):
    return (m.lean and graphs.wanted(m.device) and not (m.spec is not None and m.spec.full)
            and all(blocks._plain_lora(layer) is not None for layer in _lora_modules(m).values()))


def _padded_loss(m, buffers, shared=0):
    """The step of graphs.layout's fixed shapes: every block at every position (the first `shared`,
    the same in every row, once for the batch), the loss at the listed targets, weighted; backward
    into the .grad tensors. Returns the weighted loss."""
    body, head = _causal_lm(m)
    first = _first_computed(m)
    hidden = buffers["start"] if "start" in buffers else body.embed_tokens(buffers["inputs"])
    hidden = blocks.run_blocks(body, slice(first, None), hidden, shared)
    picked = body.norm(hidden.flatten(0, 1).index_select(0, buffers["places"]))   # (index_select: no sync on GPUs)
    loss = (blocks.supervised_losses(head, picked, buffers["targets"]) * buffers["weights"]).sum()
    loss.backward()
    return loss.detach()


def _replayed_loss(m, replays, batch, total):
    """One batch's forward and backward pass through `replays` (gradients added into .grad, which
    must exist); returns its summed loss divided by `total`, as a scalar tensor."""
    values = graphs.layout(batch, total)
    if m.prefix is not None:   # the frozen blocks' output, from the cache or computed now, as the input
        inputs = values.pop("inputs")
        width = batch.tokens.shape[1] - 1
        hidden = _batch_prefix(m, batch)
        values["start"] = hidden.new_zeros(inputs.shape + hidden.shape[2:])
        values["start"][:, :width] = hidden
    shared = _shared(batch)
    return replays.run(values, lambda buffers: _padded_loss(m, buffers, shared), m.device, tag=shared)


def _set_mode(m, training):
    """m.model.train(training), skipped when `_set_mode` already put it in that mode: the call walks
    every module (~680 of them for SmolLM2 with adapters, 1.5 ms: 2% of a W1 step)."""
    if m.training is not training:
        m.model.train(training)
        m.training = training


def train_step(m, optimizer, batches, learning_rate=None, max_grad_norm=None):
    """One optimizer step over one batch or several micro-batches (gradients accumulated, one backward each),
    at `learning_rate` when given, the gradients' global norm clipped to `max_grad_norm` when given."""
    _set_mode(m, True)
    batches = batches if isinstance(batches, (list, tuple)) else [batches]
    total = sum(int(b.supervised[:, 1:].sum()) for b in batches)
    distributed = m.world is not None and m.world.size > 1
    if distributed:   # this rank's rows of the global batch: the loss is over every rank's tokens
        total = int(reduce_sum(m, [total])[0])
    replays = _replays(m)
    loss_sum = 0.0
    if replays is not None or (distributed and not m.sharded):   # gradients added into tensors that stay / are summed
        for p in m.model.parameters():
            if p.requires_grad and p.grad is None:
                p.grad = torch.zeros_like(p)
    for batch in batches:
        if not batch.tokens.shape[0]:    # no rows on this rank in this batch
            continue
        if replays is not None and total:
            loss_sum += float(_replayed_loss(m, replays, batch, total)) * total
            continue
        losses, _ = _token_losses(m, batch)
        (losses.sum() * (m.world.size if m.sharded else 1) / total).backward()
        loss_sum += float(losses.detach().sum())
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if distributed:
        if not m.sharded:      # FSDP2 has already summed each sharded gradient over the processes
            _reduce_gradients(m, grads)
        loss_sum = reduce_sum(m, [loss_sum])[0]
    value = loss_sum / total
    if m.sharded:              # the norm of the whole gradient, from every process's shards
        norm = reduce_sum(m, [sum(float(_local(g).float().square().sum()) for g in grads)])[0] ** 0.5
        grads = [_local(g) for g in grads]
    else:
        norm = float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)).float()))
    finite = bool(np.isfinite(value)) and bool(np.isfinite(norm))
    if finite:   # a step with a non-finite loss or gradient changes nothing
        if max_grad_norm is not None and norm > max_grad_norm:
            torch._foreach_mul_(grads, max_grad_norm / (norm + 1e-6))
        if learning_rate is not None:
            for group in optimizer.param_groups:
                group["lr"] = learning_rate
        optimizer.step()
    optimizer.zero_grad(set_to_none=replays is None and (not distributed or m.sharded))
    return StepResult(value, total, finite, norm)


@torch.no_grad()
def eval_loss(m, batch):
    """Summed cross-entropy and supervised-token count of each row: two numpy arrays [B]."""
    _set_mode(m, False)
    losses, rows = _token_losses(m, batch)
    size = batch.tokens.shape[0]
    sums = torch.zeros(size, dtype=torch.float64, device=losses.device).index_add_(0, rows, losses.double())
    counts = torch.bincount(rows, minlength=size)
    return sums.cpu().numpy(), counts.cpu().numpy()


@torch.no_grad()
def logits(m, tokens):
    """Full logits [B, T, V] as float32 numpy (for tests and checks)."""
    _set_mode(m, False)
    return m.model(input_ids=torch.as_tensor(tokens, device=m.device)).logits.float().cpu().numpy()


@torch.no_grad()
def generate(m, prompt_ids, max_tokens=256, temp=0.0, top_p=1.0, seed=0, stop_ids=()):
    """Yield generated token ids one at a time (KV cache), stopping at a stop id (not yielded)."""
    _set_mode(m, False)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    ids = torch.tensor([list(prompt_ids)], device=m.device)
    cache_arg, last_only = _cache_arg(m), _last_logits_only(m)
    past = None
    for _ in range(max_tokens):
        out = m.model(input_ids=ids, use_cache=True, **{cache_arg: past}, **last_only)
        past = getattr(out, cache_arg)
        token = int(_pick(out.logits[:, -1].float().cpu(), temp, top_p, gen)[0])
        if token in stop_ids:
            return
        yield token
        ids = torch.tensor([[token]], device=m.device)


def generate_batch(m, prompts, max_tokens=256, temp=0.0, top_p=1.0, seed=0, stop_ids=()):
    """Answers (lists of token ids, stop token excluded) for several prompts at once, each what `generate`
    gives for that prompt alone."""
    rows = [dict(max_tokens=max_tokens, temp=temp, top_p=top_p, seed=seed, stop_ids=stop_ids)] * len(prompts)
    answers = [[] for _ in prompts]
    for step in generate_steps(m, prompts, rows):
        for row, (token, _, _) in step.items():
            answers[row].append(token)
    return answers


@torch.no_grad()
def generate_steps(m, prompts, rows, top_logprobs=None, cancelled=frozenset()):
    """Generate for several prompts at once, a step at a time: yields {row: (token, logprob, top)} for the
    rows that produced a token at that step. `rows`: each prompt's settings (max_tokens, temp, top_p, seed,
    stop_ids), its answer what `generate` gives for it alone; `top_logprobs`: None, or how many of the most
    likely tokens to list in `top` as (token, logprob) (logprob: the model's, before temperature); a row
    whose index is put in `cancelled` (a set the caller may add to between steps) stops.

    Prompts are left-padded, with positions counted from each row's first real token, so every row
    decodes as it would alone; the batch ends when its last row does.
    """
    _set_mode(m, False)
    gens = [torch.Generator(device="cpu").manual_seed(row["seed"]) for row in rows]
    width = max(len(p) for p in prompts)
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    attention = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(list(p))
        attention[row, width - len(p):] = 1
    ids, attention = ids.to(m.device), attention.to(m.device)
    positions = (attention.cumsum(1) - 1).clamp(min=0)
    cache_arg, last_only = _cache_arg(m), _last_logits_only(m)
    past, made = None, [0] * len(prompts)
    running = set(range(len(prompts)))
    while True:
        running -= set(cancelled)
        running = {row for row in running if made[row] < rows[row]["max_tokens"]}
        if not running:
            return
        out = m.model(input_ids=ids, attention_mask=attention, position_ids=positions, use_cache=True,
                      **{cache_arg: past}, **last_only)
        past = getattr(out, cache_arg)
        scores = out.logits[:, -1].float().cpu()                                 # [B, V]
        logprobs = torch.log_softmax(scores, -1) if top_logprobs is not None else None
        tokens = torch.zeros(len(prompts), dtype=torch.long)
        step = {}
        for row in sorted(running):
            settings = rows[row]
            token = int(_pick(scores[row:row + 1], settings["temp"], settings["top_p"], gens[row])[0])
            tokens[row] = token
            if token in settings["stop_ids"]:
                running.discard(row)
                continue
            made[row] += 1
            entry = (None, None)
            if logprobs is not None:
                top = torch.topk(logprobs[row], max(top_logprobs, 1))
                entry = (float(logprobs[row, token]),
                         [(int(t), float(v)) for t, v in zip(top.indices, top.values)][:top_logprobs])
            step[row] = (token, *entry)
        if step:
            yield step
        ids = tokens[:, None].to(m.device)
        attention = torch.cat([attention, torch.ones_like(attention[:, :1])], dim=1)
        positions = positions[:, -1:] + 1


def remove_adapter(m):
    """Take the adapters off, leaving the base model as it was loaded (nothing merged)."""
    if m.spec is None:
        return
    blocks.forget_packing(m.model)
    m.model = m.model.unload()
    m.spec = None
    m.prefix = None
    m.graphs = None
    m.training = None


def _cache_arg(m):
    """transformers 5.2x names the KV cache `cache`; earlier releases `past_key_values`."""
    return "cache" if "cache" in inspect.signature(_base_lm(m).forward).parameters else "past_key_values"


def _last_logits_only(m):
    """The forward argument that computes logits for the last position only (a prompt's other
    positions would cost the output projection [T, vocab] for nothing)."""
    for name in ("logits_to_keep", "num_logits_to_keep"):
        if name in inspect.signature(_base_lm(m).forward).parameters:
            return {name: 1}
    return {}


def _pick(scores, temp, top_p, gen):
    """Next token of each row from float32 scores [B, V]: argmax, or a sample at `temp` within top_p."""
    if temp <= 0:
        return scores.argmax(-1)
    probs = torch.softmax(scores / temp, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < top_p
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p * keep)
    return torch.multinomial(probs, 1, generator=gen)[:, 0]


def fuse(m, save_dir):
    """Merge the adapters into the weights and save an HF folder (safetensors + tokenizer)."""
    blocks.forget_packing(m.model)       # the merge adds to the frozen weights behind their versions' back
    merged = m.model.merge_and_unload() if hasattr(m.model, "merge_and_unload") else m.model
    merged.save_pretrained(str(save_dir), safe_serialization=True)
    m.tokenizer.save_pretrained(str(save_dir))
    m.model = merged
    m.spec = None
    m.prefix = None
    m.graphs = None
    m.training = None


def clear_cache(threshold=None):
    """Give the CUDA allocator's cached blocks back when they exceed `threshold` bytes (None: keep PyTorch's
    cache, which is faster; CPUs have no such cache)."""
    if threshold is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        if torch.cuda.memory_reserved() - torch.cuda.memory_allocated() > threshold:
            torch.cuda.empty_cache()


def peak_memory():
    if torch.cuda.is_available() and torch.cuda.max_memory_allocated() > 0:
        return int(torch.cuda.max_memory_allocated())
    return resident_peak()

