import json

import numpy as np
import pytest
from safetensors.numpy import load_file

from tunelab import adapters
from tunelab.errors import UserError


def _tensors(spec, rng):
    return {m: (rng.standard_normal((spec.rank, 16)).astype(np.float32),
                rng.standard_normal((24, spec.rank)).astype(np.float32)) for m in spec.modules()}


def test_spec_counts_layers_from_the_top():
    spec = adapters.spec_for(4, 30, 8, 20.0, 0.0)
    assert spec.layers == [26, 27, 28, 29] and len(spec.modules()) == 28
    assert adapters.spec_for(-1, 2, 8, 20.0, 0.0).layers == [0, 1]


def test_round_trip_and_mlx_lm_copy(tmp_path):
    spec = adapters.spec_for(2, 3, 4, 20.0, 0.0, keys=["self_attn.q_proj", "mlp.down_proj"])
    tensors = _tensors(spec, np.random.default_rng(0))
    adapters.save(tmp_path, spec, tensors)
    spec2, tensors2 = adapters.load(tmp_path)
    assert spec2.layers == spec.layers and spec2.rank == 4 and spec2.scale == 20.0
    assert set(spec2.keys) == set(spec.keys)
    for m, (a, b) in tensors.items():
        np.testing.assert_array_equal(tensors2[m][0], a)
        np.testing.assert_array_equal(tensors2[m][1], b)
    mlx = load_file(str(tmp_path / adapters.MLX_WEIGHTS))
    m = "model.layers.1.self_attn.q_proj"
    np.testing.assert_array_equal(mlx[f"{m}.lora_a"], tensors[m][0].T)   # [in, r]
    np.testing.assert_array_equal(mlx[f"{m}.lora_b"], tensors[m][1].T)   # [r, out]
    config = json.loads((tmp_path / adapters.CONFIG).read_text())
    assert config["lora_alpha"] == 80.0 and config["r"] == 4
    assert config["num_layers"] == 2 and config["lora_parameters"]["scale"] == 20.0


def test_mlx_lm_folder_alone_loads_the_same(tmp_path):
    spec = adapters.spec_for(1, 2, 4, 10.0, 0.0)
    tensors = _tensors(spec, np.random.default_rng(1))
    adapters.save(tmp_path, spec, tensors)
    (tmp_path / adapters.PEFT_WEIGHTS).unlink()
    spec2, tensors2 = adapters.load(tmp_path)
    assert spec2.scale == 10.0 and spec2.rank == 4
    for m, (a, b) in tensors.items():
        np.testing.assert_array_equal(tensors2[m][0], a)
        np.testing.assert_array_equal(tensors2[m][1], b)


def test_nan_adapter_is_never_saved_and_the_old_one_stays(tmp_path):
    spec = adapters.spec_for(1, 2, 4, 10.0, 0.0)
    good = _tensors(spec, np.random.default_rng(2))
    adapters.save(tmp_path, spec, good)
    before = (tmp_path / adapters.PEFT_WEIGHTS).read_bytes()
    bad = dict(good)
    m = next(iter(bad))
    bad[m] = (bad[m][0] * np.nan, bad[m][1])
    with pytest.raises(UserError, match="NaN"):
        adapters.save(tmp_path, spec, bad)
    assert (tmp_path / adapters.PEFT_WEIGHTS).read_bytes() == before
