"""Triton kernels of kdfast, one module per op; imported lazily by kdfast.ops."""
