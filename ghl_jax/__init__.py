"""ghl_jax: Global-guided Hebbian Learning in JAX/Flax.

``update = sign(∂L/∂W) ⊙ |Ĥ|``: the direction of each weight change comes from the backprop
gradient, its size from a local Hebbian rule (Oja's rule with soft winner-take-all)::

    rule = ghl_jax.Rule('softmax_oja', t_inv={'conv2': 0.65, 'conv3': 0.25})
    grad_fn = ghl_jax.value_and_grad(loss_fn, rule, has_aux=True)
    (loss, aux), grads, hebb = grad_fn(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params, hebb=hebb)   # tx holds ghl(rule=rule)

The core (this package without :mod:`ghl_jax.train`) needs only jax, flax, optax, chex and
numpy. The trainer, :mod:`ghl_jax.train`, comes with ``pip install ghl_jax[train]``.
"""
from ghl_jax import accel, adapters, diagnostics, hebbian, models, nnx, optim, rules, selection, trees
from ghl_jax.fused import value_and_grad
from ghl_jax.rule import Rule
from ghl_jax.selection import Selection
from ghl_jax.tap import Layer, tap
from ghl_jax.transform import Hebbian, combine, ghl, hebbian_terms, selected_layers

__all__ = ['Hebbian', 'Layer', 'Rule', 'Selection', 'accel', 'adapters', 'combine', 'diagnostics', 'ghl', 'hebbian',
           'hebbian_terms', 'models', 'nnx', 'optim', 'rules', 'selected_layers', 'selection', 'tap', 'trees',
           'value_and_grad']
__version__ = '0.4.1'
