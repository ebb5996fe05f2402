"""Library log lines off: the INFO/WARNING lines C++ libraries (XLA, and TensorFlow where a user's
code loads it) write through absl before ``TF_CPP_MIN_LOG_LEVEL`` is read.

They are filtered from stderr instead: ``with stderr_filtered(): import jax`` in Python,
``CMD 2> >(python -m experiments.quiet >&2)`` in a shell. Every other line passes.
"""
from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile

LIBRARY_LINE = re.compile(r'^([IW]\d{4} \d\d:\d\d:\d+\.\d+ +\d+ \S+:\d+\] '    # absl / glog INFO, WARNING
                          r'|WARNING: All log messages before absl::InitializeLog\(\) is called'
                          r'|To enable the following instructions: )')          # cpu_feature_guard's 2nd line


def kept(text: str) -> str:
  """``text`` without the library lines."""
  return ''.join(line for line in text.splitlines(keepends=True) if not LIBRARY_LINE.match(line))


@contextlib.contextmanager
def stderr_filtered():
  """Everything written to file descriptor 2 inside the block, library lines dropped, is
  written to stderr when the block ends (exceptions included)."""
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as captured:
    os.dup2(captured.fileno(), 2)
    try:
      yield
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      captured.seek(0)
      sys.stderr.write(kept(captured.read().decode(errors='replace')))
      sys.stderr.flush()


if __name__ == '__main__':
  for line in sys.stdin:
    if not LIBRARY_LINE.match(line):
      sys.stdout.write(line)
      sys.stdout.flush()
