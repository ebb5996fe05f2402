"""The jitted train and eval steps: one readable function each.

A train step (with ``A = grad_accum_steps`` micro-batches of the global batch)::

    for each micro-batch m (unrolled):   (loss_m, state_m), taps_m = tap(apply)(params, x_m)
                              G += ∂loss_m/∂θ / A,    H += rule(taps_m)    (raw Hebbian sums)
    updates = tx.update(G, opt_state, params, hebb=H)      (ghl: sign(G) ⊙ |Ĥ| on its kernels)
    params += updates

Raw Hebbian terms add up over micro-batches (and over devices, by XLA), so ``Ĥ`` is the
global-batch one whatever the sharding or accumulation.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import flax
import jax
import jax.numpy as jnp
import optax

from ghl_jax import fast_conv
from ghl_jax import hebbian as hebbian_lib
from ghl_jax import transform
from ghl_jax.tap import tap


def cross_entropy(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def _split(batch, parts):
  return jax.tree.map(lambda a: a.reshape((parts, a.shape[0] // parts) + a.shape[1:]), batch)


def _add(a, b):
  return jax.tree.map(jnp.add, a, b)


def _l2(tree) -> jax.Array:
  return optax.tree.norm(tree)


def hebbian_stats(hebb: dict, grads: Any) -> dict:
  """Per-layer max|H| and the fraction of weights where sign(−H) agrees with sign(G)."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(grads), sep='/')
  stats = {}
  for path, h in hebb.items():
    name = path.rsplit('/', 1)[0]
    stats[f'hebb/{name}/max_abs'] = jnp.max(jnp.abs(h.term))
    stats[f'hebb/{name}/sign_agreement'] = jnp.mean(jnp.sign(-h.term) == jnp.sign(flat[path]))
  return stats


def finite_flags(loss, grads, hebb) -> dict:
  """``finite/<name>`` flags, in the order a fault is reported: loss, gradients, Hebbian terms."""
  flags = {'finite/loss': jnp.isfinite(loss)}
  for path, g in flax.traverse_util.flatten_dict(flax.core.unfreeze(grads), sep='/').items():
    flags[f'finite/grad/{path}'] = jnp.all(jnp.isfinite(g))
  for path, h in hebb.items():
    flags[f'finite/hebb/{path}'] = jnp.all(jnp.isfinite(h.term))
  return flags


def make_train_step(model, tx: optax.GradientTransformation, *, ghl_kwargs: Optional[dict],
                    accum_steps: int = 1, lr_fns: Optional[dict] = None,
                    trainable: Optional[str] = None, conv_impl: str = 'auto',
                    fuse_hebbian: bool = True) -> Callable:
  """Builds ``train_step(state, batch) -> (state, metrics)``.

  ``state`` is a dict ``{step, params, batch_stats, opt_state, rng}``; ``ghl_kwargs`` (the
  arguments of :func:`ghl_jax.hebbian_terms`) or ``None`` for plain backprop. ``trainable``
  (a regex over param paths) makes it a linear-probe step: backprop stops at the params it
  does not match, and their BatchNorms use (and keep) their running averages.
  ``conv_impl`` (:mod:`ghl_jax.fast_conv`: 'auto', 'xla' or 'gemm') picks how convolutions are
  differentiated. The Hebbian terms of GHL's conv layers come out of the gradient pass (as the
  gradients of zero probes beside their kernels, see :mod:`ghl_jax.fast_conv`); those of other
  layers, or of every layer with ``fuse_hebbian=False``, from their taps after it.
  """
  fused = fuse_hebbian and ghl_kwargs is not None and trainable is None
  apply = tap(model.apply) if ghl_kwargs is not None else model.apply
  if trainable is not None:
    apply = hebbian_lib.frozen_features(apply, trainable)
  apply = fast_conv.wrap(apply, conv_impl, fast_conv.hebbian_rule(ghl_kwargs) if fused else None)
  lr_fns = lr_fns or {}

  def micro_step(params, batch_stats, images, labels, rng):
    def loss_fn(p):
      if trainable is not None:
        p = hebbian_lib.stop_frozen(p, trainable)
      variables = {'params': p, **({'batch_stats': batch_stats} if batch_stats else {})}
      result = apply(variables, images, train=True, mutable=['batch_stats'], rngs={'dropout': rng})
      (logits, new_state), taps = result if ghl_kwargs is not None else (result, None)
      return cross_entropy(logits, labels), (logits, new_state, taps)
    if fused:                             # probes beside the conv kernels carry their terms
      convs, others = fast_conv.fused_kernels(params, jax.eval_shape(loss_fn, params)[1][2],
                                              ghl_kwargs.get('layers'))
      (loss, (logits, new_state, taps)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
          fast_conv.probed_params(params, convs))
      grads, hebb = fast_conv.fused_hebbian_terms(grads, params, taps, convs, others, ghl_kwargs)
    else:
      (loss, (logits, new_state, taps)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
      hebb = transform.hebbian_terms(params, taps, **ghl_kwargs) if ghl_kwargs is not None else {}
    correct = jnp.sum(jnp.argmax(logits, -1) == labels)
    return loss, grads, hebb, new_state.get('batch_stats', {}), correct

  def train_step(state, batch):
    params, rng = state['params'], jax.random.fold_in(state['rng'], state['step'])
    micro = _split(batch, accum_steps)
    batch_stats, grads, hebb, loss, correct = state['batch_stats'], None, None, 0.0, 0
    for i in range(accum_steps):          # unrolled: XLA:CPU runs convs inside loops far slower
      loss_i, g, h, batch_stats, correct_i = micro_step(
          params, batch_stats, micro['image'][i], micro['label'][i], jax.random.fold_in(rng, i))
      grads, hebb = (g, h) if i == 0 else (_add(grads, g), _add(hebb, h))
      loss, correct = loss + loss_i, correct + correct_i
    grads = jax.tree.map(lambda g: g / accum_steps, grads)
    loss = loss / accum_steps

    updates, opt_state = tx.update(grads, state['opt_state'], params,
                                   **({'hebb': hebb} if ghl_kwargs is not None else {}))
    new_params = optax.apply_updates(params, updates)
    metrics = {
        'loss': loss, 'accuracy': correct / batch['label'].shape[0],
        'l2/params': _l2(params), 'l2/grads': _l2(grads), 'l2/updates': _l2(updates),
        **{f'lr/{name}': fn(state['step']) for name, fn in lr_fns.items()},
        **hebbian_stats(hebb, grads), **finite_flags(loss, grads, hebb),
    }
    new_state = dict(state, step=state['step'] + 1, params=new_params,
                     batch_stats=batch_stats, opt_state=opt_state)
    return new_state, metrics

  return train_step


def make_hebbian_step(model, tx: optax.GradientTransformation, *, hebbian_kwargs: dict) -> Callable:
  """Builds ``hebbian_step(state, batch) -> (state, metrics)``: one unsupervised step.

  One forward pass in train mode (BatchNorm batch statistics, running averages updated, no
  backprop, labels unused); raw local terms ``H`` from the taps (``hebbian_kwargs`` are the
  arguments of :func:`ghl_jax.hebbian_terms`); then ``tx.update(..., hebb=H)``, e.g.
  :func:`ghl_jax.hebbian.hebbian_ascent`: ``W_k ← W_k + η_k Ĥ_k``.
  """
  apply = tap(model.apply)

  def hebbian_step(state, batch):
    params = state['params']
    rng = jax.random.fold_in(state['rng'], state['step'])
    variables = {'params': params, **({'batch_stats': state['batch_stats']} if state['batch_stats'] else {})}
    (_, new_state), taps = apply(variables, batch['image'], train=True, mutable=['batch_stats'],
                                 rngs={'dropout': rng})
    hebb = transform.hebbian_terms(params, taps, **hebbian_kwargs)
    template = jax.tree.map(jnp.zeros_like, params)
    updates, opt_state = tx.update(template, state['opt_state'], params, hebb=hebb)
    new_params = optax.apply_updates(params, updates)
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(new_params), sep='/')
    metrics = {'l2/params': _l2(params), 'l2/updates': _l2(updates)}
    for path, h in hebb.items():
      name = path.rsplit('/', 1)[0]
      metrics[f'hebb/{name}/max_abs'] = jnp.max(jnp.abs(h.term))
      metrics[f'hebb/{name}/neuron_norm'] = jnp.mean(hebbian_lib.neuron_norms(flat[path], h.stacked))
      metrics[f'finite/hebb/{path}'] = jnp.all(jnp.isfinite(h.term))
    new_state = dict(state, step=state['step'] + 1, params=new_params,
                     batch_stats=new_state.get('batch_stats', {}), opt_state=opt_state)
    return new_state, metrics

  return hebbian_step


def make_eval_step(model) -> Callable:
  """``eval_step(state, batch) -> sums`` of loss, top-1 and top-5 hits over unmasked examples."""
  def eval_step(state, batch):
    variables = {'params': state['params'],
                 **({'batch_stats': state['batch_stats']} if state['batch_stats'] else {})}
    logits = model.apply(variables, batch['image'], train=False)
    mask = batch['mask']
    labels = batch['label']
    k = min(5, logits.shape[-1])
    top_k = jax.lax.top_k(logits, k)[1]
    return {
        'loss': jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, labels) * mask),
        'top1': jnp.sum((top_k[:, 0] == labels) * mask),
        'top5': jnp.sum(jnp.any(top_k == labels[:, None], axis=-1) * mask),
        'count': jnp.sum(mask),
    }
  return eval_step
