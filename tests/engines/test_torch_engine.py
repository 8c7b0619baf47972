"""What is the torch engine's own: PEFT and transformers read its files, its generation matches
transformers', the frozen-prefix cache on disk. The shared contract is in test_engine_contract.py."""

import os
import platform
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tunelab import adapters
from tunelab.data.batching import collate
from tunelab.data.templates import encode_row
from tunelab.engines import torch_engine as engine

ROWS = [{"messages": [{"role": "system", "content": "CREATE TABLE t (a INTEGER, b VARCHAR)"},
                      {"role": "user", "content": f"What is a when b is {w}?"},
                      {"role": "assistant", "content": f"SELECT a FROM t WHERE b = '{w}'"}]}
        for w in ("x", "yy", "zzz long value")]


def load(folder):
    return engine.load(folder, device="cpu", dtype="float32", log=lambda *_: None)


def batch_for(model, mask_prompt=True, rows=ROWS):
    return collate([encode_row(model.tokenizer, r, "chat", mask_prompt) for r in rows])


def with_adapter(folder, seed=0, randomize_b=True, dtype="float32", num_layers=1, dora=False, full=False):
    model = engine.load(folder, device="cpu", dtype=dtype, log=lambda *_: None)
    spec = adapters.spec_for(num_layers, 2, 4, 2.0, 0.0, kind="full" if full else "dora" if dora else "lora")
    engine.attach_lora(model, spec, seed=seed)
    if randomize_b and not full:  # fresh adapters have B = 0; make them do something
        gen = np.random.default_rng(seed)
        tensors = {m: (w[0], gen.standard_normal(w[1].shape).astype(np.float32) * 0.2) + w[2:]
                   for m, w in engine.adapter_tensors(model).items()}
        engine.set_adapter(model, spec, tensors)
    return model, spec


def test_peft_loads_the_adapter_folder_with_the_same_logits(tiny_model, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model, spec = with_adapter(tiny_model)
    tokens = batch_for(model).tokens
    adapters.save(tmp_path, spec, engine.adapter_tensors(model))
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, str(tmp_path)).eval()
    with torch.no_grad():
        theirs = peft_model(input_ids=torch.from_numpy(tokens)).logits.numpy()
    np.testing.assert_allclose(engine.logits(model, tokens), theirs, rtol=0, atol=1e-5)


def test_fused_folder_equals_base_plus_adapter(tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM

    model, _ = with_adapter(tiny_model)
    tokens = batch_for(model).tokens
    expected = engine.logits(model, tokens)
    engine.fuse(model, tmp_path)
    fused = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32)
    with torch.no_grad():
        got = fused(input_ids=torch.from_numpy(tokens)).logits.numpy()
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)
    assert (tmp_path / "tokenizer.json").is_file()
    assert not any(tmp_path.glob("*.bin"))


def test_after_fuse_the_loss_reads_the_merged_weights_not_their_old_layouts(tiny_model, tmp_path):
    """The blocks' and output layer's weights laid out for oneDNN during training: fuse merges into
    those weights through `.data` (no version change), and the loss afterwards is the fused folder's."""
    model, _ = with_adapter(tiny_model)
    engine.savings(model, 3, 300)
    batch = batch_for(model)
    before, _ = engine.eval_loss(model, batch)
    engine.fuse(model, tmp_path)
    after, _ = engine.eval_loss(model, batch)
    expected, _ = engine.eval_loss(load(tmp_path), batch)
    np.testing.assert_allclose(after, expected, rtol=1e-5)
    assert not np.allclose(before, engine.eval_loss(load(tiny_model), batch)[0], rtol=1e-3)   # the adapter mattered


def test_generation_stops_at_a_stop_token(tiny_model):
    model = load(tiny_model)
    prompt = model.tokenizer.encode("SELECT a", add_special_tokens=False)
    free = list(engine.generate(model, prompt, max_tokens=8))
    assert len(free) == 8
    stopped = list(engine.generate(model, prompt, max_tokens=8, stop_ids={free[3]}))
    assert stopped == free[:free.index(free[3])]
    # greedy decoding agrees with transformers' own greedy generate
    with torch.no_grad():
        ref = model.model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False,
                                   eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    assert free == ref


def test_generation_builds_no_autograd_graph(tiny_model):
    """A base model's weights require grad; generating must still not record a graph (memory)."""
    model = load(tiny_model)
    assert any(p.requires_grad for p in model.model.parameters())
    seen = []
    model.model.register_forward_hook(lambda *_: seen.append(torch.is_grad_enabled()))
    engine.generate_batch(model, [[5, 6, 7]], max_tokens=3)
    list(engine.generate(model, [5, 6, 7], max_tokens=3))
    assert seen and not any(seen)


def test_prefix_cache_spills_to_disk_past_its_memory_budget(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path))
    examples = [encode_row(load(tiny_model).tokenizer, r, "chat", True) for r in ROWS]
    batch = collate(examples, keys=[("v", i) for i in range(3)])
    plain = load(tiny_model)
    engine.attach_lora(plain, adapters.spec_for(1, 2, 4, 20.0, 0.0))
    plain.prefix = None
    expected, _ = engine.eval_loss(plain, batch)

    model = load(tiny_model)
    engine.attach_lora(model, adapters.spec_for(1, 2, 4, 20.0, 0.0))
    first_row = (len(examples[0].tokens) - 1) * 64 * 4
    model.prefix.budget = first_row                       # one row in memory, the others on disk
    tokens = sum(len(ex.tokens) for ex in examples)
    lines = engine.savings(model, 3, tokens)
    assert "memory-mapped file" in lines[-1]
    engine.eval_loss(model, batch)
    assert len(model.prefix.rows) == 1 and len(model.prefix.spilled) == 2 and not model.prefix.full
    np.testing.assert_allclose(engine.eval_loss(model, batch)[0], expected, rtol=1e-6)   # from memory and disk
    for key in model.prefix.spilled:                     # what the step reads is what was written to disk
        offset, shape, _ = model.prefix.spilled[key]
        model.prefix.disk[offset:offset + 4 * shape[0] * shape[1]] = 0
    assert not np.allclose(engine.eval_loss(model, batch)[0], expected)

    # no room on disk either: the rows past the memory budget are recomputed, and the user is told
    import shutil

    monkeypatch.setattr(shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(1, 1, 0))
    model = load(tiny_model)
    engine.attach_lora(model, adapters.spec_for(1, 2, 4, 20.0, 0.0))
    model.prefix.budget = first_row
    assert "are recomputed" in engine.savings(model, 3, tokens)[-1]
    engine.eval_loss(model, batch)
    assert len(model.prefix.rows) == 1 and model.prefix.full
    np.testing.assert_allclose(engine.eval_loss(model, batch)[0], expected, rtol=1e-6)


def losses_and_gradients(folder, lean, dtype="float32", num_layers=2, dora=False, mask_prompt=True, packed=False,
                         rows=ROWS, full=False):
    """Per-token losses and every trained tensor's gradient for one batch of rows (ROWS: three lengths,
    the same first 38 positions); packed: the adapted blocks' and the output layer's frozen weights
    laid out for oneDNN."""
    from tunelab.engines.torch_engine import blocks

    model, _ = with_adapter(folder, dtype=dtype, num_layers=num_layers, dora=dora, full=full)
    assert model.lean
    model.lean = lean
    if packed:
        assert blocks.plan_packing(engine._base_lm(model), engine._first_computed(model))[2]
    losses, rows = engine._token_losses(model, batch_for(model, mask_prompt, rows))
    if packed:   # the output layer's chunks and each adapted block's products went through the layouts
        lm = engine._base_lm(model)
        assert len(blocks._PACKED[lm.lm_head.weight][1]) >= 2
        assert all(module.weight in blocks._PACKED for layer in list(lm.model.layers)[-num_layers:]
                   for module in layer.modules() if type(module) is torch.nn.Linear and not module.weight.requires_grad)
    losses.sum().backward()
    grads = {n: p.grad.float().numpy() for n, p in model.model.named_parameters() if p.requires_grad}
    return losses.detach().float().numpy(), rows.numpy(), grads


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("num_layers,kind,mask_prompt", [(1, "lora", True), (2, "lora", True), (2, "lora", False),
                                                         (2, "dora", True), (1, "full", True), (2, "full", False)])
def test_lean_blocks_give_transformers_losses_and_gradients(tiny_model, monkeypatch, num_layers, kind, mask_prompt,
                                                            shared):
    """blocks.py (top block at supervised positions only, head loss as one function) against the plain
    forward of transformers: one adapted block (frozen-prefix cache) or both, LoRA, DoRA and full
    fine-tuning, padded rows; the rows' common first positions computed once, or in every row. Without
    mask_prompt the shared positions are supervised too, the last of them against a different target in
    each row."""
    dora, full = kind == "dora", kind == "full"
    from tunelab.engines.torch_engine import blocks

    batch = batch_for(load(tiny_model), mask_prompt)
    common = blocks.shared_length(batch.tokens[:, :-1], batch.lengths - 1)
    assert common == 38 and batch.supervised[:, 1:common + 1].any() != mask_prompt
    if not shared:
        monkeypatch.setattr(blocks, "SHARED_MIN", 10**9)
    taken = []
    pack = blocks._pack
    monkeypatch.setattr(blocks, "_pack", lambda hidden, common: taken.append(common) or pack(hidden, common))
    lean = losses_and_gradients(tiny_model, True, num_layers=num_layers, dora=dora, mask_prompt=mask_prompt, full=full)
    assert taken == ([38] * (3 - num_layers) if shared else [])   # the prefix fill and the loss, or the loss
    plain = losses_and_gradients(tiny_model, False, num_layers=num_layers, dora=dora, mask_prompt=mask_prompt,
                                 full=full)
    np.testing.assert_allclose(lean[0], plain[0], rtol=1e-5)
    np.testing.assert_array_equal(lean[1], plain[1])
    # LoRA: A and B of 7 layers a block; full: their 7 weights and 2 norms
    assert lean[2].keys() == plain[2].keys() and len(plain[2]) >= (9 if full else 14) * num_layers
    for name, grad in plain[2].items():
        assert np.abs(grad).max() > 0, name
        np.testing.assert_allclose(lean[2][name], grad, rtol=1e-4, atol=1e-5 * np.abs(grad).max(), err_msg=name)


@pytest.mark.parametrize("num_layers", [1, 2])
def test_weights_laid_out_for_onednn_give_transformers_losses_and_gradients(tiny_model, num_layers):
    from tunelab.engines.torch_engine import blocks

    if blocks._packing(torch.float32) is None:
        pytest.skip("no oneDNN weight layout here")
    packed = losses_and_gradients(tiny_model, True, num_layers=num_layers, packed=True)
    plain = losses_and_gradients(tiny_model, False, num_layers=num_layers)
    np.testing.assert_allclose(packed[0], plain[0], rtol=1e-5)
    for name, grad in plain[2].items():
        np.testing.assert_allclose(packed[2][name], grad, rtol=1e-4, atol=1e-5 * np.abs(grad).max(), err_msg=name)


@pytest.mark.parametrize("dtype,tolerance", [("float32", 1e-5), ("bfloat16", 1e-3)])
def test_products_on_a_cpu_take_whole_buckets_of_rows_and_the_same_values(tiny_model, monkeypatch, dtype, tolerance):
    """Positions and the top block's supervised rows are padded to a multiple of ROW_BUCKET for the
    block products (few oneDNN shapes), not for the output layer; losses and gradients are those of
    the unpadded computation."""
    from tunelab.engines.torch_engine import blocks

    if dtype == "float32" and blocks._onednn_linear() is None:
        pytest.skip("no oneDNN linear op in this build")
    rows_seen = []
    dense = blocks._dense
    monkeypatch.setattr(blocks, "_dense", lambda x, weight, *a: rows_seen.append((x.shape[:-1].numel(), weight.shape))
                        or dense(x, weight, *a))
    padded = losses_and_gradients(tiny_model, True, dtype=dtype, num_layers=1)
    vocab = load(tiny_model).model.lm_head.weight.shape[0]
    in_blocks = [rows for rows, shape in rows_seen if vocab not in shape]
    assert in_blocks and all(rows % blocks.ROW_BUCKET == 0 for rows in in_blocks)
    assert all(rows == len(padded[0]) for rows, shape in rows_seen if vocab in shape)
    assert len(padded[0]) % blocks.ROW_BUCKET and batch_for(load(tiny_model)).tokens.shape[1] % blocks.ROW_BUCKET != 1
    monkeypatch.setattr(blocks, "ROW_BUCKET", 1)
    plain = losses_and_gradients(tiny_model, True, dtype=dtype, num_layers=1)
    np.testing.assert_allclose(padded[0], plain[0], rtol=tolerance / 10)
    for name, grad in plain[2].items():
        np.testing.assert_allclose(padded[2][name], grad, rtol=tolerance, atol=tolerance / 10 * np.abs(grad).max(),
                                   err_msg=name)


@pytest.mark.parametrize("mask_prompt", [True, False])
def test_identical_rows_share_all_but_their_last_position_and_give_transformers_losses(tiny_model, mask_prompt):
    from tunelab.engines.torch_engine import blocks

    rows = [ROWS[2], ROWS[2], ROWS[1]]   # the same row twice: its own positions are all in common with itself
    batch = batch_for(load(tiny_model), mask_prompt, rows[:2])
    assert blocks.shared_length(batch.tokens[:, :-1], batch.lengths - 1) == batch.lengths[0] - 2
    for batch_rows in (rows[:2], rows):
        lean = losses_and_gradients(tiny_model, True, mask_prompt=mask_prompt, rows=batch_rows)
        plain = losses_and_gradients(tiny_model, False, mask_prompt=mask_prompt, rows=batch_rows)
        np.testing.assert_allclose(lean[0], plain[0], rtol=1e-5)
        for name, grad in plain[2].items():
            np.testing.assert_allclose(lean[2][name], grad, rtol=1e-4, atol=1e-5 * np.abs(grad).max(), err_msg=name)


def test_shared_length_counts_the_first_positions_every_row_has(monkeypatch):
    from tunelab.engines.torch_engine import blocks

    monkeypatch.setattr(blocks, "SHARED_MIN", 3)
    tokens = np.array([[5, 6, 7, 8, 9, 1, 2], [5, 6, 7, 8, 4, 0, 0], [5, 6, 7, 8, 9, 3, 0]])
    assert blocks.shared_length(tokens, np.array([7, 5, 6])) == 4
    assert blocks.shared_length(tokens[[0, 2]], np.array([7, 6])) == 5
    assert blocks.shared_length(tokens[[0, 0]], np.array([7, 7])) == 6       # each row keeps a position of its own
    assert blocks.shared_length(tokens[[0, 2]], np.array([7, 4])) == 3       # padding is not a common position
    assert blocks.shared_length(tokens[[0, 2]], np.array([7, 3])) == 0       # fewer than SHARED_MIN
    assert blocks.shared_length(tokens[:1], np.array([7])) == 0              # one row
    assert blocks.shared_length(np.array([[1, 6, 7, 8], [5, 6, 7, 8]]), np.array([4, 4])) == 0


def test_blocks_over_rows_with_a_shared_start_equal_each_row_computed_alone(tiny_model):
    """`run_blocks` (the frozen-prefix fill) with the common first positions computed once: every
    row's real positions as when it runs alone."""
    from tunelab.engines.torch_engine import blocks

    body = load(tiny_model).model.model
    gen = torch.Generator().manual_seed(0)
    lengths = [21, 13, 17]
    hidden = torch.randn(3, 21, body.config.hidden_size, generator=gen)
    hidden[1:, :11] = hidden[0, :11]
    with torch.no_grad():
        shared = blocks.run_blocks(body, slice(0, 2), hidden, shared=11)
        for row, size in enumerate(lengths):
            alone = blocks.run_blocks(body, slice(0, 2), hidden[row:row + 1, :size])
            torch.testing.assert_close(shared[row, :size], alone[0], rtol=1e-5, atol=1e-5 * float(alone.abs().max()))
    assert shared.shape == hidden.shape


def test_savings_name_the_first_tokens_every_row_has_when_they_are_computed_once(tiny_model):
    from tunelab.engines.torch_engine import blocks

    model, _ = with_adapter(tiny_model, num_layers=2)
    line = f"the first {blocks.SHARED_MIN} tokens, the same in every row, computed once per batch of 2 rows or more"
    assert f"{line}, not once per row" in engine.savings(model, 3, 300, blocks.SHARED_MIN)
    cached, _ = with_adapter(tiny_model, num_layers=1)
    with_fill = f"{line} and per batch of the frozen-prefix cache's fill, not once per row"
    assert with_fill in engine.savings(cached, 3, 300, blocks.SHARED_MIN)
    assert not any("the same in every row" in text for text in engine.savings(model, 3, 300, blocks.SHARED_MIN - 1))
    model.lean = False      # transformers' own forward computes every row whole
    assert not any("the same in every row" in text for text in engine.savings(model, 3, 300, 40))


def test_lean_blocks_in_bfloat16_stay_near_the_plain_forward(tiny_model):
    """On a CPU in bfloat16 attention is computed by products and a float32 softmax, not the fused kernel."""
    lean = losses_and_gradients(tiny_model, True, dtype="bfloat16")
    plain = losses_and_gradients(tiny_model, False, dtype="bfloat16")
    exact = losses_and_gradients(tiny_model, False)
    assert np.abs(lean[0] - exact[0]).mean() <= 2 * np.abs(plain[0] - exact[0]).mean() + 1e-3


def test_grouped_attention_equals_the_fused_kernel():
    from tunelab.engines.torch_engine import blocks

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(shape, generator=gen) for shape in ((2, 6, 5, 8), (2, 2, 7, 8), (2, 2, 7, 8)))
    real = torch.tensor([[1] * 7, [1] * 4 + [0] * 3]).bool()
    allowed = (torch.arange(7)[None, :] <= torch.tensor([0, 2, 3, 5, 6])[:, None])[None] & real[:, None, :]
    grouped = blocks._attend(q, k, v, allowed, 0.3, on_cpu=True)
    fused = blocks._attend(q, k, v, allowed, 0.3, on_cpu=False)
    torch.testing.assert_close(grouped, fused, rtol=1e-5, atol=1e-6)
    # query head h reads key/value head h // 3: swapping the key/value heads must change its output
    assert not torch.allclose(blocks._attend(q, k.flip(1), v.flip(1), allowed, 0.3, True), fused)
    # no mask given: causal, on both paths
    q = torch.randn((2, 6, 7, 8), generator=gen)
    causal = (torch.arange(7)[None, :] <= torch.arange(7)[:, None])[None]
    for on_cpu in (True, False):
        torch.testing.assert_close(blocks._attend(q, k, v, None, 0.3, on_cpu),
                                   blocks._attend(q, k, v, causal, 0.3, False), rtol=1e-5, atol=1e-6)


def test_models_outside_the_llama_family_or_with_attention_dropout_use_the_plain_forward(tiny_model):
    from tunelab.engines.torch_engine import blocks

    model = load(tiny_model)
    assert blocks.supported(model.model)
    model.model.config.attention_dropout = 0.1
    assert not blocks.supported(model.model)


@pytest.mark.parametrize("chunk,on_host", [(7, True), (7, False), (50, False)])
@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_one_pass_output_layer_gives_cross_entropy_and_its_gradient(dtype, tolerance, chunk, on_host):
    """Chunks of 7 rows of a 50-row output weight (a partial last chunk), logits far apart so the
    running maximum grows between chunks, targets in every chunk; the targets' logits picked by
    rows listed on the host (CPUs) or gathered on the device at every chunk (GPUs); and the whole
    weight as one chunk."""
    from tunelab.engines.torch_engine import blocks

    gen = torch.Generator().manual_seed(0)
    weight = (torch.randn(50, 16, generator=gen) * torch.linspace(0.1, 3, 50)[:, None]).to(dtype)
    hidden = torch.randn(6, 16, generator=gen).to(dtype).requires_grad_()
    targets = torch.tensor([0, 6, 7, 25, 48, 49])
    upstream = torch.rand(6, generator=gen)
    losses = blocks.SupervisedCrossEntropy.apply(hidden, weight, targets, chunk, on_host)
    (grad,) = torch.autograd.grad((losses * upstream).sum(), hidden)
    reference = hidden.detach().float().requires_grad_()
    plain = F.cross_entropy(reference @ weight.float().t(), targets, reduction="none")
    (plain_grad,) = torch.autograd.grad((plain * upstream).sum(), reference)
    torch.testing.assert_close(losses, plain.detach(), rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(grad.float(), plain_grad, rtol=tolerance, atol=tolerance * plain_grad.abs().max())
    with torch.no_grad():
        torch.testing.assert_close(blocks.SupervisedCrossEntropy.apply(hidden, weight, targets, chunk, on_host), losses)


def test_only_plain_lora_layers_take_the_fused_function(tiny_model):
    from tunelab.engines.torch_engine import blocks

    for dora, dropout, fused in ((False, 0.0, True), (True, 0.0, False), (False, 0.1, False)):
        model = load(tiny_model)
        engine.attach_lora(model, adapters.spec_for(1, 2, 4, 2.0, dropout, kind="dora" if dora else "lora"))
        layer = engine._lora_modules(model)["model.layers.1.self_attn.q_proj"]
        assert (blocks._plain_lora(layer) is not None) == fused
        assert blocks._plain_lora(layer.base_layer) is None


@pytest.mark.parametrize("dtype, tolerance", [("float32", 1e-5), ("bfloat16", 2e-2)])
def test_lora_layers_on_one_input_give_each_layers_peft_output_and_gradients(tiny_model, dtype, tolerance):
    """q/k/v (and a layer alone) through one LoraLinear (LoraLinearBf16 for bfloat16 where oneDNN has
    it) against PEFT's forward of each layer: outputs, the input's gradient and every A and B gradient."""
    from tunelab.engines.torch_engine import blocks

    model, _ = with_adapter(tiny_model, dtype=dtype)
    attn = model.model.base_model.model.model.layers[1].self_attn
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, attn.q_proj.in_features, generator=gen).to(getattr(torch, dtype))
    expected = blocks.LoraLinearBf16 if dtype == "bfloat16" and blocks._onednn_add() else blocks.LoraLinear
    assert blocks._lora_function(x) is expected
    if dtype == "bfloat16" and platform.machine() in ("x86_64", "AMD64") and torch.backends.mkldnn.is_available():
        assert blocks._onednn_add() == torch.ops.mkldnn._is_mkldnn_bf16_supported()
    for group in ((attn.q_proj, attn.k_proj, attn.v_proj), (attn.o_proj,)):
        params = [p for layer in group for p in (layer.lora_A["default"].weight, layer.lora_B["default"].weight)]
        results = []
        for run in (lambda x: blocks._project_all(group, x), lambda x: [layer(x) for layer in group]):
            tracked = x.clone().requires_grad_()
            outputs = run(tracked)
            upstream = [torch.randn(out.shape, generator=torch.Generator().manual_seed(i)).to(out.dtype)
                        for i, out in enumerate(outputs)]
            grads = torch.autograd.grad(sum((out.float() * up.float()).sum() for out, up in zip(outputs, upstream)),
                                        [tracked] + params)
            results.append([out.detach().float() for out in outputs] + [g.float() for g in grads])
        assert len(results[0]) == len(results[1]) == 2 * len(group) + 1 + len(group)
        for ours, theirs in zip(*results):
            torch.testing.assert_close(ours, theirs, rtol=tolerance, atol=tolerance * theirs.abs().max())


def test_frozen_products_equal_torch_linear():
    """The frozen-weight product (oneDNN's on CPUs in float32) against F.linear: any weight strides,
    a bias, batched rows; a frozen nn.Linear goes through it only where autograd needs nothing."""
    import platform

    from tunelab.engines.torch_engine import blocks

    if platform.machine() in ("x86_64", "AMD64") and torch.backends.mkldnn.is_available():
        assert blocks._onednn_linear() is not None
    gen = torch.Generator().manual_seed(0)
    x, weight, bias = torch.randn(2, 5, 12, generator=gen), torch.randn(7, 12, generator=gen), torch.randn(7, generator=gen)
    torch.testing.assert_close(blocks._dense(x, weight, bias), F.linear(x, weight, bias), rtol=1e-6, atol=1e-6)
    grad = torch.randn(5, 7, generator=gen)
    torch.testing.assert_close(blocks._dense(grad, weight.t()), grad @ weight, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(blocks._dense(x.transpose(0, 1), weight), F.linear(x.transpose(0, 1), weight))
    layer = torch.nn.Linear(12, 7).requires_grad_(False)
    with torch.no_grad():
        torch.testing.assert_close(blocks._project(layer, x), layer(x), rtol=1e-6, atol=1e-6)
    tracked = blocks._project(layer, x.clone().requires_grad_())
    assert tracked.grad_fn is not None
    layer.bias.requires_grad_(True)                      # a trained bias on a frozen weight
    assert blocks._project(layer, x).grad_fn is not None


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_weights_laid_out_for_onednn_give_the_same_products_and_follow_changes(dtype, tolerance):
    """A chosen frozen weight is read in oneDNN's layout, one layout a view (W, W^T, rows of W),
    made once; a change to the weight in place lays it out again; a weight not chosen is not."""
    from tunelab.engines.torch_engine import blocks

    if blocks._packing(dtype) is None:   # float32 has the layout wherever oneDNN runs on x86
        x86 = platform.machine() in ("x86_64", "AMD64") and torch.backends.mkldnn.is_available()
        assert dtype == torch.bfloat16 or not x86
        pytest.skip(f"no oneDNN weight layout for {dtype} here")
    gen = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(40, 24, generator=gen).to(dtype), torch.randn(40, generator=gen).to(dtype)
    x, grad = torch.randn(2, 5, 24, generator=gen).to(dtype), torch.randn(7, 40, generator=gen).to(dtype)
    assert blocks._packed(weight) is None and blocks._packed(weight.t()) is None

    def products():
        return [blocks._dense(x, weight, bias), blocks._dense(grad, weight.t()), blocks._dense(x, weight[8:16]),
                blocks._dense(x, weight[16:24])]      # rows of one shape at another place: their own layout

    def expected():
        plain = weight.float()
        return [F.linear(x.float(), plain, bias.float()), grad.float() @ plain, F.linear(x.float(), plain[8:16]),
                F.linear(x.float(), plain[16:24])]

    blocks._PACKABLE[weight] = True
    for ours, theirs in zip(products(), expected()):
        torch.testing.assert_close(ours.float(), theirs, rtol=tolerance, atol=tolerance * theirs.abs().max())
    assert len(blocks._PACKED[weight][1]) == 4
    assert blocks._packed(weight.t()) is blocks._packed(weight.t())
    with torch.no_grad():
        weight[3:9] *= -2
    for ours, theirs in zip(products(), expected()):
        torch.testing.assert_close(ours.float(), theirs, rtol=tolerance, atol=tolerance * theirs.abs().max())


def test_packing_takes_whole_blocks_from_the_top_then_the_output_layer_within_its_budget(tiny_model):
    from tunelab.engines.torch_engine import blocks

    if blocks._packing(torch.float32) is None:
        pytest.skip("no oneDNN weight layout here")

    def chosen(budget):
        model, _ = with_adapter(tiny_model, num_layers=2)
        lm = engine._base_lm(model)
        layers = list(lm.model.layers)
        result = blocks.plan_packing(lm, 0, budget)
        frozen = [[module.weight for module in layer.modules()
                   if type(module) is torch.nn.Linear and not module.weight.requires_grad] for layer in layers]
        sizes = [2 * sum(w.nbytes for w in weights) for weights in frozen]
        assert all(all(w in blocks._PACKABLE for w in weights) or not any(w in blocks._PACKABLE for w in weights)
                   for weights in frozen)
        marked = [all(w in blocks._PACKABLE for w in weights) for weights in frozen]
        return result, marked, lm.lm_head.weight in blocks._PACKABLE, sizes, 2 * lm.lm_head.weight.nbytes

    *_, sizes, head = chosen(0)
    assert chosen(0)[:3] == ((0, 0, False), [False, False], False)
    assert chosen(sizes[1])[:3] == ((sizes[1], 1, False), [False, True], False)
    assert chosen(sum(sizes) + head - 1)[:3] == ((sum(sizes), 2, False), [True, True], False)
    assert chosen(sum(sizes) + head)[:3] == ((sum(sizes) + head, 2, True), [True, True], True)
    model, _ = with_adapter(tiny_model, num_layers=1)
    assert any("top 1 adapted block(s) and the output layer's" in line for line in engine.savings(model, 3, 300))


def test_float32_on_a_cpu_caps_onednn_caches_unless_the_user_set_them(tiny_model, monkeypatch):
    for name in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY"):
        monkeypatch.delenv(name, raising=False)
    engine.load(tiny_model, device="cpu", dtype="bfloat16", log=lambda *_: None)
    assert "ONEDNN_PRIMITIVE_CACHE_CAPACITY" not in os.environ
    monkeypatch.setenv("LRU_CACHE_CAPACITY", "300")
    load(tiny_model)
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "256" and os.environ["LRU_CACHE_CAPACITY"] == "300"


CHURN = """
import ctypes, resource, sys, torch
from tunelab.engines import torch_engine
if sys.argv[1] == "keep":
    kept = torch_engine.keep_freed_memory()
else:   # glibc's starting thresholds (128 KB), held fixed: its own adaptive ones vary run to run
    kept = all(ctypes.CDLL("libc.so.6").mallopt(option, 128 * 1024) for option in (-3, -1))
def churn():   # activation-sized buffers of a few sizes, freed and made again, as the prefix fill does
    for size in (3, 7, 5, 7, 3, 6) * 5:
        buffers = [torch.ones(size * 1024**2 // 4) for _ in range(3)]
        del buffers
churn()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
churn()
print(kept, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's allocator only")
def test_on_glibc_freed_buffers_come_back_without_page_faults(monkeypatch):
    for name in [name for name in os.environ if name.startswith("MALLOC_")]:
        monkeypatch.delenv(name)

    def faults(mode):
        out = subprocess.run([sys.executable, "-c", CHURN, mode], capture_output=True, text=True, check=True)
        kept, count = out.stdout.split()
        return kept, int(count)

    kept, with_it = faults("keep")
    returned, without = faults("return")
    assert kept == returned == "True" and without > 5000 and with_it < without / 20, (with_it, without)
    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")                  # the user's own setting wins
    assert engine.keep_freed_memory() is False


def test_every_module_is_in_the_mode_of_the_last_call(tiny_model, tmp_path):
    """train_step puts every module in training mode and eval_loss every one in eval mode, even
    though a repeated mode is not set again, and LoRA dropout is live in training steps only."""
    model = load(tiny_model)
    spec = adapters.spec_for(1, 2, 4, 2.0, 0.5)
    engine.attach_lora(model, spec)                        # PEFT's new layers start in training mode
    gen = np.random.default_rng(0)                         # B != 0, so that dropout changes the output
    engine.set_adapter(model, spec, {m: (a, gen.standard_normal(b.shape).astype(np.float32))
                                     for m, (a, b) in engine.adapter_tensors(model).items()})
    batch = batch_for(model)

    def modes():
        return {module.training for module in model.model.modules()}

    optimizer = engine.make_optimizer(model, 0.0)
    assert modes() == {True, False}
    for _ in range(2):
        engine.train_step(model, optimizer, batch)
        assert modes() == {True}
    first, second = engine.eval_loss(model, batch)[0], engine.eval_loss(model, batch)[0]
    assert modes() == {False}
    np.testing.assert_array_equal(first, second)           # no dropout in evaluation
    losses = {engine.train_step(model, optimizer, batch).loss for _ in range(3)}
    assert modes() == {True} and len(losses) == 3          # dropout draws differ at learning rate 0
    engine.fuse(model, tmp_path / "fused")
    engine.eval_loss(model, batch)
    assert modes() == {False}


def test_gradient_checkpointing_in_transformers_forward_takes_the_same_steps(tiny_model):
    """The plain path (transformers' forward, for families blocks.py does not compute) with checkpointing on:
    the same losses and adapters, each adapted block run again in the backward pass."""
    results = []
    for checkpointed in (False, True):
        model, spec = with_adapter(tiny_model, num_layers=2)
        model.lean = False
        runs = []
        if checkpointed:
            engine.grad_checkpoint(model)
            for i in spec.layers:
                engine._base_lm(model).model.layers[i].input_layernorm.register_forward_pre_hook(
                    lambda *_: runs.append(1))
        optimizer = engine.make_optimizer(model, 1e-2)
        losses = [engine.train_step(model, optimizer, batch_for(model)).loss for _ in range(2)]
        assert len(runs) == (2 * 2 * 2 if checkpointed else 0)
        results.append((losses, engine.adapter_tensors(model)))
    np.testing.assert_allclose(results[1][0], results[0][0], rtol=1e-6)
    for module, arrays in results[0][1].items():
        for a, b in zip(arrays, results[1][1][module]):
            np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)
