"""Params-like trees by '/'-joined path: the one set of tree helpers of the core.

A params tree may be a dict, a ``FrozenDict`` or an ``nnx.State``, and its leaves may be boxed by
flax's metadata (``nn.Partitioned`` from ``nn.with_logical_partitioning``): the helpers here read the
array inside a box and put a new array back into the same box, so sharding annotations survive.
"""
from __future__ import annotations

from typing import Any, Callable

import flax
from flax import nnx
import flax.linen as nn


def as_plain_dict(tree):
  """A plain nested dict of a params-like tree (dict, FrozenDict, or an ``nnx.State``)."""
  if isinstance(tree, flax.core.FrozenDict):
    return flax.core.unfreeze(tree)
  if isinstance(tree, nnx.State):
    return nnx.to_pure_dict(tree)
  return tree


def like(template, tree):
  """``tree`` (a plain nested dict) in the container type of ``template``."""
  if isinstance(template, flax.core.FrozenDict):
    return flax.core.freeze(tree)
  if isinstance(template, nnx.State):
    return nnx.State(tree)
  return tree


def flat(tree, keep_empty_nodes: bool = False) -> dict:
  """``{'/'-joined path: leaf}`` of a params-like tree (boxed leaves stay boxed)."""
  return flax.traverse_util.flatten_dict(as_plain_dict(tree), sep='/', keep_empty_nodes=keep_empty_nodes)


def unflat_like(template, flat_tree: dict):
  """The inverse of :func:`flat`, in the container type of ``template``."""
  return like(template, flax.traverse_util.unflatten_dict(flat_tree, sep='/'))


def flat_paths(tree, keep_empty_nodes: bool = True) -> tuple[dict, dict]:
  """``(flat, keys)``: ``tree``'s leaves by key tuple (``flax.traverse_util.flatten_dict``) and
  ``{'/'-joined path: key tuple}``; keys may be ints (NNX list indices)."""
  leaves = flax.traverse_util.flatten_dict(as_plain_dict(tree), keep_empty_nodes=keep_empty_nodes)
  return leaves, {'/'.join(map(str, key)): key for key in leaves}


def get(tree: Any, path: str):
  """The node at '/'-joined ``path`` of a nested mapping."""
  for key in path.split('/'):
    tree = tree[key]
  return tree


def unbox(leaf):
  """The array inside a flax metadata box (``nn.Partitioned``, ...), or ``leaf`` itself."""
  return leaf.unbox() if isinstance(leaf, nn.meta.AxisMetadata) else leaf


def map_boxed(fn: Callable, leaf):
  """``fn`` applied to the array of ``leaf``, kept in ``leaf``'s box if it has one."""
  if isinstance(leaf, nn.meta.AxisMetadata):
    return leaf.replace_boxed(fn(leaf.unbox()))
  return fn(leaf)
