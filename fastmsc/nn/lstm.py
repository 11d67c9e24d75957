"""LSTM: a drop-in for torch.nn.LSTM (constructor, parameter names, state_dict, return values)
whose layers run as ``fastmsc.lstm_layer``; ``swap_modules`` puts it into an existing model."""

from __future__ import annotations

import logging
import math
import numbers
import warnings

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from ..ops import validate_lengths
from ..ops.lstm_layer import lstm_layer
from ._torchscript import NotScriptable

_LOG = logging.getLogger("fastmsc")


def _check_arguments(input_size, hidden_size, num_layers, bias, batch_first, dropout, proj_size) -> None:
    """torch.nn.LSTM's constructor checks, in its order and with its exception classes (TypeError for a wrong
    type, ValueError for a wrong value) and the same warning for dropout on a single layer."""
    try:
        float(dropout)  # torch converts dropout first, so an object float() refuses raises float()'s class
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"dropout should be a number in range [0, 1] representing the probability of an element "
                        f"being zeroed, got {type(dropout).__name__} ({dropout!r})") from None
    if not isinstance(dropout, numbers.Number) or isinstance(dropout, bool) or not 0 <= dropout <= 1:
        raise ValueError(f"dropout should be a number in range [0, 1] representing the probability of an element "
                         f"being zeroed, got {dropout!r}")
    if dropout > 0 and num_layers == 1:
        warnings.warn(f"dropout option adds dropout after all but last recurrent layer, so non-zero dropout expects "
                      f"num_layers greater than 1, but got dropout={dropout} and num_layers={num_layers}",
                      stacklevel=3)
    for name, value in (("bias", bias), ("batch_first", batch_first)):
        if not isinstance(value, bool):
            raise TypeError(f"{name} should be of type bool, got: {type(value).__name__} ({value!r})")
    # bool passes as int, as in torch: input_size=True is one feature there too.
    for name, value in (("input_size", input_size), ("hidden_size", hidden_size)):
        if not isinstance(value, int):
            raise TypeError(f"{name} should be of type int, got: {type(value).__name__} ({value!r})")
        if value <= 0:
            raise ValueError(f"{name} must be greater than zero, got {value}")
    # torch compares num_layers and proj_size before it uses them as sizes: a non-positive float is a wrong
    # value (ValueError), a positive one a wrong type (TypeError), and proj_size=0.0 disables projections.
    for name, value in (("num_layers", num_layers), ("proj_size", proj_size)):
        if not isinstance(value, numbers.Real):
            raise TypeError(f"{name} should be of type int, got: {type(value).__name__} ({value!r})")
    if num_layers <= 0:
        raise ValueError(f"num_layers must be greater than zero, got {num_layers}")
    if proj_size < 0:
        raise ValueError(f"proj_size should be a positive integer or zero to disable projections, got {proj_size}")
    if proj_size >= hidden_size:
        raise ValueError(f"proj_size has to be smaller than hidden_size, got proj_size={proj_size} and "
                         f"hidden_size={hidden_size}")
    for name, value in (("num_layers", num_layers), ("proj_size", proj_size)):
        if not isinstance(value, numbers.Integral) and value != 0:
            raise TypeError(f"{name} should be of type int, got: {type(value).__name__} ({value!r})")


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {len(value)} element(s)"
    return f"{type(value).__name__} ({value!r})"


def _hidden_pair(hx):
    """(h_0, c_0) read as hx[0] and hx[1], as torch.nn.LSTM reads them, so misuse raises its classes: IndexError
    for a single tensor or a tuple of fewer than two, TypeError for an object without items, AttributeError for
    an item that is not a tensor."""
    try:
        h0, c0 = hx[0], hx[1]
    except (IndexError, TypeError) as exc:
        raise type(exc)(f"hx should be a tuple (h_0, c_0) of two tensors, got {_describe(hx)}") from None
    for name, state in (("h_0", h0), ("c_0", c0)):
        if not isinstance(state, torch.Tensor):
            raise AttributeError(f"hx should be a tuple (h_0, c_0) of two tensors, got {name} of type "
                                 f"{type(state).__name__}")
    return h0, c0


class LSTM(NotScriptable, nn.Module):
    """Same arguments as torch.nn.LSTM, ``proj_size`` included.

    forward(input, hx=None, lengths=None) -> (output, (h_n, c_n)). ``input`` is (T, B, I), (B, T, I)
    with ``batch_first``, (T, I) unbatched, or a PackedSequence (then ``output`` is one too).
    ``lengths`` (B,) marks the valid steps of a padded batch, as packing would.

    With ``proj_size`` P > 0 each layer projects its hidden state, h_t = W_hr (o_t * tanh(c_t)), with the
    parameters ``weight_hr_l{k}[_reverse]`` (P, H), exactly as torch.nn.LSTM: h_0 and h_n are
    (layers*directions, B, P), c_0 and c_n (layers*directions, B, H), the output's last size is directions*P.
    """

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False, dropout=0.0,
                 bidirectional=False, proj_size=0, device=None, dtype=None):
        super().__init__()
        _check_arguments(input_size, hidden_size, num_layers, bias, batch_first, dropout, proj_size)
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.bias, self.batch_first, self.dropout = bias, batch_first, float(dropout)
        self.bidirectional, self.proj_size = bidirectional, proj_size
        factory = {"device": device, "dtype": dtype}
        directions = 2 if bidirectional else 1
        state_size = proj_size or hidden_size  # the size of h: what the next layer and the recurrence read
        for layer in range(num_layers):
            layer_in = input_size if layer == 0 else state_size * directions
            for suffix in ("", "_reverse")[:directions]:
                tag = f"l{layer}{suffix}"
                gates = 4 * hidden_size
                self.register_parameter(f"weight_ih_{tag}", nn.Parameter(torch.empty(gates, layer_in, **factory)))
                self.register_parameter(f"weight_hh_{tag}", nn.Parameter(torch.empty(gates, state_size, **factory)))
                if bias:
                    self.register_parameter(f"bias_ih_{tag}", nn.Parameter(torch.empty(4 * hidden_size, **factory)))
                    self.register_parameter(f"bias_hh_{tag}", nn.Parameter(torch.empty(4 * hidden_size, **factory)))
                if proj_size:
                    self.register_parameter(f"weight_hr_{tag}",
                                            nn.Parameter(torch.empty(proj_size, hidden_size, **factory)))
        self.reset_parameters()

    @property
    def num_directions(self) -> int:
        return 2 if self.bidirectional else 1

    @property
    def _flat_weights_names(self) -> list[str]:
        """Parameter names in torch.nn.LSTM's order: per layer and direction w_ih, w_hh[, b_ih, b_hh][, w_hr]."""
        kinds = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")[: 4 if self.bias else 2]
        if self.proj_size:
            kinds += ("weight_hr",)
        return [f"{kind}_l{layer}{suffix}" for layer in range(self.num_layers)
                for suffix in ("", "_reverse")[: self.num_directions] for kind in kinds]

    @property
    def _flat_weights(self) -> list:
        """The parameters named by ``_flat_weights_names``, as torch.nn.LSTM exposes them (read at each access, so
        a reassigned weight is seen)."""
        return [getattr(self, name, None) for name in self._flat_weights_names]

    @property
    def all_weights(self) -> list[list[nn.Parameter]]:
        """Per layer and direction, [w_ih, w_hh, b_ih, b_hh, w_hr] (without biases when ``bias=False``, without w_hr
        when ``proj_size=0``), as torch.nn.LSTM."""
        per = (4 if self.bias else 2) + (1 if self.proj_size else 0)
        flat = self._flat_weights
        return [flat[i:i + per] for i in range(0, len(flat), per)]

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.hidden_size)
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    def flatten_parameters(self) -> None:
        """Kept for torch.nn.LSTM compatibility; fastmsc needs no flattened weight buffer."""

    def layer_weights(self, layer: int):
        """The ``weights`` argument of fastmsc.lstm_layer for one layer."""
        kinds = ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr")[: 5 if self.proj_size else 4]
        parameters = self._parameters

        def get(name):
            # A registered parameter straight from its dict (getattr through nn.Module costs ~0.3 us); anything
            # else (a plain tensor set in its place, a missing bias) the way getattr finds it.
            p = parameters.get(name)
            return p if p is not None else getattr(self, name, None)

        return tuple(tuple(get(f"{kind}_l{layer}{suffix}") for kind in kinds)
                     for suffix in ("", "_reverse")[: self.num_directions])

    def forward(self, input, hx=None, lengths=None):
        # Misuse raises the exception class torch.nn.LSTM raises, checked in torch's order (where two checks
        # fail, the first one's class), so code written against torch.nn.LSTM catches ours; the messages say more.
        packed = isinstance(input, PackedSequence)
        if packed:
            if lengths is not None:
                raise ValueError("pass lengths only with a padded tensor, not with a PackedSequence")
            x, lengths = pad_packed_sequence(input, batch_first=True)
        else:
            if not isinstance(input, torch.Tensor):
                raise AttributeError(f"LSTM: expected input to be a tensor or a PackedSequence, got "
                                     f"{type(input).__name__}")
            if input.dim() not in (2, 3):
                raise ValueError(f"LSTM: expected input to be a 2-D (unbatched) or 3-D tensor or a PackedSequence, "
                                 f"got {tuple(input.shape)}")
            x = input if input.dim() == 2 or self.batch_first else input.transpose(0, 1)
        unbatched = x.dim() == 2
        if unbatched:
            x = x.unsqueeze(0)
        h0 = c0 = None
        if hx is not None:
            h0, c0 = _hidden_pair(hx)
            wanted_dim = 2 if unbatched else 3
            if h0.dim() != wanted_dim or c0.dim() != wanted_dim:
                hint = "; hx should be a tuple (h_0, c_0), not one tensor" if isinstance(hx, torch.Tensor) else ""
                if packed:
                    # torch does not check the states of a packed input; its kernel reports the missing
                    # dimension as IndexError.
                    raise IndexError(f"For a PackedSequence input, hx and cx should be 3-D (layers*directions, "
                                     f"batch, hidden) but got ({h0.dim()}-D, {c0.dim()}-D) tensors{hint}")
                raise RuntimeError(f"For {'unbatched 2-D' if unbatched else 'batched 3-D'} input, hx and cx should "
                                   f"also be {wanted_dim}-D but got ({h0.dim()}-D, {c0.dim()}-D) tensors{hint}")
            if unbatched:
                h0, c0 = h0.unsqueeze(1), c0.unsqueeze(1)
        weight = self.weight_ih_l0
        if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
            # torch checks the dtype of a tensor input in Python (ValueError) and meets that of a packed one
            # only in its kernel (RuntimeError).
            raise (RuntimeError if packed else ValueError)(
                f"LSTM input dtype ({x.dtype}) does not match weight dtype ({weight.dtype}); convert the input "
                f"(input.to({weight.dtype})) or the module (module.to({x.dtype}))")
        if x.shape[-1] != self.input_size:
            raise RuntimeError(f"input.size(-1) must be equal to input_size. Expected {self.input_size}, "
                               f"got {x.shape[-1]}")
        if hx is not None:
            states = (self.num_layers * self.num_directions, x.shape[0])
            h_what = "proj_size" if self.proj_size else "hidden"
            for index, (name, state, size, what) in enumerate((("h_0", h0, self.proj_size or self.hidden_size, h_what),
                                                               ("c_0", c0, self.hidden_size, "hidden"))):
                expected = (*states, size)
                if tuple(state.shape) != expected:
                    raise RuntimeError(f"Expected hidden[{index}] size {expected}, got {tuple(state.shape)}: {name} "
                                       f"is (layers*directions, batch, {what})")
            # torch's kernel refuses these after the checks above, with these classes.
            if isinstance(hx, torch.Tensor):
                raise TypeError(f"hx should be a tuple (h_0, c_0) of two tensors, got {_describe(hx)}")
            if len(hx) != 2:
                raise RuntimeError(f"hx should be a tuple (h_0, c_0) of two tensors, got {_describe(hx)}")
        if x.device != weight.device:
            raise RuntimeError(f"Input and parameter tensors are not at the same device, found input tensor at "
                               f"{x.device} and parameter tensor at {weight.device}; move them to one device")
        for name, state in (("h_0", h0), ("c_0", c0)):
            if state is not None and state.device != x.device:
                raise RuntimeError(f"Input and hidden tensors are not at the same device, found input tensor at "
                                   f"{x.device} and hidden tensor {name} at {state.device}; move them to one device")
        if x.shape[1] == 0:
            raise RuntimeError(f"Expected sequence length to be larger than 0 in RNN, got input of shape "
                               f"{tuple(input.shape)}")
        for name, state in (("h_0", h0), ("c_0", c0)):
            if state is not None and state.dtype != x.dtype:
                raise RuntimeError(f"{name} has dtype {state.dtype}, the input {x.dtype}; pass one dtype")
        D = self.num_directions
        # Validated once for all layers: each layer then compares only its shape, never reads its values again.
        valid_lengths = validate_lengths(lengths, x.shape[0], x.shape[1], x.device)
        h_n, c_n = [], []
        for layer in range(self.num_layers):
            if layer > 0 and self.dropout > 0 and self.training:
                x = nn.functional.dropout(x, self.dropout, training=True)
            states = slice(layer * D, (layer + 1) * D)
            x, h, c = lstm_layer(x, self.layer_weights(layer),
                                 None if h0 is None else h0[states], None if c0 is None else c0[states],
                                 valid_lengths)
            h_n.append(h)
            c_n.append(c)
        h_n, c_n = (h_n[0], c_n[0]) if len(h_n) == 1 else (torch.cat(h_n), torch.cat(c_n))
        if packed:
            order = input.sorted_indices
            x_sorted = x if order is None else x.index_select(0, order)
            sorted_lengths = lengths if order is None else lengths.index_select(0, order.cpu())
            data = pack_padded_sequence(x_sorted, sorted_lengths, batch_first=True).data
            return PackedSequence(data, input.batch_sizes, order, input.unsorted_indices), (h_n, c_n)
        if unbatched:
            return x.squeeze(0), (h_n.squeeze(1), c_n.squeeze(1))
        return (x if self.batch_first else x.transpose(0, 1)), (h_n, c_n)

    def extra_repr(self) -> str:
        # torch.nn.LSTM's repr: the sizes, then only the arguments that differ from their defaults.
        s = f"{self.input_size}, {self.hidden_size}"
        if self.proj_size != 0:
            s += f", proj_size={self.proj_size}"
        if self.num_layers != 1:
            s += f", num_layers={self.num_layers}"
        if self.bias is not True:
            s += f", bias={self.bias}"
        if self.batch_first is not False:
            s += f", batch_first={self.batch_first}"
        if self.dropout != 0:
            s += f", dropout={self.dropout}"
        if self.bidirectional is not False:
            s += f", bidirectional={self.bidirectional}"
        return s


def _why_not_swappable(lstm: nn.LSTM) -> str | None:
    """Why ``lstm`` must stay a torch.nn.LSTM, or None: only a plain nn.LSTM whose parameters are its own
    standard ones, with no hooks, is replaced, since anything else may rely on what the replacement lacks."""
    if type(lstm) is not nn.LSTM:
        return (f"it is a {type(lstm).__module__}.{type(lstm).__qualname__}, a subclass of torch.nn.LSTM, whose "
                f"forward or state may differ")
    own = {name for name, _ in lstm.named_parameters(recurse=False)}
    expected = set(lstm._flat_weights_names)
    if own != expected:
        missing, extra = sorted(expected - own), sorted(own - expected)
        return (f"its parameters were rewired (missing {', '.join(missing) or 'none'}; "
                f"extra {', '.join(extra) or 'none'}), e.g. by a weight-dropout wrapper")
    hooks = [kind for kind in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_state_dict_hooks",
                               "_load_state_dict_pre_hooks") if getattr(lstm, kind, None)]
    if hooks:
        return f"it has hooks ({', '.join(hooks)}), which the replacement would not carry"
    return None


def swap_modules(model: nn.Module) -> nn.Module:
    """Replace every plain torch.nn.LSTM inside ``model`` (in place) by fastmsc.nn.LSTM with the same weights.

    Only exact torch.nn.LSTM instances with their standard parameters and no hooks are replaced (``proj_size``
    included); subclasses, LSTMs with rewired parameters (weight-dropout wrappers) or with hooks are left as they
    are. The logger ``fastmsc`` reports what was swapped (INFO) and each LSTM left alone with the reason
    (WARNING). Returns ``model``.
    """
    if isinstance(model, nn.LSTM):
        raise TypeError("swap_modules replaces LSTMs inside a model; wrap a bare nn.LSTM or build fastmsc.nn.LSTM")
    swapped = []
    for path, parent, name, child in _lstm_children(model, ""):
        reason = _why_not_swappable(child)
        if reason is not None:
            _LOG.warning("swap_modules: left %s as it is: %s", path, reason)
            continue
        p = next(child.parameters())
        fast = LSTM(child.input_size, child.hidden_size, child.num_layers, child.bias, child.batch_first,
                    child.dropout, child.bidirectional, child.proj_size, device=p.device, dtype=p.dtype)
        fast.load_state_dict(child.state_dict())
        fast.train(child.training)
        setattr(parent, name, fast)
        swapped.append(path)
    _LOG.info("swap_modules: replaced %d torch.nn.LSTM by fastmsc.nn.LSTM%s", len(swapped),
              f": {', '.join(swapped)}" if swapped else "")
    return model


def _lstm_children(module: nn.Module, prefix: str):
    """(dotted path, parent, attribute name, child) of every torch.nn.LSTM (subclasses too) below ``module``,
    not looking inside an LSTM."""
    for name, child in list(module.named_children()):
        path = f"{prefix}{name}"
        if isinstance(child, nn.LSTM):
            yield path, module, name, child
        else:
            yield from _lstm_children(child, f"{path}.")
