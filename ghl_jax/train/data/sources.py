"""Where a ``config.data`` dataset lives and how its examples are read: tfds ``array_record`` data
sources, random access, no TensorFlow.

A split is read by index: ``Split(cfg, name)[i]`` is example ``i`` as ``(uint8 [H,W,C], label)``.
Process ``p`` of ``P`` owns the contiguous slice ``[start_p, start_p + size_p)`` of a split (the
first ``n mod P`` slices one example longer). Small splits are decoded once into host memory.
"""
from __future__ import annotations

import dataclasses
import functools
import io
import math
import os
from typing import Sequence

import numpy as np
from PIL import Image

IN_MEMORY_MAX_BYTES = 4 << 30  # decoded uint8 train split; above this, examples are read per batch
DEFAULTS = dict(data_dir=None, download=False, manual_dir=None, train_split='train',
                eval_split=None, augment='none', image_size=None, normalize='half', in_memory=None)


class DatasetMissingError(ValueError):
  """The dataset is not prepared in the data_dir (as array_record) and may not be downloaded."""


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  num_classes: int
  image_shape: tuple  # (H, W, C) after preprocessing
  num_train: int
  num_eval: int


def get(cfg, field: str):
  """``cfg.field``, or its default when the config lacks it."""
  return cfg.get(field, DEFAULTS[field])


def base_name(cfg) -> str:
  return cfg.name.split(':')[0].split('/')[0]


def default_data_dir() -> str:
  """``$TFDS_DATA_DIR``, else tfds's default ``~/tensorflow_datasets``."""
  return os.environ.get('TFDS_DATA_DIR') or os.path.join(os.path.expanduser('~'), 'tensorflow_datasets')


def data_dir(cfg) -> str:
  return os.path.abspath(os.path.expanduser(get(cfg, 'data_dir') or default_data_dir()))


def eval_split(cfg) -> str:
  return get(cfg, 'eval_split') or ('validation' if base_name(cfg) == 'imagenet2012' else 'test')


def _missing_message(cfg, where: str) -> str:
  from ghl_jax.train.data import offline  # here, not at the top: offline.py also runs as __main__
  name = base_name(cfg)
  if name in offline.IMPORTERS:
    return (f'{name} is not in {where} (offline): run `{offline.import_command(name, where)}`, '
            'or set config.data.download=True when online.')
  if name == 'imagenet2012':
    return (f'imagenet2012 is not in {where}: put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar '
            'in config.data.manual_dir and set config.data.download=True (tfds prepares it from there; '
            'preparing needs TensorFlow: pip install "ghl_jax[prepare]").')
  return (f'{cfg.name} is not in {where} (offline): set config.data.download=True when online, '
          'or point config.data.data_dir at a tfds data_dir that holds it.')


def _tfrecord_message(cfg, where: str) -> str:
  from ghl_jax.train.data import offline  # pylint: disable=import-outside-toplevel
  name = base_name(cfg)
  if name in offline.IMPORTERS:
    return (f'{cfg.name} in {where} is stored as tfrecord, which the input pipeline (grain) does not read: '
            f'import it again as array_record with `{offline.import_command(name, where)}`.')
  return (f'{cfg.name} in {where} is stored as tfrecord, which the input pipeline (grain) does not read: '
          'convert it with `tfds convert_format --dataset_dir DIR --out_file_format array_record` '
          '(needs TensorFlow: pip install "ghl_jax[prepare]").')


def _prepare(builder, cfg) -> None:
  """Downloads and prepares ``cfg.name`` as array_record: (Fashion-)MNIST through the offline importer
  (no TensorFlow), anything else through tfds (which needs TensorFlow for most datasets)."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  from ghl_jax.train.data import offline  # pylint: disable=import-outside-toplevel
  importer = offline.IMPORTERS.get(base_name(cfg))
  if importer is not None and importer.downloadable:
    offline.download_and_import(base_name(cfg), data_dir(cfg), force=True)
    return
  manual_dir = get(cfg, 'manual_dir')
  try:
    builder.download_and_prepare(file_format='array_record', download_config=tfds.download.DownloadConfig(
        manual_dir=os.path.expanduser(manual_dir) if manual_dir else None))
  except ImportError as error:
    raise DatasetMissingError(f'Preparing {cfg.name} needs {error.name or "TensorFlow"}: pip install '
                              f'"ghl_jax[prepare]", or import the data offline.') from None


def prepared(found) -> bool:
  """Whether tfds finished writing the builder's dataset (asked only where its info file exists, so
  that tfds logs no warning about an empty folder)."""
  return os.path.exists(os.path.join(str(found.data_dir), 'dataset_info.json')) and found.is_prepared()


def builder(cfg):
  """The prepared tfds builder of ``cfg.name`` (array_record); downloads only when ``cfg.download``."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  where = data_dir(cfg)
  try:
    found = tfds.builder(cfg.name, data_dir=where)
  except tfds.core.registered.DatasetNotFoundError:
    raise DatasetMissingError(_missing_message(cfg, where)) from None
  if not prepared(found):
    if not get(cfg, 'download'):
      raise DatasetMissingError(_missing_message(cfg, where))
    _prepare(found, cfg)
    found = tfds.builder(cfg.name, data_dir=where)
  if str(found.info.file_format.value) != 'array_record':
    raise DatasetMissingError(_tfrecord_message(cfg, where))
  return found


def image_shape(cfg, found) -> tuple:
  """(H, W, C) of the images the pipeline yields."""
  height, width, channels = found.info.features['image'].shape
  size = get(cfg, 'image_size')
  if size:
    return (int(size), int(size), channels)
  if height is None or width is None:
    raise ValueError(f'{cfg.name} images have no fixed size; set config.data.image_size.')
  return (height, width, channels)


def process_slice(total: int, process_index: int, process_count: int) -> tuple:
  """(start, sizes of every process's slice) of a split of ``total`` examples."""
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index {process_index} must lie in [0, {process_count}).')
  sizes = [total // process_count + (p < total % process_count) for p in range(process_count)]
  return sum(sizes[:process_index]), sizes


def decode(encoded, channels: int) -> np.ndarray:
  """uint8 ``[H, W, C]`` pixels of an encoded image (PNG, JPEG, ...) or of an already decoded array."""
  if isinstance(encoded, np.ndarray) and encoded.dtype == np.uint8 and encoded.ndim == 3:
    return encoded
  with Image.open(io.BytesIO(encoded)) as image:
    image = image.convert('L' if channels == 1 else 'RGB')
    pixels = np.asarray(image)
  return pixels[..., None] if channels == 1 else pixels


class Split:
  """Random access to one split: ``split[i] = (uint8 image [H,W,C], int label)``, images decoded by
  PIL from the stored bytes (``split.read(indices)`` for many)."""

  def __init__(self, found, name: str):
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
    self.source = found.as_data_source(name, decoders={'image': tfds.decode.SkipDecoding()})
    self.channels = found.info.features['image'].shape[-1]
    self.stored_shape = found.info.features['image'].shape

  def __len__(self) -> int:
    return len(self.source)

  def read(self, indices: Sequence[int]) -> tuple:
    """``([uint8 image], int64 labels)`` of the examples at ``indices``."""
    examples = self.source.__getitems__([int(i) for i in indices])
    return ([decode(ex['image'], self.channels) for ex in examples],
            np.array([ex['label'] for ex in examples], np.int64))


def in_memory(cfg, found) -> bool:
  """Whether the train split is decoded once into host memory (``config.data.in_memory``, else when
  its fixed-size uint8 images fit in :data:`IN_MEMORY_MAX_BYTES`)."""
  choice = get(cfg, 'in_memory')
  if choice is not None:
    return bool(choice)
  shape = found.info.features['image'].shape
  if None in shape:
    return False
  return found.info.splits[get(cfg, 'train_split')].num_examples * math.prod(shape) <= IN_MEMORY_MAX_BYTES


@functools.lru_cache(maxsize=8)
def decoded(where: str, name: str, split: str, start: int, stop: int) -> tuple:
  """``(images uint8 [N,H,W,C], labels int64 [N])`` of examples ``[start, stop)`` of a split,
  decoded once per process."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  source = Split(tfds.builder(name, data_dir=where), split)
  images, labels = [], []
  for chunk in range(start, stop, 4096):
    part = source.read(range(chunk, min(chunk + 4096, stop)))
    images.extend(part[0])
    labels.append(part[1])
  shape = source.stored_shape
  stacked = np.stack(images) if images else np.zeros((0, *shape), np.uint8)
  return stacked, np.concatenate(labels) if labels else np.zeros((0,), np.int64)


def dataset_info(cfg, found, shape: tuple) -> DatasetInfo:
  splits = found.info.splits
  return DatasetInfo(num_classes=found.info.features['label'].num_classes, image_shape=shape,
                     num_train=splits[get(cfg, 'train_split')].num_examples,
                     num_eval=splits[eval_split(cfg)].num_examples)

