"""``RNN`` and ``RNNCell``: drop-in for ``torch.nn.RNN`` / ``torch.nn.RNNCell``.

Everything that is not the single-layer recurrence lives here, once, for every backend: argument
and input checks (same exception types and messages as ``torch.nn``), parameters (same names,
shapes, registration order and initialization, so ``state_dict`` moves both ways), stacked layers,
the reverse direction, dropout between layers, ``batch_first``, unbatched input and
``PackedSequence``. The recurrence itself is the backend's ``layer`` (see ``myrnn_fast.backends``).

These classes deliberately do not subclass ``torch.nn.RNN``: ``torch.compile`` refuses to trace
any instance of it.
"""

from __future__ import annotations

import math
import numbers
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from . import export, registry

_MODES = {"tanh": "RNN_TANH", "relu": "RNN_RELU"}


class _NotATensorError(TypeError, AttributeError):
    """A non-tensor where a tensor belongs. ``torch.nn.RNN`` fails there with ``AttributeError``
    (``'list' object has no attribute 'dim'``); this is both that and the ``TypeError`` it means."""


def _tensor(value, what: str) -> Tensor:
    if not isinstance(value, Tensor):
        raise _NotATensorError(f"{what} must be a Tensor, got {type(value).__name__}")
    return value


_CELL_WEIGHTS = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")


def _weights(module: nn.Module, names) -> list[Tensor | None]:
    """A module's weights by name, straight from ``_parameters`` (where torch.func.functional_call
    puts its tensors too): nn.Module.__getattr__ costs as much per weight as a tiny layer's whole
    forward. Weights that are properties (torch.nn.utils.parametrize) are read as attributes."""
    params = module._parameters
    try:
        return [params[name] for name in names]
    except KeyError:
        return [getattr(module, name) for name in names]


def _check_backend(backend: str | None) -> str | None:
    """Validate a module's ``backend=``: unknown names and unusable backends fail at construction."""
    if backend is not None and registry.check_name(backend) != registry.AUTO:
        registry.implementation(backend)
    return backend


def _check_devices(x: Tensor, hx: Tensor, params: list[Tensor]) -> None:
    # Same checks and messages as ATen's check_attributes for RNNs.
    device = x.device
    for name, tensors in (("hidden", [hx]), ("parameter", params)):
        for t in tensors:
            if t.device != device:
                raise RuntimeError(
                    f"Input and {name} tensors are not at the same device, found input tensor "
                    f"at {device} and {name} tensor at {t.device}"
                )


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype autocast runs RNNs in on this device type, or None where it is off.

    torch.nn's RNN ops are on autocast's lower-precision list. Their casts happen here, once for
    every backend, and the backend then runs with autocast off: a backend needs no autocast logic
    of its own, and the casts (differentiable ``.to``) give float32 parameters float32 gradients.
    """
    try:
        if not torch.is_autocast_enabled(device.type):
            return None
    except RuntimeError:  # a device type autocast does not know (meta, ...)
        return None
    return torch.get_autocast_dtype(device.type)


# Whether autocast is on for any device type (torch 2.3+); otherwise always ask _autocast_dtype.
_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", lambda: True)


def _recording_or_autocast() -> bool:
    """Whether a call must take the modules' Python path whatever the backend: autocast is on, or
    a program is being recorded (torch.compile, torch.jit.trace, torch.func), which must see the
    registered ops."""
    return (
        _any_autocast() or torch.compiler.is_compiling() or torch._C._is_tracing()
        or torch._C._are_functorch_transforms_active()
    )


def _autocast_cast(t: Tensor | None, dtype: torch.dtype, device_type: str) -> Tensor | None:
    # Autocast's own rule (cached_cast): floating tensors on its device, except float64.
    if t is None or not t.is_floating_point() or t.dtype == torch.float64 or t.device.type != device_type:
        return t
    return t.to(dtype)


def _under_autocast(x: Tensor, hx: Tensor, weights):
    """``(dtype, x, hx, weights)``: under autocast, its dtype and the tensors cast as autocast
    casts them; otherwise ``None`` and the tensors as they are."""
    if not _any_autocast():  # one call where autocast is off everywhere, the usual case
        return None, x, hx, weights
    dtype = _autocast_dtype(x.device)
    if dtype is None:
        return None, x, hx, weights
    kind = x.device.type
    x, hx = _autocast_cast(x, dtype, kind), _autocast_cast(hx, dtype, kind)
    weights = type(weights)(_autocast_cast(w, dtype, kind) for w in weights)
    _check_autocast_dtypes(weights[0], x, hx)
    return dtype, x, hx, weights


def _check_autocast_dtypes(weight: Tensor, *tensors: Tensor) -> None:
    # What ATen's GEMM says when a float64 tensor, which autocast leaves alone, meets the others.
    for t in tensors:
        if t.dtype != weight.dtype:
            raise RuntimeError(
                f"mat1 and mat2 must have the same dtype, but got {_dtype_name(t.dtype)} and "
                f"{_dtype_name(weight.dtype)}"
            )


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float64: "Double", torch.float32: "Float", torch.float16: "Half", torch.bfloat16: "BFloat16"}.get(
        dtype, str(dtype).removeprefix("torch.")
    )


def _reverse_index(batch_sizes: Tensor) -> Tensor:
    """Permutation of packed rows that reverses every sequence within its own length.

    It maps the packed data of a batch to the packed data of the same batch with each sequence
    reversed (the lengths, hence ``batch_sizes``, are unchanged), and is its own inverse.
    """
    batch = int(batch_sizes[0])
    active = torch.arange(batch).unsqueeze(0) < batch_sizes.unsqueeze(1)  # [T, B]
    t, b = active.nonzero(as_tuple=True)  # packed order: step-major, then row
    lengths = active.sum(0)
    offsets = torch.cumsum(batch_sizes, 0) - batch_sizes
    return offsets[lengths[b] - 1 - t] + b


def _check_rnn_args(input_size, hidden_size, num_layers, nonlinearity, bias, batch_first, dropout, kwargs) -> None:
    """``RNN``'s constructor arguments, checked in torch.nn.RNN's order, with its exception types
    and messages (and its warning for dropout on a single layer)."""
    if "proj_size" in kwargs:
        raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")
    if kwargs:
        raise TypeError(f"RNN got an unexpected keyword argument {next(iter(kwargs))!r}")
    if nonlinearity not in _MODES:
        raise ValueError(
            f"Unknown nonlinearity '{nonlinearity}'. Select from 'tanh' or 'relu'."
        )
    if (
        not isinstance(dropout, numbers.Number)
        or isinstance(dropout, bool)
        or not 0 <= dropout <= 1
    ):
        raise ValueError(
            "dropout should be a number in range [0, 1] representing the probability of an "
            "element being zeroed"
        )
    if dropout > 0 and num_layers == 1:
        warnings.warn(
            "dropout option adds dropout after all but last recurrent layer, so non-zero "
            f"dropout expects num_layers greater than 1, but got dropout={dropout} and "
            f"num_layers={num_layers}",
            stacklevel=3,  # the caller of RNN(...)
        )
    if not isinstance(bias, bool):
        raise TypeError(f"bias should be of type bool, got: {type(bias).__name__}")
    if not isinstance(batch_first, bool):
        raise TypeError(
            f"batch_first should be of type bool, got: {type(batch_first).__name__}"
        )
    if not isinstance(input_size, int):
        raise TypeError(f"input_size should be of type int, got: {type(input_size).__name__}")
    if input_size <= 0:
        raise ValueError("input_size must be greater than zero")
    if not isinstance(hidden_size, int):
        raise TypeError(
            f"hidden_size should be of type int, got: {type(hidden_size).__name__}"
        )
    if hidden_size <= 0:
        raise ValueError("hidden_size must be greater than zero")
    if not isinstance(num_layers, int):
        raise TypeError(f"num_layers should be of type int, got: {type(num_layers).__name__}")
    if num_layers <= 0:
        raise ValueError("num_layers must be greater than zero")


class RNN(nn.Module):
    """Multi-layer Elman RNN with tanh or ReLU, a drop-in for :class:`torch.nn.RNN`.

    Takes the same arguments, has the same parameters and returns the same values; ``backend=``
    picks the implementation for this module (``None`` follows :func:`myrnn_fast.get_backend`).
    """

    __constants__ = [
        "mode",
        "input_size",
        "hidden_size",
        "num_layers",
        "bias",
        "batch_first",
        "dropout",
        "bidirectional",
        "proj_size",
    ]

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        nonlinearity: str = "tanh",
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        device=None,
        dtype=None,
        *,
        backend: str | None = None,
        **kwargs,
    ) -> None:
        _check_rnn_args(input_size, hidden_size, num_layers, nonlinearity, bias, batch_first, dropout, kwargs)
        super().__init__()
        self.mode = _MODES[nonlinearity]
        self.nonlinearity = nonlinearity
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.bias = bias
        self.batch_first = batch_first
        self.dropout = float(dropout)
        self.bidirectional = bidirectional
        self.proj_size = 0
        self.backend = _check_backend(backend)

        # Parameters in torch.nn.RNN's registration order: reset_parameters() then draws the
        # same numbers from the same seed, and state_dict keys and order match.
        factory = {"device": device, "dtype": dtype}
        directions = 2 if bidirectional else 1
        self._flat_weights_names: list[str] = []
        self._all_weights: list[list[str]] = []
        for layer in range(num_layers):
            layer_input = input_size if layer == 0 else hidden_size * directions
            for direction in range(directions):
                suffix = f"_l{layer}" + ("_reverse" if direction else "")
                shapes = {
                    "weight_ih": (hidden_size, layer_input),
                    "weight_hh": (hidden_size, hidden_size),
                }
                if bias:
                    shapes |= {"bias_ih": (hidden_size,), "bias_hh": (hidden_size,)}
                names = []
                for stem, shape in shapes.items():
                    setattr(self, stem + suffix, nn.Parameter(torch.empty(shape, **factory)))
                    names.append(stem + suffix)
                self._flat_weights_names += names
                self._all_weights.append(names)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        stdv = 1.0 / math.sqrt(self.hidden_size)
        for weight in self.parameters():
            nn.init.uniform_(weight, -stdv, stdv)

    @property
    def all_weights(self) -> list[list[nn.Parameter]]:
        return [[getattr(self, name) for name in names] for names in self._all_weights]

    @property
    def _flat_weights(self) -> list[Tensor]:
        return _weights(self, self._flat_weights_names)

    def flatten_parameters(self) -> None:
        """No-op, kept for code written against ``torch.nn.RNN`` (cuDNN's weight layout)."""

    def extra_repr(self) -> str:
        s = "{input_size}, {hidden_size}"
        if self.num_layers != 1:
            s += ", num_layers={num_layers}"
        if self.nonlinearity != "tanh":
            s += ", nonlinearity={nonlinearity!r}"
        if self.bias is not True:
            s += ", bias={bias}"
        if self.batch_first is not False:
            s += ", batch_first={batch_first}"
        if self.dropout != 0:
            s += ", dropout={dropout}"
        if self.bidirectional is not False:
            s += ", bidirectional={bidirectional}"
        if self.backend is not None:
            s += ", backend={backend!r}"
        return s.format(**self.__dict__)

    def forward(self, input, hx: Tensor | None = None):
        # The usual call first, whole in one entry where the backend has one (cpp's in C++, numba's;
        # see backends/__init__.py): a plain tensor, no program being recorded, autocast off; the
        # entry checks the rest and returns None where the call is anything else, for the path
        # below, which raises torch.nn's errors.
        if type(input) is Tensor and (hx is None or type(hx) is Tensor) and not _recording_or_autocast():
            whole = getattr(registry.cpu_kernels(self.backend), "module_forward", None)
            if (
                whole is not None and type(self.bidirectional) is bool
                and not (self.dropout and self.training and self.num_layers > 1)  # masks drawn per layer below
            ):
                result = whole(input, hx, self._flat_weights, self.num_layers, self.bidirectional, self.bias,
                               self.nonlinearity, self.batch_first, self.input_size, self.hidden_size)
                if result is not None:
                    return result
        # Every line here runs on every other call, and at small sizes the call is mostly this
        # Python: each attribute and shape is read once, the usual case (dense, autocast off) first.
        if isinstance(input, PackedSequence):
            if export.recording():  # its batch sizes are data: a graph would freeze them
                raise export.packed_input_error()
            x, batch_sizes, sorted_indices, unsorted_indices = input
            batch, batched = int(batch_sizes[0]), True
            if hx is not None:
                hx = _tensor(hx, "hx")
        else:
            x = _tensor(input, "input")
            batch_sizes = sorted_indices = unsorted_indices = None
            dim = x.dim()
            if dim not in (2, 3):
                raise ValueError(f"RNN: Expected input to be 2D or 3D, got {dim}D tensor instead")
            batched = dim == 3
            if not batched:
                x = x.unsqueeze(0 if self.batch_first else 1)
            if hx is not None:
                hx = _tensor(hx, "hx")
                if not batched:
                    if hx.dim() != 2:
                        raise RuntimeError(
                            f"For unbatched 2-D input, hx should also be 2-D but got {hx.dim()}-D tensor"
                        )
                    hx = hx.unsqueeze(1)
                elif hx.dim() != 3:
                    raise RuntimeError(
                        f"For batched 3-D input, hx should also be 3-D but got {hx.dim()}-D tensor"
                    )
            batch = x.shape[0 if self.batch_first else 1]
        if hx is None:
            directions = 2 if self.bidirectional else 1
            hx = torch.zeros(self.num_layers * directions, batch, self.hidden_size, dtype=x.dtype, device=x.device)
        elif sorted_indices is not None:
            hx = hx.index_select(1, sorted_indices)  # hx rows follow the caller's order, the data is sorted

        weights = self._flat_weights
        autocast = None
        if _any_autocast():  # one call where autocast is off everywhere, the usual case
            autocast, x, hx, weights = _under_autocast(x, hx, weights)
        self._check_forward_args(x, hx, batch, batch_sizes, weights)
        if type(self.bidirectional) is not bool:
            raise TypeError(f"bidirectional should be of type bool, got: {type(self.bidirectional).__name__}")
        if batch_sizes is None and self.batch_first:
            x = x.transpose(0, 1)

        impl = registry.kernels(x.device, self.backend)
        if autocast is None:
            out, h_n = self._run(impl, x, hx, batch_sizes, weights)
        else:
            with torch.autocast(x.device.type, enabled=False):
                out, h_n = self._run(impl, x, hx, batch_sizes, weights)

        if batch_sizes is not None:
            if unsorted_indices is not None:
                h_n = h_n.index_select(1, unsorted_indices)
            return PackedSequence(out, batch_sizes, sorted_indices, unsorted_indices), h_n
        if self.batch_first:
            out = out.transpose(0, 1)
        if not batched:
            out, h_n = out.squeeze(0 if self.batch_first else 1), h_n.squeeze(1)
        return out, h_n

    def _check_forward_args(self, x, hx, batch, batch_sizes, weights) -> None:
        # All the checks at once first (per-call overhead is most of a short sequence's cost),
        # then one by one, in torch.nn's order and words, for the message.
        xs, device, dtype = x.shape, x.device, x.dtype
        expected = (self.num_layers * (2 if self.bidirectional else 1), batch, self.hidden_size)
        if (
            len(xs) == (2 if batch_sizes is not None else 3) and xs[-1] == self.input_size
            and hx.shape == expected and (batch_sizes is not None or xs[1 if self.batch_first else 0] > 0)
            and dtype == hx.dtype == weights[0].dtype and hx.device == device
        ):
            for w in weights:  # a loop, not all(...): its generator costs three times as much
                if w.device != device:
                    break
            else:
                return
        if x.dtype != weights[0].dtype and not torch.is_autocast_enabled(x.device.type):
            raise ValueError(
                f"RNN input dtype ({x.dtype}) does not match weight dtype ({weights[0].dtype}). "
                f"Convert input: input.to({weights[0].dtype}), or convert model: model.to({x.dtype})"
            )
        expected_dim = 2 if batch_sizes is not None else 3
        if x.dim() != expected_dim:
            raise RuntimeError(f"input must have {expected_dim} dimensions, got {x.dim()}")
        if x.size(-1) != self.input_size:
            raise RuntimeError(
                f"input.size(-1) must be equal to input_size. Expected {self.input_size}, got {x.size(-1)}"
            )
        if hx.size() != expected:
            raise RuntimeError(f"Expected hidden size {expected}, got {list(hx.size())}")
        if batch_sizes is None and x.size(1 if self.batch_first else 0) == 0:
            raise RuntimeError("Expected sequence length to be larger than 0 in RNN")
        _check_devices(x, hx, weights)
        if hx.dtype != x.dtype:
            raise RuntimeError(
                f"hx dtype ({hx.dtype}) does not match input dtype ({x.dtype}); "
                f"convert it: hx.to({x.dtype})"
            )

    def _run(self, impl, x, hx, batch_sizes, weights):
        """The stacked layers and directions: in one call where the backend has ``stack`` (and no
        dropout mask is drawn between layers), else layer by layer."""
        reverse_index = None
        if self.bidirectional and batch_sizes is not None:
            reverse_index = _reverse_index(batch_sizes).to(x.device)
        stack = getattr(impl, "stack", None)
        if stack is not None and not (self.dropout and self.training and self.num_layers > 1):
            result = stack(x, hx, weights, self.num_layers, self.bidirectional, self.bias, self.nonlinearity,
                           batch_sizes, reverse_index)
            if result is not None:
                return result
        return self._layers(impl, x, hx, batch_sizes, weights, reverse_index)

    def _layers(self, impl, x, hx, batch_sizes, weights, reverse_index):
        """Stacked layers and both directions over the backend's single-layer ``layer``."""
        dropout = self.dropout if self.training else 0.0
        return stacked_layers(impl, x, hx, weights, batch_sizes, reverse_index, self.num_layers, self.bidirectional,
                              self.bias, self.nonlinearity, dropout)


def stacked_layers(impl, x, hx, weights, batch_sizes, reverse_index, num_layers, bidirectional, bias, nonlinearity,
                   dropout=0.0):
    """An RNN's layers and directions over a backend's single-layer ``impl.layer``: ``(out, h_n)``.

    ``weights`` is torch.nn's flat list; ``reverse_index`` (packed bidirectional input) reverses
    each sequence in place; ``dropout`` is applied between layers, as torch.nn does in training."""
    directions = 2 if bidirectional else 1
    per_direction = len(weights) // (num_layers * directions)
    if directions == 2:
        # The reverse direction is the forward recurrence over reversed sequences.
        if batch_sizes is None:
            reverse = lambda t: t.flip(0)  # noqa: E731
        else:
            reverse = lambda t: t.index_select(0, reverse_index)  # noqa: E731
    h_n = []
    for layer in range(num_layers):
        outputs = []
        for direction in range(directions):
            k = layer * directions + direction
            w = weights[k * per_direction : (k + 1) * per_direction]
            w_ih, w_hh, b_ih, b_hh = w if bias else (*w, None, None)
            x_in = reverse(x) if direction else x
            out, h = impl.layer(x_in, hx[k], w_ih, w_hh, b_ih, b_hh, nonlinearity, batch_sizes)
            outputs.append(reverse(out) if direction else out)
            h_n.append(h)
        x = outputs[0] if directions == 1 else torch.cat(outputs, -1)
        if dropout and layer < num_layers - 1:
            x = F.dropout(x, dropout, training=True)
    return x, h_n[0].unsqueeze(0) if len(h_n) == 1 else torch.stack(h_n)


class RNNCell(nn.Module):
    """An Elman RNN cell with tanh or ReLU, a drop-in for :class:`torch.nn.RNNCell`.

    Like ``torch.nn.RNNCell`` it accepts its arguments as given and reports an unknown
    ``nonlinearity`` when called.
    """

    __constants__ = ["input_size", "hidden_size", "bias", "nonlinearity"]

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        bias: bool = True,
        nonlinearity: str = "tanh",
        device=None,
        dtype=None,
        *,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.bias = bias
        self.weight_ih = nn.Parameter(torch.empty((hidden_size, input_size), **factory))
        self.weight_hh = nn.Parameter(torch.empty((hidden_size, hidden_size), **factory))
        if bias:
            self.bias_ih = nn.Parameter(torch.empty(hidden_size, **factory))
            self.bias_hh = nn.Parameter(torch.empty(hidden_size, **factory))
        else:
            self.register_parameter("bias_ih", None)
            self.register_parameter("bias_hh", None)
        self.nonlinearity = nonlinearity
        self.backend = _check_backend(backend)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        stdv = 1.0 / math.sqrt(self.hidden_size) if self.hidden_size > 0 else 0
        for weight in self.parameters():
            nn.init.uniform_(weight, -stdv, stdv)

    def extra_repr(self) -> str:
        s = "{input_size}, {hidden_size}"
        if self.bias is not True:
            s += ", bias={bias}"
        if self.nonlinearity != "tanh":
            s += ", nonlinearity={nonlinearity}"
        if self.backend is not None:
            s += ", backend={backend!r}"
        return s.format(**self.__dict__)

    def forward(self, input: Tensor, hx: Tensor | None = None) -> Tensor:
        # The usual call whole in one entry where the backend has one, as in RNN.forward.
        if type(input) is Tensor and (hx is None or type(hx) is Tensor) and not _recording_or_autocast():
            whole = getattr(registry.cpu_kernels(self.backend), "cell_module_forward", None)
            if whole is not None:
                h = whole(input, hx, *_weights(self, _CELL_WEIGHTS), self.nonlinearity, self.input_size,
                          self.hidden_size)
                if h is not None:
                    return h
        x = _tensor(input, "input")
        if x.dim() not in (1, 2):
            raise ValueError(f"RNNCell: Expected input to be 1D or 2D, got {x.dim()}D instead")
        if hx is not None:
            hx = _tensor(hx, "hx")
            if hx.dim() not in (1, 2):
                raise ValueError(f"RNNCell: Expected hidden to be 1D or 2D, got {hx.dim()}D instead")
        batched = x.dim() == 2
        if not batched:
            x = x.unsqueeze(0)
        if hx is None:
            hx = torch.zeros(x.size(0), self.hidden_size, dtype=x.dtype, device=x.device)
        elif not batched:
            hx = hx.unsqueeze(0)
        if self.nonlinearity not in _MODES:
            raise RuntimeError(f"Unknown nonlinearity: {self.nonlinearity}")
        weights = tuple(_weights(self, _CELL_WEIGHTS))
        autocast, x, hx, weights = _under_autocast(x, hx, weights)
        self._check_forward_args(x, hx, weights[0])

        impl = registry.kernels(x.device, self.backend)
        if autocast is None:
            h = self._step(impl, x, hx, weights)
        else:
            with torch.autocast(x.device.type, enabled=False):
                h = self._step(impl, x, hx, weights)
        return h if batched else h.squeeze(0)

    def _step(self, impl, x: Tensor, hx: Tensor, weights) -> Tensor:
        cell = getattr(impl, "cell", None)
        if cell is not None:
            return cell(x, hx, *weights, self.nonlinearity)
        return impl.layer(x.unsqueeze(0), hx, *weights, self.nonlinearity)[1]

    def _check_forward_args(self, x: Tensor, hx: Tensor, w: Tensor) -> None:
        # ATen's rnn_*_cell checks, in its order and words, then what ATen leaves to its GEMM.
        # All of them at once first: per-call overhead is most of a small step's cost.
        xs, hs = x.shape, hx.shape
        if (
            len(hs) == 2 and xs[1] == self.input_size and hs[0] == xs[0] and hs[1] == self.hidden_size
            and x.device == hx.device == w.device and x.dtype == hx.dtype == w.dtype
        ):
            return
        if x.size(1) != self.input_size:
            raise RuntimeError(
                f"input has inconsistent input_size: got {x.size(1)} expected {self.input_size}"
            )
        if hx.size(0) != x.size(0):
            raise RuntimeError(
                f"Input batch size {x.size(0)} doesn't match hidden0 batch size {hx.size(0)}"
            )
        if hx.size(1) != self.hidden_size:
            raise RuntimeError(
                f"hidden0 has inconsistent hidden_size: got {hx.size(1)}, expected {self.hidden_size}"
            )
        if hx.dim() != 2:
            raise RuntimeError(f"hidden0 must be 2-D for batched input, got {hx.dim()}-D")
        # One weight stands for all: a module's parameters share dtype and device unless the
        # user splits them, and then the kernels' own checks raise.
        for t, name in ((x, "input"), (hx, "hidden")):
            if t.device != w.device:
                raise RuntimeError(
                    f"RNNCell {name} is on device {t.device} but its parameters are on device {w.device}"
                )
            if t.dtype != w.dtype:
                raise RuntimeError(
                    f"RNNCell {name} dtype ({t.dtype}) does not match weight dtype ({w.dtype}); "
                    f"convert the {name} or the model: .to({w.dtype})"
                )
