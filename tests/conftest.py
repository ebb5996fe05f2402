"""Test setup: 8 simulated CPU devices, set before JAX initialises its backend."""
import os

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')

import jax  # noqa: E402

jax.config.update('jax_platforms', 'cpu')


# ------------------------------------------------------------------------------------------------
# Tiny tfds datasets (real tfrecords in a temp data_dir), read through the same code as real data.
import numpy as np  # noqa: E402
import pytest  # noqa: E402


def store_tiny_tfds(data_dir, name, image_shape, *, num_train=96, num_test=40, num_classes=10, seed=0,
                    ordered=True, num_shards=None):
  """Writes ``name`` (uint8 random images, labels ``i % num_classes``) into ``data_dir``.

  ``ordered`` keeps the insertion order on disk (else tfds shuffles by key, as for real data).
  """
  import tensorflow_datasets as tfds

  rng = np.random.default_rng(seed)
  features = tfds.features.FeaturesDict({
      'image': tfds.features.Image(shape=image_shape),
      'label': tfds.features.ClassLabel(num_classes=num_classes)})

  def examples(count):
    images = rng.integers(0, 256, (count, *image_shape), dtype=np.uint8)
    return [(i, {'image': images[i], 'label': i % num_classes}) for i in range(count)]

  tfds.dataset_builders.store_as_tfds_dataset(
      name=name, version='1.0.0', features=features, data_dir=str(data_dir), disable_shuffling=ordered,
      split_datasets={'train': examples(num_train), 'test': examples(num_test)},
      download_config=tfds.download.DownloadConfig(num_shards=num_shards))
  return str(data_dir), name


@pytest.fixture(scope='session')
def tiny_tfds(tmp_path_factory):
  """(data_dir, name): 32x32x3 images, 10 classes, 96 train / 40 test examples."""
  return store_tiny_tfds(tmp_path_factory.mktemp('tfds_rgb'), 'tiny_rgb', (32, 32, 3))


@pytest.fixture(scope='session')
def tiny_tfds_gray(tmp_path_factory):
  """(data_dir, name): 28x28x1 images, 10 classes, 96 train / 40 test examples."""
  return store_tiny_tfds(tmp_path_factory.mktemp('tfds_gray'), 'tiny_gray', (28, 28, 1), seed=1)
