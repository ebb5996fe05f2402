"""Host allocator setting that keeps XLA:CPU steps out of the page-fault path.

XLA:CPU allocates a step's temporaries (hundreds of MB for DeepHebb at batch 64) with
``malloc`` on every call. glibc serves blocks that large with a fresh ``mmap`` and gives them
back with ``munmap``, so every step zero-fills all of its temporary pages again (DeepHebb:
~120-180k page faults and 0.2-0.5 s of system time per step). :func:`keep_freed_memory` makes
glibc serve them from its heap and keep what is freed for the next step (``mallopt``:
``M_MMAP_MAX = 0``, no trimming, one arena). The process then holds its peak memory until it
exits, which is what a training process does anyway.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools

# mallopt parameters (glibc malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
# glibc defaults, restored by keep_freed_memory(False).
_DEFAULTS = {_M_TRIM_THRESHOLD: 128 * 1024, _M_MMAP_MAX: 65536, _M_ARENA_MAX: 0}
_KEEP = {_M_MMAP_MAX: 0, _M_TRIM_THRESHOLD: -1, _M_ARENA_MAX: 1}   # -1: never trim (SIZE_MAX)


@functools.lru_cache(maxsize=None)
def _mallopt():
  name = ctypes.util.find_library('c')
  try:
    return ctypes.CDLL(name).mallopt if name else None
  except (OSError, AttributeError):        # not glibc (musl, macOS): nothing to set
    return None


def keep_freed_memory(enable: bool = True) -> bool:
  """Keeps freed host memory for reuse (``enable``) or restores glibc's defaults.

  Returns whether the setting was applied (False where the C library has no ``mallopt``).
  """
  mallopt = _mallopt()
  if mallopt is None:
    return False
  return all(mallopt(param, value) == 1 for param, value in (_KEEP if enable else _DEFAULTS).items())
