"""Backend-specific kernels: pure jax functions, no flax modules, no rules.

* :mod:`~ghl_jax.kernels.conv` — convolutions with a two-GEMM backward pass, and the same with a
  caller's term over the patches (GHL's fused Hebbian product);
* :mod:`~ghl_jax.kernels.matmul` — low-precision matrix products accumulated in float32 (the CPU's
  bfloat16 peak), also as ``nn.Dense``'s ``dot_general``;
* :mod:`~ghl_jax.kernels.pooling` — max pooling with a fused elementwise backward pass;
* :mod:`~ghl_jax.kernels.host_memory` — the host allocator setting for XLA:CPU steps.

The core reaches them through one seam, :mod:`ghl_jax.accel`, which picks them by backend.
"""
from ghl_jax.kernels import conv, host_memory, matmul, pooling

__all__ = ['conv', 'host_memory', 'matmul', 'pooling']
