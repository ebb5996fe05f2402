"""tfds + tf.data input pipeline: deterministic, resumable, one slice of each split per process.

Train stream (per process ``p`` of ``P``, global batch ``B``, local batch ``b = B / P``)::

    steps_per_epoch = num_train // B                 (the same on every process)
    step s  ->  epoch e = s // steps_per_epoch, position k = s % steps_per_epoch
    epoch e = shuffle(slice_p, seed(seed, e, p))[:steps_per_epoch · b]   (drop remainder)
    batch s = epoch e[k·b : (k+1)·b], each example i augmented with seeds (seed, e, i)

where ``i`` identifies the example (its index in the split; a hash of its record id when
streaming), whatever the epoch or process count. So a batch depends only on ``(seed, s, p, P)``
and ``start_step=k`` resumes exactly. Images are
float32 NHWC, normalised as ``(x/255 − mean) / std``; labels int32. Small datasets (CIFAR,
MNIST) are decoded once into host memory; large ones (ImageNet) stream from the tfrecords.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Iterator, Optional

import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

AUGMENTS = ('none', 'crop_flip', 'inception')
NORMALIZE = ('half', 'unit', 'imagenet', 'dataset')
CROP_PAD = 4
IN_MEMORY_MAX_BYTES = 4 << 30  # decoded uint8 train split; above this the data streams
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
DATASET_STATS = {  # per-channel mean / std of the train split, pixels in [0, 1]
    'cifar10': ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    'cifar100': ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    'mnist': ((0.1307,), (0.3081,)),
    'fashion_mnist': ((0.2860,), (0.3530,)),
}
DEFAULTS = dict(data_dir=None, download=False, manual_dir=None, train_split='train',
                eval_split=None, augment='none', image_size=None, normalize='half',
                shuffle_buffer=50_000, in_memory=None)

try:  # tf.data runs on the host; never let TensorFlow claim accelerator memory.
  tf.config.set_visible_devices([], 'GPU')
except RuntimeError:
  pass


class DatasetMissingError(ValueError):
  """The dataset is not prepared in the data_dir and may not be downloaded."""


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  num_classes: int
  image_shape: tuple  # (H, W, C) after preprocessing
  num_train: int
  num_eval: int


def default_config(name: str = 'cifar10') -> ml_collections.ConfigDict:
  """A ``config.data`` ConfigDict with every field this module reads."""
  return ml_collections.ConfigDict(dict(DEFAULTS, name=name))


def _get(cfg, field: str):
  return cfg.get(field, DEFAULTS[field])


def _base_name(cfg) -> str:
  return cfg.name.split(':')[0].split('/')[0]


def default_data_dir() -> str:
  """``$TFDS_DATA_DIR``, else tfds's default ``~/tensorflow_datasets``."""
  return os.environ.get('TFDS_DATA_DIR') or os.path.join(os.path.expanduser('~'), 'tensorflow_datasets')


def _data_dir(cfg) -> str:
  return os.path.abspath(os.path.expanduser(_get(cfg, 'data_dir') or default_data_dir()))


def _eval_split(cfg) -> str:
  return _get(cfg, 'eval_split') or ('validation' if _base_name(cfg) == 'imagenet2012' else 'test')


def _missing_message(cfg, data_dir: str) -> str:
  from ghl_jax.train.data import offline  # here, not at the top: offline.py also runs as __main__
  name = _base_name(cfg)
  if name in offline.IMPORTERS:
    return (f'{name} is not in {data_dir} (offline): run `{offline.import_command(name, data_dir)}`, '
            'or set config.data.download=True when online.')
  if name == 'imagenet2012':
    return (f'imagenet2012 is not in {data_dir}: put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar '
            'in config.data.manual_dir and set config.data.download=True (tfds prepares it from there).')
  return (f'{cfg.name} is not in {data_dir} (offline): set config.data.download=True when online, '
          'or point config.data.data_dir at a tfds data_dir that holds it.')


def _builder(cfg) -> tfds.core.DatasetBuilder:
  """The prepared tfds builder for ``cfg.name``; downloads only when ``cfg.download``."""
  data_dir = _data_dir(cfg)
  try:
    builder = tfds.builder(cfg.name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    raise DatasetMissingError(_missing_message(cfg, data_dir)) from None
  if not builder.is_prepared():
    if not _get(cfg, 'download'):
      raise DatasetMissingError(_missing_message(cfg, data_dir))
    manual_dir = _get(cfg, 'manual_dir')
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=os.path.expanduser(manual_dir) if manual_dir else None))
  return builder


def ensure_available(data_cfg) -> None:
  """Returns when the dataset is readable (downloading it if ``download``); else DatasetMissingError."""
  _check_options(data_cfg)
  _builder(data_cfg)


def _check_options(cfg) -> None:
  if _get(cfg, 'augment') not in AUGMENTS:
    raise ValueError(f'config.data.augment must be one of {AUGMENTS}, got {_get(cfg, "augment")!r}.')
  normalize = _get(cfg, 'normalize')
  if normalize not in NORMALIZE:
    raise ValueError(f'config.data.normalize must be one of {NORMALIZE}, got {normalize!r}.')
  if normalize == 'dataset' and _base_name(cfg) not in DATASET_STATS:
    raise ValueError(f"normalize='dataset' knows {sorted(DATASET_STATS)}, not {cfg.name!r}; "
                     "use 'half', 'unit' or 'imagenet'.")


def _image_shape(cfg, builder) -> tuple:
  """(H, W, C) of the images the pipeline yields."""
  height, width, channels = builder.info.features['image'].shape
  size = _get(cfg, 'image_size')
  if size:
    return (int(size), int(size), channels)
  if height is None or width is None:
    raise ValueError(f'{cfg.name} images have no fixed size; set config.data.image_size.')
  return (height, width, channels)


def _stats(cfg, channels: int):
  """(mean, std) on the [0, 1] scale, one value per channel."""
  normalize = _get(cfg, 'normalize')
  mean, std = {'half': ((0.5,), (0.5,)), 'unit': ((0.0,), (1.0,)), 'imagenet': IMAGENET_STATS,
               'dataset': DATASET_STATS.get(_base_name(cfg))}[normalize]
  if len(mean) not in (1, channels):
    raise ValueError(f"normalize={normalize!r} has {len(mean)} channels but {cfg.name} images have "
                     f"{channels}; use 'half' or 'unit'.")
  return (np.broadcast_to(np.float32(mean), (channels,)), np.broadcast_to(np.float32(std), (channels,)))


def info(data_cfg) -> DatasetInfo:
  """Classes, preprocessed image shape and split sizes of ``data_cfg``'s dataset."""
  _check_options(data_cfg)
  builder = _builder(data_cfg)
  splits = builder.info.splits
  image_shape = _image_shape(data_cfg, builder)
  _stats(data_cfg, image_shape[-1])  # fail early on a channel mismatch
  return DatasetInfo(num_classes=builder.info.features['label'].num_classes, image_shape=image_shape,
                     num_train=splits[_get(data_cfg, 'train_split')].num_examples,
                     num_eval=splits[_eval_split(data_cfg)].num_examples)


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


# ------------------------------------------------------------------------------------------------
# Sources: one process's slice of a split, as {'image', 'label', 'index'} examples.

def _process_slice(builder, split: str, process_index: int, process_count: int):
  """(subsplit, sizes of all process slices, offset of this slice in the split)."""
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index {process_index} must lie in [0, {process_count}).')
  subsplits = tfds.even_splits(split, process_count)
  sizes = [builder.info.splits[sub].num_examples for sub in subsplits]
  return subsplits[process_index], sizes, sum(sizes[:process_index])


def _in_memory(cfg, builder) -> bool:
  choice = _get(cfg, 'in_memory')
  if choice is not None:
    return bool(choice)
  shape = builder.info.features['image'].shape
  if None in shape:
    return False
  num = builder.info.splits[_get(cfg, 'train_split')].num_examples
  return num * math.prod(shape) <= IN_MEMORY_MAX_BYTES


@functools.lru_cache(maxsize=8)
def _decoded(data_dir: str, name: str, split) -> tuple:
  """(images uint8 [N,H,W,C], labels int64 [N]) of a split, decoded once per process."""
  builder = tfds.builder(name, data_dir=data_dir)
  ds = builder.as_dataset(split=split, shuffle_files=False,
                          read_config=tfds.ReadConfig(try_autocache=False))
  ds = ds.map(lambda ex: (ex['image'], ex['label']), num_parallel_calls=tf.data.AUTOTUNE)
  parts = list(ds.batch(4096).as_numpy_iterator())
  return tuple(np.concatenate([part[k] for part in parts]) for k in range(2))


def _source(cfg, builder, split, offset: int, *, in_memory: bool, file_seed: Optional[int] = None):
  """Examples ``{'image', 'label', 'index'}``; ``index`` identifies the example within the split.

  In memory: decoded uint8 images, ``index`` = offset + position. Streaming: still-encoded
  images (decoded after the shuffle, so the shuffle buffer holds compressed bytes), files
  read in an order drawn from ``file_seed`` (unless the dataset is stored as ordered),
  ``index`` = a hash of the record's tfds id.
  """
  if in_memory:
    images, labels = _decoded(_data_dir(cfg), cfg.name, split)
    return tf.data.Dataset.from_tensor_slices(
        {'image': images, 'label': labels, 'index': np.arange(offset, offset + len(labels))})
  shuffle_files = file_seed is not None and not builder.info.disable_shuffling  # keep ordered data in order
  read_config = tfds.ReadConfig(try_autocache=False, add_tfds_id=True, shuffle_seed=file_seed)
  ds = builder.as_dataset(split=split, shuffle_files=shuffle_files, read_config=read_config,
                          decoders={'image': tfds.decode.SkipDecoding()})
  return ds.map(lambda ex: {'image': ex['image'], 'label': ex['label'],
                            'index': tf.strings.to_hash_bucket_fast(ex['tfds_id'], 1 << 62)},
                num_parallel_calls=tf.data.AUTOTUNE)


def _pixels(image, stored_shape):
  """uint8 HWC pixels of the stored shape, decoding the encoded bytes of streamed examples."""
  if image.dtype == tf.string:
    image = tf.io.decode_image(image, channels=stored_shape[-1], expand_animations=False)
    image = tf.ensure_shape(image, stored_shape)
  return image


# ------------------------------------------------------------------------------------------------
# Per-example preprocessing (stateless, seeded per example) and batched normalisation.

def _center_view(image, size: Optional[int], crop_fraction: float):
  """Resize the shorter side to ``size / crop_fraction``, then take the central size×size crop."""
  static = image.shape
  if not size or (static[0] == static[1] == size and crop_fraction == 1.0):
    return image
  hw = tf.cast(tf.shape(image)[:2], tf.float32)
  scale = (size / crop_fraction) / tf.reduce_min(hw)
  new_hw = tf.maximum(tf.cast(tf.round(hw * scale), tf.int32), size)
  image = tf.image.resize(image, new_hw, method='bilinear', antialias=True)
  top, left = (new_hw[0] - size) // 2, (new_hw[1] - size) // 2
  image = image[top:top + size, left:left + size]
  return tf.ensure_shape(image, (size, size, static[-1]))


def _pad_crop(image, seed):
  """Zero-pad by CROP_PAD on each side, then a random crop of the original size."""
  height, width, channels = image.shape
  padded = tf.pad(image, [[CROP_PAD, CROP_PAD], [CROP_PAD, CROP_PAD], [0, 0]])
  return tf.image.stateless_random_crop(padded, (height, width, channels), seed=seed)


def _inception_crop(image, size: int, seed):
  """A crop of 8–100 % of the area and aspect 3/4–4/3, resized to size×size."""
  begin, extent, _ = tf.image.stateless_sample_distorted_bounding_box(
      tf.shape(image), bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]), seed=seed,
      min_object_covered=0.1, aspect_ratio_range=(3 / 4, 4 / 3), area_range=(0.08, 1.0),
      max_attempts=10, use_image_if_no_bounding_boxes=True)
  crop = tf.slice(image, begin, extent)
  crop = tf.image.resize(crop, (size, size), method='bilinear', antialias=True)
  return tf.ensure_shape(crop, (size, size, image.shape[-1]))


def _crop_fraction(cfg) -> float:
  """Eval view: ImageNet-style 87.5 % center crop with inception training, else the whole image."""
  return 0.875 if _get(cfg, 'augment') == 'inception' else 1.0


def _train_example_fn(cfg, stored_shape, image_shape, keys):
  """Per-example training view; ``keys`` = (crop key, flip key) of this (seed, epoch)."""
  augment, size = _get(cfg, 'augment'), image_shape[0]

  def preprocess(example):
    crop_seed = tf.stack([tf.constant(keys[0], tf.int64), example['index']])
    flip_seed = tf.stack([tf.constant(keys[1], tf.int64), example['index']])
    image = _pixels(example['image'], stored_shape)
    if augment == 'inception':
      image = _inception_crop(image, size, crop_seed)
    else:
      image = _center_view(image, _get(cfg, 'image_size'), _crop_fraction(cfg))
      if augment == 'crop_flip':
        image = _pad_crop(image, crop_seed)
    if augment != 'none':
      image = tf.image.stateless_random_flip_left_right(image, seed=flip_seed)
    return {'image': tf.cast(image, tf.float32), 'label': example['label']}
  return preprocess


def _eval_example_fn(cfg, stored_shape):
  def preprocess(example):
    image = _pixels(example['image'], stored_shape)
    image = _center_view(image, _get(cfg, 'image_size'), _crop_fraction(cfg))
    return {'image': tf.cast(image, tf.float32), 'label': example['label'], 'mask': tf.constant(1.0)}
  return preprocess


def _finish_fn(cfg, channels: int):
  """Batched: ``image ← (image/255 − mean) / std`` in float32, ``label`` → int32."""
  mean, std = _stats(cfg, channels)
  scale, shift = tf.constant(1.0 / (255.0 * std)), tf.constant(mean / std)

  def finish(batch):
    batch = dict(batch)
    batch['image'] = batch['image'] * scale - shift
    batch['label'] = tf.cast(batch['label'], tf.int32)
    return batch
  return finish


def _options() -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = True
  return options


def _epoch_keys(seed: int, epoch: int, process_index: int) -> tuple:
  """(shuffle seed, crop key, flip key): independent 63-bit integers per (seed, epoch[, process])."""
  shuffle = np.random.SeedSequence([seed, epoch, process_index, 0]).generate_state(2, np.uint64)[0]
  crop, flip = np.random.SeedSequence([seed, epoch, 1]).generate_state(2, np.uint64)
  return tuple(int(k >> np.uint64(1)) for k in (shuffle, crop, flip))


# ------------------------------------------------------------------------------------------------
# Public iterators.

def train_batches(data_cfg, *, batch_size: int, seed: int, start_step: int = 0, process_index: int = 0,
                  process_count: int = 1) -> Iterator[dict]:
  """Endless ``{'image': (b,H,W,C) float32, 'label': (b,) int32}`` with ``b = batch_size / process_count``.

  The batch at global step ``s`` depends only on ``(seed, s, process_index, process_count)``;
  ``start_step=k`` yields what the uninterrupted iterator yields from step ``k`` on.
  """
  _check_options(data_cfg)
  local = _local_batch(batch_size, process_count)
  if start_step < 0:
    raise ValueError(f'start_step must be >= 0, got {start_step}.')
  builder = _builder(data_cfg)
  steps = steps_per_epoch(data_cfg, batch_size)
  image_shape = _image_shape(data_cfg, builder)
  stored_shape = builder.info.features['image'].shape
  split, sizes, offset = _process_slice(builder, _get(data_cfg, 'train_split'), process_index,
                                        process_count)
  in_memory = _in_memory(data_cfg, builder)
  make_source = functools.partial(_source, data_cfg, builder, split, offset, in_memory=in_memory)
  resident = make_source() if in_memory else None
  buffer = min(int(_get(data_cfg, 'shuffle_buffer') or 0), sizes[process_index])
  finish = _finish_fn(data_cfg, image_shape[-1])
  epoch, skip = divmod(start_step, steps)
  while True:
    shuffle_seed, *keys = _epoch_keys(seed, epoch, process_index)
    source = resident if in_memory else make_source(file_seed=shuffle_seed)
    ds = source.shuffle(buffer, seed=shuffle_seed, reshuffle_each_iteration=False) if buffer > 1 else source
    ds = ds.take(steps * local).skip(skip * local)
    ds = ds.map(_train_example_fn(data_cfg, stored_shape, image_shape, keys),
                num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(local, drop_remainder=True).map(finish).prefetch(tf.data.AUTOTUNE)
    yield from ds.with_options(_options()).as_numpy_iterator()
    epoch, skip = epoch + 1, 0


def eval_batches(data_cfg, *, batch_size: int, process_index: int = 0,
                 process_count: int = 1) -> Iterator[dict]:
  """One pass over this process's slice of the eval split, padded to full batches.

  Yields ``{'image', 'label', 'mask'}`` with ``mask`` 1.0 on real and 0.0 on padding examples;
  every process yields the same number of batches and every example counts exactly once.
  """
  _check_options(data_cfg)
  local = _local_batch(batch_size, process_count)
  builder = _builder(data_cfg)
  image_shape = _image_shape(data_cfg, builder)
  split, sizes, offset = _process_slice(builder, _eval_split(data_cfg), process_index, process_count)
  num_batches = -(-max(sizes) // local)
  padding = tf.data.Dataset.from_tensors(
      {'image': tf.zeros(image_shape, tf.float32), 'label': tf.constant(0, tf.int64),
       'mask': tf.constant(0.0)}).repeat(num_batches * local - sizes[process_index])
  ds = _source(data_cfg, builder, split, offset, in_memory=_in_memory(data_cfg, builder))
  ds = ds.map(_eval_example_fn(data_cfg, builder.info.features['image'].shape),
              num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.concatenate(padding).batch(local, drop_remainder=True)
  ds = ds.map(_finish_fn(data_cfg, image_shape[-1])).prefetch(tf.data.AUTOTUNE)
  yield from ds.with_options(_options()).as_numpy_iterator()
