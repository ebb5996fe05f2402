"""Offline import: local copies of CIFAR-10 / (Fashion-)MNIST written into a tfds data_dir.

The records are written (by :mod:`ghl_jax.train.data.store`, without TensorFlow) as ``array_record``
files under the registered tfds name and version, with the registered builder's features and split
names, so ``tfds.data_source(name, data_dir=D)`` and :mod:`ghl_jax.train.data.pipeline` read them
exactly like data tfds prepared::

    python -m ghl_jax.train.data.offline cifar10 --source /path/to/cifar10_npz --data_dir ~/tensorflow_datasets
    python -m ghl_jax.train.data.offline fashion_mnist --data_dir ~/tensorflow_datasets
    python -m ghl_jax.train.data.offline fashion_mnist --download --data_dir ~/tensorflow_datasets

Sources: ``cifar10`` reads ``train-*-of-*.npz`` shards (concatenated in shard order) and
``test.npz``, each with ``image`` uint8 [N,32,32,3] and ``label`` int [N]; ``mnist`` and
``fashion_mnist`` read the four IDX files (``{train,t10k}-{images-idx3,labels-idx1}-ubyte``,
gzipped or not); ``--download`` fetches those four files from the address tfds downloads them from
(into ``DATA_DIR/downloads/NAME``) and imports them. Examples are keyed by their index, as the tfds builders key them. A split whose
labels come sorted by class (some CIFAR-10 copies store the test images class by class) is written
in one fixed shuffled order, so that a slice such as ``test[:5000]`` samples every class.
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import gzip
import os
import shutil
import sys
import time
import urllib.parse
import urllib.request
from typing import Callable, Optional, Sequence

import numpy as np

from ghl_jax.train.data import store
from ghl_jax.train.data.sources import default_data_dir, prepared

CIFAR10_CLASSES = ('airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship',
                   'truck')

Splits = dict  # split name -> (images uint8 [N,H,W,C], labels int64 [N])


def _check_split(split: str, images: np.ndarray, labels: np.ndarray, source: str) -> None:
  if images.dtype != np.uint8 or images.ndim != 4:
    raise ValueError(f'{source}: {split} images must be uint8 [N,H,W,C], got {images.dtype} {images.shape}.')
  if labels.shape != (len(images),):
    raise ValueError(f'{source}: {split} has {len(images)} images but labels of shape {labels.shape}.')


def _class_mixed(images: np.ndarray, labels: np.ndarray) -> tuple:
  """``(images, labels)`` as given, or under a fixed permutation (seed 0) if sorted by class."""
  if len(np.unique(labels)) > 1 and np.all(np.diff(labels) >= 0):
    order = np.random.default_rng(0).permutation(len(labels))
    return images[order], labels[order]
  return images, labels


def read_cifar10_npz(source: str) -> Splits:
  """``{'train': ..., 'test': ...}`` from ``train-*-of-*.npz`` (in shard order) and ``test.npz``."""
  shards = sorted(glob.glob(os.path.join(source, 'train-*-of-*.npz')))
  test_path = os.path.join(source, 'test.npz')
  if not shards or not os.path.exists(test_path):
    raise ValueError(f'{source} must hold train-*-of-*.npz shards and test.npz (keys image, label); '
                     'pass the right --source.')
  splits = {}
  for split, paths in (('train', shards), ('test', [test_path])):
    parts = [np.load(path) for path in paths]
    images = np.concatenate([part['image'] for part in parts])
    labels = np.concatenate([part['label'] for part in parts]).astype(np.int64)
    _check_split(split, images, labels, source)
    splits[split] = _class_mixed(images, labels)
  return splits


def read_idx(path: str) -> np.ndarray:
  """One IDX file (``magic = 0x0000 08 ndim``, big-endian int32 dims, then uint8 data)."""
  opener = gzip.open if path.endswith('.gz') else open
  with opener(path, 'rb') as f:
    raw = f.read()
  if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
    raise ValueError(f'{path} is not an uint8 IDX file (magic {raw[:4].hex()}).')
  ndim = raw[3]
  dims = np.frombuffer(raw, dtype='>i4', count=ndim, offset=4).astype(np.int64)
  return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _find(source: str, stem: str) -> str:
  for path in (os.path.join(source, stem), os.path.join(source, stem + '.gz')):
    if os.path.exists(path):
      return path
  raise ValueError(f'{source} has no {stem}[.gz]; pass the folder with the four IDX files as --source.')


def read_mnist_idx(source: str) -> Splits:
  """``{'train': ..., 'test': ...}`` from the MNIST-format IDX files; images become [N,28,28,1]."""
  splits = {}
  for split, prefix in (('train', 'train'), ('test', 't10k')):
    images = read_idx(_find(source, f'{prefix}-images-idx3-ubyte'))[..., None]
    labels = read_idx(_find(source, f'{prefix}-labels-idx1-ubyte')).astype(np.int64)
    _check_split(split, images, labels, source)
    splits[split] = _class_mixed(images, labels)
  return splits


IDX_FILES = tuple(f'{prefix}-{kind}-ubyte.gz' for prefix in ('train', 't10k') for kind in ('images-idx3', 'labels-idx1'))


def download_idx(name: str, folder: str, *, timeout: float = 60.0, log: Callable[[str], None] = print) -> str:
  """The four IDX files of ``name`` (mnist, fashion_mnist) from tfds's address into ``folder``."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  base = tfds.builder_cls(name).URL
  os.makedirs(folder, exist_ok=True)
  for file in IDX_FILES:
    path = os.path.join(folder, file)
    if not os.path.exists(path):
      log(f'[offline] downloading {urllib.parse.urljoin(base, file)}')
      with urllib.request.urlopen(urllib.parse.urljoin(base, file), timeout=timeout) as response:
        data = response.read()
      with open(path + '.part', 'wb') as f:
        f.write(data)
      os.replace(path + '.part', path)
  return folder


@dataclasses.dataclass(frozen=True)
class Importer:
  read: Callable[[str], Splits]
  default_source: Optional[str] = None
  label_names: Optional[Sequence[str]] = None
  with_id: bool = False  # the tfds cifar builders also store an 'id' text feature
  downloadable: bool = False  # --download fetches its source files (download_idx)


# The CIFAR-10 npz copy in the shared folder beside the repository (shared/data/cifar10).
SHARED_CIFAR10 = os.path.normpath(os.path.join(os.path.dirname(__file__), '..', '..', '..', '..',
                                               'shared', 'data', 'cifar10'))

IMPORTERS = {
    'cifar10': Importer(read_cifar10_npz, SHARED_CIFAR10, CIFAR10_CLASSES, with_id=True),
    'fashion_mnist': Importer(read_mnist_idx, '/usr/share/datasets/fashion-mnist', downloadable=True),
    'mnist': Importer(read_mnist_idx, downloadable=True),
}


def download_and_import(name: str, data_dir: Optional[str] = None, *, force: bool = False,
                        log: Callable[[str], None] = print) -> str:
  """``--download``: the source files of ``name`` into ``DATA_DIR/downloads/NAME``, then the import."""
  if not IMPORTERS[name].downloadable:
    raise ValueError(f'--download fetches {sorted(n for n, i in IMPORTERS.items() if i.downloadable)}, '
                     f'not {name}; pass --source DIR.')
  data_dir = os.path.abspath(os.path.expanduser(data_dir or default_data_dir()))
  source = download_idx(name, os.path.join(data_dir, 'downloads', name), log=log)
  return import_dataset(name, source=source, data_dir=data_dir, force=force, log=log)


def import_command(name: str, data_dir: str) -> str:
  """The shell command that imports ``name`` into ``data_dir``."""
  source = IMPORTERS[name].default_source or 'DIR'
  return f'python -m ghl_jax.train.data.offline {name} --source {source} --data_dir {data_dir}'


def import_dataset(name: str, *, source: Optional[str] = None, data_dir: Optional[str] = None,
                   force: bool = False, log: Callable[[str], None] = print) -> str:
  """Writes ``name`` from ``source`` into ``data_dir`` as tfds would; returns the dataset folder.

  Skips the work when the registered builder already finds the data there as array_record, unless
  ``force``; data stored as tfrecord (the format of earlier versions) is written again.
  """
  import tensorflow_datasets as tfds  # heavy import, kept out of module import

  if name not in IMPORTERS:
    raise ValueError(f'No offline importer for {name!r}; known: {sorted(IMPORTERS)}.')
  importer = IMPORTERS[name]
  source = source or importer.default_source
  if not source:
    raise ValueError(f'{name} has no default source folder; pass --source DIR.')
  data_dir = os.path.abspath(os.path.expanduser(data_dir or default_data_dir()))
  registered = tfds.builder(name, data_dir=data_dir)
  target = str(registered.data_dir)
  if _stored_as_array_record(registered) and not force:
    log(f'[offline] {name} {registered.version} is already in {target}; nothing to do (--force rewrites).')
    return target
  if prepared(registered) and not force:
    log(f'[offline] {name} in {target} is stored as tfrecord; writing it again as array_record')
  if os.path.isdir(target):
    log(f'[offline] removing the old {target}')
    shutil.rmtree(target)

  start = time.time()
  log(f'[offline] reading {name} from {source}')
  splits = importer.read(source)
  for split, (images, labels) in splits.items():
    log(f'[offline]   {split}: {images.shape} {images.dtype}, labels {labels.min()}..{labels.max()}')
  features = registered.info.features
  if importer.label_names is not None:
    features['label'].names = list(importer.label_names)
  log(f'[offline] writing {name}:{registered.version} into {data_dir}')
  store.write(name, str(registered.version), features, splits, data_dir, with_id=importer.with_id,
              description=registered.info.description, homepage=registered.info.homepage,
              citation=registered.info.citation)

  readback = tfds.builder(name, data_dir=data_dir)
  counts = {split: readback.info.splits[split].num_examples for split in splits}
  for split, (images, _) in splits.items():
    if counts[split] != len(images):
      raise RuntimeError(f'{name}/{split}: wrote {len(images)} examples but tfds reads {counts[split]}.')
  log(f'[offline] done in {time.time() - start:.1f}s: {type(readback).__name__} reads {counts} from {target}')
  return target


def _stored_as_array_record(builder) -> bool:
  return prepared(builder) and str(builder.info.file_format.value) == 'array_record'


def is_imported(name: str, data_dir: Optional[str] = None) -> bool:
  """Whether ``name`` is in ``data_dir`` as array_record (what the input pipeline reads)."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  try:
    return _stored_as_array_record(tfds.builder(name, data_dir=data_dir))
  except Exception:  # pylint: disable=broad-except
    return False


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(
      prog='python -m ghl_jax.train.data.offline',
      description='Import a local dataset copy into a tfds data_dir under its registered tfds name.')
  parser.add_argument('dataset', choices=sorted(IMPORTERS))
  parser.add_argument('--source', default=None, help='folder with the local copy (default: per dataset)')
  parser.add_argument('--data_dir', default=None, help='tfds data_dir (default: $TFDS_DATA_DIR or '
                      '~/tensorflow_datasets)')
  parser.add_argument('--force', action='store_true', help='rewrite the dataset if it is already there')
  parser.add_argument('--download', action='store_true',
                      help='fetch the source files first (mnist, fashion_mnist), into DATA_DIR/downloads/NAME')
  parser.add_argument('--check', action='store_true',
                      help='only report whether the dataset is already in data_dir (exit status 0 or 1)')
  args = parser.parse_args(argv)
  if args.check:
    present = is_imported(args.dataset, args.data_dir)
    print(f'{args.dataset}: {"present" if present else "missing"} in {args.data_dir or "the default data_dir"}')
    return 0 if present else 1
  try:
    if args.download:
      download_and_import(args.dataset, args.data_dir, force=args.force)
    else:
      import_dataset(args.dataset, source=args.source, data_dir=args.data_dir, force=args.force)
  except (ValueError, OSError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  return 0


if __name__ == '__main__':
  sys.exit(main())
