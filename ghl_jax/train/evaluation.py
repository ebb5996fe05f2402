"""Evaluation over the whole eval split, and the linear probe's evaluation on features computed once.

:func:`evaluate` runs an eval step over every example of the eval split once (sharded over the
mesh's ``'data'`` axis) and returns top-1, top-5 and the mean loss.

While a linear probe trains (method 'hebbian', its second phase), the network before it is frozen,
its BatchNorms on their running averages (:func:`ghl_jax.hebbian.frozen_features`), so the eval
split's features ``z = f_frozen(x)`` do not change. :class:`ProbeEvaluation` computes them at the
phase's first evaluation, checks that the probe on them gives the full network's logits, and from
then on evaluates the probe alone (:func:`ghl_jax.hebbian.probe_split`): an evaluation costs the
classifier, not a forward pass of the network. Features that would take more than
``max_bytes`` per process are not kept, nor features the probe on which does not give the network's
logits: then (a log line says so) every evaluation runs in full.
"""
from __future__ import annotations

import collections
from typing import Callable, Iterable, Optional

from absl import logging
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from ghl_jax import accel
from ghl_jax import hebbian as hebbian_lib
from ghl_jax.train import data as data_lib
from ghl_jax.train import steps as steps_lib

MAX_BYTES = 4 << 30          # cached eval features per process
IN_FLIGHT = 2                # eval computations dispatched ahead of the host (see evaluate)
CHECK_RTOL = 1e-4            # probe-on-features vs full-network logits, relative to max |logit|


def eval_batches(config, mesh) -> Iterable[dict]:
  """The eval split once, as global arrays sharded over the mesh's ``'data'`` axis."""
  sharding = NamedSharding(mesh, P('data'))
  for batch in data_lib.eval_batches(config.data, batch_size=config.eval_batch_size,
                                     process_index=jax.process_index(),
                                     process_count=jax.process_count()):
    yield jax.make_array_from_process_local_data(sharding, batch)


def evaluate(eval_step, state, config, mesh, batches: Optional[Iterable[dict]] = None) -> dict:
  """Top-1/top-5 accuracy and loss over the whole eval split (every example once), or over
  ``batches`` already made from it.

  One computation per batch, at most :data:`IN_FLIGHT` of them ahead of the host: each batch's sums
  are fetched (and added up on the host) before the batch after next is dispatched. XLA:CPU holds a
  bounded number of executions in flight per device and launches them from a thread pool, so
  dozens queued at once (an eval step and a device-side add per batch) can fill one device's slots
  with executions that wait for a collective another of its executions never gets a slot to join:
  a multi-process run then waits forever."""
  totals = collections.Counter()
  pending = collections.deque()

  def add(sums):
    for key, value in jax.device_get(sums).items():
      totals[key] += float(value)

  for batch in eval_batches(config, mesh) if batches is None else batches:
    pending.append(eval_step(state, batch))
    if len(pending) >= IN_FLIGHT:
      add(pending.popleft())
  while pending:
    add(pending.popleft())
  count = max(totals['count'], 1.0)
  return {'eval/loss': totals['loss'] / count, 'eval/top1': totals['top1'] / count,
          'eval/top5': totals['top5'] / count}


class ProbeEvaluation:
  """``evaluation(state) -> metrics`` of a probe phase, as :func:`evaluate` with the full eval step,
  on the eval split's features computed at the first call (``trainable``: the probe's regex).

  Where the features cannot stand in for the network (the probe on them does not give its logits,
  the split cannot be made, or they exceed ``max_bytes``), every call evaluates the full network,
  and a log line says why."""

  def __init__(self, model, trainable: str, eval_step: Callable, config, mesh, *,
               conv_impl: str = 'auto', max_bytes: int = MAX_BYTES):
    self._eval_step, self._config, self._mesh, self._max_bytes = eval_step, config, mesh, max_bytes
    apply = accel.wrap(model.apply, conv_impl)
    features, head = hebbian_lib.probe_split(apply, trainable)
    replicated = NamedSharding(mesh, P())

    variables = lambda state: steps_lib.model_variables(state['params'], state['batch_stats'])

    def batch_features(state, batch):
      return features(variables(state), batch['image'], train=False)

    def head_logits(state, z, image_shape):
      unused = jnp.zeros(z.shape[:1] + image_shape, jnp.float32)     # the frozen layers' input: dead code
      return head(z, variables(state), unused, train=False)

    def features_and_check(state, batch):
      z = batch_features(state, batch)
      full = apply(variables(state), batch['image'], train=False)
      probe = head_logits(state, z, batch['image'].shape[1:])
      return z, jnp.max(jnp.abs(probe - full)) / (jnp.max(jnp.abs(full)) + 1e-30)

    self._features = jax.jit(batch_features)
    self._check = jax.jit(features_and_check, out_shardings=(None, replicated))
    self._head = jax.jit(
        lambda state, batch, image_shape: steps_lib.eval_sums(
            head_logits(state, batch['features'], image_shape), batch),
        static_argnums=2, out_shardings=replicated)
    self._cache: Optional[list] = None
    self._image_shape: Optional[tuple] = None
    self._in_full = False

  def __call__(self, state) -> dict:
    if self._cache is None and not self._in_full:
      try:
        self._cache = self._build(state)
      except (ValueError, TypeError) as error:    # TypeError: also a tracer leaked from a scan body
        self._cache = self._give_up(f'the probe cannot be split off ({error})')
    if self._in_full:
      return evaluate(self._eval_step, state, self._config, self._mesh)
    head = lambda state, batch: self._head(state, batch, self._image_shape)
    return evaluate(head, state, self._config, self._mesh, batches=self._cache)

  def _build(self, state) -> Optional[list]:
    """The eval split's features under ``state``, or None (then evaluations run in full)."""
    cache, size = [], 0
    for batch in eval_batches(self._config, self._mesh):
      if not cache:
        self._image_shape = tuple(batch['image'].shape[1:])
        z, error = self._check(state, batch)
        if float(error) > CHECK_RTOL:
          return self._give_up(f"the probe on the features does not give the network's logits "
                               f'(relative error {float(error):.1e})')
      else:
        z = self._features(state, batch)
        if cache:
          jax.block_until_ready(cache[-1]['features'])   # at most two feature passes in flight (evaluate)
      size += sum(s.data.nbytes for s in z.addressable_shards)
      if size > self._max_bytes:
        return self._give_up(f'its features would take more than {self._max_bytes / 2**30:.1f} GiB')
      cache.append({'features': z, 'label': batch['label'], 'mask': batch['mask']})
    return cache

  def _give_up(self, why: str) -> None:
    logging.warning('Probe evaluation runs the full network each time: %s.', why)
    self._in_full = True
    return None
