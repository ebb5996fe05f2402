"""Orbax checkpoints of the train state, always resumed from the workdir.

Saves are atomic (orbax writes to a temporary directory and renames it when complete), so a
process killed mid-save leaves no checkpoint that could be restored half-written. If the
latest checkpoint cannot be read (truncated, corrupted) the previous one is used, with a warning.
A readable checkpoint whose tree or shapes differ from the train state is refused, untouched.
"""
from __future__ import annotations

from typing import Any, Optional

from absl import logging
import jax
import orbax.checkpoint as ocp

from ghl_jax.train import workdir as workdir_lib
from ghl_jax.train.validate import ConfigError


def saved_steps(workdir: str) -> list[int]:
  """Steps of the complete checkpoints in ``workdir`` (read from the directory, nothing opened)."""
  directory = workdir_lib.path(workdir) / 'checkpoints'
  names = [entry.name for entry in directory.iterdir()] if directory.is_dir() else []
  return sorted(int(name) for name in names if name.isdigit())


def read_latest(workdir: str) -> dict:
  """The newest checkpoint in ``workdir`` as saved (the train state's dict), on this host's first
  device, whatever topology wrote it; nothing in the workdir changes."""
  directory = workdir_lib.path(workdir) / 'checkpoints'
  if not saved_steps(workdir):
    raise ValueError(f'No checkpoint in {directory}: train first or pass another workdir.')
  manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=False),
                                  item_handlers=ocp.StandardCheckpointHandler())
  try:
    step = manager.latest_step()
    here = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=here),
                          dict(manager.metadata(step).item_metadata))
    return manager.restore(step, args=ocp.args.StandardRestore(target))
  finally:
    manager.close()


class Checkpointer:
  """``CheckpointManager`` under ``workdir/checkpoints`` with fall-back restore.

  ``metadata`` (JSON-able) is stored with every checkpoint (the run's config).
  """

  def __init__(self, workdir: str, *, keep: int = 2, metadata: Optional[dict] = None):
    self.directory = workdir_lib.path(workdir) / 'checkpoints'
    self.metadata = metadata
    self.manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                            cleanup_tmp_directories=True),
        item_handlers=ocp.StandardCheckpointHandler())     # lets metadata() read a step before restoring

  def save(self, step: int, state: Any, *, force: bool = False) -> None:
    self.manager.save(step, args=ocp.args.StandardSave(state), force=force, custom_metadata=self.metadata)

  def restore_latest(self, template: Any, *, changed=()) -> Optional[Any]:
    """The newest readable checkpoint restored onto ``template``'s structure and shardings.

    An unreadable checkpoint is reported, moved aside (``checkpoints/corrupt-<step>``, so that
    the step can be saved again) and the next older one is tried. A readable one that holds
    another tree or other shapes raises :class:`ConfigError` and nothing is moved; ``changed``
    names the config fields that differ from the saved config.
    """
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        stored = _shapes(self.manager.metadata(step).item_metadata)
        if not stored:
          raise ValueError('its metadata lists no arrays')
      except Exception as error:  # pylint: disable=broad-except
        self._unreadable(step, error)
        continue
      mismatch = _mismatch(stored, _shapes(target))
      if mismatch:
        hint = f' after changing {", ".join(changed)}' if changed else ''
        raise ConfigError(f'The checkpoint at step {step} in {self.directory} does not fit this run{hint} '
                          f'({mismatch}): resume with the config it was written with, or use a new --workdir.')
      try:
        return self.manager.restore(step, args=ocp.args.StandardRestore(target))
      except Exception as error:  # pylint: disable=broad-except
        self._unreadable(step, error)
    return None

  def _unreadable(self, step: int, error: Exception) -> None:
    reason = (str(error).strip().splitlines() or [''])[0][:200]
    logging.warning('Checkpoint at step %d is unreadable (%s: %s); falling back to an older one.',
                    step, type(error).__name__, reason)
    print(f'warning: checkpoint at step {step} is unreadable ({type(error).__name__}); '
          'falling back to the previous one.', flush=True)
    self._set_aside(step)

  def _set_aside(self, step: int) -> None:
    if jax.process_index() == 0:
      path = self.directory / str(step)
      aside = self.directory / f'corrupt-{step}'
      for number in range(2, 100):              # an earlier one set aside at this step keeps its name
        if not aside.exists():
          break
        aside = self.directory / f'corrupt-{step}-{number}'
      try:
        if path.is_dir():
          path.rename(aside)
      except OSError as error:
        print(f'warning: could not move the unreadable checkpoint {path} aside ({error}); '
              'move or delete it before the next save of that step.', flush=True)
    self.manager.reload()

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def _path(keys) -> str:
  return '/'.join(str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k)))) for k in keys)


def _shapes(tree) -> dict:
  """``{'params/conv1/kernel': shape}`` of a tree of arrays, shape structs or orbax array metadata."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, 'shape'))
  return {_path(keys): tuple(leaf.shape) for keys, leaf in leaves if hasattr(leaf, 'shape')}


def _mismatch(stored: dict, wanted: dict, *, shown: int = 3) -> str:
  """The leaves whose shapes differ or that only one tree holds ('' if none), the first few spelled out."""
  paths = sorted(set(stored) | set(wanted), key=lambda p: (not p.startswith('params/'), p))   # params first
  bad = [p for p in paths if stored.get(p) != wanted.get(p)]
  text = '; '.join(f'{p} {stored.get(p, "absent")} there, {wanted.get(p, "absent")} now' for p in bad[:shown])
  return text + (f'; {len(bad) - shown} more' if len(bad) > shown else '')
