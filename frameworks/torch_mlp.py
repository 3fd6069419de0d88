"""The seed MLP in PyTorch, for training: Linear layers named after the graph's Dense layers.

The module's state_dict is the exchange file's (`dense_0.weight`, `dense_0.bias`, …), the same as
the module `exchange.torch_adapter` builds from the graph; this one also exposes the last layer's
pre-activation (`pre_activation`), which the Keras-style loss needs.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from exchange import torch_modules
from exchange.graph import Graph
from exchange.kinds.activations import torch_function
from exchange.kinds.dense import DenseConfig
from frameworks.recipe import Recipe

KERAS_EPSILON = 1e-7  # keras.config.epsilon(): the clip of probabilities in its cross-entropy


def activation_function(name: str):
    """Activation `name` on (batch, features) tensors, from the exchange's one table."""
    function, keywords = torch_function(name, torch_modules.NAMESPACES)
    return lambda x: function(x, **keywords)


class TorchMLP(nn.Module):
    """`forward` returns what Keras's `predict` returns: the last activation, softmax included."""

    def __init__(self, architecture: Graph, device: str | torch.device | None = None):
        super().__init__()
        if (
            not all(
                isinstance(node.config, DenseConfig) and len(architecture.input_shape_of(node)) == 1
                for node in architecture.nodes
            )
            or len(architecture.outputs) != 1
        ):
            raise ValueError("TorchMLP trains a chain of Dense layers on flat inputs")
        self.exchange_graph = architecture
        self.activations = [node.config.activation for node in architecture.nodes]
        self.linears = []
        for node in architecture.nodes:
            linear = nn.Linear(
                architecture.input_shape_of(node)[-1], node.config.units, bias=node.config.use_bias, device=device
            )
            self.add_module(architecture.torch_names[node.name], linear)
            self.linears.append(linear)

    @property
    def architecture(self) -> Graph:
        return self.exchange_graph

    def pre_activation(self, inputs: torch.Tensor) -> torch.Tensor:
        """The last layer's input to its activation (the logits, for a softmax output)."""
        hidden = inputs
        for linear, activation in zip(self.linears[:-1], self.activations[:-1]):
            hidden = activation_function(activation)(linear(hidden))
        return self.linears[-1](hidden)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return activation_function(self.activations[-1])(self.pre_activation(inputs))


def build_torch_model(architecture: Graph) -> TorchMLP:
    return TorchMLP(architecture)


class KerasSGD(torch.optim.Optimizer):
    """SGD with momentum written as Keras writes it, with old Keras's decaying learning rate.

    Keras:   v <- mu * v - lr_t * g;  w <- w + v
    PyTorch: b <- mu * b + g;         w <- w - lr_t * b
    With a constant learning rate the two are the same (v = -lr * b). With lr_t decaying, PyTorch's
    form applies today's lr_t to the whole accumulated buffer while Keras's applies each step's own
    lr_t to that step's gradient, so they differ. This optimizer is the Keras form, with
    lr_t = lr / (1 + decay * t) computed in float32 as Keras does (t = updates so far).
    """

    def __init__(self, params, recipe: Recipe):
        super().__init__(params, {"momentum": recipe.momentum})
        self.recipe = recipe
        self.updates_so_far = 0

    @torch.no_grad()
    def step(self, closure=None):
        learning_rate = torch.tensor(self.recipe.learning_rate_at(self.updates_so_far))
        for group in self.param_groups:
            momentum = torch.tensor(group["momentum"], dtype=torch.float32)
            for parameter in group["params"]:
                if parameter.grad is None:
                    continue
                state = self.state[parameter]
                if "velocity" not in state:
                    state["velocity"] = torch.zeros_like(parameter)
                velocity = state["velocity"]
                velocity.copy_(velocity * momentum - parameter.grad * learning_rate)
                parameter.add_(velocity)
        self.updates_so_far += 1


def keras_categorical_crossentropy(model: TorchMLP, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean categorical cross-entropy as Keras 3 (TensorFlow backend) computes it for this model.

    When the output layer is a softmax, Keras notices and computes the loss from the logits
    (`softmax_cross_entropy_with_logits`), with no clipping. Otherwise it normalises the
    probabilities, clips them to [1e-7, 1 - 1e-7] and takes -sum(y * log p).
    """
    if model.activations[-1] == "softmax":
        log_probabilities = torch.log_softmax(model.pre_activation(inputs), dim=-1)
        return -(targets * log_probabilities).sum(dim=-1).mean()
    probabilities = model(inputs)
    probabilities = probabilities / probabilities.sum(dim=-1, keepdim=True)
    probabilities = probabilities.clamp(KERAS_EPSILON, 1.0 - KERAS_EPSILON)
    return -(targets * torch.log(probabilities)).sum(dim=-1).mean()


def train_torch_epoch(
    model: TorchMLP,
    optimizer: KerasSGD,
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_val: torch.Tensor,
    y_val: torch.Tensor,
    batch_size: int,
    order: torch.Tensor,
) -> dict[str, float]:
    """One epoch in `order`; reports what Keras's `fit` reports: the running means of the batch
    losses and of per-sample accuracy during the epoch, then loss and accuracy on the hold-out."""
    model.train()
    loss_sum, correct, seen = 0.0, 0, 0
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        inputs, targets = x_train[batch], y_train[batch]
        optimizer.zero_grad(set_to_none=True)
        loss = keras_categorical_crossentropy(model, inputs, targets)
        loss.backward()
        with torch.no_grad():
            correct += int((model(inputs).argmax(-1) == targets.argmax(-1)).sum())
        optimizer.step()
        loss_sum += float(loss.detach()) * len(batch)
        seen += len(batch)
    model.eval()
    with torch.no_grad():
        val_loss = float(keras_categorical_crossentropy(model, x_val, y_val))
        val_accuracy = float((model(x_val).argmax(-1) == y_val.argmax(-1)).float().mean())
    return {"loss": loss_sum / seen, "accuracy": correct / seen, "val_loss": val_loss, "val_accuracy": val_accuracy}


@torch.no_grad()
def predict(model: nn.Module, x: np.ndarray) -> np.ndarray:
    """Outputs of a flat-input model (the seed's TorchMLP or the exchange's module of it)."""
    model.eval()
    return model(torch.from_numpy(np.ascontiguousarray(x))).numpy()
