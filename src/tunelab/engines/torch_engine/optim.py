"""SGD, Adafactor and Muon for the torch engine, making the updates MLX's optimizers make (mlx-lm's
configs name them with MLX's settings and defaults; see tunelab/optimizers.py), so a config trains
the same way on both engines. Their state is tensors only, by parameter, so checkpoints hold it as
they hold Adam's.

Where PyTorch has one of the same name it differs: its SGD skips the dampening on the first step,
its Adafactor has no relative step or parameter scaling, its Muon scales the step by the shape
otherwise and refuses vectors.
"""

import torch


class _Optimizer(torch.optim.Optimizer):
    """Per-tensor updates with a step count, as MLX's Optimizer.apply_single."""

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    self.init_state(p, state, group)
                state["step"] += 1
                self.update(p, p.grad, state, group)

    def init_state(self, p, state, group):
        raise NotImplementedError

    def update(self, p, grad, state, group):
        raise NotImplementedError


class SGD(_Optimizer):
    def __init__(self, params, lr, momentum=0.0, weight_decay=0.0, dampening=0.0, nesterov=False):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, dampening=dampening,
                                      nesterov=nesterov))

    def init_state(self, p, state, group):
        state["v"] = torch.zeros_like(p)

    def update(self, p, grad, state, group):
        if group["weight_decay"]:
            grad = grad + group["weight_decay"] * p
        if group["momentum"] <= 0:
            p.sub_(group["lr"] * grad)
            return
        v = state["v"].mul_(group["momentum"])
        v.add_(grad, alpha=1 - group["dampening"] if group["dampening"] > 0 else 1.0)
        p.sub_(group["lr"] * (grad + group["momentum"] * v if group["nesterov"] else v))


def _rms(x):
    return x.square().mean().sqrt()


class Adafactor(_Optimizer):
    def __init__(self, params, lr, eps=(1e-30, 1e-3), clip_threshold=1.0, decay_rate=-0.8, beta_1=None,
                 weight_decay=0.0, scale_parameter=True, relative_step=True, warmup_init=False):
        super().__init__(params, dict(lr=lr, eps=tuple(eps), clip_threshold=clip_threshold, decay_rate=decay_rate,
                                      beta_1=beta_1, weight_decay=weight_decay, scale_parameter=scale_parameter,
                                      relative_step=relative_step, warmup_init=warmup_init))

    def init_state(self, p, state, group):
        if p.ndim >= 2:
            state["exp_avg_sq_row"] = p.new_zeros(p.shape[:-1])
            state["exp_avg_sq_col"] = p.new_zeros(p.shape[:-2] + p.shape[-1:])
        else:
            state["exp_avg_sq"] = torch.zeros_like(p)
        if group["beta_1"] is not None:
            state["exp_avg"] = torch.zeros_like(p)

    def _learning_rate(self, step, p, group):
        if group["relative_step"]:
            size = torch.minimum(1e-6 * step if group["warmup_init"] else torch.tensor(1e-2), step.rsqrt())
        else:
            size = torch.tensor(group["lr"], dtype=torch.float32)
        scale = torch.maximum(torch.tensor(group["eps"][1]), _rms(p).float()) if group["scale_parameter"] else 1.0
        return (scale * size).to(p.dtype)

    def update(self, p, grad, state, group):
        step = state["step"]
        rate = self._learning_rate(step, p, group)
        beta_2 = (1.0 - step ** group["decay_rate"]).to(p.dtype)
        update = grad.square() + group["eps"][0]
        if grad.ndim >= 2:
            row = state["exp_avg_sq_row"].mul_(beta_2).add_((1 - beta_2) * update.mean(-1))
            col = state["exp_avg_sq_col"].mul_(beta_2).add_((1 - beta_2) * update.mean(-2))
            r_factor = (row / row.mean(-1, keepdim=True)).rsqrt()
            update = r_factor.unsqueeze(-1) * col.rsqrt().unsqueeze(-2) * grad
        else:
            update = state["exp_avg_sq"].mul_(beta_2).add_((1 - beta_2) * update).rsqrt() * grad
        update = update / torch.clamp(_rms(update) / group["clip_threshold"], min=1.0)
        update = rate * update
        if group["beta_1"] is not None:
            update = state["exp_avg"].mul_(group["beta_1"]).add_((1 - group["beta_1"]) * update).clone()
        if group["weight_decay"]:
            p.add_(p * (-group["weight_decay"] * rate))
        p.sub_(update)


def _orthogonalized(x, steps):
    """MLX's Newton-Schulz iteration (quintic, five steps by default) towards the nearest semi-orthogonal
    matrix of a 2-D update."""
    a, b, c = 3.4445, -4.7750, 2.0315
    transposed = x.shape[-2] > x.shape[-1]
    if transposed:
        x = x.t()
    x = x / (torch.linalg.norm(x) + 1e-7)
    for _ in range(steps):
        gram = x @ x.t()
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.t() if transposed else x


class Muon(_Optimizer):
    """A param group with `transposed` True holds matrices that MLX stores transposed (LoRA's A and B:
    [in, r] and [r, out] in mlx-lm, [r, in] and [out, r] in PEFT): the step's shape factor is theirs."""

    def __init__(self, params, lr, momentum=0.95, weight_decay=0.01, nesterov=True, ns_steps=5):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov,
                                      ns_steps=ns_steps, transposed=False))

    def init_state(self, p, state, group):
        state["v"] = torch.zeros_like(p)

    def update(self, p, grad, state, group):
        momentum = group["momentum"]
        if group["weight_decay"]:
            grad = grad + group["weight_decay"] * p
        v = state["v"].mul_(momentum).add_((1 - momentum) * grad)
        update = grad * (1 - momentum) + v * momentum if group["nesterov"] else v
        rate = group["lr"]
        if update.ndim >= 2:
            shape = update.shape
            update = _orthogonalized(update.reshape(shape[0], -1), group["ns_steps"]).reshape(shape)
            rows, cols = update.shape[-2:][::-1] if group["transposed"] else update.shape[-2:]
            rate *= max(1, rows / cols) ** 0.5
        p.sub_(rate * update)


CLASSES = {"sgd": SGD, "adafactor": Adafactor, "muon": Muon}
