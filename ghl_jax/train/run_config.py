"""The config of a workdir's run, kept in ``workdir/config.json``, and what a resumed run may change.

A run writes its resolved config into the workdir. Resuming a workdir that holds checkpoints compares
every field with that file and refuses, before any checkpoint is touched, when a field that defines
the experiment differs (unless ``config.force``). Only the fields in :data:`RESUMABLE` may change.
"""
from __future__ import annotations

import json

from ghl_jax.train import workdir as workdir_lib
from ghl_jax.train.validate import ConfigError

FILENAME = 'config.json'
LEGACY_FILENAME = 'run.json'       # older workdirs: only model.name and data.name

# The one list of fields a resumed run may change: how long, how often, where and how fast it runs,
# never what it learns. Every other field defines the experiment: changing it needs a new --workdir
# or --config.force=True.
RESUMABLE = frozenset({
    'num_train_steps', 'num_epochs',                                         # the step budget
    'log_every_steps', 'eval_every_steps', 'checkpoint_every_steps', 'keep_checkpoints',  # cadence
    'profile_steps',                                    # which steps jax.profiler traces
    'eval_batch_size',                                  # evaluation still sees every example once
    'data.data_dir', 'data.manual_dir', 'data.download', 'compilation_cache_dir',  # where files live
    'conv_impl',                                        # the same convolution by another kernel
    'force', 'sweep',                                   # switches of the command line and launcher
    'ghl.shadow',                                       # a BP run's diagnostics: what GHL would have done
    'compute_dtype',                                    # the arithmetic's precision (params, optimizer state
                                                        # stay float32): a run may move to other hardware
}) | {f'watchdog.{name}' for name in (                  # fault tolerance: timeouts and grace periods
    'enabled', 'startup_s', 'restore_s', 'step_s', 'eval_s', 'save_s', 'step_factor', 'sigterm_grace_s',
    'heartbeat_s', 'shutdown_s')}


# Fields that earlier versions saved and this one no longer has: a saved run that holds them resumes
# (their value changed nothing this version does), with one line naming them.
RETIRED = {
    'data.shuffle_buffer': 'grain permutes the whole split each epoch',
}


class _Unset:
  """A field one of the two configs lacks."""

  def __repr__(self):
    return 'unset'


_UNSET = _Unset()


def flatten(config) -> dict:
  """``{dotted.field: value}`` of a ConfigDict or nested dict, with values as JSON stores them."""
  out = {}

  def walk(node, prefix):
    for key, value in node.items():
      if hasattr(value, 'items'):
        walk(value, f'{prefix}{key}.')
      else:
        out[prefix + str(key)] = value
  walk(config.to_dict() if hasattr(config, 'to_dict') else config, '')
  return json.loads(json.dumps(out, default=repr))


def read(workdir: str) -> dict | None:
  """The flat config saved in ``workdir`` (the legacy identity file if only that exists), else None."""
  for name in (FILENAME, LEGACY_FILENAME):
    path = workdir_lib.path(workdir) / name
    if path.exists():
      try:
        return flatten(json.loads(path.read_text()))
      except (OSError, ValueError, AttributeError) as error:
        raise ConfigError(f'{path} is unreadable ({error}): restore it, or pass --config.force=True '
                          'to replace it with this config.') from None
  return None


def save(config, workdir: str) -> None:
  """Writes ``config`` to ``workdir/config.json`` atomically (a reader sees the old or the new file)."""
  text = json.dumps(config.to_dict(), indent=2, sort_keys=True, default=repr) + '\n'
  workdir_lib.write_text(workdir_lib.path(workdir) / FILENAME, text)


def changed_fields(saved: dict, mine: dict, *, legacy: bool = False) -> list[str]:
  """Fields outside :data:`RESUMABLE` whose values differ (a legacy file: only the fields it holds);
  a :data:`RETIRED` field that only the saved config holds is not a change."""
  fields = set(saved) if legacy else set(saved) | set(mine)
  retired = {f for f in RETIRED if f in saved and f not in mine}
  return sorted(f for f in fields - retired
                if f not in RESUMABLE and saved.get(f, _UNSET) != mine.get(f, _UNSET))


def describe(saved: dict, mine: dict, fields: list[str], *, shown: int = 4) -> str:
  """``'a.b=1 there but 2 now, ...'`` for the first ``shown`` fields, then the others' names."""
  pairs = (f'{f}={saved.get(f, _UNSET)!r} there but {mine.get(f, _UNSET)!r} now' for f in fields[:shown])
  text = ', '.join(pairs)
  return text + (f'; also {", ".join(fields[shown:])}' if fields[shown:] else '')


def check_resume(config, workdir: str, *, resuming: bool, announce: bool = True) -> list[str]:
  """Refuses to resume ``workdir`` with a config that changes the experiment, unless ``config.force``.

  ``resuming``: the workdir holds checkpoints (else its saved config binds nothing); ``announce``:
  print the notes on retired fields (one process of a multi-host run does). Returns the
  changed fields that ``force`` lets through (empty when nothing that matters changed).
  """
  if not resuming:
    return []
  force = bool(config.get('force', False))
  try:
    saved = read(workdir)
  except ConfigError:
    if force:
      return []
    raise
  if saved is None:
    return []
  mine = flatten(config)
  for field in sorted(f for f in RETIRED if f in saved and f not in mine and announce):
    print(f'note: the saved run sets config.{field}, which this version no longer has ({RETIRED[field]}); '
          'resuming without it.', flush=True)
  if announce and 'compute_dtype' in saved and saved['compute_dtype'] != mine.get('compute_dtype'):
    print(f"note: the saved run computes in {saved['compute_dtype']}; it resumes in "
          f"{mine.get('compute_dtype')} (config.compute_dtype; params and optimizer state stay float32).",
          flush=True)
  legacy = not (workdir_lib.path(workdir) / FILENAME).exists()
  fields = changed_fields(saved, mine, legacy=legacy)
  if fields and not force:
    raise ConfigError(f'Workdir {workdir} belongs to another run ({describe(saved, mine, fields)}): use a '
                      'new --workdir, set these fields back, or --config.force=True to resume it anyway.')
  return fields
