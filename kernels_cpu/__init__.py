"""Compiled CPU kernels: C++ sources built on first use into XLA FFI custom calls.

`attention`: causal softmax attention (forward and backward) for the CPU training step, where
XLA:CPU's batched matmuls over [batch, heads, t, s] cost several times the FLOPs they do.
`build`: compiling, caching and registering a source's handlers.
"""
