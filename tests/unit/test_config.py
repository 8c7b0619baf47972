import argparse

import pytest

from tunelab.config import LoraOptions, add_arguments, resolve
from tunelab.errors import UserError


def parse(argv):
    parser = argparse.ArgumentParser()
    add_arguments(parser, LoraOptions)
    return resolve(LoraOptions, parser.parse_args(argv))


def test_defaults_follow_mlx_lm():
    opts = parse([])
    assert (opts.batch_size, opts.iters, opts.learning_rate, opts.num_layers) == (4, 1000, 1e-5, 16)
    assert (opts.lora_rank, opts.lora_scale, opts.train) == (8, 20.0, False)
    assert opts.mask_prompt is None   # not given: off for training, as the adapter was trained for --test alone


def test_config_file_then_command_line(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("batch_size: 2\niters: 50\nmask-prompt: true\nlora_parameters: {rank: 4, scale: 10}\n")
    opts = parse(["-c", str(cfg), "--iters", "7"])
    assert opts.batch_size == 2 and opts.iters == 7 and opts.mask_prompt is True
    assert opts.lora_rank == 4 and opts.lora_scale == 10.0


def test_flag_default_does_not_override_config_file(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train: true\nlearning_rate: 0.001\n")
    opts = parse(["-c", str(cfg), "--batch-size", "1"])
    assert opts.train is True and opts.learning_rate == 0.001


def test_every_bad_key_reported_at_once(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("batch_sise: 2\niters: many\nfine_tune_type: dpo\nlora_parameters: {rnk: 4}\n")
    with pytest.raises(UserError) as e:
        parse(["-c", str(cfg)])
    text = str(e.value)
    assert "batch_sise: unknown option" in text
    assert "iters: expected int, got 'many'" in text
    assert "fine_tune_type: 'dpo' is not one of lora" in text
    assert "lora_parameters.rnk: unknown option" in text
    assert len(e.value.problems) == 4


def test_missing_config_file(tmp_path):
    with pytest.raises(UserError, match="config file not found"):
        parse(["-c", str(tmp_path / "none.yaml")])


def test_the_recommended_recipe_reads_and_passes_the_checks(tmp_path):
    from dataclasses import replace
    from pathlib import Path

    from tunelab.config import LoraOptions, read_config_file
    from tunelab.train import check_options

    recipe = Path(__file__).resolve().parents[2] / "recipes" / "text-to-sql.yaml"
    values = read_config_file(recipe, LoraOptions)
    assert values["num_layers"] == -1 and values["best_metric"] == "sql-exec" and values["keep_best"] is True
    data = tmp_path / "data"
    data.mkdir()
    for split in ("train", "valid", "test"):
        (data / f"{split}.jsonl").write_text("")
    check_options(replace(LoraOptions(), **values, data=str(data)))


def test_sizes_read_as_mlx_lm_reads_them():
    import argparse

    from tunelab.config import size

    assert [size(x) for x in ("0", "512", "512MB", "2GB", "1.5G", "3 m")] == [0, 512, 512 * 10**6, 2 * 10**9,
                                                                             1.5e9, 3 * 10**6]
    with pytest.raises(argparse.ArgumentTypeError, match="a size such as 512MB"):
        size("2TB")
