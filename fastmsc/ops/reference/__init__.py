"""The ops' references, one file per op: plain PyTorch written straight from the math, float64-capable.

They sit below both fastmsc.ops.<op> (which imports its kernel module) and fastmsc.kernels.<op> (whose double
backward recomputes the reference), so that neither imports the other in a circle.
"""
