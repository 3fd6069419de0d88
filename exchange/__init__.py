"""Framework-agnostic weight exchange between Keras and PyTorch through one safetensors file.

The core (`graph`, `kinds`, `ports`, `layout`, `fileformat`, `keras_files`) needs only numpy,
safetensors and h5py. Each framework has one thin adapter with the same verbs (`architecture_of`,
`get_tensors`, `set_tensors`, `save_file`, `load_file`, `model_from_file`):
`exchange.keras_adapter`, `exchange.torch_adapter`. They are not imported here, so importing
`exchange` never imports a framework.
"""

from exchange.errors import (
    ArchitectureMismatchError,
    ExchangeError,
    ExchangeFileError,
    TensorMismatchError,
    UnsupportedLayerError,
)
from exchange.fileformat import FORMAT_VERSION, ExchangeFile, load, read_metadata, save
from exchange.graph import Graph, InputSpec, Node, dense_chain

__all__ = [
    "FORMAT_VERSION",
    "ArchitectureMismatchError",
    "ExchangeError",
    "ExchangeFile",
    "ExchangeFileError",
    "Graph",
    "InputSpec",
    "Node",
    "TensorMismatchError",
    "UnsupportedLayerError",
    "dense_chain",
    "load",
    "read_metadata",
    "save",
]
