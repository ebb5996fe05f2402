"""Test setup: 8 simulated CPU devices, set before JAX initialises its backend."""
import os

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')

import jax  # noqa: E402

jax.config.update('jax_platforms', 'cpu')


# ------------------------------------------------------------------------------------------------
# Tiny tfds datasets (real array_record files in a temp data_dir), read through the same code as real data.
import numpy as np  # noqa: E402
import pytest  # noqa: E402


def store_tiny_tfds(data_dir, name, image_shape, *, num_train=96, num_test=40, num_classes=10, seed=0,
                    ordered=True, num_shards=None):
  """Writes ``name`` (uint8 random images, labels ``i % num_classes``) into ``data_dir``.

  ``ordered`` keeps the insertion order on disk (else the examples are stored in a shuffled order,
  as tfds stores real data), in ``num_shards`` files per split (tfds's choice when None).
  """
  from ghl_jax.train.data import store

  rng = np.random.default_rng(seed)

  def split(count):
    images = rng.integers(0, 256, (count, *image_shape), dtype=np.uint8)
    labels = np.arange(count) % num_classes
    order = np.arange(count) if ordered else rng.permutation(count)
    return images[order], labels[order]

  store.write(name, '1.0.0', store.image_features(image_shape, num_classes=num_classes),
              {'train': split(num_train), 'test': split(num_test)}, str(data_dir), num_shards=num_shards)
  return str(data_dir), name


@pytest.fixture(scope='session')
def tiny_tfds(tmp_path_factory):
  """(data_dir, name): 32x32x3 images, 10 classes, 96 train / 40 test examples."""
  return store_tiny_tfds(tmp_path_factory.mktemp('tfds_rgb'), 'tiny_rgb', (32, 32, 3))


@pytest.fixture(scope='session')
def tiny_tfds_gray(tmp_path_factory):
  """(data_dir, name): 28x28x1 images, 10 classes, 96 train / 40 test examples."""
  return store_tiny_tfds(tmp_path_factory.mktemp('tfds_gray'), 'tiny_gray', (28, 28, 1), seed=1)
