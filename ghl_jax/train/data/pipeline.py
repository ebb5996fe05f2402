"""tfds ``array_record`` data through grain: deterministic, resumable, one slice of each split per process.

Train stream (per process ``p`` of ``P``, global batch ``B``, local batch ``b = B / P``)::

    steps_per_epoch = num_train // B                 (the same on every process)
    step s  ->  epoch e = s // steps_per_epoch, position k = s % steps_per_epoch
    epoch e = permutation(slice_p, seed(seed, e, p))[:steps_per_epoch · b]   (drop remainder)
    batch s = epoch e[k·b : (k+1)·b], each example i viewed with uniforms of (seed, e, i)

where ``i`` is the example's index in the split, whatever the epoch or process count. So a batch
depends only on ``(seed, s, p, P)``; grain's ``MapDataset`` is random access, so ``start_step=k``
starts at batch ``k`` without reading the ones before it. Images are float32 NHWC, normalised as
``(x/255 − mean) / std``; labels int32. Small datasets (CIFAR, MNIST) are decoded once into host
memory; large ones (ImageNet) are read and decoded per batch, by grain's threads.
"""
from __future__ import annotations

import functools
import os
from typing import Iterator

import grain
import ml_collections
import numpy as np

from ghl_jax.train.data import augment as views
from ghl_jax.train.data import sources
from ghl_jax.train.data.sources import DEFAULTS, DatasetInfo, DatasetMissingError, get

AUGMENTS = ('none', 'crop_flip', 'inception')
NORMALIZE = ('half', 'unit', 'imagenet', 'dataset')
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
DATASET_STATS = {  # per-channel mean / std of the train split, pixels in [0, 1]
    'cifar10': ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    'cifar100': ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    'mnist': ((0.1307,), (0.3081,)),
    'fashion_mnist': ((0.2860,), (0.3530,)),
}
THREADS = max(1, min(8, os.cpu_count() or 1))   # grain's reader threads (batches built at once)

__all__ = ['AUGMENTS', 'NORMALIZE', 'DatasetInfo', 'DatasetMissingError', 'default_config', 'ensure_available',
           'eval_batches', 'info', 'steps_per_epoch', 'train_batches']


def default_config(name: str = 'cifar10') -> ml_collections.ConfigDict:
  """A ``config.data`` ConfigDict with every field this module reads."""
  return ml_collections.ConfigDict(dict(DEFAULTS, name=name))


def _check_options(cfg) -> None:
  if get(cfg, 'augment') not in AUGMENTS:
    raise ValueError(f'config.data.augment must be one of {AUGMENTS}, got {get(cfg, "augment")!r}.')
  normalize = get(cfg, 'normalize')
  if normalize not in NORMALIZE:
    raise ValueError(f'config.data.normalize must be one of {NORMALIZE}, got {normalize!r}.')
  if normalize == 'dataset' and sources.base_name(cfg) not in DATASET_STATS:
    raise ValueError(f"normalize='dataset' knows {sorted(DATASET_STATS)}, not {cfg.name!r}; "
                     "use 'half', 'unit' or 'imagenet'.")


def ensure_available(data_cfg) -> None:
  """Returns when the dataset is readable (downloading it if ``download``); else DatasetMissingError."""
  _check_options(data_cfg)
  sources.builder(data_cfg)


def _stats(cfg, channels: int):
  """(mean, std) on the [0, 1] scale, one value per channel."""
  normalize = get(cfg, 'normalize')
  mean, std = {'half': ((0.5,), (0.5,)), 'unit': ((0.0,), (1.0,)), 'imagenet': IMAGENET_STATS,
               'dataset': DATASET_STATS.get(sources.base_name(cfg))}[normalize]
  if len(mean) not in (1, channels):
    raise ValueError(f"normalize={normalize!r} has {len(mean)} channels but {cfg.name} images have "
                     f"{channels}; use 'half' or 'unit'.")
  return (np.broadcast_to(np.float32(mean), (channels,)), np.broadcast_to(np.float32(std), (channels,)))


def info(data_cfg) -> DatasetInfo:
  """Classes, preprocessed image shape and split sizes of ``data_cfg``'s dataset."""
  _check_options(data_cfg)
  found = sources.builder(data_cfg)
  shape = sources.image_shape(data_cfg, found)
  _stats(data_cfg, shape[-1])  # fail early on a channel mismatch
  return sources.dataset_info(data_cfg, found, shape)


def steps_per_epoch(data_cfg, batch_size: int) -> int:
  """``num_train // batch_size`` (the last partial batch of each epoch is dropped)."""
  num_train = info(data_cfg).num_train
  if batch_size > num_train:
    raise ValueError(f'batch_size {batch_size} exceeds the {num_train} training examples of '
                     f'{data_cfg.name}; lower batch_size.')
  return num_train // batch_size


def _local_batch(batch_size: int, process_count: int) -> int:
  if batch_size <= 0 or batch_size % process_count:
    raise ValueError(f'batch_size {batch_size} must be a positive multiple of the process count '
                     f'{process_count}.')
  return batch_size // process_count


def _crop_fraction(cfg) -> float:
  """Eval view: ImageNet-style 87.5 % center crop with inception training, else the whole image."""
  return 0.875 if get(cfg, 'augment') == 'inception' else 1.0


def _epoch_keys(seed: int, epoch: int, process_index: int) -> tuple:
  """(shuffle seed < 2³², crop key, flip key) of (seed, epoch[, process]): independent integers."""
  shuffle = np.random.SeedSequence([seed, epoch, process_index, 0]).generate_state(1, np.uint32)[0]
  crop, flip = np.random.SeedSequence([seed, epoch, 1]).generate_state(2, np.uint64)
  return int(shuffle), int(crop), int(flip)


# ------------------------------------------------------------------------------------------------
# One process's slice of a split, read by position in the slice.

class _Slice:
  """Examples ``[start, start + size)`` of a split: ``read(positions)`` gives their uint8 images
  (one array when they share a shape) and int64 labels."""

  def __init__(self, cfg, found, split: str, start: int, size: int, *, resident: bool):
    self.start, self.size = start, size
    if resident:
      self._images, self._labels = sources.decoded(sources.data_dir(cfg), cfg.name, split, start, start + size)
      self._source = None
    else:
      self._source = sources.Split(found, split)

  def read(self, positions: np.ndarray):
    if self._source is None:
      return self._images[positions], self._labels[positions]
    return self._source.read(self.start + positions)


def _views(cfg, images, indices: np.ndarray, shape: tuple, keys=None) -> np.ndarray:
  """uint8 ``[n, *shape]``: the training views (``keys`` = (crop key, flip key)) or, without keys,
  the evaluation view of each image."""
  augment, size = get(cfg, 'augment'), get(cfg, 'image_size')
  if keys is not None and augment == 'inception':
    u = views.uniform(keys[0], indices, views.INCEPTION_UNIFORMS)
    out = np.stack([views.inception_crop(image, shape[0], u[n]) for n, image in enumerate(images)])
  elif isinstance(images, np.ndarray) and not size:
    out = images
  else:
    out = np.stack([views.center_view(image, size, _crop_fraction(cfg)) for image in images])
  if keys is not None and augment == 'crop_flip':
    out = views.pad_crop(out, views.uniform(keys[0], indices, 2))
  if keys is not None and augment != 'none':
    out = views.flip(out, views.uniform(keys[1], indices, 1)[:, 0])
  return out


def _read_options() -> grain.ReadOptions:
  return grain.ReadOptions(num_threads=THREADS, prefetch_buffer_size=THREADS)


def _prepared(data_cfg, split: str, process_index: int, process_count: int):
  """(builder, image shape, normalisation, this process's slice start, all slice sizes)."""
  _check_options(data_cfg)
  found = sources.builder(data_cfg)
  shape = sources.image_shape(data_cfg, found)
  start, sizes = sources.process_slice(found.info.splits[split].num_examples, process_index, process_count)
  return found, shape, _stats(data_cfg, shape[-1]), start, sizes


# ------------------------------------------------------------------------------------------------
# Public iterators.

def train_batches(data_cfg, *, batch_size: int, seed: int, start_step: int = 0, process_index: int = 0,
                  process_count: int = 1) -> Iterator[dict]:
  """Endless ``{'image': (b,H,W,C) float32, 'label': (b,) int32}`` with ``b = batch_size / process_count``.

  The batch at global step ``s`` depends only on ``(seed, s, process_index, process_count)``;
  ``start_step=k`` yields what the uninterrupted iterator yields from step ``k`` on.
  """
  local = _local_batch(batch_size, process_count)
  if start_step < 0:
    raise ValueError(f'start_step must be >= 0, got {start_step}.')
  split = get(data_cfg, 'train_split')
  found, shape, (mean, std), start, sizes = _prepared(data_cfg, split, process_index, process_count)
  steps = steps_per_epoch(data_cfg, batch_size)
  part = _Slice(data_cfg, found, split, start, sizes[process_index],
                resident=sources.in_memory(data_cfg, found))

  def batch_of(keys, positions):
    images, labels = part.read(positions)
    pixels = _views(data_cfg, images, start + positions, shape, keys)
    return {'image': views.normalize(pixels, mean, std), 'label': labels.astype(np.int32)}

  epoch, skip = divmod(start_step, steps)
  while True:
    shuffle_seed, *keys = _epoch_keys(seed, epoch, process_index)
    order = grain.MapDataset.range(part.size).shuffle(seed=shuffle_seed)[:steps * local].batch(local)
    batches = order.map(functools.partial(batch_of, tuple(keys)))[skip:]
    yield from batches.to_iter_dataset(_read_options())
    epoch, skip = epoch + 1, 0


def eval_batches(data_cfg, *, batch_size: int, process_index: int = 0,
                 process_count: int = 1) -> Iterator[dict]:
  """One pass over this process's slice of the eval split, padded to full batches.

  Yields ``{'image', 'label', 'mask'}`` with ``mask`` 1.0 on real and 0.0 on padding examples;
  every process yields the same number of batches and every example counts exactly once.
  """
  local = _local_batch(batch_size, process_count)
  split = sources.eval_split(data_cfg)
  found, shape, (mean, std), start, sizes = _prepared(data_cfg, split, process_index, process_count)
  part = _Slice(data_cfg, found, split, start, sizes[process_index],
                resident=sources.in_memory(data_cfg, found))

  def batch_of(number):
    positions = np.arange(number * local, min((number + 1) * local, part.size))
    pixels = np.zeros((local, *shape), np.uint8)
    labels = np.zeros((local,), np.int32)
    if len(positions):
      images, real = part.read(positions)
      pixels[:len(positions)] = _views(data_cfg, images, start + positions, shape)
      labels[:len(positions)] = real
    mask = (np.arange(local) < len(positions)).astype(np.float32)
    return {'image': views.normalize(pixels, mean, std), 'label': labels, 'mask': mask}

  batches = grain.MapDataset.range(-(-max(sizes) // local)).map(batch_of)
  yield from batches.to_iter_dataset(_read_options())
