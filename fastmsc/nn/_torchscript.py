"""TorchScript refusal shared by the fastmsc modules."""

from __future__ import annotations


class NotScriptable:
    """Mixin for modules whose forward runs fastmsc ops, which TorchScript cannot compile.

    ``torch.jit.script`` calls ``__prepare_scriptable__`` on a module and on every submodule before compiling
    anything, so raising there replaces the error TorchScript would meet deep inside an op (an f-string, a
    Python-only type, a Triton launch) with one that says what to use instead, also for a model that merely
    contains a fastmsc module.
    """

    def __prepare_scriptable__(self):
        name = f"{type(self).__module__}.{type(self).__qualname__}"
        raise RuntimeError(
            f"torch.jit.script cannot compile {name} (nor a model containing it): fastmsc modules call Triton "
            f"kernels, a compiled C++ extension and torch.library custom ops, which TorchScript cannot compile. "
            f"Use torch.compile(model) to compile it, or torch.export.export(model, example_inputs) for a "
            f"graph to save and load without Python model code; where TorchScript itself is required, build "
            f"the model from torch.nn modules (torch.nn.LSTM instead of fastmsc.nn.LSTM)."
        )
