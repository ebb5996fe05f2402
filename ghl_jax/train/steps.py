"""The jitted steps: one readable function each.

A train step (with ``A = grad_accum_steps`` micro-batches of the global batch)::

    for each micro-batch m:   (loss_m, aux_m), G_m, H_m = value_and_grad(loss, rule)(θ, x_m)
                              (unrolled on XLA:CPU, a lax.scan elsewhere: ghl_jax.accel.unrolled_loops)
                              G += G_m / A,    H += H_m              (raw Hebbian sums)
    updates = tx.update(G, opt_state, params, hebb=H)      (ghl: sign(G) ⊙ |Ĥ| on its kernels)
    params += updates

``value_and_grad`` is :func:`ghl_jax.value_and_grad`, the public fused path. Raw Hebbian terms
add up over micro-batches (and over devices, by XLA), so ``Ĥ`` is the global-batch one whatever
the sharding or accumulation.

Every step returns what every step needs: the loss, the accuracy and one all-finite flag. The
per-layer statistics are computed only at log steps (``lax.cond``) and the per-leaf finite flags
are read only when a step is not finite, so the host fetches one scalar per step.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax

import ghl_jax
from ghl_jax import diagnostics
from ghl_jax import hebbian as hebbian_lib
from ghl_jax import transform
from ghl_jax import trees
from ghl_jax.rule import Rule
from ghl_jax.tap import tap


def cross_entropy(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def model_variables(params, batch_stats) -> dict:
  """The variables ``model.apply`` takes: params, and batch stats where the model has them."""
  return {'params': params, **({'batch_stats': batch_stats} if batch_stats else {})}


def _split(batch, parts):
  return jax.tree.map(lambda a: a.reshape((parts, a.shape[0] // parts) + a.shape[1:]), batch)


def _add(a, b):
  return jax.tree.map(jnp.add, a, b)


def _l2(tree) -> jax.Array:
  return optax.tree.norm(tree)


def hebbian_stats(hebb: dict, grads: Any, updates: Any = None) -> dict:
  """Per governed layer: max|H|, the fraction of weights where sign(−H) agrees with sign(G), and the
  gradient alignment of :mod:`ghl_jax.diagnostics` (``align/<layer>/<measure>``)."""
  stats = {}
  aligned = diagnostics.alignment(hebb, grads, updates)          # {module path: measures}, in hebb's order
  for (name, measures), term in zip(aligned.items(), hebb.values()):
    stats[f'hebb/{name}/max_abs'] = jnp.max(jnp.abs(term.term))
    stats[f'hebb/{name}/sign_agreement'] = measures.pop('sign_agreement')
    stats.update({f'align/{name}/{key}': value for key, value in measures.items()})
  return stats


def finite_flags(loss, grads, hebb) -> dict:
  """``{name: finite}`` in the order a fault is reported: loss, gradients, Hebbian terms."""
  flags = {'loss': jnp.isfinite(loss)}
  for path, g in trees.flat(grads).items():
    flags[f'grad/{path}'] = jnp.all(jnp.isfinite(g))
  for path, h in hebb.items():
    flags[f'hebb/{path}'] = jnp.all(jnp.isfinite(h.term))
  return flags


def when(pred, fn: Callable, *operands):
  """``fn(*operands)`` where ``pred`` holds, zeros of its shapes elsewhere (computed only then)."""
  shapes = jax.eval_shape(fn, *operands)
  zeros = lambda *_: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
  return jax.lax.cond(pred, fn, zeros, *operands)


def checks(step, log_every: int, loss, grads, hebb, stats_fn: Callable) -> dict:
  """``finite`` (one scalar), ``faults`` (per-leaf flags, fetched only when not finite) and ``stats``
  (``stats_fn()``, only at log steps: ``step + 1`` a multiple of ``log_every``)."""
  flags = finite_flags(loss, grads, hebb)            # scalars; the host reads them only on a fault
  return {'finite': jnp.all(jnp.stack(jax.tree.leaves(flags))), 'faults': flags,
          'stats': when((step + 1) % log_every == 0, stats_fn)}


def make_train_step(model, tx: optax.GradientTransformation, *, rule: Optional[Rule],
                    accum_steps: int = 1, lr_fns: Optional[dict] = None,
                    trainable: Optional[str] = None, conv_impl: str = 'auto',
                    log_every: int = 1, shadow: Optional[Rule] = None) -> Callable:
  """Builds ``train_step(state, batch) -> (state, metrics)``.

  ``state`` is a dict ``{step, params, batch_stats, opt_state, rng}``; ``rule`` the
  :class:`ghl_jax.Rule` of GHL, or ``None`` for plain backprop. ``trainable`` (a regex over
  param paths) makes it a linear-probe step: backprop stops at the params it does not match,
  and their BatchNorms use (and keep) their running averages. ``conv_impl`` picks the kernels
  (:mod:`ghl_jax.accel`). ``shadow`` (a Rule, backprop steps only): at log steps, also the terms
  that rule forms on the same batch (same dropout draw as the first micro-batch) and how GHL's update
  would align with this step's gradient (``align/<layer>/*`` without ``cos_update``); the step
  itself is unchanged.
  """
  apply = model.apply
  if trainable is not None:
    apply = hebbian_lib.frozen_features(apply, trainable)
  lr_fns = lr_fns or {}

  def loss_fn(params, batch_stats, images, labels, rng):
    if trainable is not None:
      params = hebbian_lib.stop_frozen(params, trainable)
    variables = model_variables(params, batch_stats)
    logits, new_state = apply(variables, images, train=True, mutable=['batch_stats'], rngs={'dropout': rng})
    return cross_entropy(logits, labels), (logits, new_state)

  grad_fn = ghl_jax.value_and_grad(loss_fn, rule, has_aux=True, conv_impl=conv_impl)
  if shadow is not None and rule is not None:
    raise ValueError('shadow= shows what GHL would do in a backprop step; this step already applies GHL.')
  shadow_fn = None if shadow is None else ghl_jax.value_and_grad(loss_fn, shadow, has_aux=True,
                                                                 conv_impl=conv_impl)

  def shadow_stats(params, batch_stats, batch, rng, grads) -> dict:
    """What GHL would have done: its terms on the whole batch against this step's gradient."""
    if shadow_fn is None:
      return {}
    _, _, hebb = shadow_fn(params, batch_stats, batch['image'], batch['label'], jax.random.fold_in(rng, 0))
    return hebbian_stats(hebb, grads)

  def micro_step(params, batch_stats, images, labels, rng):
    """``(new batch stats, (loss, correct, grads, hebb))`` of one micro-batch."""
    (loss, (logits, new_state)), grads, hebb = grad_fn(params, batch_stats, images, labels, rng)
    correct = jnp.sum(jnp.argmax(logits, -1) == labels)
    return new_state.get('batch_stats', {}), (loss, correct, grads, hebb)

  def accumulate(params, batch_stats, micro, rng):
    """Sums of ``(loss, correct, grads, hebb)`` over the micro-batches, batch stats threaded through:
    an unrolled loop where loops slow convolutions down (XLA:CPU), a ``lax.scan`` elsewhere, so
    that compile time does not grow with the number of micro-batches."""
    xs = (micro['image'], micro['label'], jnp.arange(accum_steps))
    if ghl_jax.accel.unrolled_loops(conv_impl):
      totals = None
      for i in range(accum_steps):
        batch_stats, out = micro_step(params, batch_stats, xs[0][i], xs[1][i], jax.random.fold_in(rng, i))
        totals = out if totals is None else _add(totals, out)
      return batch_stats, totals

    def body(carry, x):
      stats, totals = carry
      stats, out = micro_step(params, stats, x[0], x[1], jax.random.fold_in(rng, x[2]))
      return (stats, _add(totals, out)), None
    shapes = jax.eval_shape(lambda: micro_step(params, batch_stats, xs[0][0], xs[1][0], rng)[1])
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    (batch_stats, totals), _ = jax.lax.scan(body, (batch_stats, zeros), xs)
    return batch_stats, totals

  def train_step(state, batch):
    params, rng = state['params'], jax.random.fold_in(state['rng'], state['step'])
    batch_stats, (loss, correct, grads, hebb) = accumulate(params, state['batch_stats'],
                                                           _split(batch, accum_steps), rng)
    grads = jax.tree.map(lambda g: g / accum_steps, grads)
    loss = loss / accum_steps

    updates, opt_state = tx.update(grads, state['opt_state'], params,
                                   **({'hebb': hebb} if rule is not None else {}))
    new_params = optax.apply_updates(params, updates)
    stats = lambda: {'l2/params': _l2(params), 'l2/grads': _l2(grads), 'l2/updates': _l2(updates),
                     **{f'lr/{name}': fn(state['step']) for name, fn in lr_fns.items()},
                     **hebbian_stats(hebb, grads, updates),
                     **shadow_stats(params, state['batch_stats'], batch, rng, grads)}
    metrics = {'loss': loss, 'accuracy': correct / batch['label'].shape[0],
               **checks(state['step'], log_every, loss, grads, hebb, stats)}
    new_state = dict(state, step=state['step'] + 1, params=new_params,
                     batch_stats=batch_stats, opt_state=opt_state)
    return new_state, metrics

  return train_step


def make_hebbian_step(model, tx: optax.GradientTransformation, *, rule: Rule,
                      log_every: int = 1) -> Callable:
  """Builds ``hebbian_step(state, batch) -> (state, metrics)``: one unsupervised step.

  One forward pass in train mode (BatchNorm batch statistics, running averages updated, no
  backprop, labels unused); raw local terms ``H`` of ``rule`` from the taps; then
  ``tx.update(..., hebb=H)``, e.g. :func:`ghl_jax.hebbian.hebbian_ascent`: ``W_k ← W_k + η_k Ĥ_k``.
  """
  apply = tap(model.apply)

  def hebbian_step(state, batch):
    params = state['params']
    rng = jax.random.fold_in(state['rng'], state['step'])
    variables = model_variables(params, state['batch_stats'])
    (_, new_state), taps = apply(variables, batch['image'], train=True, mutable=['batch_stats'],
                                 rngs={'dropout': rng})
    hebb = transform.hebbian_terms(params, taps, rule=rule)
    template = jax.tree.map(jnp.zeros_like, params)
    updates, opt_state = tx.update(template, state['opt_state'], params, hebb=hebb)
    new_params = optax.apply_updates(params, updates)

    def stats():
      flat = trees.flat(new_params)
      out = {'l2/params': _l2(params), 'l2/updates': _l2(updates)}
      for path, h in hebb.items():
        name = path.rsplit('/', 1)[0]
        out[f'hebb/{name}/max_abs'] = jnp.max(jnp.abs(h.term))
        out[f'hebb/{name}/neuron_norm'] = jnp.mean(hebbian_lib.neuron_norms(flat[path], h.stacked))
      return out
    zero = jnp.zeros((), jnp.float32)
    metrics = checks(state['step'], log_every, zero, {}, hebb, stats)
    new_state = dict(state, step=state['step'] + 1, params=new_params,
                     batch_stats=new_state.get('batch_stats', {}), opt_state=opt_state)
    return new_state, metrics

  return hebbian_step


def eval_sums(logits: jax.Array, batch) -> dict:
  """Sums of loss, top-1 and top-5 hits over the unmasked examples of ``batch``."""
  mask, labels = batch['mask'], batch['label']
  top_k = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
  return {
      'loss': jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, labels) * mask),
      'top1': jnp.sum((top_k[:, 0] == labels) * mask),
      'top5': jnp.sum(jnp.any(top_k == labels[:, None], axis=-1) * mask),
      'count': jnp.sum(mask),
  }


def make_eval_step(model, conv_impl: str = 'auto') -> Callable:
  """``eval_step(state, batch) -> sums`` of loss, top-1 and top-5 hits over unmasked examples."""
  apply = ghl_jax.accel.wrap(model.apply, conv_impl)

  def eval_step(state, batch):
    return eval_sums(apply(model_variables(state['params'], state['batch_stats']), batch['image'], train=False),
                     batch)
  return eval_step
