"""A stuck run ends itself: per-phase timeouts, SIGTERM with a grace period, lost peers.

Each guard is a daemon thread that does not need the main thread to make progress: the main thread
only stores what it is doing (:meth:`Watchdog.enter`), and when the main thread waits inside XLA (a
collective whose peer never comes) the thread still runs, prints one line and ends the process with
``os._exit``, so that a launcher or scheduler restarts it and the run resumes from its last complete
checkpoint.

Exit codes: :data:`EXIT_STUCK` (a phase ran past its timeout, or a peer process is gone: restart),
:data:`EXIT_SIGTERM` (SIGTERM and the main thread could not save within the grace period: do not
restart, the scheduler asked the job to end).
"""
from __future__ import annotations

import os
import signal
import socket
import statistics
import sys
import threading
import time
from typing import Callable, Optional

EXIT_STUCK = 75        # EX_TEMPFAIL: launch/ restarts on it
EXIT_SIGTERM = 76

PHASES = ('startup', 'restore', 'step', 'eval', 'save')


def abort(line: str, code: int) -> None:
  """Writes ``line`` to stderr and ends the process at once (no clean-up: a peer may be gone)."""
  try:
    sys.stdout.flush()
  except Exception:  # pylint: disable=broad-except
    pass
  os.write(2, (line.rstrip('\n') + '\n').encode())
  os._exit(code)     # pylint: disable=protected-access


def limits(config) -> dict:
  """``{phase: seconds}`` from ``config.watchdog`` (empty when it is off), plus ``'step_factor'``."""
  dog = config.get('watchdog')
  if dog is None or not dog.get('enabled', False):
    return {}
  out = {phase: float(dog.get(f'{phase}_s', 0) or 0) for phase in PHASES}
  out = {phase: seconds for phase, seconds in out.items() if seconds > 0}
  out['step_factor'] = float(dog.get('step_factor', 0) or 0)
  return out


class Watchdog:
  """Ends the process when the phase the main thread is in outlasts its timeout.

  ``timeouts``: ``{phase: seconds}`` for phases among :data:`PHASES` (a phase absent: no limit);
  ``step_factor`` > 0 raises the step's limit to that many times the median of the steps measured so
  far (a slow model gets a proportionate limit). The first step of each phase compiles: it runs under
  the start-up limit.
  """

  def __init__(self, timeouts: dict, *, process_index: int = 0, poll: float = 0.25,
               exit: Callable[[str, int], None] = abort):
    self.timeouts = {k: v for k, v in timeouts.items() if k in PHASES}
    self.step_factor = float(timeouts.get('step_factor', 0) or 0)
    self.process_index = process_index
    self._exit = exit
    self._state = ('startup', 0, time.monotonic())
    self._durations: list[float] = []
    self._stop = threading.Event()
    self._thread = None
    if self.timeouts:
      self._poll = min([poll] + [t / 8 for t in self.timeouts.values()])
      self._thread = threading.Thread(target=self._watch, name='ghl-watchdog', daemon=True)
      self._thread.start()

  @property
  def active(self) -> bool:
    return self._thread is not None

  @property
  def state(self) -> tuple:
    """``(phase, step, since)`` of the main thread."""
    return self._state

  def enter(self, phase: str, step: int) -> None:
    """The main thread starts ``phase`` (at ``step``); a step measures the one before it."""
    now = time.monotonic()
    old_phase, old_step, since = self._state
    if phase == 'step' and old_phase == 'step' and self.step_factor > 0:
      self._durations.append(now - since)
      del self._durations[:-50]
    self._state = (phase, step, now)         # one assignment: the thread reads a consistent tuple

  def limit(self, phase: str) -> Optional[float]:
    seconds = self.timeouts.get(phase)
    if phase == 'step' and seconds and self.step_factor > 0 and len(self._durations) >= 5:
      seconds = max(seconds, self.step_factor * statistics.median(self._durations))
    return seconds

  def _watch(self) -> None:
    while not self._stop.wait(self._poll):
      phase, step, since = self._state
      seconds = self.limit(phase)
      if seconds and time.monotonic() - since > seconds and not self._stop.is_set():
        self._exit(f'watchdog: process {self.process_index} stuck in {phase} at step {step} for more '
                   f'than {seconds:g} s (config.watchdog.{phase}_s); exiting with code {EXIT_STUCK} '
                   'to be restarted from the last complete checkpoint.', EXIT_STUCK)
        return

  def stop(self) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join(timeout=5)


class SigtermGuard:
  """SIGTERM ends the process even while the main thread waits inside XLA.

  The trainer's Python handler runs only when the main thread executes Python. CPython's C-level
  handler, which runs in whichever thread the kernel picks, also writes the signal's number to the
  wake-up fd (``signal.set_wakeup_fd``): this guard's thread reads it and gives the main thread
  ``grace`` seconds to save and stop (:meth:`finished`); past that it prints one line and exits
  with :data:`EXIT_SIGTERM`. ``describe()`` names where the main thread is. Install from the main
  thread, after the Python handler.
  """

  def __init__(self, grace: float, *, process_index: int = 0, describe: Callable[[], str] = lambda: '',
               exit: Callable[[str, int], None] = abort):
    self.grace, self.process_index, self._describe, self._exit = grace, process_index, describe, exit
    self._done = threading.Event()
    self._thread = None
    self._old_fd = None
    if grace <= 0 or threading.current_thread() is not threading.main_thread():
      return
    self._read, self._write = socket.socketpair()
    self._write.setblocking(False)
    self._old_fd = signal.set_wakeup_fd(self._write.fileno(), warn_on_full_buffer=False)
    self._thread = threading.Thread(target=self._watch, name='ghl-sigterm', daemon=True)
    self._thread.start()

  def _watch(self) -> None:
    while not self._done.is_set():
      try:
        data = self._read.recv(64)
      except OSError:
        return
      if not data or self._done.is_set():
        return
      if signal.SIGTERM in data:
        break
    if self._done.wait(self.grace):
      return
    where = self._describe()
    self._exit(f'SIGTERM: process {self.process_index} could not stop within {self.grace:g} s '
               f'(config.watchdog.sigterm_grace_s){" " + where if where else ""}; no checkpoint was '
               f'written for the current interval; exiting with code {EXIT_SIGTERM}.', EXIT_SIGTERM)

  def finished(self) -> None:
    """The main thread is done (saved and stopping, or the run ended): stand down."""
    self._done.set()
    if self._thread is None:
      return
    if self._old_fd is not None:
      signal.set_wakeup_fd(self._old_fd)
    try:
      self._write.send(b'\0')
    except OSError:
      pass
    self._thread.join(timeout=5)
    self._read.close()
    self._write.close()
