"""torch and mlx side by side: the same weights give the same numbers, and each engine's adapters
work on the other, in PEFT and in mlx-lm itself."""

import json

import numpy as np
import pytest

from tests.conftest import write_jsonl
from tests.engines.engine_params import engine_module
from tests.engines.test_engine_contract import ROWS, batch_for, load, random_adapter
from tunelab import adapters
from tunelab.cli import main

mlx = engine_module("mlx")
torch_engine = engine_module("torch")


def pair(folder, spec=None, seed=0):
    """The same base model on both engines, with the same random adapter when spec is given."""
    t, m = load(torch_engine, folder), load(mlx, folder)
    if spec is not None:
        torch_engine.attach_lora(t, spec, seed=seed)
        tensors = random_adapter(spec, torch_engine.adapter_tensors(t), seed)
        torch_engine.set_adapter(t, spec, tensors)
        mlx.set_adapter(m, spec, tensors)
    return t, m


def scale_of(logits):
    return float(np.abs(logits).max())


def test_same_weights_and_adapter_give_the_same_logits(tiny_model):
    t, m = pair(tiny_model)
    tokens = batch_for(t).tokens
    expected = torch_engine.logits(t, tokens)
    np.testing.assert_allclose(mlx.logits(m, tokens), expected, rtol=0, atol=1e-5 * scale_of(expected))
    t, m = pair(tiny_model, adapters.spec_for(-1, 2, 4, 2.0, 0.0))
    expected = torch_engine.logits(t, tokens)
    np.testing.assert_allclose(mlx.logits(m, tokens), expected, rtol=0, atol=1e-5 * scale_of(expected))


def test_one_training_step_gives_the_same_loss_and_adapter(tiny_model):
    spec = adapters.spec_for(-1, 2, 4, 2.0, 0.0)
    t, m = pair(tiny_model, spec)
    batch = batch_for(t)
    ours, theirs = torch_engine.make_optimizer(t, 1e-3), mlx.make_optimizer(m, 1e-3)
    for _ in range(3):
        step_t, step_m = torch_engine.train_step(t, ours, batch), mlx.train_step(m, theirs, batch)
        assert step_m.loss == pytest.approx(step_t.loss, rel=1e-5)
        assert step_m.supervised_tokens == step_t.supervised_tokens
    after_t, after_m = torch_engine.adapter_tensors(t), mlx.adapter_tensors(m)
    for module, (a, b) in after_t.items():
        np.testing.assert_allclose(after_m[module][0], a, rtol=0, atol=1e-5)
        np.testing.assert_allclose(after_m[module][1], b, rtol=0, atol=1e-5)
        assert np.abs(b).max() > 1e-4       # the steps did move B away from its random start


def test_adamw_clipping_and_a_schedule_are_the_same_on_both_engines(tiny_model):
    from tunelab import schedules

    spec = adapters.spec_for(-1, 2, 4, 2.0, 0.0)
    t, m = pair(tiny_model, spec)
    batch = batch_for(t)
    rate = schedules.build(*schedules.from_options("cosine", 1e-2, 4, warmup=1, warmup_init=1e-3))
    settings = {"weight_decay": 0.1, "betas": (0.8, 0.95), "eps": 1e-6}
    ours = torch_engine.make_optimizer(t, rate(1), "adamw", **settings)
    theirs = mlx.make_optimizer(m, rate(1), "adamw", **settings)
    assert ours.param_groups[0]["betas"] == (0.8, 0.95) and list(theirs.betas) == [0.8, 0.95]
    assert ours.param_groups[0]["eps"] == theirs.eps == 1e-6
    for step in range(1, 5):
        step_t = torch_engine.train_step(t, ours, batch, rate(step), max_grad_norm=0.05)
        step_m = mlx.train_step(m, theirs, batch, rate(step), max_grad_norm=0.05)
        assert step_m.loss == pytest.approx(step_t.loss, rel=1e-5)
        assert step_m.grad_norm == pytest.approx(step_t.grad_norm, rel=1e-4)
        assert step_t.grad_norm > 0.05   # the clipping was applied
    after_t, after_m = torch_engine.adapter_tensors(t), mlx.adapter_tensors(m)
    for module, (a, b) in after_t.items():
        np.testing.assert_allclose(after_m[module][0], a, rtol=0, atol=1e-5)
        np.testing.assert_allclose(after_m[module][1], b, rtol=0, atol=1e-5)


def train_with_cli(engine_name, model, folder):
    write_jsonl(folder / "data" / "train.jsonl", ROWS * 4)
    write_jsonl(folder / "data" / "valid.jsonl", ROWS)
    code = main(["lora", "--train", "--engine", engine_name, "--model", str(model), "--data", str(folder / "data"),
                 "--iters", "6", "--num-layers", "1", "--mask-prompt", "--learning-rate", "1e-2",
                 "--steps-per-report", "3", "--adapter-path", str(folder / "run")])
    assert not code
    manifest = json.loads((folder / "run" / "tunelab_run.json").read_text())
    assert manifest["chosen"]["engine"] == engine_name
    return folder / "run"


def test_an_adapter_trained_on_mlx_works_in_torch_and_peft(tiny_model, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run = train_with_cli("mlx", tiny_model, tmp_path)
    spec, tensors = adapters.load(run)
    m = load(mlx, tiny_model)
    mlx.set_adapter(m, spec, tensors)
    tokens = batch_for(m).tokens
    expected = mlx.logits(m, tokens)
    assert not np.allclose(expected, mlx.logits(load(mlx, tiny_model), tokens), atol=1e-3)   # it learned something
    t = load(torch_engine, tiny_model)
    torch_engine.set_adapter(t, spec, tensors)
    np.testing.assert_allclose(torch_engine.logits(t, tokens), expected, rtol=0, atol=1e-5 * scale_of(expected))
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, str(run)).eval()
    with torch.no_grad():
        theirs = peft_model(input_ids=torch.from_numpy(tokens)).logits.numpy()
    np.testing.assert_allclose(theirs, expected, rtol=0, atol=1e-5 * scale_of(expected))


def test_an_adapter_trained_on_torch_works_in_mlx_lm_itself(tiny_llama, tmp_path):
    """mlx-lm's own loader and generator on tunelab's mlx-lm copy (Llama: its rope_theta is the
    default mlx-lm assumes when config.json keeps it under rope_parameters only)."""
    import mlx.core as mx
    from mlx_lm import generate, load as mlx_lm_load

    run = train_with_cli("torch", tiny_llama, tmp_path)
    t = load(torch_engine, tiny_llama)
    torch_engine.set_adapter(t, *adapters.load(run))
    tokens = batch_for(t).tokens
    expected = torch_engine.logits(t, tokens)
    model, tokenizer = mlx_lm_load(str(tiny_llama), adapter_path=str(run))
    model.set_dtype(mx.float32)
    theirs = np.array(model(mx.array(tokens)).astype(mx.float32))
    np.testing.assert_allclose(theirs, expected, rtol=0, atol=1e-5 * scale_of(expected))
    prompt = t.tokenizer.encode("SELECT a FROM", add_special_tokens=False)
    ours = t.tokenizer.decode(list(torch_engine.generate(t, prompt, max_tokens=8)))
    assert generate(model, tokenizer, prompt=prompt, max_tokens=8) == ours


@pytest.mark.parametrize("bits", [4, 8])
def test_qlora_on_mlx_trains_and_fuses_to_a_torch_model(tiny_model, tmp_path, bits):
    import mlx.core as mx
    import mlx.nn as nn

    m = mlx.load(tiny_model, device="cpu", dtype="float32", log=lambda *_: None, quantize=(bits, 32))
    tokens = batch_for(m).tokens
    # the quantized model computes exactly what the plain model does with the dequantized weights
    plain = load(mlx, tiny_model)
    layers = dict(plain.model.named_modules())
    count = 0
    for path, module in m.model.named_modules():
        if isinstance(module, nn.QuantizedLinear):
            layers[path].weight = mx.dequantize(module.weight, module.scales, module.biases, module.group_size, bits)
            count += 1
    assert count == 2 * 7
    expected = mlx.logits(plain, tokens)
    np.testing.assert_allclose(mlx.logits(m, tokens), expected, rtol=0, atol=1e-4 * scale_of(expected))
    assert not np.allclose(mlx.logits(load(mlx, tiny_model), tokens), expected)
    spec = adapters.spec_for(-1, 2, 4, 2.0, 0.0)
    mlx.attach_lora(m, spec)
    optimizer = mlx.make_optimizer(m, 1e-2)
    batch = batch_for(m)
    first = mlx.train_step(m, optimizer, batch).loss
    for _ in range(10):
        last = mlx.train_step(m, optimizer, batch).loss
    assert last < first
    expected = mlx.logits(m, tokens)
    mlx.fuse(m, tmp_path / "fused")          # dequantized: a plain model any engine loads
    fused = load(torch_engine, tmp_path / "fused")
    np.testing.assert_allclose(torch_engine.logits(fused, tokens), expected, rtol=0, atol=1e-4 * scale_of(expected))


def test_a_qlora_adapter_reloads_on_the_quantized_base(tiny_model, tmp_path):
    from tunelab import engines

    run = train_with_cli_quantized(tiny_model, tmp_path)
    assert json.loads((run / adapters.CONFIG).read_text())["tunelab_quantization"] == {"bits": 4, "group_size": 32}
    engine, m, _ = engines.load(str(tiny_model), run, device="cpu", dtype="float32", log=lambda *_: None,
                                engine="mlx")
    assert m.quantized == (4, 32)


def train_with_cli_quantized(model, folder):
    write_jsonl(folder / "data" / "train.jsonl", ROWS * 4)
    write_jsonl(folder / "data" / "valid.jsonl", ROWS)
    code = main(["lora", "--train", "--engine", "mlx", "--quantize", "4", "--q-group-size", "32", "--model", str(model),
                 "--data", str(folder / "data"), "--iters", "3", "--num-layers", "1", "--adapter-path", str(folder / "run")])
    assert not code
    return folder / "run"


def test_quantize_needs_the_mlx_engine(tiny_llama, tmp_path, capsys):
    write_jsonl(tmp_path / "data" / "train.jsonl", ROWS)
    write_jsonl(tmp_path / "data" / "valid.jsonl", ROWS)
    code = main(["lora", "--train", "--engine", "torch", "--quantize", "4", "--model", str(tiny_llama),
                 "--data", str(tmp_path / "data"), "--adapter-path", str(tmp_path / "run")])
    assert code and "--quantize needs the mlx engine" in capsys.readouterr().err


def test_every_command_runs_on_the_mlx_engine(tiny_llama, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    steps = [["prepare", "--out", "data", "--num-rows", "30", "--valid-rows", "4", "--test-rows", "3"],
             ["lora", "--engine", "mlx", "--train", "--test", "--model", str(tiny_llama), "--data", "data",
              "--iters", "4", "--num-layers", "1", "--mask-prompt", "--steps-per-report", "2", "--grad-accumulation-steps", "2",
              "--adapter-path", "run"],
             ["fuse", "--engine", "mlx", "--model", str(tiny_llama), "--adapter-path", "run", "--save-path", "fused"],
             ["generate", "--engine", "mlx", "--model", "fused", "--prompt", "What is a?", "--max-tokens", "4"],
             ["eval", "--engine", "mlx", "--model", str(tiny_llama), "--adapter-path", "run", "--data", "data",
              "--max-tokens", "4"]]
    for argv in steps:
        assert not main(argv), argv
    out = capsys.readouterr().out
    assert "Engine: mlx (as asked)" in out and "Test loss" in out
    assert (tmp_path / "fused" / "model.safetensors").is_file()
    results = json.loads((tmp_path / "run" / "eval" / "results.json").read_text())
    assert set(results["models"]) == {"base", "tuned"} and results["rows"] == 3


def test_a_model_saved_quantized_by_mlx_lm_trains_and_fuses(tiny_llama, tmp_path):
    """A folder from `mlx_lm.convert -q` (4-bit, as mlx-community publishes): loaded as it is, adapters
    trained on it, reloaded with them, fused into a plain float folder that torch loads."""
    from mlx_lm import convert

    from tunelab import engines

    convert(str(tiny_llama), str(tmp_path / "q4"), quantize=True, q_bits=4, q_group_size=32)
    run = train_with_cli("mlx", tmp_path / "q4", tmp_path)
    assert json.loads((run / adapters.CONFIG).read_text())["tunelab_quantization"] == {"bits": 4, "group_size": 32}
    _, m, _ = engines.load(str(tmp_path / "q4"), run, device="cpu", dtype="float32", log=lambda *_: None,
                           engine="mlx")
    assert m.quantized == (4, 32)
    tokens = batch_for(m).tokens
    expected = mlx.logits(m, tokens)
    mlx.fuse(m, tmp_path / "fused")
    config = json.loads((tmp_path / "fused" / "config.json").read_text())
    assert "quantization" not in config and "quantization_config" not in config
    fused = load(torch_engine, tmp_path / "fused")
    np.testing.assert_allclose(torch_engine.logits(fused, tokens), expected, rtol=0, atol=1e-4 * scale_of(expected))
    with pytest.raises(Exception, match="already quantized"):
        mlx.load(tmp_path / "q4", device="cpu", dtype="float32", log=lambda *_: None, quantize=(8, 32))


def test_dora_is_the_same_on_both_engines_and_in_peft(tiny_model, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tests.engines.test_engine_contract import with_dora

    t, spec = with_dora(torch_engine, tiny_model)
    m = load(mlx, tiny_model)
    mlx.set_adapter(m, spec, torch_engine.adapter_tensors(t))
    batch = batch_for(t)
    expected = torch_engine.logits(t, batch.tokens)
    np.testing.assert_allclose(mlx.logits(m, batch.tokens), expected, rtol=0, atol=1e-5 * scale_of(expected))
    ours, theirs = torch_engine.make_optimizer(t, 1e-3), mlx.make_optimizer(m, 1e-3)
    for _ in range(3):
        step_t, step_m = torch_engine.train_step(t, ours, batch), mlx.train_step(m, theirs, batch)
        assert step_m.loss == pytest.approx(step_t.loss, rel=1e-5)
    after_t, after_m = torch_engine.adapter_tensors(t), mlx.adapter_tensors(m)
    # Adam moves a value by up to lr (1e-3) a step whatever its gradient's size, so where a gradient is
    # near zero, float-order differences in the row norms show at a few 1e-5: held to a tenth of a step
    for module, arrays in after_t.items():
        for ours_array, theirs_array in zip(arrays, after_m[module]):
            np.testing.assert_allclose(theirs_array, ours_array, rtol=0, atol=1e-4)
    # the mlx-trained DoRA adapter in PEFT itself
    adapters.save(tmp_path, spec, after_m)
    expected = mlx.logits(m, batch.tokens)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, str(tmp_path)).eval()
    with torch.no_grad():
        got = peft_model(input_ids=torch.from_numpy(batch.tokens)).logits.numpy()
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5 * scale_of(expected))


def test_dora_from_the_command_line_and_what_export_does_with_it(tiny_llama, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "data" / "train.jsonl", ROWS * 2)
    write_jsonl(tmp_path / "data" / "valid.jsonl", ROWS)
    for engine_name in ("mlx", "torch"):
        assert not main(["lora", "--train", "--engine", engine_name, "--fine-tune-type", "dora", "--model",
                         str(tiny_llama), "--data", "data", "--iters", "2", "--num-layers", "1",
                         "--adapter-path", f"run-{engine_name}"])
        config = json.loads((tmp_path / f"run-{engine_name}" / adapters.CONFIG).read_text())
        assert config["use_dora"] is True and config["fine_tune_type"] == "dora"
    assert "Training 7 DoRA modules" in capsys.readouterr().out
    assert main(["export", "--model", str(tiny_llama), "--adapter-path", "run-mlx", "--to", "gguf-lora"])
    assert "DoRA adapter" in capsys.readouterr().err
    assert not main(["export", "--model", str(tiny_llama), "--adapter-path", "run-mlx", "--outtype", "f32",
                     "--out", "merged.gguf"])
    assert (tmp_path / "merged.gguf").is_file()


def test_full_fine_tuning_steps_are_the_same_on_both_engines(tiny_model):
    spec = adapters.spec_for(1, 2, 0, 0.0, 0.0, kind="full")
    t, m = pair(tiny_model)
    torch_engine.attach_lora(t, spec)
    mlx.attach_lora(m, spec)
    batch = batch_for(t)
    ours, theirs = torch_engine.make_optimizer(t, 1e-3), mlx.make_optimizer(m, 1e-3)
    for _ in range(3):
        step_t, step_m = torch_engine.train_step(t, ours, batch), mlx.train_step(m, theirs, batch)
        assert step_m.loss == pytest.approx(step_t.loss, rel=1e-5)
        assert step_m.grad_norm == pytest.approx(step_t.grad_norm, rel=1e-4)
    after_t, after_m = torch_engine.adapter_tensors(t), mlx.adapter_tensors(m)
    assert after_t.keys() == after_m.keys()
    for name, value in after_t.items():
        np.testing.assert_allclose(after_m[name], value, rtol=0, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("engine_name", ["torch", "mlx"])
def test_a_full_fine_tune_from_the_command_line_is_a_model_every_tool_loads(tiny_llama, tmp_path, engine_name,
                                                                          capsys):
    """`lora --fine-tune-type full` writes mlx-lm's adapter layout and a whole model folder; transformers and
    mlx-lm load that folder, mlx-lm loads the adapter onto the base itself, and lora --test, fuse and export
    take the run folder."""
    import mlx.core as mx
    import torch
    from mlx_lm import load as mlx_lm_load
    from transformers import AutoModelForCausalLM

    write_jsonl(tmp_path / "data" / "train.jsonl", ROWS * 4)
    write_jsonl(tmp_path / "data" / "valid.jsonl", ROWS)
    write_jsonl(tmp_path / "data" / "test.jsonl", ROWS)
    run = tmp_path / "run"
    assert not main(["lora", "--train", "--test", "--engine", engine_name, "--model", str(tiny_llama), "--data",
                     str(tmp_path / "data"), "--fine-tune-type", "full", "--iters", "4", "--num-layers", "1",
                     "--learning-rate", "1e-3", "--steps-per-report", "2", "--adapter-path", str(run)])
    out = capsys.readouterr().out
    assert "every weight of the top 1 blocks (full fine-tuning)" in out and "Memory: weights" in out
    assert not (run / adapters.PEFT_WEIGHTS).exists()
    assert json.loads((run / adapters.CONFIG).read_text())["fine_tune_type"] == "full"
    spec, tensors = adapters.load(run)
    t = load(torch_engine, tiny_llama)
    torch_engine.set_adapter(t, spec, tensors)
    tokens = batch_for(t).tokens
    expected = torch_engine.logits(t, tokens)
    assert not np.allclose(expected, torch_engine.logits(load(torch_engine, tiny_llama), tokens), atol=1e-4)
    with torch.no_grad():
        folder = AutoModelForCausalLM.from_pretrained(str(run / "model"), dtype=torch.float32)
        np.testing.assert_allclose(folder(input_ids=torch.from_numpy(tokens)).logits.numpy(), expected, rtol=0,
                                   atol=1e-5 * scale_of(expected))
    for path, adapter in ((run / "model", None), (tiny_llama, run)):   # the folder; the base + mlx-lm's adapter
        model, _ = mlx_lm_load(str(path), adapter_path=str(adapter) if adapter else None)
        model.set_dtype(mx.float32)
        np.testing.assert_allclose(np.array(model(mx.array(tokens)).astype(mx.float32)), expected, rtol=0,
                                   atol=1e-5 * scale_of(expected))
    assert not main(["lora", "--test", "--model", str(tiny_llama), "--data", str(tmp_path / "data"),
                     "--adapter-path", str(run)])
    assert not main(["fuse", "--model", str(tiny_llama), "--adapter-path", str(run), "--save-path",
                     str(tmp_path / "fused")])
    np.testing.assert_allclose(torch_engine.logits(load(torch_engine, tmp_path / "fused"), tokens), expected,
                               rtol=0, atol=1e-5 * scale_of(expected))
    assert not main(["export", "--model", str(tiny_llama), "--adapter-path", str(run), "--outtype", "f32",
                     "--out", str(tmp_path / "full.gguf")])
    assert main(["export", "--model", str(tiny_llama), "--adapter-path", str(run), "--to", "gguf-lora",
                 "--out", str(tmp_path / "lora.gguf")]) == 2
    assert "a full fine-tune" in capsys.readouterr().err


@pytest.mark.parametrize("name, settings", [
    ("sgd", {}),
    ("sgd", {"momentum": 0.9, "dampening": 0.1, "weight_decay": 0.01}),
    ("sgd", {"momentum": 0.9, "nesterov": True}),
    ("adafactor", {}),                                         # relative steps: the learning rate is not used
    ("adafactor", {"relative_step": False, "beta_1": 0.9, "weight_decay": 0.01, "scale_parameter": False}),
    ("adafactor", {"warmup_init": True, "clip_threshold": 0.5}),
    ("muon", {}),
    ("muon", {"nesterov": False, "momentum": 0.8, "ns_steps": 3}),
])
def test_every_optimizer_makes_mlx_s_updates_on_both_engines(tiny_model, name, settings):
    """mlx-lm's optimizers with MLX's settings: the torch engine's own SGD, Adafactor and Muon take the steps
    MLX's take, LoRA (vectors and matrices) and full fine-tuning (norm weights too)."""
    for spec in (adapters.spec_for(-1, 2, 4, 2.0, 0.0), adapters.spec_for(1, 2, 0, 0.0, 0.0, kind="full")):
        t, m = pair(tiny_model, None if spec.full else spec)
        if spec.full:
            torch_engine.attach_lora(t, spec)
            mlx.attach_lora(m, spec)
        batch = batch_for(t)
        ours = torch_engine.make_optimizer(t, 1e-2, name, **settings)
        theirs = mlx.make_optimizer(m, 1e-2, name, **settings)
        start = torch_engine.adapter_tensors(t)
        for _ in range(3):
            step_t, step_m = torch_engine.train_step(t, ours, batch), mlx.train_step(m, theirs, batch)
            assert step_m.loss == pytest.approx(step_t.loss, rel=1e-5)
        after_t, after_m = torch_engine.adapter_tensors(t), mlx.adapter_tensors(m)
        moved = 0
        for key, value in after_t.items():
            for ours_, theirs_, before in zip(*(x if isinstance(x, tuple) else (x,)
                                                for x in (value, after_m[key], start[key]))):
                np.testing.assert_allclose(theirs_, ours_, rtol=1e-4, atol=1e-6, err_msg=f"{spec.kind} {key}")
                moved += not np.array_equal(ours_, before)
        assert moved >= len(after_t)
