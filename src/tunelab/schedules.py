"""Learning-rate schedules: mlx-lm's forms, as plain functions of the step, the same on every engine.

mlx-lm's config form (`lr_schedule` in a YAML file):

  lr_schedule:
    name: cosine_decay          # cosine_decay, linear_schedule, exponential_decay, step_decay
    arguments: [1e-5, 1000, 1e-7]
    warmup: 100                 # steps of linear warm-up from warmup_init to arguments[0]
    warmup_init: 1e-7

and tunelab's shorthand flags (`--lr-schedule cosine --warmup 50 --min-lr 1e-6`), which fill the
arguments from --learning-rate and the run's length. Step k of a run (counted from 1) uses the
schedule's value at k - 1, as mlx-lm's optimizer does; with warm-up the main schedule starts after
warmup + 1 steps, as mlx-lm joins them.
"""

import math

from tunelab.errors import UserError

# name: (formula of the step s, counted from 0, the arguments' names)
SCHEDULES = {
    "cosine_decay": (lambda init, decay_steps, end=0.0: lambda s: end + 0.5 * (
        1.0 + math.cos(math.pi * min(s, decay_steps) / decay_steps)) * (init - end), ("init", "decay_steps", "end")),
    "linear_schedule": (lambda init, end, steps: lambda s: init + (end - init) * min(s, steps) / steps,
                        ("init", "end", "steps")),
    "exponential_decay": (lambda init, decay_rate: lambda s: init * decay_rate ** s, ("init", "decay_rate")),
    "step_decay": (lambda init, decay_rate, step_size: lambda s: init * decay_rate ** (s // step_size),
                   ("init", "decay_rate", "step_size")),
}
SHORTHANDS = ("constant", "cosine", "linear")
STEP_ARGUMENTS = {"cosine_decay": (1,), "linear_schedule": (2,), "step_decay": (2,)}   # whole numbers >= 1


def _number(value, where):
    if isinstance(value, str):   # YAML 1.1 reads 1e-5 as text; mlx-lm's loader reads it as a number
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UserError(f"{where}: expected a number, got {value!r}")
    return value


def from_config(config, where="lr_schedule"):
    """(schedule name, arguments, warmup, warmup_init) from mlx-lm's `lr_schedule` mapping, checked."""
    if not isinstance(config, dict):
        raise UserError(f"{where}: expected a mapping with name and arguments (mlx-lm's form), got {config!r}")
    unknown = sorted(set(config) - {"name", "arguments", "warmup", "warmup_init"})
    if unknown:
        raise UserError(f"{where}: unknown keys {', '.join(unknown)} (valid: name, arguments, warmup, warmup_init)")
    name = config.get("name")
    if name not in SCHEDULES:
        raise UserError(f"{where}.name: {name!r} is not one of {', '.join(SCHEDULES)}")
    arguments = config.get("arguments")
    _, names = SCHEDULES[name]
    required = len(names) - (1 if name == "cosine_decay" else 0)
    if not isinstance(arguments, list) or not required <= len(arguments) <= len(names):
        raise UserError(f"{where}.arguments: {name} takes [{', '.join(names)}], got {arguments!r}")
    arguments = [_number(a, f"{where}.arguments[{i}]") for i, a in enumerate(arguments)]
    for i in STEP_ARGUMENTS.get(name, ()):
        if arguments[i] < 1 or arguments[i] != int(arguments[i]):
            raise UserError(f"{where}.arguments[{i}] ({names[i]}): expected a whole number of at least 1, "
                            f"got {arguments[i]!r}")
        arguments[i] = int(arguments[i])
    warmup = _number(config.get("warmup", 0), f"{where}.warmup")
    if warmup < 0 or warmup != int(warmup):
        raise UserError(f"{where}.warmup: expected a whole number of steps, got {warmup!r}")
    return name, arguments, int(warmup), float(_number(config.get("warmup_init", 0.0), f"{where}.warmup_init"))


def from_options(schedule, learning_rate, iters, warmup=0, warmup_init=0.0, min_lr=0.0):
    """(name, arguments, warmup, warmup_init) for the `lr_schedule` option: mlx-lm's mapping, or a
    shorthand name (constant, cosine, linear) whose arguments come from the run."""
    if isinstance(schedule, dict):
        return from_config(schedule)
    if schedule not in SHORTHANDS:
        raise UserError(f"--lr-schedule: {schedule!r} is not one of {', '.join(SHORTHANDS)} (mlx-lm's named "
                        f"schedules, {', '.join(SCHEDULES)}, go in a config file's lr_schedule mapping)")
    if warmup < 0:
        raise UserError(f"--warmup: must be 0 or more steps, got {warmup}")
    decay = max(iters - 1 - (warmup + 1 if warmup else 0), 1)   # the main schedule ends at the last step
    arguments = {"constant": ("linear_schedule", [learning_rate, learning_rate, 1]),
                 "cosine": ("cosine_decay", [learning_rate, decay, min_lr]),
                 "linear": ("linear_schedule", [learning_rate, min_lr, decay])}[schedule]
    return (*arguments, warmup, warmup_init)


def build(name, arguments, warmup=0, warmup_init=0.0):
    """The learning rate of each step of a run, counted from 1: a function step -> float."""
    main = SCHEDULES[name][0](*arguments)
    if not warmup:
        return lambda step: float(main(step - 1))
    rise = SCHEDULES["linear_schedule"][0](warmup_init, arguments[0], warmup)
    return lambda step: float(rise(step - 1) if step - 1 < warmup + 1 else main(step - 1 - (warmup + 1)))


def describe(name, arguments, warmup, warmup_init):
    text = f"{name}({', '.join(f'{a:g}' for a in arguments)})"
    if name == "linear_schedule" and arguments[0] == arguments[1]:
        text = f"constant {arguments[0]:g}"
    return f"linear warm-up from {warmup_init:g} over {warmup} steps, then {text}" if warmup else text
