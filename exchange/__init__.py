"""Framework-agnostic weight exchange between Keras and PyTorch through one safetensors file.

The core (`architecture`, `layout`, `fileformat`) needs only numpy and safetensors. Each framework
has one thin adapter with the same verbs (`architecture_of`, `get_tensors`, `set_tensors`,
`save_file`, `load_file`, `model_from_file`): `exchange.keras_adapter`, `exchange.torch_adapter`.
They are not imported here, so importing `exchange` never imports a framework.
"""

from exchange.architecture import ACTIVATIONS, Architecture, DenseLayer, dense_stack
from exchange.errors import (ArchitectureMismatchError, ExchangeError, ExchangeFileError,
                             TensorMismatchError, UnsupportedLayerError)
from exchange.fileformat import FORMAT_VERSION, ExchangeFile, load, read_metadata, save

__all__ = ["ACTIVATIONS", "Architecture", "DenseLayer", "dense_stack", "ArchitectureMismatchError",
           "ExchangeError", "ExchangeFileError", "TensorMismatchError", "UnsupportedLayerError",
           "FORMAT_VERSION", "ExchangeFile", "load", "read_metadata", "save"]
