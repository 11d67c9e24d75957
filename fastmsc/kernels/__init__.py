"""Fused implementations (Triton kernels, the compiled LSTM extension), one module per op.

Each module defines ``fused`` and ``fused_unsupported``; see :class:`fastmsc.backend.Op`. They are
imported lazily by the backend, so nothing here is needed for ``import fastmsc``.
"""
