"""The one kernel contract, implemented once per backend (one file each: ``_<name>.py``).

Every backend computes a single layer in a single direction of the Elman recurrence
``h_t = act(x_t W_ih^T + b_ih + h_{t-1} W_hh^T + b_hh)`` and nothing else::

    layer(x, h0, w_ih, w_hh, b_ih, b_hh, nonlinearity, batch_sizes=None) -> (out, h_n)

- dense input (``batch_sizes is None``): ``x`` is ``[T, B, I]`` and ``out`` is ``[T, B, H]``;
- packed input: ``x`` is the data of a ``PackedSequence``, ``[N, I]`` with ``N = sum(batch_sizes)``,
  ``batch_sizes`` the non-increasing number of active rows per step (int64, on the CPU), and
  ``out`` is ``[N, H]`` in the same packed order. A dense input is the packed case with every
  step holding all ``B`` rows, which is how the backends treat it.
- ``h0`` and ``h_n`` are ``[B, H]``; ``h_n[b]`` is row ``b``'s state after its own last step.
- ``w_ih [H, I]``, ``w_hh [H, H]``; ``b_ih``, ``b_hh`` are ``[H]`` or both ``None``;
  ``nonlinearity`` is ``"tanh"`` or ``"relu"``.
- Differentiable with respect to ``x``, ``h0`` and every weight.

``cell(x [B, I], h [B, H], w_ih, w_hh, b_ih, b_hh, nonlinearity) -> h' [B, H]`` is optional: a
backend without it runs ``RNNCell`` as a one-step ``layer``.

``stack(x, hx, weights, num_layers, bidirectional, bias, nonlinearity, batch_sizes, reverse_index)
-> (out, h_n) | None`` is optional too: the module layer's loop over layers and directions
in one call, for a backend whose per-call overhead would otherwise be paid per layer and
direction (``cpp``), or whose small calls are mostly overhead (``numba``, one dense layer).
It must equal that loop over ``layer`` (``modules.stacked_layers``), and
returns ``None`` where it does not apply, for the module to run the loop. The module never uses
it while dropout draws masks between layers.

``module_forward(input, hx, weights, num_layers, bidirectional, bias, nonlinearity, batch_first,
input_size, hidden_size) -> (out, h_n) | None`` and ``cell_module_forward(input, hx, w_ih, w_hh,
b_ih, b_hh, nonlinearity, input_size, hidden_size) -> h' | None`` are the last two optional
hooks, for CPU backends whose small calls are mostly the module's own Python (``cpp`` in C++,
``numba``): ``RNN.forward`` / ``RNNCell.forward`` hand them their usual call whole (a plain
tensor, nothing recorded, autocast off), arguments and attributes as they are. Each does the
module's reshaping and checks, then what the module's Python path would do, with the same
result bit for bit; it returns ``None`` for any other call, and for every call that path must
answer with torch.nn's errors.

Names, the same in every backend: ``batch_sizes`` is the active rows per step (a tensor here, a
``list[int]`` inside the Python backends, an int64 array in the numba kernels), ``seq_len`` a
count of steps, ``batch`` the scalar ``B``, ``offsets`` each step's first packed row, and
``gemm`` the CPU path that does each step's product with ``W_hh`` as one BLAS call. What the
Python backends share (the input projection, the gradient GEMMs after the reverse recurrence,
the check of these arguments) is in ``_common``.

Inputs arrive validated (shapes, dtypes, devices agree) from ``myrnn_fast.modules``, which also
owns layers, directions, dropout, ``batch_first``, unbatched input and packing.
"""
