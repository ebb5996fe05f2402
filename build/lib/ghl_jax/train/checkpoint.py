"""Orbax checkpoints of the train state, always resumed from the workdir.

Saves are atomic (orbax writes to a temporary directory and renames it when complete), so a
process killed mid-save leaves no checkpoint that could be restored half-written. If the
latest checkpoint cannot be read (truncated, corrupted) the previous one is used, with a warning.
"""
from __future__ import annotations

import json
import os
from typing import Any, Optional

from absl import logging
import jax
import orbax.checkpoint as ocp

from ghl_jax.train.validate import ConfigError

IDENTITY_FIELDS = ('model.name', 'data.name')


class Checkpointer:
  """``CheckpointManager`` under ``workdir/checkpoints`` with fall-back restore."""

  def __init__(self, workdir: str, *, keep: int = 2):
    self.directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
    self.manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                            cleanup_tmp_directories=True))

  def save(self, step: int, state: Any, *, force: bool = False) -> None:
    self.manager.save(step, args=ocp.args.StandardSave(state), force=force)

  def restore_latest(self, template: Any) -> Optional[Any]:
    """The newest readable checkpoint restored onto ``template``'s structure and shardings.

    An unreadable checkpoint is reported, moved aside (``checkpoints/corrupt-<step>``, so that
    the step can be saved again) and the next older one is tried.
    """
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        return self.manager.restore(step, args=ocp.args.StandardRestore(target))
      except Exception as error:  # pylint: disable=broad-except
        reason = (str(error).strip().splitlines() or [''])[0][:200]
        logging.warning('Checkpoint at step %d is unreadable (%s: %s); falling back to an older one.',
                        step, type(error).__name__, reason)
        print(f'warning: checkpoint at step {step} is unreadable ({type(error).__name__}); '
              'falling back to the previous one.', flush=True)
        self._set_aside(step)
    return None

  def _set_aside(self, step: int) -> None:
    if jax.process_index() == 0:
      path = os.path.join(self.directory, str(step))
      if os.path.isdir(path):
        os.replace(path, os.path.join(self.directory, f'corrupt-{step}'))
    self.manager.reload()

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def _field(config, dotted: str):
  value = config
  for key in dotted.split('.'):
    value = value[key]
  return value


def check_workdir_identity(config, workdir: str, *, write: bool) -> None:
  """Refuses a workdir written by a run of another model or dataset (unless ``config.force``).

  The identity (``model.name``, ``data.name``) of the first run is kept in ``workdir/run.json``.
  """
  path = os.path.join(workdir, 'run.json')
  mine = {field: _field(config, field) for field in IDENTITY_FIELDS}
  if os.path.exists(path):
    with open(path) as f:
      theirs = json.load(f)
    differ = {k: (theirs.get(k), v) for k, v in mine.items() if theirs.get(k) != v}
    if differ and not config.get('force', False):
      what = ', '.join(f'{k}={old!r} there but {new!r} now' for k, (old, new) in differ.items())
      raise ConfigError(f'Workdir {workdir} belongs to another run ({what}): use a new --workdir, '
                       'or --config.force=True to resume it anyway.')
    if not differ:
      return
  if write:
    with open(path, 'w') as f:
      json.dump(mine, f)
