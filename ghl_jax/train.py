"""``train_and_evaluate(config, workdir)``: the one training loop of ghl_jax.

One code path from a laptop to a pod: a ``Mesh`` over all devices with the batch sharded and
the state replicated; one jitted, donated train step (:mod:`ghl_jax.steps`); eval with
top-1/top-5; orbax checkpoints that always resume from the workdir (the data position is the
step: batches are a pure function of (seed, step)); metrics to JSONL and TensorBoard; a progress
line with images/s and ETA; fail-fast on NaN/Inf naming the step and the first bad layer.
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
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from ghl_jax import data as data_lib
from ghl_jax import fast_conv
from ghl_jax import hebbian as hebbian_lib
from ghl_jax import host_memory
from ghl_jax import models
from ghl_jax import optim
from ghl_jax import steps as steps_lib
from ghl_jax import transform
from ghl_jax import validate
from ghl_jax.checkpoint import Checkpointer, check_workdir_identity
from ghl_jax.metrics import MetricWriter, Progress
from ghl_jax.tap import tap


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


def total_steps(config, num_train_examples: int) -> tuple[int, int]:
  """``(num_train_steps, steps_per_epoch)`` from the config and the dataset size."""
  per_epoch = config.steps_per_epoch if config.steps_per_epoch > 0 else num_train_examples // config.batch_size
  if per_epoch <= 0:
    raise validate.ConfigError(f'config.batch_size={config.batch_size} exceeds the {num_train_examples} '
                               'training examples; lower it.')
  first = hebbian_steps(config, num_train_examples)
  steps = config.num_train_steps if config.num_train_steps > 0 else first + int(config.num_epochs * per_epoch)
  if config.method == 'hebbian' and steps <= first:
    raise validate.ConfigError(f'{steps} steps in all leave none for the probe after the {first} Hebbian '
                               'steps: raise config.num_train_steps or lower config.hebbian.num_steps/epochs.')
  return steps, per_epoch


def hebbian_steps(config, num_train_examples: int) -> int:
  """Steps of the unsupervised phase of method 'hebbian' (0 for the other methods):
  ``config.hebbian.num_steps`` if >= 0, else ``epochs`` passes at ``config.hebbian.batch_size``."""
  if config.method != 'hebbian':
    return 0
  h = config.hebbian
  if h.num_steps >= 0:
    return int(h.num_steps)
  examples = config.steps_per_epoch * config.batch_size if config.steps_per_epoch > 0 else num_train_examples
  return int(h.epochs * (examples // h.batch_size))


def build_model(config, num_classes: int):
  kwargs = dict(config.model.kwargs)
  kwargs.setdefault('num_classes', num_classes)
  kwargs['dtype'] = jnp.dtype(config.compute_dtype)
  try:
    return models.build(config.model.name, **kwargs)
  except TypeError as error:
    raise validate.ConfigError(f'config.model.kwargs does not fit {config.model.name}: {error}') from None


def _plain(value):
  """A float, or a per-layer ConfigDict as a plain dict."""
  return dict(value) if hasattr(value, 'items') else value


def ghl_kwargs(config, kernels, section: str = 'ghl') -> dict:
  """Arguments of :func:`ghl_jax.hebbian_terms` for this run (rule settings of ``config.ghl``,
  or of ``config.hebbian`` with ``section='hebbian'``)."""
  rule = config[section]
  return {'rule': rule.rule, 't_inv': _plain(rule.t_inv), 'layers': tuple(kernels),
          'rule_kwargs': dict(rule.rule_kwargs)}


def ghl_kernels(model, sample, layers) -> tuple[str, ...]:
  """Kernel paths GHL governs, found by tracing the model once (no compute)."""
  def traced():
    variables = model.init(jax.random.key(0), sample, train=False)
    return tap(model.apply)(variables, sample, train=False)[1]
  try:
    return tuple(transform.selected_layers(jax.eval_shape(traced), layers))
  except ValueError as error:
    raise validate.ConfigError(f'config.ghl.layers: {error}') from None


def base_optimizer(o, total: int):
  """The backprop optimizer ``config.optimizer`` names (momentum SGD or Adam) over ``total`` steps."""
  if o.name == 'momentum_sgd':
    return optim.momentum_sgd(lr=o.lr, total_steps=total, momentum=o.momentum,
                              weight_decay=o.weight_decay, nesterov=o.nesterov, warmup_steps=o.warmup_steps)
  return optim.adam(lr=o.lr, total_steps=total, weight_decay=o.weight_decay)


def make_hebbian_optimizer(config, total: int, kernels, first: int):
  """``(tx, lr_fns)`` of method 'hebbian': Hebbian ascent on ``kernels`` for the first ``first``
  steps, then ``config.optimizer`` on the params matching ``config.hebbian.trainable`` (the
  probe; the rest frozen) for the remaining ``total - first`` steps."""
  h, o = config.hebbian, config.optimizer
  probe_steps = total - first
  if h.probe_schedule == 'halving':
    probe = hebbian_lib.halving_adam(lr=o.lr, total_steps=probe_steps, weight_decay=o.weight_decay)
    schedule = hebbian_lib.halving_schedule(o.lr, probe_steps)
  else:
    probe, schedule = base_optimizer(o, probe_steps), optim.cosine(o.lr, probe_steps)
  ascent = hebbian_lib.hebbian_ascent(
      _plain(h.lr), layers=tuple(kernels), rule=h.rule, t_inv=_plain(h.t_inv),
      rule_kwargs=dict(h.rule_kwargs), norm_power=h.norm_power)
  tx = hebbian_lib.two_phase(ascent, hebbian_lib.probe_only(probe, h.trainable))
  return tx, {'probe': lambda step: schedule(step - first)}


def make_optimizer(config, total: int, kernels, first: int = 0):
  """``(tx, lr_fns)``: the configured optimizer (with GHL on ``kernels`` when method='ghl'; the
  two phases of :func:`make_hebbian_optimizer` when method='hebbian')."""
  if config.method == 'hebbian':
    return make_hebbian_optimizer(config, total, kernels, first)
  o = config.optimizer
  use_ghl = config.method == 'ghl'
  ghl_args = dict(t_inv=ghl_kwargs(config, kernels)['t_inv'], rule=config.ghl.rule,
                  rule_kwargs=dict(config.ghl.rule_kwargs), direction=config.ghl.direction,
                  magnitude=config.ghl.magnitude)
  if o.name == 'paper_sgd':
    tx = optim.paper_sgd(lr=o.lr, lr_conv=o.lr_conv, wd_conv=o.wd_conv, total_steps=total,
                         kernels=kernels, use_ghl=use_ghl, **ghl_args)
    return tx, {'ghl': optim.cosine(o.lr_conv, total), 'other': optim.cosine(o.lr, total)}
  base = base_optimizer(o, total)
  tx = optax.chain(transform.ghl(layers=kernels, **ghl_args), base) if use_ghl else base
  return tx, {'all': optim.cosine(o.lr, total)}


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


def _first_fault(metrics: dict) -> str | None:
  """The first non-finite quantity: the loss, else a gradient, else a Hebbian term (by layer path)."""
  rank = {'loss': 0, 'grad': 1, 'hebb': 2}
  bad = [key[len('finite/'):] for key, ok in metrics.items() if key.startswith('finite/') and not bool(ok)]
  return min(bad, key=lambda k: (rank.get(k.split('/')[0], 3), k), default=None)


class _Preemption:
  """Turns SIGTERM into a request to checkpoint and stop at the next step boundary."""

  def __init__(self):
    self.requested = False
    if threading.current_thread() is threading.main_thread():
      self._old = signal.signal(signal.SIGTERM, self._handle)
    else:
      self._old = None

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def restore(self):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


def evaluate(eval_step, state, config, mesh) -> dict:
  """Top-1/top-5 accuracy and loss over the whole eval split (every example once)."""
  sharding = NamedSharding(mesh, P('data'))
  totals = None
  for batch in data_lib.eval_batches(config.data, batch_size=config.eval_batch_size,
                                     process_index=jax.process_index(),
                                     process_count=jax.process_count()):
    batch = jax.make_array_from_process_local_data(sharding, batch)
    sums = eval_step(state, batch)
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  totals = jax.device_get(totals)
  count = max(float(totals['count']), 1.0)
  return {'eval/loss': float(totals['loss']) / count, 'eval/top1': float(totals['top1']) / count,
          'eval/top5': float(totals['top5']) / count}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains ``config`` in ``workdir`` (resuming whatever is there) and returns the final metrics."""
  validate.validate(config, device_count=jax.device_count(), process_count=jax.process_count())
  validate.check_workdir(workdir)
  try:
    data_lib.ensure_available(config.data)
  except data_lib.DatasetMissingError:
    raise
  except ValueError as error:              # bad data options (augment, normalize, ...)
    raise validate.ConfigError(str(error)) from None
  check_workdir_identity(config, workdir, write=jax.process_index() == 0)
  enable_compilation_cache(config.get('compilation_cache_dir'))
  conv_impl = config.get('conv_impl', 'auto')
  try:
    fast_conv.resolve(conv_impl)
  except ValueError as error:
    raise validate.ConfigError(f'config.{error}') from None
  if jax.default_backend() == 'cpu':
    host_memory.keep_freed_memory()        # XLA:CPU reuses step buffers instead of re-faulting them

  info = data_lib.info(config.data)
  total, per_epoch = total_steps(config, info.num_train)
  model = build_model(config, info.num_classes)
  mesh = make_mesh()
  replicated, batch_sharding = NamedSharding(mesh, P()), NamedSharding(mesh, P('data'))
  sample = jnp.zeros((1,) + tuple(info.image_shape), jnp.float32)

  rule_section = 'hebbian' if config.method == 'hebbian' else 'ghl'
  kernels = ghl_kernels(model, sample, config[rule_section].layers)   # bp: paper_sgd's conv group
  first = hebbian_steps(config, info.num_train)     # unsupervised steps before the probe
  tx, lr_fns = make_optimizer(config, total, kernels, first)

  def init_state(rng):
    init_rng, train_rng = jax.random.split(rng)
    variables = model.init(init_rng, sample, train=False)
    params = variables['params']
    return {'step': jnp.zeros((), jnp.int32), 'params': params,
            'batch_stats': variables.get('batch_stats', {}), 'opt_state': tx.init(params),
            'rng': train_rng}

  state = jax.jit(init_state, out_shardings=replicated)(jax.random.key(config.seed))
  ckpt = Checkpointer(workdir, keep=config.keep_checkpoints)
  restored = ckpt.restore_latest(state)
  if restored is not None:
    state = restored
  start = int(jax.device_get(state['step']))
  logging.info('%s from step %d of %d (%d steps/epoch, %d devices).',
               'Resuming' if start else 'Starting', start, total, per_epoch, jax.device_count())

  method = config.method
  train_step = jax.jit(
      steps_lib.make_train_step(model, tx, ghl_kwargs=ghl_kwargs(config, kernels) if method == 'ghl' else None,
                                accum_steps=config.grad_accum_steps, lr_fns=lr_fns, conv_impl=conv_impl,
                                trainable=config.hebbian.trainable if method == 'hebbian' else None),
      donate_argnums=(0,), out_shardings=(replicated, replicated))
  hebbian_step = jax.jit(
      steps_lib.make_hebbian_step(model, tx, hebbian_kwargs=ghl_kwargs(config, kernels, 'hebbian')),
      donate_argnums=(0,), out_shardings=(replicated, replicated)) if first else None
  eval_step = jax.jit(steps_lib.make_eval_step(model), out_shardings=replicated)

  is_main = jax.process_index() == 0
  writer = MetricWriter(workdir, enabled=is_main)
  writer.rewind(start)
  eval_every = config.eval_every_steps if config.eval_every_steps > 0 else per_epoch

  def phase_batch_size(step):
    return config.hebbian.batch_size if step < first else config.batch_size

  def batches_from(step):
    """The batch stream from global ``step``; the probe's stream starts at step ``first``."""
    return data_lib.train_batches(config.data, batch_size=phase_batch_size(step), seed=config.seed,
                                  start_step=step if step < first else step - first,
                                  process_index=jax.process_index(), process_count=jax.process_count())

  progress = Progress(total, phase_batch_size(start), start)
  batches = batches_from(start)
  preemption = _Preemption()
  final = {}
  pending = None                                   # (step, metrics) of the step in flight
  try:
    for step in range(start, total):
      if step == first and step != start:        # Hebbian phase over: the probe begins
        batches, progress = batches_from(step), Progress(total, config.batch_size, step)
      local = next(batches)
      if step == start:
        check_batch(local, info.image_shape)
      batch = jax.make_array_from_process_local_data(batch_sharding, local)
      state, metrics = (hebbian_step if step < first else train_step)(state, batch)
      if config.method == 'hebbian':
        metrics = dict(metrics, phase=1 if step < first else 2)
      if pending is not None:
        _report(pending, writer, progress, config)
      pending = (step + 1, metrics)
      done = step + 1
      if (done > first and (done - first) % eval_every == 0) or done == total:
        _report(pending, writer, progress, config)
        pending = None
        final = evaluate(eval_step, state, config, mesh)
        writer.write(done, final)
        if is_main:
          print(f'eval at step {done}: ' + ' | '.join(f'{k} {v:.4f}' for k, v in final.items()), flush=True)
      if done % config.checkpoint_every_steps == 0 or done == total or preemption.requested:
        if pending is not None:
          _report(pending, writer, progress, config)
          pending = None
        ckpt.save(done, state, force=True)
      if preemption.requested:
        logging.warning('SIGTERM: checkpointed step %d, stopping.', done)
        break
    if pending is not None:
      _report(pending, writer, progress, config)
  finally:
    ckpt.close()
    writer.close()
    preemption.restore()
  return final


def _report(pending, writer, progress, config) -> None:
  """Checks the finished step for NaN/Inf, then logs it (at ``log_every_steps``)."""
  step, metrics = pending
  metrics = jax.device_get(metrics)
  fault = _first_fault(metrics)
  if fault is not None:
    raise NumericalError(f'Non-finite value at step {step} in {fault}: stopping; the last good '
                         'checkpoint is kept (lower the learning rate or check the inputs).')
  if step % config.log_every_steps == 0:
    scalars = {k: v for k, v in metrics.items() if not k.startswith('finite/')}
    writer.write(step, scalars)
    progress.log(step, {k: scalars[k] for k in ('phase', 'loss', 'accuracy') if k in scalars})
