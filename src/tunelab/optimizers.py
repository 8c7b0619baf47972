"""The optimizers a run may use, mlx-lm's five, with their settings as mlx-lm's `optimizer_config` takes
them and MLX's defaults. Engine-neutral: this checks and completes the settings; each engine builds
the optimizer (the torch engine's SGD, Adafactor and Muon (engines/torch_engine/optim.py) make MLX's updates, so the same config
trains the same way on both).

  adam       betas [0.9, 0.999], eps 1e-8, bias_correction true (the update PyTorch's Adam makes)
  adamw      adam's, and decoupled weight_decay 0.01
  sgd        momentum 0, weight_decay 0 (added to the gradient), dampening 0, nesterov false
  adafactor  eps [1e-30, 1e-3], clip_threshold 1, decay_rate -0.8, beta_1 none, weight_decay 0,
             scale_parameter true, relative_step true (the step size then comes from the step count,
             not the learning rate, as in MLX), warmup_init false
  muon       momentum 0.95, weight_decay 0.01, nesterov true, ns_steps 5 (2-D weights are
             orthogonalized; vectors take plain momentum steps)
"""

import math

from tunelab.errors import UserError

NAMES = ("adam", "adamw", "sgd", "adafactor", "muon")


def _number(low=None, high=None, above=None, below=None):
    def check(value):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return "expected a number"
        if (low is not None and value < low) or (high is not None and value > high) or \
                (above is not None and value <= above) or (below is not None and value >= below):
            parts = [f"at least {low}" if low is not None else "", f"at most {high}" if high is not None else "",
                     f"above {above}" if above is not None else "", f"below {below}" if below is not None else ""]
            return "expected a number " + " and ".join(p for p in parts if p)
        return None
    return check


def _flag(value):
    return None if isinstance(value, bool) else "expected true or false"


def _pair(check):
    def both(value):
        if not isinstance(value, (list, tuple)) or len(value) != 2:
            return "expected two numbers"
        return next((f"{problem} (each of two)" for problem in map(check, value) if problem), None)
    return both


def _whole(value):
    return None if isinstance(value, int) and not isinstance(value, bool) and value >= 1 else \
        "expected a whole number of at least 1"


def _optional(check):
    return lambda value: None if value is None else check(value)


def _only_true(value):
    return None if value is True else ("tunelab's Adam always corrects the bias (as PyTorch's does), so only true")


_ADAM = {"betas": ([0.9, 0.999], _pair(_number(low=0, below=1))), "eps": (1e-8, _number(above=0)),
         "bias_correction": (True, _only_true)}
SETTINGS = {
    "adam": _ADAM,
    "adamw": {**_ADAM, "weight_decay": (0.01, _number(low=0))},
    "sgd": {"momentum": (0.0, _number(low=0, below=1)), "weight_decay": (0.0, _number(low=0)),
            "dampening": (0.0, _number(low=0, high=1)), "nesterov": (False, _flag)},
    "adafactor": {"eps": ([1e-30, 1e-3], _pair(_number(low=0))), "clip_threshold": (1.0, _number(above=0)),
                  "decay_rate": (-0.8, _number(below=0)), "beta_1": (None, _optional(_number(low=0, below=1))),
                  "weight_decay": (0.0, _number(low=0)), "scale_parameter": (True, _flag),
                  "relative_step": (True, _flag), "warmup_init": (False, _flag)},
    "muon": {"momentum": (0.95, _number(low=0, below=1)), "weight_decay": (0.01, _number(low=0)),
             "nesterov": (True, _flag), "ns_steps": (5, _whole)},
}


def settings(name, config=None, weight_decay=None):
    """The complete settings of optimizer `name`: MLX's defaults, then `config` (mlx-lm's
    optimizer_config[name]), then `weight_decay` (--weight-decay) where given. Every problem at once."""
    known = SETTINGS[name]
    config = dict(config or {})
    where = f"optimizer_config.{name}"
    problems = []
    unknown = sorted(set(config) - set(known))
    if unknown:
        problems.append(f"{where}: {', '.join(unknown)}: not a setting of {name} (it takes "
                        f"{', '.join(known)})")
    if weight_decay is not None:
        if "weight_decay" not in known:
            problems.append("--weight-decay: Adam takes none here; pass --optimizer adamw for decoupled weight decay")
        else:
            config["weight_decay"] = weight_decay
    out = {}
    for key, (default, check) in known.items():
        value = config.get(key, default)
        problem = check(value) if key in config else None
        if problem:
            flag = "--weight-decay" if key == "weight_decay" and weight_decay is not None else f"{where}.{key}"
            problems.append(f"{flag}: {problem}, got {value!r}")
        out[key] = tuple(value) if isinstance(value, list) else value
    if name == "sgd" and out["nesterov"] and (out["momentum"] <= 0 or out["dampening"] != 0):
        problems.append(f"{where}.nesterov: Nesterov momentum needs a momentum above 0 and no dampening")
    UserError.raise_if(problems)
    out.pop("bias_correction", None)
    return out


def describe(name, values):
    """A few words on the optimizer for the run's header, e.g. 'adamw (weight decay 0.01)'."""
    parts = [f"weight decay {values['weight_decay']:g}"] if values.get("weight_decay") else []
    if "momentum" in values and values["momentum"]:
        parts.append(f"momentum {values['momentum']:g}" + (", Nesterov" if values.get("nesterov") else ""))
    if name == "adafactor" and values["relative_step"]:
        parts.append("relative steps: the learning rate below is not used; relative_step false to use it")
    return name + (f" ({'; '.join(parts)})" if parts else "")
