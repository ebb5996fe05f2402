"""Model zoo: plain flax.linen modules that know nothing about GHL, and a name registry."""
from __future__ import annotations

from typing import Callable

from ghl_jax.models.deephebb import DeepHebb

_REGISTRY: dict[str, Callable] = {
    'deephebb': DeepHebb,
}


def register(name: str, constructor: Callable) -> None:
  """Adds a model constructor under ``name`` (used by ``build`` and configs)."""
  _REGISTRY[name] = constructor


def names() -> list[str]:
  return sorted(_REGISTRY)


def build(name: str, **kwargs):
  """The registered model ``name`` built with ``kwargs``; unknown names list the known ones."""
  if name not in _REGISTRY:
    raise ValueError(f'Unknown model {name!r}; known models: {", ".join(names())}.')
  return _REGISTRY[name](**kwargs)
