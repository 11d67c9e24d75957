"""Fused implementations (Triton kernels, the compiled LSTM extension), one module per op.

Each module defines ``fused`` and ``fused_unsupported`` (see :class:`fastmsc.backend.Op`); ``fastmsc.ops.<op>``
imports its own module guarded, so a missing triton or a broken extension never fails ``import fastmsc``.
Nothing here imports :mod:`fastmsc.backend`: the backend policy arrives as arguments (``allow_interpreter``).
"""
