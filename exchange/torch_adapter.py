"""PyTorch side of the exchange: `TorchMLP` <-> common file.

The file is in PyTorch layout already, so this adapter only moves tensors between torch and numpy.

Example:
    >>> from exchange import torch_adapter
    >>> model = torch_adapter.model_from_file("mlp.safetensors")
    >>> torch_adapter.save_file(model, "copy.safetensors")
"""

from __future__ import annotations

import os

import numpy as np
import torch

from exchange import fileformat
from exchange.architecture import Architecture
from exchange.errors import ExchangeError, ExchangeFileError, first_line


# dtypes that convert to numpy; bfloat16 and the float8 types do not.
NUMPY_READABLE_DTYPES = (torch.float16, torch.float32, torch.float64, torch.int8, torch.int16,
                         torch.int32, torch.int64, torch.uint8, torch.bool)


def architecture_of(model: torch.nn.Module) -> Architecture:
    architecture = getattr(model, "architecture", None)
    if not isinstance(architecture, Architecture):
        raise ExchangeError(f"{type(model).__name__} has no `architecture`; build it with "
                            "frameworks.torch_mlp.TorchMLP")
    return architecture


def get_tensors(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {key: value.detach().cpu().numpy().copy() for key, value in model.state_dict().items()}


def set_tensors(model: torch.nn.Module, file_tensors: dict[str, np.ndarray]) -> None:
    """Load file tensors with `strict=True` after checking every shape and dtype."""
    fileformat.check_tensors(architecture_of(model), file_tensors)
    model.load_state_dict({key: torch.from_numpy(np.array(value)) for key, value in file_tensors.items()},
                          strict=True)


def save_file(model: torch.nn.Module, path: str | os.PathLike) -> None:
    fileformat.save(path, architecture_of(model), get_tensors(model), source_framework="torch")


def load_file(model: torch.nn.Module, path: str | os.PathLike) -> None:
    exchange_file = fileformat.load(path)
    fileformat.check_same_architecture(exchange_file.architecture, architecture_of(model), path)
    set_tensors(model, exchange_file.tensors)


def model_from_file(path: str | os.PathLike) -> torch.nn.Module:
    """A ready `TorchMLP` (in eval mode) built from the file's architecture and weights.

    The model is built on the `meta` device and the file's tensors are assigned to it, so no
    time goes into a random initialisation that would be overwritten at once.
    """
    from frameworks.torch_mlp import TorchMLP

    exchange_file = fileformat.load(path)
    model = TorchMLP(exchange_file.architecture, device="meta")
    fileformat.check_tensors(exchange_file.architecture, exchange_file.tensors, where=str(path))
    model.load_state_dict({key: torch.from_numpy(np.array(value))
                           for key, value in exchange_file.tensors.items()}, strict=True, assign=True)
    return model.eval()


def load_state_dict_file(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a `.pt` state_dict safely (`weights_only=True`: no code runs) as numpy arrays."""
    try:
        state = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ExchangeFileError(f"{path}: no such file") from None
    except Exception as err:  # torch raises many types for a bad file: pickle, zip, runtime
        message = first_line(err)
        raise ExchangeFileError(f"{path}: not a readable PyTorch weights file ({message})") from None
    if not isinstance(state, dict) or not all(isinstance(key, str) and isinstance(value, torch.Tensor)
                                              for key, value in state.items()):
        raise ExchangeFileError(f"{path}: expected a state_dict (a dict of named tensors), "
                                f"found {type(state).__name__}")
    unreadable = sorted(f"{key} ({value.dtype})" for key, value in state.items()
                        if value.dtype not in NUMPY_READABLE_DTYPES)
    if unreadable:
        raise ExchangeFileError(f"{path}: tensors of a dtype the exchange file cannot hold (it stores "
                                f"float32): {', '.join(unreadable)}")
    return {key: value.detach().cpu().numpy() for key, value in state.items()}


def save_state_dict_file(file_tensors: dict[str, np.ndarray], path: str | os.PathLike) -> None:
    """Write a plain `.pt` state_dict atomically."""
    state = {key: torch.from_numpy(np.array(value)) for key, value in file_tensors.items()}
    with fileformat.atomic_output(path) as temporary:
        torch.save(state, temporary)
