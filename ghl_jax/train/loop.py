"""``train_and_evaluate(config, workdir)``: the one training loop of ghl_jax.

One code path from a laptop to a pod: a ``Mesh`` over all devices with the batch sharded and
the state replicated; the method's phases (:mod:`ghl_jax.train.methods`), each a jitted, donated step; eval with
top-1/top-5; orbax checkpoints that always resume from the workdir (the data position is the
step: batches are a pure function of (seed, step)); metrics to JSONL and TensorBoard; a progress
line with images/s and ETA; fail-fast on NaN/Inf naming the step and the first bad layer.

Same computations in the same order on every process, few in flight (multi-host runs cannot
deadlock on them): every computation over global arrays (train and eval steps, the SIGTERM vote,
orbax's barriers inside ``ckpt.save``) is dispatched by the main thread, in program order, and every
branch that decides which one comes next reads only the config, the step and global values (the
vote's result, the replicated metrics), so all processes issue the same sequence; no other thread
dispatches one (orbax's background save thread writes files and meets the other processes at the
distributed runtime's barriers). And at most a handful are in flight per device: each step waits
for the one before it (the NaN check fetches its ``finite`` flag), each vote for the vote before,
an evaluation keeps two batches in flight (:func:`ghl_jax.train.evaluation.evaluate`). XLA:CPU
launches queued executions from a thread pool into a bounded number of slots per device; a long
queue (an evaluation that dispatched an eval step and four device-side adds per batch, all at
once) could fill one device's slots with executions waiting for a collective whose own execution on
that device never got a slot, and both processes waited forever (issue 24).

A stuck run ends itself (:mod:`ghl_jax.train.watchdog`): with ``config.watchdog.enabled`` each phase
(start-up, restore, step, eval, save) has a timeout, after which one line names the phase, the step
and the process and the process exits with code 75 (launch/ restarts it; it resumes from the last
complete checkpoint). SIGTERM always ends the process: all processes save the same step and stop,
or, when the main thread cannot react within ``config.watchdog.sigterm_grace_s``, one line says that
no checkpoint was written for the current interval (exit 76). A collective that fails because a peer
process is gone ends the process with one line (exit 75).
"""
from __future__ import annotations

import os
import signal
import threading

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from ghl_jax import accel
from ghl_jax import models
from ghl_jax.train import data as data_lib
from ghl_jax.train import evaluation
from ghl_jax.train import methods
from ghl_jax.train import steps as steps_lib
from ghl_jax.train import validate
from ghl_jax.train import run_config
from ghl_jax.train import watchdog as watchdog_lib
from ghl_jax.train import workdir as workdir_lib
from ghl_jax.train.checkpoint import Checkpointer, saved_steps
from ghl_jax.train import summary as summary_lib
from ghl_jax.train.metrics import MetricWriter, Progress, StepProfiler, last_eval, profile_window


class NumericalError(FloatingPointError):
  """A NaN or Inf in the loss, gradients or Hebbian terms."""


def make_mesh() -> jax.sharding.Mesh:
  """A 1-D data-parallel mesh over every device of every process (GSPMD, ``AxisType.Auto``)."""
  return jax.make_mesh((jax.device_count(),), ('data',), axis_types=(jax.sharding.AxisType.Auto,))


def enable_compilation_cache(path: str | None) -> None:
  """Persistent XLA cache: restarts after preemption skip recompilation."""
  if path and path != 'None':
    jax.config.update('jax_compilation_cache_dir', os.path.expanduser(path))
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)


def build_model(config, num_classes: int):
  kwargs = dict(config.model.kwargs)
  kwargs.setdefault('num_classes', num_classes)
  dtype = accel.compute_dtype(config.compute_dtype)
  if config.compute_dtype == 'auto':
    print(f'compute_dtype auto: {dtype} ({jax.default_backend()}'
          f'{", bf16 instructions" if accel.cpu_has_bf16() else ""})', flush=True)
  kwargs['dtype'] = jnp.dtype(dtype)
  try:
    return models.build(config.model.name, **kwargs)
  except (TypeError, ValueError) as error:
    raise validate.ConfigError(f'config.model.kwargs does not fit {config.model.name}: {error}') from None


def check_batch(batch: dict, image_shape) -> None:
  """The first batch has the images the model was built for: shape, float dtype, finite."""
  images = np.asarray(batch['image'])
  if images.ndim != 4 or tuple(images.shape[1:]) != tuple(image_shape):
    raise validate.ConfigError(f'Input images have shape {images.shape[1:]} but the dataset info says '
                               f'{tuple(image_shape)}: check config.data (image_size, name).')
  if not np.issubdtype(images.dtype, np.floating):
    raise validate.ConfigError(f'Input images are {images.dtype}, expected floats: set config.data.normalize.')
  if not np.all(np.isfinite(images)):
    raise validate.ConfigError('Input images contain NaN or Inf: check the dataset and config.data.normalize.')


def _first_fault(faults: dict) -> str | None:
  """The first non-finite quantity: the loss, else a gradient, else a Hebbian term (by layer path)."""
  rank = {'loss': 0, 'grad': 1, 'hebb': 2}
  bad = [key for key, ok in faults.items() if not bool(ok)]
  return min(bad, key=lambda k: (rank.get(k.split('/')[0], 3), k), default=None)


class _Preemption:
  """Turns SIGTERM into a request to checkpoint and stop, agreed by every process.

  One process may see SIGTERM while the others do not (or see it a step later), so :meth:`agreed`
  reduces the local flags over all devices (a max) at every step boundary and answers with the
  reduction of the boundary before: it runs behind the step in flight, and every process reads the
  same value at the same step, so all of them save that step and stop. The Python handler runs only
  when the main thread runs Python; :class:`~ghl_jax.train.watchdog.SigtermGuard` ends the process
  when it cannot within ``grace`` seconds (the main thread waits in a collective whose peer is stuck).
  """

  def __init__(self, mesh, *, grace: float = 0.0, describe=lambda: ''):
    self.requested = False
    self._sharding = NamedSharding(mesh, P('data'))
    self._any = jax.jit(jnp.max, out_shardings=NamedSharding(mesh, P()))
    self._vote = None
    self._guard = None
    if threading.current_thread() is threading.main_thread():
      self._old = signal.signal(signal.SIGTERM, self._handle)
      self._guard = watchdog_lib.SigtermGuard(grace, process_index=jax.process_index(), describe=describe)
    else:
      self._old = None

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def agreed(self) -> bool:
    """True on every process at the same step boundary once any process has seen SIGTERM."""
    previous = self._vote
    local = np.full((jax.local_device_count(),), self.requested, np.int32)
    self._vote = self._any(jax.make_array_from_process_local_data(self._sharding, local))
    return previous is not None and bool(jax.device_get(previous))

  def restore(self):
    if self._guard is not None:
      self._guard.finished()
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *, tune_host: bool = True) -> dict:
  """Trains ``config`` in ``workdir`` (resuming whatever is there) and returns the final metrics
  (a finished workdir: its last stored evaluation).

  ``tune_host``: on CPU, set this process's allocator to keep freed memory for the next step
  (:func:`ghl_jax.accel.prepare_host`, until the process exits); False leaves it alone (notebooks).
  """
  dog = watchdog_lib.Watchdog(watchdog_lib.limits(config), process_index=jax.process_index())
  try:
    return _train(config, workdir, tune_host, dog)
  except jax.errors.JaxRuntimeError as error:
    _peer_lost(error, dog)
    raise
  finally:
    dog.stop()


def _peer_lost(error: Exception, dog: watchdog_lib.Watchdog) -> None:
  """In a multi-process run a failed computation means a peer is gone: one line, exit 75 (no clean-up,
  which would wait for the peer)."""
  if jax.process_count() == 1:
    return
  phase, step, _ = dog.state
  reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:160]
  watchdog_lib.abort(f'process {jax.process_index()}: a computation over all processes failed in {phase} at '
                     f'step {step} ({reason}); a peer process is gone or unreachable; exiting with code '
                     f'{watchdog_lib.EXIT_STUCK} to be restarted from the last complete checkpoint.',
                     watchdog_lib.EXIT_STUCK)


def _train(config, workdir: str, tune_host: bool, dog: watchdog_lib.Watchdog) -> dict:
  validate.validate(config, device_count=jax.device_count(), process_count=jax.process_count())
  workdir_lib.check(workdir)
  try:
    data_lib.ensure_available(config.data)
  except data_lib.DatasetMissingError:
    raise
  except ValueError as error:              # bad data options (augment, normalize, ...)
    raise validate.ConfigError(str(error)) from None
  enable_compilation_cache(config.get('compilation_cache_dir'))
  conv_impl = config.get('conv_impl', 'auto')
  try:
    accel.resolve(conv_impl)
    if tune_host:
      accel.prepare_host(conv_impl)         # XLA:CPU reuses step buffers instead of re-faulting them
  except ValueError as error:
    raise validate.ConfigError(f'config.{error}') from None

  info = data_lib.info(config.data)
  total, per_epoch, first = methods.budget(config, info.num_train)
  profile_window(config.get('profile_steps'), total)       # every process validates it
  model = build_model(config, info.num_classes)
  mesh = make_mesh()
  replicated, batch_sharding = NamedSharding(mesh, P()), NamedSharding(mesh, P('data'))
  sample = jnp.zeros((1,) + tuple(info.image_shape), jnp.float32)
  tx, phases, selection = methods.phases(config, model, sample, total, first)
  forced = run_config.check_resume(config, workdir, resuming=bool(saved_steps(workdir)),
                                   announce=jax.process_index() == 0)

  def init_state(rng):
    init_rng, train_rng = jax.random.split(rng)
    variables = model.init(init_rng, sample, train=False)
    params = variables['params']
    return {'step': jnp.zeros((), jnp.int32), 'params': params,
            'batch_stats': variables.get('batch_stats', {}), 'opt_state': tx.init(params),
            'rng': train_rng}

  state = jax.jit(init_state, out_shardings=replicated)(jax.random.key(config.seed))
  dog.enter('restore', max(saved_steps(workdir), default=0))
  ckpt = Checkpointer(workdir, keep=config.keep_checkpoints, metadata={'config': run_config.flatten(config)})
  restored = ckpt.restore_latest(state, changed=forced)
  if jax.process_index() == 0:
    run_config.save(config, workdir)
  if restored is not None:
    state = restored
  start = int(jax.device_get(state['step']))
  dog.enter('startup', start)
  if jax.process_index() == 0 and start >= total > 0:
    print(f'The workdir is at step {start}, at or past this run\'s {total} steps: nothing to train '
          '(raise config.num_train_steps or num_epochs to train on).', flush=True)
  elif jax.process_index() == 0:
    print(f"{'Resuming' if start else 'Starting'} from step {start} of {total} ({per_epoch} steps/epoch, "
          f'{jax.device_count()} devices).', flush=True)

  eval_step = jax.jit(steps_lib.make_eval_step(model, conv_impl), out_shardings=replicated)
  is_main = jax.process_index() == 0
  writer = MetricWriter(workdir, enabled=is_main)
  profiler = StepProfiler(config.get('profile_steps'), total, os.path.join(writer.logdir, 'profile'),
                          enabled=is_main, shown_as=f'{workdir}/profile')
  writer.rewind(start)
  writer.write_config(config)
  model_summary = summary_lib.summarize(model, sample, selection)
  if is_main:
    print(model_summary.table(), flush=True)
  eval_every = config.eval_every_steps if config.eval_every_steps > 0 else per_epoch
  grace = float(config.get('watchdog', {}).get('sigterm_grace_s', 0) or 0)
  describe = lambda: 'in {} at step {}'.format(*dog.state[:2])
  preemption = _Preemption(mesh, grace=grace, describe=describe)
  final = {}
  done = start
  try:
    for number, phase in enumerate(phases, 1):
      if start >= phase.stop:
        continue
      first = max(start, phase.start)
      step_fn = jax.jit(phase.step_fn, donate_argnums=(0,), out_shardings=(replicated, replicated))
      batches = data_lib.train_batches(config.data, batch_size=phase.batch_size, seed=config.seed,
                                       start_step=first - phase.start, process_index=jax.process_index(),
                                       process_count=jax.process_count())
      evaluate = (evaluation.ProbeEvaluation(model, phase.probe, eval_step, config, mesh, conv_impl=conv_impl)
                  if phase.probe else lambda state: evaluation.evaluate(eval_step, state, config, mesh))
      progress = Progress(total, phase.batch_size, first)
      tag = {'phase': number} if len(phases) > 1 else {}
      pending = None                                 # (step, metrics) of the step in flight
      for step in range(first, phase.stop):
        local = next(batches)
        if step == start:
          check_batch(local, info.image_shape)
        dog.enter('startup' if step == first else 'step', step + 1)
        profiler.before(step + 1)
        state, metrics = step_fn(state, jax.make_array_from_process_local_data(batch_sharding, local))
        profiler.after(step + 1, metrics)
        if pending is not None:
          _report(pending, writer, progress, config, tag)
        pending = (step + 1, metrics)
        done = step + 1
        evaluate_now = phase.evaluates and ((done - phase.start) % eval_every == 0 or done == phase.stop)
        stop = preemption.agreed()
        save_now = done % config.checkpoint_every_steps == 0 or done == total or stop
        if evaluate_now or save_now:
          _report(pending, writer, progress, config, tag)
          pending = None
        if evaluate_now:
          dog.enter('eval', done)
          final = evaluate(state)
          writer.write(done, final)
          writer.write_fields(done, model_summary.first_kernel(state['params']))
          if is_main:
            print(f'eval at step {done}: ' + ' | '.join(f'{k} {v:.4f}' for k, v in final.items()), flush=True)
        if save_now:
          dog.enter('save', done)
          ckpt.save(done, state, force=True)
          writer.sync()
        if stop:
          message = f'SIGTERM: process {jax.process_index()} saved step {done} with every process and stops.'
          logging.warning(message)
          print(message, flush=True)
          return final
      if pending is not None:
        _report(pending, writer, progress, config, tag)
  except jax.errors.JaxRuntimeError as error:
    _peer_lost(error, dog)                   # before the clean-up below, which would wait for the peer
    raise
  finally:
    profiler.stop()
    dog.enter('save', done)                  # the last save's background write ends here
    try:
      ckpt.close()
    finally:
      writer.close()                         # a bucket workdir's last log copy, even after a failed save
      preemption.restore()
  return final or last_eval(workdir)


def _report(pending, writer, progress, config, tag: dict) -> None:
  """Checks the finished step for NaN/Inf (one scalar; the per-leaf flags only on a fault), then
  logs it at ``log_every_steps``."""
  step, metrics = pending
  if not bool(jax.device_get(metrics['finite'])):
    fault = _first_fault(jax.device_get(metrics['faults'])) or 'an unknown quantity'
    raise NumericalError(f'Non-finite value at step {step} in {fault}: stopping; the last good '
                         'checkpoint is kept (lower the learning rate or check the inputs).')
  if step % config.log_every_steps == 0:
    scalars = jax.device_get({k: v for k, v in metrics.items() if k not in ('finite', 'faults', 'stats')})
    scalars = {**tag, **scalars, **jax.device_get(metrics['stats'])}
    writer.write(step, scalars)
    progress.log(step, {k: scalars[k] for k in ('phase', 'loss', 'accuracy') if k in scalars})
