"""Writes image datasets as tfds datasets in ``array_record`` files, without TensorFlow.

A dataset written here is what ``tfds`` itself prepares (``data_dir/name/version`` with
``dataset_info.json``, ``features.json`` and one ``array_record`` file set per split), so
``tfds.builder(name, data_dir=...)``, ``tfds.data_source`` and :mod:`ghl_jax.train.data.pipeline`
read it like downloaded data. Images are stored PNG-encoded (by PIL) in an ``Image`` feature, as
the registered tfds builders store them; examples keep the order given (keys are their indices).
"""
from __future__ import annotations

import contextlib
import io
from typing import Iterator, Mapping, Optional

import numpy as np
from PIL import Image

# uint8 [N, H, W, C] images and int labels of each split.
Splits = Mapping[str, tuple]


def png(image: np.ndarray) -> bytes:
  """A uint8 ``[H, W, C]`` image (C = 1, 3 or 4) as PNG bytes."""
  out = io.BytesIO()
  Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(out, format='PNG')
  return out.getvalue()


def image_features(image_shape, *, num_classes: Optional[int] = None, label_names=None, with_id=False):
  """``FeaturesDict(image: Image(shape), label: ClassLabel[, id: Text])``, the layout of tfds's
  image-classification builders."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  label = (tfds.features.ClassLabel(names=list(label_names)) if label_names is not None
           else tfds.features.ClassLabel(num_classes=num_classes))
  fields = {'image': tfds.features.Image(shape=tuple(image_shape)), 'label': label}
  if with_id:
    fields['id'] = tfds.features.Text()
  return tfds.features.FeaturesDict(fields)


def write(name: str, version: str, features, splits: Splits, data_dir: str, *, with_id: bool = False,
          num_shards: Optional[int] = None, description: str = '', homepage: str = '',
          citation: str = '') -> str:
  """Writes ``splits`` as tfds dataset ``name:version`` with ``features`` into ``data_dir``; returns
  the dataset folder. ``with_id`` adds ``id = '<split>_<index:05d>'`` (the tfds cifar builders');
  ``num_shards`` files per split (None: tfds's choice)."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

  def examples(split: str, images: np.ndarray, labels: np.ndarray) -> Iterator:
    for index, (image, label) in enumerate(zip(images, labels)):
      example = {'image': png(image), 'label': int(label)}
      if with_id:
        example['id'] = f'{split}_{index:05d}'
      yield index, example

  class Writer(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """One-off builder: the given splits under the given name, version and features."""
    VERSION = tfds.core.Version(version)

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=features, description=description,
                                   homepage=homepage, citation=citation, disable_shuffling=True)

    def _split_generators(self, dl_manager):
      del dl_manager
      return {split: self._generate_examples(split) for split in splits}

    def _generate_examples(self, split):  # pylint: disable=arguments-differ
      return examples(split, *splits[split])

  Writer.name = name
  builder = Writer(data_dir=data_dir, file_format='array_record')
  tfds.display_progress_bar(False)
  with contextlib.redirect_stdout(io.StringIO()):     # tfds's own 'preparing ... prepared' lines
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(num_shards=num_shards))
  return str(builder.data_dir)
