"""ghl_jax: Global-guided Hebbian Learning in JAX/Flax.

``update = sign(∂L/∂W) ⊙ |Ĥ|``: the direction of each weight change comes from the backprop
gradient, its size from a local Hebbian rule (Oja's rule with soft winner-take-all).
"""
from ghl_jax import models, optim, rules
from ghl_jax.tap import Layer, tap
from ghl_jax.transform import Hebbian, combine, ghl, hebbian_terms, selected_layers

__all__ = ['Hebbian', 'Layer', 'combine', 'ghl', 'hebbian_terms', 'models', 'optim', 'rules',
           'selected_layers', 'tap']
__version__ = '0.1.0'
