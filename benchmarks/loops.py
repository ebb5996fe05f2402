"""Training loops a user writes with the public API alone, as steps the benchmarks can time.

* :func:`user_step` — the README's "Use it in your own code" loop: ``ghl_jax.value_and_grad``
  with a :class:`ghl_jax.Rule` (or ``None`` for backprop on the same kernels), then ``tx.update``;
* :func:`taps_step` — the v1 loop: ``ghl_jax.tap(model.apply)`` under ``jax.value_and_grad``
  (XLA's own convolutions), then ``tx.update(..., taps=taps)``.

Both take and return the trainer's state dict ``{step, params, batch_stats, opt_state, rng}`` so
that one harness times them beside :func:`ghl_jax.train.steps.make_train_step`; the state dict is
only the container, every computation is the user's.
"""
from __future__ import annotations

from typing import Optional

import jax
import optax

import ghl_jax


def _loss(apply, tapped: bool):
  def loss_fn(params, batch_stats, images, labels, rng):
    variables = {'params': params, **({'batch_stats': batch_stats} if batch_stats else {})}
    out = apply(variables, images, train=True, mutable=['batch_stats'], rngs={'dropout': rng})
    (logits, state), aux = out if tapped else (out, None)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, (state, aux)
  return loss_fn


def _advance(state, params, batch_stats, opt_state, loss):
  new = dict(state, step=state['step'] + 1, params=params, opt_state=opt_state,
             batch_stats=batch_stats.get('batch_stats', {}))
  return new, {'loss': loss}


def user_step(model, tx: optax.GradientTransformation, rule: Optional[ghl_jax.Rule]):
  """``step(state, batch)``: the README's loop on the public fused path."""
  grad_fn = ghl_jax.value_and_grad(_loss(model.apply, False), rule, has_aux=True)

  def step(state, batch):
    params = state['params']
    rng = jax.random.fold_in(state['rng'], state['step'])
    (loss, (new_stats, _)), grads, hebb = grad_fn(params, state['batch_stats'], batch['image'],
                                                  batch['label'], rng)
    updates, opt_state = tx.update(grads, state['opt_state'], params, hebb=hebb)
    return _advance(state, optax.apply_updates(params, updates), new_stats, opt_state, loss)
  return step


def taps_step(model, tx: optax.GradientTransformation, ghl: bool = True):
  """``step(state, batch)``: the v1 loop, Hebbian terms from taps after the gradient."""
  loss_fn = _loss(ghl_jax.tap(model.apply) if ghl else model.apply, ghl)

  def step(state, batch):
    params = state['params']
    rng = jax.random.fold_in(state['rng'], state['step'])
    (loss, (new_stats, taps)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, state['batch_stats'], batch['image'], batch['label'], rng)
    updates, opt_state = tx.update(grads, state['opt_state'], params, **({'taps': taps} if ghl else {}))
    return _advance(state, optax.apply_updates(params, updates), new_stats, opt_state, loss)
  return step
