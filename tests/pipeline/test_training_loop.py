"""The loop's schedule, epochs, optimizer and clipping through the real `lora` stage and mlx-lm's config form."""

import json
import math
from dataclasses import replace

import pytest
import yaml

from tests.conftest import builtin_sql_data
from tests.engines.engine_params import engine_module
from tunelab import adapters, schedules, train
from tunelab.cli import main
from tunelab.config import LoraOptions


def quiet(*_):
    pass


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return builtin_sql_data(tmp_path_factory.mktemp("loop") / "data", 31)   # 21 training rows: 11 batches of 2 an epoch


def metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


ENGINES = ["torch", "mlx"]


def engine_named(name):
    engine_module(name)     # mlx: skipped where it is not installed (outside CI)
    return name


@pytest.mark.parametrize("engine", ENGINES)
def test_logged_learning_rates_follow_the_schedule_and_epochs_set_the_length(tiny_llama, data, tmp_path, engine):
    opts = replace(LoraOptions(), model=str(tiny_llama), data=str(data), train=True, epochs=3, batch_size=2,
                   grad_accumulation_steps=2, num_layers=1, mask_prompt=True, learning_rate=1e-3,
                   lr_schedule="cosine", warmup=2, min_lr=1e-5, steps_per_report=1, steps_per_eval=100,
                   max_grad_norm=0.5, adapter_path=str(tmp_path / "run"), dtype="float32",
                   engine=engine_named(engine))
    lines = []
    train.lora(opts, log=lines.append)
    per_epoch = math.ceil(math.ceil(21 / 2) / 2)
    assert any(f"--epochs 3: {3 * per_epoch} steps of {per_epoch} an epoch" in line for line in lines)
    assert any("learning rate: linear warm-up from 0 over 2 steps, then cosine_decay(" in line for line in lines)
    reports = [m for m in metrics(tmp_path / "run") if "train_loss" in m]
    assert [m["step"] for m in reports] == list(range(1, 3 * per_epoch + 1))
    rate = schedules.build(*schedules.from_options("cosine", 1e-3, 3 * per_epoch, 2, 0.0, 1e-5))
    assert [m["learning_rate"] for m in reports] == [rate(m["step"]) for m in reports]
    assert reports[-1]["learning_rate"] == pytest.approx(1e-5)
    assert all(m["grad_norm"] > 0 for m in reports)


def test_mlx_lm_config_keys_for_the_schedule_and_optimizer(tiny_llama, data, tmp_path):
    config = tmp_path / "lora_config.yaml"
    config.write_text(yaml.safe_dump({
        "model": str(tiny_llama), "data": str(data), "train": True, "iters": 6, "batch_size": 2,
        "num_layers": 1, "learning_rate": "1e-3", "steps_per_report": 1, "adapter_path": str(tmp_path / "run"),
        "optimizer": "adamw", "weight_decay": 0.05, "max_grad_norm": 1.0,
        "lr_schedule": {"name": "cosine_decay", "warmup": 2, "warmup_init": 1e-7, "arguments": [1e-3, 4, 1e-7]},
    }).replace("'1e-3'", "1e-3"))
    assert main(["lora", "-c", str(config), "--dtype", "float32"]) == 0
    rate = schedules.build("cosine_decay", [1e-3, 4, 1e-7], 2, 1e-7)
    reports = [m for m in metrics(tmp_path / "run") if "train_loss" in m]
    assert [m["learning_rate"] for m in reports] == [rate(s) for s in range(1, 7)]
    manifest = json.loads((tmp_path / "run" / "tunelab_run.json").read_text())
    assert manifest["options"]["optimizer"] == "adamw" and manifest["options"]["weight_decay"] == 0.05


@pytest.mark.parametrize("flags, message", [
    (["--weight-decay", "0.1"], "--weight-decay: Adam takes none here"),
    (["--max-grad-norm", "0"], "--max-grad-norm: must be positive"),
    (["--epochs", "0"], "--epochs: must be at least 1"),
    (["--lr-schedule", "cosine_decay"], "go in a config file's lr_schedule mapping"),
    (["--lr-schedule", "cosine", "--warmup", "-2"], "--warmup: must be 0 or more"),
])
def test_bad_loop_options_are_named_before_any_work(tiny_llama, data, tmp_path, capsys, flags, message):
    code = main(["lora", "--train", "--model", str(tiny_llama), "--data", str(data), "--adapter-path",
                 str(tmp_path / "run"), *flags])
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
    assert not (tmp_path / "run").exists()


def loop_options(model, data, run, **changes):
    return replace(LoraOptions(), **{**dict(model=str(model), data=str(data), train=True, batch_size=2, num_layers=1,
                                          mask_prompt=True, steps_per_report=2, steps_per_eval=2, val_batches=-1,
                                          adapter_path=str(run), dtype="float32", engine="torch"), **changes})


@pytest.mark.parametrize("engine", ENGINES)
def test_keep_best_keeps_the_adapter_of_the_lowest_validation_loss(tiny_llama, data, tmp_path, engine):
    run = tmp_path / "run"
    lines = []
    train.lora(loop_options(tiny_llama, data, run, iters=16, learning_rate=3e-2, keep_best=True,
                            engine=engine_named(engine)), log=lines.append)
    validations = [(m["step"], m["val_loss"]) for m in metrics(run) if "val_loss" in m and m["step"] > 0]
    step, loss = min(validations, key=lambda v: (v[1], v[0]))
    config = json.loads((run / "best" / "adapter_config.json").read_text())
    assert (config["tunelab"]["step"], config["tunelab"]["val_loss"]) == (step, loss)
    assert any(f"Best validation loss {loss:.3f} at step {step}" in line for line in lines)
    # the kept adapter really is that one: its loss on the validation rows is the logged one
    check = tmp_path / "check"
    check.mkdir()
    (check / "test.jsonl").write_bytes((data / "valid.jsonl").read_bytes())
    seen = []
    result = train.lora(loop_options(tiny_llama, check, run / "best", train=False, test=True, test_batches=-1,
                                     engine=engine), log=seen.append)
    assert result["test_loss"] == pytest.approx(loss, rel=1e-6)
    assert any(f"(step {step}, validation loss {loss:.3f})" in line for line in seen)


def test_early_stop_ends_the_run_after_validations_without_improvement(tiny_llama, data, tmp_path):
    run = tmp_path / "run"
    lines = []
    train.lora(loop_options(tiny_llama, data, run, iters=40, learning_rate=5e-2, early_stop=1, keep_best=True),
               log=lines.append)
    validations = [(m["step"], m["val_loss"]) for m in metrics(run) if "val_loss" in m]
    best, stale, expected = validations[0][1], 0, None
    for step, loss in validations[1:]:
        stale = stale + 1 if loss >= best else 0
        best = min(best, loss)
        if stale == 1:
            expected = step
            break
    assert expected is not None and expected < 40, [round(v, 3) for _, v in validations]
    assert validations[-1][0] == expected
    state = json.loads((run / "checkpoints" / f"step-{expected:07d}" / "trainer_state.json").read_text())
    assert state["loop"]["done"] is True
    before = (run / "adapter_model.safetensors").read_bytes()
    train.lora(replace(loop_options(tiny_llama, data, run, iters=40, learning_rate=5e-2, early_stop=1,
                                    keep_best=True), resume=True), log=quiet)   # nothing left to do
    assert any(f"Early stop at step {expected}: no better validation loss in 1 validations" in line for line in lines)
    assert (run / "adapter_model.safetensors").read_bytes() == before


def test_test_alone_measures_the_loss_as_the_adapter_was_trained_and_says_so(tiny_llama, data, tmp_path):
    run = tmp_path / "run"
    train.lora(loop_options(tiny_llama, data, run, iters=4, learning_rate=1e-2), log=quiet)   # --mask-prompt
    test = dict(train=False, test=True, test_batches=-1)
    lines = []
    default = train.lora(loop_options(tiny_llama, data, run, mask_prompt=None, **test), log=lines.append)
    assert any("answers only, as the adapter was trained" in line for line in lines)
    masked = train.lora(loop_options(tiny_llama, data, run, mask_prompt=True, **test), log=quiet)
    every = train.lora(loop_options(tiny_llama, data, run, mask_prompt=False, **test), log=quiet)
    assert default == masked and every["test_loss"] != masked["test_loss"]
    assert main(["lora", "--test", "--model", str(tiny_llama), "--data", str(data), "--adapter-path", str(run),
                 "--no-mask-prompt"]) == 0


def test_the_adapter_names_a_base_model_peft_can_load(tmp_path):
    model_dir = tmp_path / "imported"
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    assert train._loadable_base(str(gguf), model_dir) == str(model_dir.resolve())
    assert train._loadable_base("HuggingFaceTB/SmolLM2-135M-Instruct", model_dir) == \
        "HuggingFaceTB/SmolLM2-135M-Instruct"


MLX_LM_EXAMPLE = """\
model: {model}
train: true
fine_tune_type: lora
optimizer: adamw
data: {data}
seed: 0
num_layers: 16
batch_size: 4
iters: 12
val_batches: 25
learning_rate: 1e-5
steps_per_report: 10
steps_per_eval: 200
grad_accumulation_steps: 1
resume_adapter_file: null
adapter_path: {run}
save_every: 100
test: false
test_batches: 100
max_seq_length: 2048
grad_checkpoint: false
lora_parameters:
  keys: ["self_attn.q_proj", "self_attn.v_proj"]
  rank: 8
  scale: 20.0
  dropout: 0.0
lr_schedule:
  name: cosine_decay
  warmup: 4
  warmup_init: 1e-7
  arguments: [1e-5, 12, 1e-7]
"""


@pytest.mark.parametrize("engine, changes", [
    ("torch", {}),
    ("mlx", {"grad_checkpoint: false": "grad_checkpoint: true\nclear_cache_threshold: 1GB"}),
    ("torch", {"grad_checkpoint: false": "grad_checkpoint: true", "fine_tune_type: lora": "fine_tune_type: full",
               "optimizer: adamw": "optimizer: adafactor"}),
])
def test_mlx_lm_example_config_runs_as_it_is(data, tmp_path, engine, changes):
    """The keys and values of mlx-lm's examples/lora_config.yaml, its schedule turned on, its paths and length
    made to fit a tiny model of 18 blocks; and with its gradient checkpointing, full fine-tuning and another
    optimizer turned on."""
    from tests.conftest import make_model

    if engine == "mlx":
        engine_module("mlx")
    model = make_model(tmp_path / "model", "llama", layers=18)
    config = tmp_path / "lora_config.yaml"
    text = MLX_LM_EXAMPLE.format(model=model, data=data, run=tmp_path / "run")
    for old, new in changes.items():
        assert old in text
        text = text.replace(old, new)
    config.write_text(text)
    assert main(["lora", "-c", str(config), "--dtype", "float32", "--engine", engine]) == 0
    if "fine_tune_type: full" in text:
        assert adapters.load(tmp_path / "run")[0].layers == list(range(2, 18))
        return
    adapter = json.loads((tmp_path / "run" / "adapter_config.json").read_text())
    assert adapter["lora_parameters"]["keys"] == ["self_attn.q_proj", "self_attn.v_proj"]
    assert adapter["layers_to_transform"] == list(range(2, 18))


def test_more_layers_than_the_model_has_is_an_error(tiny_llama, data, tmp_path, capsys):
    code = main(["lora", "--train", "--model", str(tiny_llama), "--data", str(data), "--num-layers", "99",
                 "--adapter-path", str(tmp_path / "run")])
    assert code == 2 and "--num-layers 99: the model has 2 blocks; pass 2 or -1" in capsys.readouterr().err


@pytest.mark.parametrize("line, message", [
    ("report_to: wandb,swanlab", "--report-to swanlab: not a tracker tunelab reports to"),
    ("trust_remote_code: true", "--trust-remote-code: tunelab never runs a model's own code"),
    ("hf_dataset: {path: billsum, prompt: text}", "hf_dataset: prompt: unknown"),
    ("clear_cache_threshold: lots", "clear_cache_threshold: expected a size such as 2GB"),
    ("fine_tune_type: full\nquantize: 4\nengine: mlx", "--fine-tune-type full trains the weights themselves"),
    ("optimizer: lion", "optimizer: 'lion' is not one of adam, adamw, sgd, adafactor, muon"),
    ("optimizer_config: {adam: {bias_correction: false}}", "bias_correction: tunelab's Adam always corrects"),
    ("optimizer_config: {adam: {momentum: 0.9}}", "optimizer_config.adam: momentum: not a setting of adam"),
    ("optimizer: sgd\noptimizer_config: {sgd: {nesterov: true}}", "Nesterov momentum needs a momentum above 0"),
    ("optimizer: adafactor\noptimizer_config: {adafactor: {eps: 1e-3}}", "adafactor.eps: expected two numbers"),
    ("optimizer: muon\noptimizer_config: {muon: {ns_steps: 0}}", "muon.ns_steps: expected a whole number"),
    ("optimizer: muon\noptimizer_config: {muon: 3}", "optimizer_config.muon: expected a mapping"),
    ("optimizer_config: {adamw: {betas: [0.9]}}\noptimizer: adamw", "optimizer_config.adamw.betas: expected two"),
    ("optimizer_config: {adam: {weight_decay: 0.1}}", "optimizer_config.adam: weight_decay: not a setting of adam"),
])
def test_mlx_lm_keys_tunelab_cannot_honour_are_named(tiny_llama, data, tmp_path, capsys, line, message):
    config = tmp_path / "c.yaml"
    config.write_text(f"model: {tiny_llama}\ndata: {data}\ntrain: true\nadapter_path: {tmp_path / 'run'}\n{line}\n")
    code = main(["lora", "-c", str(config)])
    err = capsys.readouterr().err
    assert code == 2 and message in err, err


def test_optimizer_config_sets_betas_and_eps(tiny_llama, data, tmp_path):
    from tunelab.config import LoraOptions

    opts = replace(LoraOptions(), optimizer="adamw",
                   optimizer_config={"adamw": {"betas": [0.8, 0.95], "eps": 1e-6, "weight_decay": 0.05}})
    assert train._optimizer(opts) == ("adamw", {"weight_decay": 0.05, "betas": (0.8, 0.95), "eps": 1e-6})
    assert train._optimizer(replace(opts, optimizer="sgd", optimizer_config={"sgd": {"momentum": 0.9}})) == \
        ("sgd", {"momentum": 0.9, "weight_decay": 0.0, "dampening": 0.0, "nesterov": False})
    assert train._optimizer(replace(opts, weight_decay=0.2))[1]["weight_decay"] == 0.2   # the flag wins


def test_best_metric_generates_answers_for_the_validation_rows_and_judges_by_them(tiny_llama, data, tmp_path):
    run = tmp_path / "run"
    train.lora(loop_options(tiny_llama, data, run, iters=8, learning_rate=1e-2, best_metric="sql-exec",
                            best_max_tokens=8, keep_best=True), log=quiet)
    logged = metrics(run)
    scores = {m["step"]: m["val_sql-exec"] for m in logged if "val_sql-exec" in m}
    losses = {m["step"]: m["val_loss"] for m in logged if "val_loss" in m}
    assert list(scores) == [0, 2, 4, 6, 8] and all(0.0 <= v <= 1.0 for v in scores.values())
    best = min((s for s in scores if s > 0), key=lambda s: (-scores[s], losses[s]))
    if (-scores[best], losses[best]) < (-scores[0], losses[0]):
        config = json.loads((run / "best" / "adapter_config.json").read_text())
        assert (config["tunelab"]["step"], config["tunelab"]["sql-exec"]) == (best, scores[best])
    else:
        assert not (run / "best").exists()   # nothing beat the start


def test_keep_best_by_a_task_metric_keeps_the_highest_score(tiny_llama, data, tmp_path, monkeypatch):
    scripted = iter([0.2, 0.4, 0.8, 0.6, 0.8, 0.1])   # a tie at 0.8 goes to the lower validation loss
    monkeypatch.setattr(train, "_task_score", lambda *_: next(scripted))
    run = tmp_path / "run"
    lines = []
    train.lora(loop_options(tiny_llama, data, run, iters=10, learning_rate=1e-2, best_metric="exact",
                            keep_best=True), log=lines.append)
    config = json.loads((run / "best" / "adapter_config.json").read_text())
    losses = {m["step"]: m["val_loss"] for m in metrics(run) if "val_loss" in m}
    step = min((4, 8), key=lambda s: losses[s])
    assert (config["tunelab"]["step"], config["tunelab"]["exact"]) == (step, 0.8)
    assert any(f"Best validation exact 0.800 at step {step}" in line for line in lines)
