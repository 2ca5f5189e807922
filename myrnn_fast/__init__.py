"""myrnn_fast: drop-in ``torch.nn.RNN`` and ``torch.nn.RNNCell`` with interchangeable backends.

    import myrnn_fast
    rnn = myrnn_fast.RNN(1, 32)                      # follows MYRNN_BACKEND / set_backend
    rnn = myrnn_fast.RNN(1, 32, backend="torch")     # or pins one backend for this module
    myrnn_fast.available_backends()                  # what runs here
"""

__version__ = "0.1.0"

from . import config
from .export import DeploymentError
from .modules import RNN, RNNCell
from .onnx import export_onnx, onnx_translation_table
from .registry import (
    BACKENDS,
    BackendUnavailableError,
    available_backends,
    get_backend,
    resolve_backend,
    set_backend,
    use_backend,
)

__all__ = [
    "BACKENDS",
    "RNN",
    "RNNCell",
    "BackendUnavailableError",
    "DeploymentError",
    "available_backends",
    "config",
    "export_onnx",
    "get_backend",
    "onnx_translation_table",
    "resolve_backend",
    "set_backend",
    "use_backend",
]
