"""Learning-rate schedules: every step's value against an independent formula, and against MLX's own
schedulers joined the way mlx-lm joins them (where mlx is installed)."""

import math

import pytest

from tunelab import schedules
from tunelab.errors import UserError

FORMULAS = {   # value of 0-based step s, written out again
    ("cosine_decay", (1e-3, 10, 1e-5)): lambda s: 1e-5 + (1e-3 - 1e-5) * (1 + math.cos(math.pi * min(s, 10) / 10)) / 2,
    ("linear_schedule", (1e-3, 0.0, 8)): lambda s: 1e-3 * (1 - min(s, 8) / 8),
    ("exponential_decay", (1e-3, 0.9)): lambda s: 1e-3 * 0.9 ** s,
    ("step_decay", (1e-3, 0.5, 4)): lambda s: 1e-3 * 0.5 ** (s // 4),
}


@pytest.mark.parametrize("name, arguments", list(FORMULAS), ids=[n for n, _ in FORMULAS])
@pytest.mark.parametrize("warmup", [0, 3])
def test_every_step_equals_the_formula(name, arguments, warmup):
    rate = schedules.build(*schedules.from_config({"name": name, "arguments": list(arguments), "warmup": warmup,
                                                   "warmup_init": 1e-6}))
    formula = FORMULAS[(name, arguments)]
    for step in range(1, 31):
        s = step - 1
        if warmup and s <= warmup:
            expected = 1e-6 + (arguments[0] - 1e-6) * s / warmup
        else:
            expected = formula(s - (warmup + 1 if warmup else 0))
        assert rate(step) == pytest.approx(expected, rel=1e-12, abs=1e-18), (step, rate(step), expected)


@pytest.mark.parametrize("name, arguments", list(FORMULAS), ids=[n for n, _ in FORMULAS])
@pytest.mark.parametrize("warmup", [0, 3])
def test_the_same_as_mlx_lm_builds_from_its_config(name, arguments, warmup):
    optim = pytest.importorskip("mlx.optimizers")
    main = getattr(optim, name)(*arguments)
    if warmup:   # mlx-lm's tuner.utils.build_schedule
        main = optim.join_schedules([optim.linear_schedule(1e-6, arguments[0], warmup), main], [warmup + 1])
    rate = schedules.build(*schedules.from_config({"name": name, "arguments": list(arguments), "warmup": warmup,
                                                   "warmup_init": 1e-6}))
    for step in range(1, 31):   # mlx's optimizer applies schedule(optimizer.step) before counting the step
        assert rate(step) == pytest.approx(float(main(step - 1)), rel=1e-5)


@pytest.mark.parametrize("shorthand", ["cosine", "linear"])
@pytest.mark.parametrize("warmup", [0, 4])
def test_shorthands_start_at_the_learning_rate_and_end_at_min_lr_on_the_last_step(shorthand, warmup):
    rate = schedules.build(*schedules.from_options(shorthand, 2e-4, 50, warmup=warmup, min_lr=1e-6))
    first = warmup + 2 if warmup else 1   # the first step of the main schedule
    assert rate(first) == pytest.approx(2e-4)
    assert rate(50) == pytest.approx(1e-6)
    values = [rate(s) for s in range(first, 51)]
    assert values == sorted(values, reverse=True)
    constant = schedules.build(*schedules.from_options("constant", 2e-4, 50))
    assert {constant(s) for s in range(1, 51)} == {2e-4}


@pytest.mark.parametrize("config, message", [
    ({"name": "cosine", "arguments": [1e-3, 10]}, "is not one of"),
    ({"name": "cosine_decay", "arguments": [1e-3]}, "takes [init, decay_steps, end]"),
    ({"name": "cosine_decay", "arguments": [1e-3, 0]}, "decay_steps): expected a whole number of at least 1"),
    ({"name": "step_decay", "arguments": [1e-3, 0.5, 2.5]}, "step_size): expected a whole number"),
    ({"name": "exponential_decay", "arguments": [1e-3, "fast"]}, "arguments[1]: expected a number"),
    ({"name": "cosine_decay", "arguments": [1e-3, 10], "warmup": -1}, "warmup: expected a whole number"),
    ({"name": "cosine_decay", "arguments": [1e-3, 10], "decay": 1}, "unknown keys decay"),
    ("cosine_decay", "mlx-lm's named schedules"),
])
def test_bad_schedules_name_what_is_wrong(config, message):
    with pytest.raises(UserError) as e:
        schedules.from_options(config, 1e-3, 100)
    assert message in str(e.value)


def test_yaml_numbers_as_mlx_lm_reads_them():
    name, arguments, warmup, init = schedules.from_config({"name": "cosine_decay", "arguments": ["1e-5", 1000, "1e-7"],
                                                           "warmup": 100, "warmup_init": "1e-7"})
    assert (name, arguments, warmup, init) == ("cosine_decay", [1e-5, 1000, 1e-7], 100, 1e-7)
