"""Keras's optimizers and learning-rate schedules written in PyTorch, to continue a Keras run.

Each optimizer keeps Keras's state under Keras's slot names (`momentum`, `velocity`, …) and
Keras's step count (`iterations`), so a `.keras` file's optimizer variables load into it one for
one, and its `update_step` is Keras 3.15's (keras/src/optimizers/*.py) written with torch ops, in
float32 like Keras. Only torch is imported: this module's source can be copied into generated code.

Conventions that differ:
- Adam, Adamax: Keras folds both bias corrections into the step size and adds epsilon to
  `sqrt(v)`: `lr_t = lr * sqrt(1 - b2^t) / (1 - b1^t)`, `w -= lr_t * m / (sqrt(v) + eps)`.
  torch adds epsilon to the bias-corrected root, `sqrt(v / (1 - b2^t)) + eps`, so Keras's epsilon
  is torch's times `sqrt(1 - b2^t)`, different at every step: no torch epsilon gives Keras's run.
- RMSprop: Keras adds epsilon inside the root, `sqrt(v + eps)` (torch: `sqrt(v) + eps`), and its
  momentum buffer holds `lr * g / sqrt(…)` (torch's holds the step before the learning rate).
- SGD with momentum: Keras's buffer holds the step, `m = mu * m - lr * g` (torch's holds
  gradients, `b = mu * b + g`, times today's lr); they differ once the learning rate changes.
  Nesterov: Keras steps by `mu * m - lr * g` with the new `m`.
- Adagrad: Keras's epsilon is inside the root, `sqrt(acc + eps)`; torch's outside.
- Nadam: Keras's momentum schedule is `mu_t = b1 * (1 - 0.5 * 0.96^t)`; torch's NAdam's is
  `0.96^(t * momentum_decay)` with `momentum_decay=4e-3` by default (torch with
  `momentum_decay=1` follows Keras's). Both add epsilon to the bias-corrected root,
  `sqrt(v / (1 - b2^t)) + eps` (unlike Adam's), defaults 1e-7 and 1e-8. Keras keeps one product
  `u_product = mu_1 * ... * mu_t` for the whole optimizer (a variable of its own, stored after the
  slots), torch one `mu_product` per parameter in its state; Keras's weight decay shrinks the
  variable first, torch's NAdam's `weight_decay` is an L2 term in the gradient.
- Weight decay (AdamW, or `weight_decay` on any Keras optimizer): Keras first shrinks the
  variable, `w -= w * wd * lr`, then takes its step; torch's AdamW multiplies by `1 - lr * wd`
  too, but its Adam's `weight_decay` is an L2 term in the gradient.
- Embeddings: Keras 3 on TensorFlow gets an Embedding's gradient as `tf.IndexedSlices`, one row
  per lookup, and its optimizers square each row before a token's rows are summed (Adamax: take
  its absolute value; tf-keras, Keras 2, sums a token's rows first, as torch does): a token
  looked up twice in a batch adds `g1^2 + g2^2` to Adam's or RMSprop's `velocity`, where
  torch's dense gradient gives `(g1 + g2)^2`. `torch_sparse_lookups`
  makes torch's Embedding gradients sparse (one row per lookup, `sparse=True`), and these
  optimizers apply the function row by row (`per_lookup`). Rows not looked up decay as in a dense
  step (Keras densifies when it adds the rows to a slot); SGD, linear in the gradient, is the same.
- Schedules: Keras evaluates the schedule at the step count before the update (0 on the first),
  in float32; torch's schedulers are stepped by hand. These classes are called with the count.
- BatchNormalization in training: Keras moves `moving_variance` towards the biased batch variance
  (divided by n), torch's `running_var` towards the unbiased one (n - 1): `KerasBatchNorm`.
- Regularizers: Keras adds `l1 * sum|w| + l2 * sum(w^2)` of each regularized variable to the loss;
  torch has no such term unless written (`regularization_penalty`).
- Losses: Keras's cross-entropy clips probabilities to [1e-7, 1 - 1e-7] (unless from logits),
  smooths labels before, and averages over the batch (`sum_over_batch_size`). Of a softmax or
  sigmoid output it takes the logits instead (`training_state.make_loss(..., from_logits=True)` on them).
"""

from __future__ import annotations

import math

import torch

FLOAT = torch.float32


def _f32(value) -> torch.Tensor:
    return torch.as_tensor(value, dtype=FLOAT)


class ExponentialDecay:
    """`lr * rate ** (step / decay_steps)` (the exponent floored with `staircase`)."""

    def __init__(self, initial_learning_rate: float, decay_steps: int, decay_rate: float, staircase: bool = False):
        self.initial_learning_rate, self.decay_steps = initial_learning_rate, decay_steps
        self.decay_rate, self.staircase = decay_rate, staircase

    def __call__(self, step: int) -> torch.Tensor:
        progress = _f32(step) / _f32(self.decay_steps)
        if self.staircase:
            progress = torch.floor(progress)
        return _f32(self.initial_learning_rate) * torch.pow(_f32(self.decay_rate), progress)


class InverseTimeDecay:
    """`lr / (1 + rate * step / decay_steps)` (the quotient floored with `staircase`)."""

    def __init__(self, initial_learning_rate: float, decay_steps: int, decay_rate: float, staircase: bool = False):
        self.initial_learning_rate, self.decay_steps = initial_learning_rate, decay_steps
        self.decay_rate, self.staircase = decay_rate, staircase

    def __call__(self, step: int) -> torch.Tensor:
        progress = _f32(step) / _f32(self.decay_steps)
        if self.staircase:
            progress = torch.floor(progress)
        return _f32(self.initial_learning_rate) / (_f32(1.0) + _f32(self.decay_rate) * progress)


class PiecewiseConstantDecay:
    """`values[i]` while `boundaries[i - 1] < step <= boundaries[i]`."""

    def __init__(self, boundaries: list, values: list):
        self.boundaries, self.values = list(boundaries), list(values)

    def __call__(self, step: int) -> torch.Tensor:
        index = sum(step > boundary for boundary in self.boundaries)
        return _f32(self.values[index])


class PolynomialDecay:
    """From `initial_learning_rate` to `end_learning_rate` along `(1 - step / decay_steps) ** power`."""

    def __init__(
        self,
        initial_learning_rate: float,
        decay_steps: int,
        end_learning_rate: float = 1e-4,
        power: float = 1.0,
        cycle: bool = False,
    ):
        self.initial_learning_rate, self.decay_steps = initial_learning_rate, decay_steps
        self.end_learning_rate, self.power, self.cycle = end_learning_rate, power, cycle

    def __call__(self, step: int) -> torch.Tensor:
        decay_steps = _f32(self.decay_steps)
        position = _f32(step)
        if self.cycle:
            decay_steps = decay_steps * (_f32(1.0) if step == 0 else torch.ceil(position / self.decay_steps))
        else:
            position = torch.minimum(position, decay_steps)
        fraction = position / decay_steps
        initial, end = _f32(self.initial_learning_rate), _f32(self.end_learning_rate)
        return (initial - end) * torch.pow(1 - fraction, _f32(self.power)) + end


class CosineDecay:
    """Half a cosine from the rate down to `alpha` times it over `decay_steps`, after a linear
    warmup from `initial_learning_rate` to `warmup_target` over `warmup_steps` when one is given."""

    def __init__(
        self,
        initial_learning_rate: float,
        decay_steps: int,
        alpha: float = 0.0,
        warmup_target: float | None = None,
        warmup_steps: int = 0,
    ):
        self.initial_learning_rate, self.decay_steps, self.alpha = initial_learning_rate, decay_steps, alpha
        self.warmup_target, self.warmup_steps = warmup_target, warmup_steps

    def _decay(self, step: torch.Tensor, decay_from: torch.Tensor) -> torch.Tensor:
        fraction = step / _f32(self.decay_steps)
        cosine = 0.5 * (1.0 + torch.cos(_f32(math.pi) * fraction))
        return decay_from * ((1 - self.alpha) * cosine + self.alpha)

    def __call__(self, step: int) -> torch.Tensor:
        initial, decay_steps = _f32(self.initial_learning_rate), _f32(self.decay_steps)
        if self.warmup_target is None:
            return self._decay(torch.minimum(_f32(step), decay_steps), initial)
        target, warmup_steps = _f32(self.warmup_target), _f32(self.warmup_steps)
        position = torch.minimum(_f32(step), decay_steps + warmup_steps)
        if position < warmup_steps:
            return (target - initial) * (position / warmup_steps) + initial
        return self._decay(position - warmup_steps, target)


SCHEDULES = {
    schedule.__name__: schedule
    for schedule in (ExponentialDecay, InverseTimeDecay, PiecewiseConstantDecay, PolynomialDecay, CosineDecay)
}


class KerasOptimizer(torch.optim.Optimizer):
    """What every Keras optimizer does around its `update_step`: the learning rate of this step
    (a constant or a schedule of `iterations`), weight decay first, then the step, then
    `iterations += 1`. Subclasses name their slots (`SLOTS`, in Keras's order) and give the step.
    Each parameter's state holds one tensor per slot, created (zeros, or `initial_slot`) at its
    first step or loaded from a Keras file."""

    SLOTS: tuple[str, ...] = ()
    # Scalar variables of the whole optimizer (not per parameter), with their initial values.
    SCALARS: dict[str, float] = {}

    def __init__(self, params, learning_rate=0.001, weight_decay: float | None = None, **hyper):
        super().__init__(params, hyper)
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay
        self.iterations = 0
        self.scalars = {name: _f32(value) for name, value in self.SCALARS.items()}

    def slots(self) -> tuple[str, ...]:
        return self.SLOTS

    def initial_slot(self, name: str, parameter: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(parameter)

    def current_learning_rate(self) -> torch.Tensor:
        rate = self.learning_rate
        return rate(self.iterations) if callable(rate) else _f32(rate)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        learning_rate = self.current_learning_rate()
        self.begin_step()
        for group in self.param_groups:
            with_gradient = [parameter for parameter in group["params"] if parameter.grad is not None]
            if self.weight_decay is not None:
                for parameter in with_gradient:
                    parameter.sub_(parameter * _f32(self.weight_decay) * learning_rate)
            for parameter in with_gradient:
                state = self.state[parameter]
                for name in self.slots():
                    if name not in state:
                        state[name] = self.initial_slot(name, parameter)
                gradient = parameter.grad.to_dense() if parameter.grad.is_sparse else parameter.grad  # lookups summed
                self.update_step(parameter, gradient, state, learning_rate, group)
        self.iterations += 1
        return loss

    def begin_step(self) -> None:
        """Before the variables' updates: what the optimizer updates once per step (its scalars)."""

    def update_step(self, parameter, gradient, state, learning_rate, group) -> None:
        raise NotImplementedError

    def state_dict(self):
        state = super().state_dict()
        state["iterations"] = self.iterations
        state["scalars"] = {name: float(value) for name, value in self.scalars.items()}
        return state

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        self.iterations = int(state_dict.pop("iterations", 0))
        for name, value in state_dict.pop("scalars", {}).items():
            self.scalars[name] = _f32(value)
        super().load_state_dict(state_dict)


def per_lookup(function, parameter: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
    """`function(gradient)` element by element, as Keras on TensorFlow computes it: of an
    embedding's gradient (sparse in torch, one row per lookup: `torch_sparse_lookups`) each
    lookup's row, then the rows of each token summed."""
    lookups = parameter.grad
    if lookups is None or not lookups.is_sparse:
        return function(gradient)
    rows = lookups._indices()[0]
    return torch.zeros_like(gradient).index_add_(0, rows, function(lookups._values()))


def torch_sparse_lookups(model: torch.nn.Module) -> torch.nn.Module:
    """Make every `nn.Embedding` of `model` give its weight a sparse gradient, one row per lookup,
    as Keras on TensorFlow gets it (`tf.IndexedSlices`), for `per_lookup`. In place; the model
    computes the same."""
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding):
            module.sparse = True
    return model


class Adam(KerasOptimizer):
    """Keras's Adam: bias corrections folded into the step size, epsilon added to `sqrt(v)`."""

    SLOTS = ("momentum", "velocity")

    def __init__(self, params, learning_rate=0.001, beta_1=0.9, beta_2=0.999, epsilon=1e-7, weight_decay=None):
        super().__init__(params, learning_rate, weight_decay, beta_1=beta_1, beta_2=beta_2, epsilon=epsilon)

    def update_step(self, parameter, gradient, state, learning_rate, group) -> None:
        step = _f32(self.iterations + 1)
        beta_1_power = torch.pow(_f32(group["beta_1"]), step)
        beta_2_power = torch.pow(_f32(group["beta_2"]), step)
        alpha = learning_rate * torch.sqrt(1 - beta_2_power) / (1 - beta_1_power)
        momentum, velocity = state["momentum"], state["velocity"]
        momentum.add_((gradient - momentum) * (1 - group["beta_1"]))
        velocity.add_((per_lookup(torch.square, parameter, gradient) - velocity) * (1 - group["beta_2"]))
        parameter.sub_(momentum * alpha / (torch.sqrt(velocity) + group["epsilon"]))


class AdamW(Adam):
    """Keras's AdamW: its Adam after the weight decay every Keras optimizer applies."""

    def __init__(self, params, learning_rate=0.001, weight_decay=0.004, beta_1=0.9, beta_2=0.999, epsilon=1e-7):
        super().__init__(params, learning_rate, beta_1, beta_2, epsilon, weight_decay)


class SGD(KerasOptimizer):
    """Keras's SGD: the momentum buffer holds the step itself, `m = mu * m - lr * g`."""

    def __init__(self, params, learning_rate=0.01, momentum=0.0, nesterov=False, weight_decay=None):
        super().__init__(params, learning_rate, weight_decay, momentum=momentum, nesterov=nesterov)

    def slots(self) -> tuple[str, ...]:
        return ("momentum",) if self.param_groups[0]["momentum"] != 0 else ()

    def update_step(self, parameter, gradient, state, learning_rate, group) -> None:
        if group["momentum"] == 0:
            parameter.sub_(gradient * learning_rate)
            return
        momentum = _f32(group["momentum"])
        buffer = state["momentum"]
        buffer.copy_(buffer * momentum - gradient * learning_rate)
        if group["nesterov"]:
            parameter.add_(buffer * momentum - gradient * learning_rate)
        else:
            parameter.add_(buffer)


class RMSprop(KerasOptimizer):
    """Keras's RMSprop: epsilon inside the root; the momentum buffer holds `lr * g / sqrt(…)`."""

    def __init__(
        self, params, learning_rate=0.001, rho=0.9, momentum=0.0, epsilon=1e-7, centered=False, weight_decay=None
    ):
        super().__init__(
            params, learning_rate, weight_decay, rho=rho, momentum=momentum, epsilon=epsilon, centered=centered
        )

    def slots(self) -> tuple[str, ...]:
        group = self.param_groups[0]
        return (
            ("velocity",)
            + (("momentum",) if group["momentum"] > 0 else ())
            + (("average_gradient",) if group["centered"] else ())
        )

    def update_step(self, parameter, gradient, state, learning_rate, group) -> None:
        rho, velocity = group["rho"], state["velocity"]
        velocity.copy_(rho * velocity + (1 - rho) * per_lookup(torch.square, parameter, gradient))
        if group["centered"]:
            average = state["average_gradient"]
            average.copy_(rho * average + (1 - rho) * gradient)
            denominator = velocity - average * average + group["epsilon"]
        else:
            denominator = velocity + group["epsilon"]
        increment = learning_rate * gradient / torch.sqrt(denominator)
        if group["momentum"] > 0:
            buffer = state["momentum"]
            buffer.copy_(group["momentum"] * buffer + increment)
            parameter.sub_(buffer)
        else:
            parameter.sub_(increment)


class Adagrad(KerasOptimizer):
    """Keras's Adagrad: epsilon inside the root; accumulators start at `initial_accumulator_value`."""

    SLOTS = ("accumulator",)

    def __init__(self, params, learning_rate=0.001, initial_accumulator_value=0.1, epsilon=1e-7, weight_decay=None):
        super().__init__(
            params, learning_rate, weight_decay, initial_accumulator_value=initial_accumulator_value, epsilon=epsilon
        )

    def initial_slot(self, name: str, parameter: torch.Tensor) -> torch.Tensor:
        return torch.full_like(parameter, self.param_groups[0]["initial_accumulator_value"])

    def update_step(self, parameter, gradient, state, learning_rate, group) -> None:
        accumulator = state["accumulator"]
        accumulator.add_(per_lookup(torch.square, parameter, gradient))
        parameter.sub_(learning_rate * gradient / torch.sqrt(accumulator + group["epsilon"]))


class Adamax(KerasOptimizer):
    """Keras's Adamax: the infinity norm `u` with epsilon added, the first moment's correction
    in the denominator."""

    SLOTS = ("momentum", "norm")

    def __init__(self, params, learning_rate=0.001, beta_1=0.9, beta_2=0.999, epsilon=1e-7, weight_decay=None):
        super().__init__(params, learning_rate, weight_decay, beta_1=beta_1, beta_2=beta_2, epsilon=epsilon)

    def update_step(self, parameter, gradient, state, learning_rate, group) -> None:
        beta_1_power = torch.pow(_f32(group["beta_1"]), _f32(self.iterations + 1))
        momentum, norm = state["momentum"], state["norm"]
        momentum.add_((gradient - momentum) * (1 - group["beta_1"]))
        norm.copy_(torch.maximum(group["beta_2"] * norm, per_lookup(torch.abs, parameter, gradient)))
        parameter.sub_(learning_rate * momentum / ((1 - beta_1_power) * (norm + group["epsilon"])))


class Nadam(KerasOptimizer):
    """Keras's Nadam: Adam with Nesterov momentum under the schedule `mu_t = b1 * (1 - 0.5 * 0.96^t)`,
    whose running product `u_product` is updated once per step, before the variables."""

    SLOTS = ("momentum", "velocity")
    SCALARS = {"u_product": 1.0}

    def __init__(self, params, learning_rate=0.001, beta_1=0.9, beta_2=0.999, epsilon=1e-7, weight_decay=None):
        super().__init__(params, learning_rate, weight_decay, beta_1=beta_1, beta_2=beta_2, epsilon=epsilon)

    def _mu(self, step: int) -> torch.Tensor:
        beta_1 = _f32(self.param_groups[0]["beta_1"])
        return beta_1 * (1.0 - 0.5 * torch.pow(_f32(0.96), _f32(step)))

    def begin_step(self) -> None:
        self.scalars["u_product"] = self.scalars["u_product"] * self._mu(self.iterations + 1)

    def update_step(self, parameter, gradient, state, learning_rate, group) -> None:
        step = self.iterations + 1
        u_t, u_next = self._mu(step), self._mu(step + 1)
        u_product = self.scalars["u_product"]
        u_product_next = u_product * u_next
        beta_1, beta_2 = _f32(group["beta_1"]), _f32(group["beta_2"])  # float32 before `1 - beta`
        beta_2_power = torch.pow(beta_2, _f32(step))
        momentum, velocity = state["momentum"], state["velocity"]
        momentum.add_((gradient - momentum) * (1 - beta_1))
        velocity.add_((per_lookup(torch.square, parameter, gradient) - velocity) * (1 - beta_2))
        momentum_hat = u_next * momentum / (1 - u_product_next) + (1 - u_t) * gradient / (1 - u_product)
        velocity_hat = velocity / (1 - beta_2_power)
        parameter.sub_(momentum_hat * learning_rate / (torch.sqrt(velocity_hat) + group["epsilon"]))


class KerasBatchNorm(torch.nn.modules.batchnorm._BatchNorm):
    """A torch BatchNorm (same state_dict) that trains as Keras's does: normalise by the batch's
    mean and biased variance, then `moving = moving * momentum + batch * (1 - momentum)` with
    Keras's momentum (`1 - self.momentum`) and the biased variance. In eval mode it is torch's."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected an input of rank 2 or more, found {input.dim()}")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(input)
        axes = [0] + list(range(2, input.dim()))
        shape = [1, -1] + [1] * (input.dim() - 2)
        mean = input.mean(dim=axes)
        variance = ((input - mean.detach().reshape(shape)) ** 2).mean(dim=axes)
        if (
            self.momentum is None
            or self.running_mean is None
            or self.running_var is None
            or self.num_batches_tracked is None
        ):
            raise ValueError("Keras's BatchNormalization keeps moving statistics with a momentum")
        with torch.no_grad():
            keep = 1.0 - self.momentum
            self.running_mean.copy_(self.running_mean * keep + mean * (1.0 - keep))
            self.running_var.copy_(self.running_var * keep + variance * (1.0 - keep))
            self.num_batches_tracked.add_(1)
        inverse = torch.rsqrt(variance + self.eps)
        if self.weight is not None:
            inverse = inverse * self.weight
        shift = -mean * inverse if self.bias is None else self.bias - mean * inverse
        return input * inverse.reshape(shape) + shift.reshape(shape)


def use_keras_batch_norm(model: torch.nn.Module) -> torch.nn.Module:
    """Make every BatchNorm of `model` a `KerasBatchNorm` in place: the same module objects, with
    the same tensors and paths, only their class (and so their training step) changes."""
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.__class__ = KerasBatchNorm
    return model


def regularization_penalty(model: torch.nn.Module, regularizers: dict) -> torch.Tensor:
    """Keras's regularization losses: `{state_dict key: {"l1": a, "l2": b}}` summed over the keys."""
    tensors = dict(model.named_parameters())
    total = torch.zeros((), dtype=FLOAT)
    for key, factors in regularizers.items():
        value = tensors[key]
        if factors.get("l1"):
            total = total + _f32(factors["l1"]) * torch.sum(torch.abs(value))
        if factors.get("l2"):
            total = total + _f32(factors["l2"]) * torch.sum(torch.square(value))
    return total


def activity_penalty(model: torch.nn.Module) -> torch.Tensor:
    """Keras's activity losses of the model's last forward pass in training, which Keras adds to
    the loss: the `penalty` each of its modules keeps (`KerasActivityRegularization`)."""
    total = torch.zeros((), dtype=FLOAT)
    for module in model.modules():
        penalty = getattr(module, "penalty", None)
        if isinstance(penalty, torch.Tensor):
            total = total + penalty
    return total


KERAS_EPSILON = 1e-7  # keras.config.epsilon()


def categorical_crossentropy(
    y_pred: torch.Tensor, y_true: torch.Tensor, from_logits: bool = False, label_smoothing: float = 0.0, axis: int = -1
) -> torch.Tensor:
    """Keras's per-sample categorical cross-entropy (`sum_over_batch_size`: take the mean)."""
    if label_smoothing:
        classes = y_true.shape[axis]
        y_true = y_true * (1.0 - label_smoothing) + label_smoothing / classes
    if from_logits:
        return -(y_true * torch.log_softmax(y_pred, dim=axis)).sum(dim=axis)
    y_pred = y_pred / y_pred.sum(dim=axis, keepdim=True)
    y_pred = y_pred.clamp(KERAS_EPSILON, 1.0 - KERAS_EPSILON)
    return -(y_true * torch.log(y_pred)).sum(dim=axis)


def sparse_categorical_crossentropy(
    y_pred: torch.Tensor, y_true: torch.Tensor, from_logits: bool = False, axis: int = -1
) -> torch.Tensor:
    """Keras's per-sample cross-entropy against integer labels: probabilities are clipped, and their
    logarithms taken as logits (so the clipped probabilities are renormalised)."""
    if not from_logits:
        y_pred = torch.log(y_pred.clamp(KERAS_EPSILON, 1.0 - KERAS_EPSILON))
    log_probabilities = torch.log_softmax(y_pred, dim=axis)
    labels = y_true.long().unsqueeze(axis)
    return -torch.gather(log_probabilities, axis, labels).squeeze(axis)


def binary_crossentropy(
    y_pred: torch.Tensor, y_true: torch.Tensor, from_logits: bool = False, label_smoothing: float = 0.0, axis: int = -1
) -> torch.Tensor:
    """Keras's per-sample binary cross-entropy, averaged over `axis`."""
    if label_smoothing:
        y_true = y_true * (1.0 - label_smoothing) + 0.5 * label_smoothing
    if from_logits:
        losses = torch.nn.functional.binary_cross_entropy_with_logits(y_pred, y_true, reduction="none")
    else:
        y_pred = y_pred.clamp(KERAS_EPSILON, 1.0 - KERAS_EPSILON)
        losses = -(y_true * torch.log(y_pred) + (1 - y_true) * torch.log(1 - y_pred))
    return losses.mean(dim=axis)


def mean_squared_error(y_pred: torch.Tensor, y_true: torch.Tensor) -> torch.Tensor:
    return torch.mean(torch.square(y_pred - y_true), dim=-1)


def mean_absolute_error(y_pred: torch.Tensor, y_true: torch.Tensor) -> torch.Tensor:
    return torch.mean(torch.abs(y_pred - y_true), dim=-1)


LOSSES = {
    "categorical_crossentropy": categorical_crossentropy,
    "sparse_categorical_crossentropy": sparse_categorical_crossentropy,
    "binary_crossentropy": binary_crossentropy,
    "mean_squared_error": mean_squared_error,
    "mean_absolute_error": mean_absolute_error,
}
OPTIMIZERS = {optimizer.__name__: optimizer for optimizer in (Adam, AdamW, SGD, RMSprop, Adagrad, Adamax, Nadam)}


def make_schedule(learning_rate):
    """A float, or `{"class_name": "ExponentialDecay", "config": {...}}` as Keras serializes it."""
    if isinstance(learning_rate, dict):
        config = {key: value for key, value in learning_rate["config"].items() if key != "name"}
        return SCHEDULES[learning_rate["class_name"]](**config)
    return learning_rate


def make_optimizer(params, class_name: str, config: dict) -> KerasOptimizer:
    """The optimizer a Keras optimizer config describes (checked by `exchange.training_state`),
    over `params` in the order of the Keras model's trainable variables."""
    arguments = {key: value for key, value in config.items() if key != "name"}
    arguments["learning_rate"] = make_schedule(arguments["learning_rate"])
    return OPTIMIZERS[class_name](params, **arguments)
