"""``fastmsc bench``: time every backend of every op and of MSCClassifier's training step.

For each op in ``fastmsc.backend.OPS`` (forward under no_grad, and forward+backward) and for the model's
training step (forward, cross-entropy, backward, AdamW step), every available backend is first checked against
the float64 reference, then timed round-robin, one call of each backend in turn (median and spread over
repeats after warm-up; CUDA events on GPU, perf_counter on CPU) against the ``torch`` backend and
``torch.compile`` of it measured in the same run. The saved-for-backward activation bytes of each backend are
counted with :func:`saved_tensor_bytes`. A table is printed and one CSV row per measurement is appended,
tagged with the device and versions.

Modules: ``cases`` (shapes and input factories, shared with the ``bench/`` pytest-benchmark suite),
``memory`` (saved_tensor_bytes), ``timing``, ``rows`` (Options, Result), ``checks`` (against the reference),
``workloads`` (each backend made ready per case and mode), ``harness`` (check, time, run the suite), ``report``
(table, CSV, chart). The command line is :mod:`fastmsc.commands.bench`.
"""

from .cases import Case, OpInputs, default_cases, make_model, make_model_batch, make_op_inputs
from .harness import BACKEND_CHOICES, Options, Result, measure, run_suite
from .memory import saved_tensor_bytes
from .timing import Stats, time_interleaved, time_step

__all__ = [
    "BACKEND_CHOICES", "Case", "OpInputs", "Options", "Result", "Stats", "default_cases",
    "make_model", "make_model_batch", "make_op_inputs", "measure", "run_suite", "saved_tensor_bytes",
    "time_interleaved", "time_step",
]
