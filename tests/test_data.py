"""ghl_jax.data: shapes, normalisation, determinism, resume, per-process slices, eval padding,
augmentation, missing data and the offline importer, on tiny tfds datasets in temp dirs.

References are plain numpy on the stored uint8 pixels (read back with tfds's data source); examples
are identified by their pixel bytes, which are unique in the random tiny datasets.
"""
import functools
import gzip
import io
import itertools
import json
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from conftest import store_tiny_tfds
from ghl_jax.train import data
from ghl_jax.train.data import offline

BATCH = 16  # 96 train examples -> 6 steps per epoch


def _config(dataset, **overrides):
  data_dir, name = dataset
  cfg = data.default_config(name)
  cfg.data_dir = data_dir
  cfg.update(overrides)
  return cfg


def _load(name, split, data_dir):
  """``{feature: stacked values}`` of a whole split as stored, read by index with tfds's data source."""
  source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  examples = [source[i] for i in range(len(source))]
  return {key: np.stack([example[key] for example in examples]) for key in examples[0]}


def _stored(dataset, split):
  """(images uint8, labels) exactly as stored."""
  data_dir, name = dataset
  arrays = _load(name, split, data_dir)
  return arrays['image'], arrays['label']


def _pixels(images):
  """Inverse of normalize='unit' (x/255), checked to land on integers."""
  scaled = images * 255.0
  assert np.allclose(scaled, np.rint(scaled), atol=1e-3)
  return np.rint(scaled).astype(np.uint8)


def _keys(images_uint8):
  return [image.tobytes() for image in images_uint8]


@pytest.fixture(scope='module')
def sharded_tfds(tmp_path_factory):
  """Like tiny_tfds, but stored the way real data is: 4 shards, shuffled by key."""
  return store_tiny_tfds(tmp_path_factory.mktemp('tfds_sharded'), 'tiny_sharded', (32, 32, 3),
                         ordered=False, num_shards=4)


def _take(iterator, count):
  return list(itertools.islice(iterator, count))


def _assert_same_batches(first, second):
  assert len(first) == len(second)
  for a, b in zip(first, second):
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['label'], b['label'])


# ------------------------------------------------------------------------------------------------
# info, shapes, dtypes, normalisation

def test_info_and_steps_per_epoch(tiny_tfds, tiny_tfds_gray):
  assert data.info(_config(tiny_tfds)) == data.DatasetInfo(10, (32, 32, 3), 96, 40)
  assert data.info(_config(tiny_tfds_gray)) == data.DatasetInfo(10, (28, 28, 1), 96, 40)
  assert data.info(_config(tiny_tfds, image_size=24)).image_shape == (24, 24, 3)
  assert data.steps_per_epoch(_config(tiny_tfds), BATCH) == 6
  assert data.steps_per_epoch(_config(tiny_tfds), 50) == 1
  with pytest.raises(ValueError, match='exceeds'):
    data.steps_per_epoch(_config(tiny_tfds), 97)


@pytest.mark.parametrize('fixture,shape', [('tiny_tfds', (32, 32, 3)), ('tiny_tfds_gray', (28, 28, 1))])
def test_batch_shapes_and_dtypes(request, fixture, shape):
  cfg = _config(request.getfixturevalue(fixture), augment='crop_flip')
  train = next(data.train_batches(cfg, batch_size=8, seed=0, process_count=2))
  assert set(train) == {'image', 'label'}
  assert train['image'].shape == (4, *shape) and train['image'].dtype == np.float32
  assert train['label'].shape == (4,) and train['label'].dtype == np.int32
  evaluation = next(data.eval_batches(cfg, batch_size=8))
  assert set(evaluation) == {'image', 'label', 'mask'}
  assert evaluation['image'].shape == (8, *shape) and evaluation['image'].dtype == np.float32
  assert evaluation['label'].dtype == np.int32 and evaluation['mask'].dtype == np.float32


@pytest.mark.parametrize('normalize,mean,std', [
    ('half', (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    ('unit', (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
    ('imagenet', (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
])
def test_normalization_matches_numpy(tiny_tfds, normalize, mean, std):
  images, labels = _stored(tiny_tfds, 'train')
  reference = (images.astype(np.float64) / 255.0 - np.array(mean)) / np.array(std)
  batch = next(data.train_batches(_config(tiny_tfds, normalize=normalize), batch_size=BATCH, seed=3))
  for image, label in zip(batch['image'], batch['label']):
    matches = np.flatnonzero(np.all(np.abs(reference - image) < 1e-5, axis=(1, 2, 3)))
    assert len(matches) == 1 and labels[matches[0]] == label
  evaluation = next(data.eval_batches(_config(tiny_tfds, normalize=normalize), batch_size=BATCH))
  test_images, _ = _stored(tiny_tfds, 'test')
  test_reference = (test_images.astype(np.float64) / 255.0 - np.array(mean)) / np.array(std)
  assert np.abs(np.sort(evaluation['image'].ravel()) - np.sort(test_reference[:BATCH].ravel())).max() < 1e-5


# ------------------------------------------------------------------------------------------------
# determinism, resume, epochs, process slices

STREAMS = [('tiny_tfds', True), ('tiny_tfds', False), ('sharded_tfds', False)]  # (dataset, in_memory)


@pytest.mark.parametrize('fixture,in_memory', STREAMS)
def test_same_seed_same_batches(request, fixture, in_memory):
  cfg = _config(request.getfixturevalue(fixture), augment='crop_flip', in_memory=in_memory)
  first = _take(data.train_batches(cfg, batch_size=BATCH, seed=7), 8)
  _assert_same_batches(first, _take(data.train_batches(cfg, batch_size=BATCH, seed=7), 8))
  other = _take(data.train_batches(cfg, batch_size=BATCH, seed=8), 8)
  assert not np.array_equal(first[0]['image'], other[0]['image'])


@pytest.mark.parametrize('fixture,in_memory', STREAMS)
def test_resume_equals_uninterrupted(request, fixture, in_memory):
  cfg = _config(request.getfixturevalue(fixture), augment='crop_flip', in_memory=in_memory)
  stream = functools.partial(data.train_batches, cfg, batch_size=BATCH, seed=1, process_index=1,
                             process_count=2)
  uninterrupted = _take(stream(), 13)  # 6 steps per epoch
  for start in (4, 6, 9):  # inside epoch 0, at the epoch boundary, inside epoch 1
    _assert_same_batches(uninterrupted[start:], _take(stream(start_step=start), 13 - start))


@pytest.mark.parametrize('fixture,in_memory', STREAMS)
def test_each_epoch_is_a_new_permutation(request, fixture, in_memory):
  dataset = request.getfixturevalue(fixture)
  images, _ = _stored(dataset, 'train')
  cfg = _config(dataset, normalize='unit', in_memory=in_memory)
  batches = _take(data.train_batches(cfg, batch_size=BATCH, seed=0), 12)
  epochs = [_keys(_pixels(np.concatenate([b['image'] for b in batches[e * 6:(e + 1) * 6]]))) for e in (0, 1)]
  for epoch in epochs:
    assert sorted(epoch) == sorted(_keys(images))
  assert epochs[0] != epochs[1] and epochs[0] != _keys(images)


@pytest.mark.parametrize('batch_size,process_count,in_memory', [(16, 2, True), (24, 3, False)])
def test_process_slices_are_disjoint_and_cover_the_split(tiny_tfds, batch_size, process_count, in_memory):
  images, labels = _stored(tiny_tfds, 'train')
  label_of = dict(zip(_keys(images), labels))
  cfg = _config(tiny_tfds, normalize='unit', in_memory=in_memory)
  steps = data.steps_per_epoch(cfg, batch_size)
  seen = []
  for index in range(process_count):
    batches = _take(data.train_batches(cfg, batch_size=batch_size, seed=0, process_index=index,
                                       process_count=process_count), steps)
    assert all(b['image'].shape[0] == batch_size // process_count for b in batches)
    for batch in batches:
      keys = _keys(_pixels(batch['image']))
      assert [label_of[k] for k in keys] == batch['label'].tolist()
      seen += keys
  assert len(seen) == len(set(seen)) == steps * batch_size == len(images)


@pytest.mark.parametrize('batch_size,process_count,num_batches,in_memory',
                         [(16, 1, 3, True), (16, 2, 3, True), (12, 3, 4, False)])
def test_eval_counts_every_example_once(tiny_tfds, batch_size, process_count, num_batches, in_memory):
  images, labels = _stored(tiny_tfds, 'test')
  label_of = dict(zip(_keys(images), labels))
  cfg = _config(tiny_tfds, normalize='unit', in_memory=in_memory)
  seen, batch_counts = [], set()
  for index in range(process_count):
    batches = list(data.eval_batches(cfg, batch_size=batch_size, process_index=index,
                                     process_count=process_count))
    batch_counts.add(len(batches))
    for batch in batches:
      assert batch['image'].shape[0] == batch['mask'].shape[0] == batch_size // process_count
      assert set(np.unique(batch['mask'])) <= {0.0, 1.0}
      real = batch['mask'] == 1.0
      keys = _keys(_pixels(batch['image'][real]))
      assert [label_of[k] for k in keys] == batch['label'][real].tolist()
      seen += keys
  assert batch_counts == {num_batches}  # ceil(largest slice / local batch) on every process
  assert sorted(seen) == sorted(_keys(images))


# ------------------------------------------------------------------------------------------------
# augmentation and resizing

def _padded_views(image, pad=4):
  """Every zero-padded crop of the original size, with and without a horizontal flip."""
  height, width, _ = image.shape
  padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)))
  for top, left, flip in itertools.product(range(2 * pad + 1), range(2 * pad + 1), (False, True)):
    view = padded[top:top + height, left:left + width]
    yield (top, left, flip), (view[:, ::-1] if flip else view)


def test_augment_none_vs_crop_flip(tiny_tfds):
  images, _ = _stored(tiny_tfds, 'train')
  plain = _take(data.train_batches(_config(tiny_tfds, normalize='unit'), batch_size=BATCH, seed=5), 6)
  assert sorted(_keys(_pixels(np.concatenate([b['image'] for b in plain])))) == sorted(_keys(images))

  view_of = {view.tobytes(): (index, where) for index, image in enumerate(images)
             for where, view in _padded_views(image)}
  cfg = _config(tiny_tfds, normalize='unit', augment='crop_flip')
  augmented = _take(data.train_batches(cfg, batch_size=BATCH, seed=5), 12)
  found = [view_of[key] for b in augmented for key in _keys(_pixels(b['image']))]
  assert sorted(index for index, _ in found[:96]) == list(range(96))  # one view of each per epoch
  offsets = {where[:2] for _, where in found}
  flips = [where[2] for _, where in found]
  assert len(offsets) > 20 and 0.3 < np.mean(flips) < 0.7
  first_epoch, second_epoch = dict(found[:96]), dict(found[96:])
  assert sum(first_epoch[i] != second_epoch[i] for i in range(96)) > 80  # fresh draws each epoch


def test_inception_crop_and_eval_resize(tiny_tfds):
  cfg = _config(tiny_tfds, augment='inception', image_size=24)
  batch = next(data.train_batches(cfg, batch_size=BATCH, seed=0))
  assert batch['image'].shape == (BATCH, 24, 24, 3)
  assert -1.0 - 1e-5 <= batch['image'].min() and batch['image'].max() <= 1.0 + 1e-5
  evaluation = next(data.eval_batches(cfg, batch_size=BATCH))
  assert evaluation['image'].shape == (BATCH, 24, 24, 3)
  resized = next(data.eval_batches(_config(tiny_tfds, image_size=16), batch_size=BATCH))
  assert resized['image'].shape == (BATCH, 16, 16, 3)


def test_dataset_normalization_on_gray_and_bad_options(tiny_tfds, tiny_tfds_gray):
  with pytest.raises(ValueError, match='augment'):
    data.info(_config(tiny_tfds, augment='mixup'))
  with pytest.raises(ValueError, match='normalize'):
    data.info(_config(tiny_tfds, normalize='zca'))
  with pytest.raises(ValueError, match="normalize='dataset'"):
    data.info(_config(tiny_tfds_gray, normalize='dataset'))
  with pytest.raises(ValueError, match='channels'):
    data.info(_config(tiny_tfds_gray, normalize='imagenet'))
  with pytest.raises(ValueError, match='multiple of the process count'):
    next(data.train_batches(_config(tiny_tfds), batch_size=15, seed=0, process_count=2))


# ------------------------------------------------------------------------------------------------
# missing data and the offline importer

def test_missing_dataset_names_the_import_command(tmp_path):
  cfg = data.default_config('cifar10')
  cfg.data_dir = str(tmp_path)
  with pytest.raises(data.DatasetMissingError) as missing:
    data.ensure_available(cfg)
  message = str(missing.value)
  assert isinstance(missing.value, ValueError) and '\n' not in message
  assert 'python -m ghl_jax.train.data.offline cifar10 --source ' in message
  assert f'--data_dir {tmp_path}' in message and 'download=True' in message
  with pytest.raises(data.DatasetMissingError, match='not in'):
    data.info(cfg)
  cfg.name = 'no_such_dataset'
  with pytest.raises(data.DatasetMissingError, match='no_such_dataset is not in'):
    data.ensure_available(cfg)


def _as_tfrecord(dataset_folder):
  """Marks a stored dataset as written in tfrecord files (the format of the tf.data pipeline)."""
  path = os.path.join(dataset_folder, 'dataset_info.json')
  with open(path) as f:
    info = json.load(f)
  info['fileFormat'] = 'tfrecord'
  with open(path, 'w') as f:
    json.dump(info, f)


def test_tfrecord_data_gets_one_line_and_the_importer_rewrites_it(tmp_path, capsys):
  """Data stored as tfrecord (earlier versions, or tfds's default) is refused in one line naming the
  way out; the offline importer writes it again as array_record."""
  data_dir, name = store_tiny_tfds(tmp_path / 'tiny', 'tiny_old', (8, 8, 3), num_train=10, num_test=5)
  _as_tfrecord(os.path.join(data_dir, name, '1.0.0'))
  with pytest.raises(data.DatasetMissingError) as error:
    data.ensure_available(_config((data_dir, name)))
  assert 'stored as tfrecord' in str(error.value) and 'tfds convert_format' in str(error.value)
  assert '\n' not in str(error.value)

  source, cifar_dir = tmp_path / 'npz', str(tmp_path / 'tfds')
  source.mkdir()
  rng = np.random.default_rng(3)
  for file, count in (('train-00000-of-00001.npz', 10), ('test.npz', 4)):
    np.savez(source / file, image=rng.integers(0, 256, (count, 32, 32, 3), dtype=np.uint8),
             label=rng.integers(0, 10, count))
  assert offline.main(['cifar10', '--source', str(source), '--data_dir', cifar_dir]) == 0
  _as_tfrecord(os.path.join(cifar_dir, 'cifar10', '3.0.2'))
  cfg = data.default_config('cifar10')
  cfg.data_dir = cifar_dir
  with pytest.raises(data.DatasetMissingError, match='stored as tfrecord.*python -m ghl_jax.train.data.offline cifar10'):
    data.ensure_available(cfg)
  assert offline.main(['cifar10', '--check', '--data_dir', cifar_dir]) == 1
  capsys.readouterr()
  assert offline.main(['cifar10', '--source', str(source), '--data_dir', cifar_dir]) == 0
  assert 'stored as tfrecord; writing it again as array_record' in capsys.readouterr().out
  assert data.info(cfg).num_train == 10


def test_download_only_when_allowed(tmp_path, monkeypatch):
  calls = []

  def fake_download_and_prepare(builder, download_config=None, **_):
    calls.append((builder.name, str(download_config.manual_dir)))
    raise ConnectionError('no network in tests')

  monkeypatch.setattr(tfds.core.DatasetBuilder, 'download_and_prepare', fake_download_and_prepare)
  cfg = data.default_config('imagenet2012')
  cfg.update(data_dir=str(tmp_path), manual_dir=str(tmp_path / 'manual'))
  with pytest.raises(data.DatasetMissingError, match='manual_dir'):
    data.ensure_available(cfg)
  assert not calls
  cfg.download = True
  with pytest.raises(ConnectionError):
    data.ensure_available(cfg)
  assert calls == [('imagenet2012', str(tmp_path / 'manual'))]


def _write_idx(path, array):
  header = bytes([0, 0, 0x08, array.ndim]) + np.array(array.shape, dtype='>i4').tobytes()
  with gzip.open(path, 'wb') as f:
    f.write(header + array.astype(np.uint8).tobytes())


def test_offline_cifar10_npz_round_trip(tmp_path, capsys):
  rng = np.random.default_rng(0)
  source, data_dir = tmp_path / 'npz', str(tmp_path / 'tfds')
  source.mkdir()
  split_arrays = {'train': (rng.integers(0, 256, (12, 32, 32, 3), dtype=np.uint8), np.arange(12) % 10),
                  'test': (rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8), np.arange(6)[::-1])}
  train_images, train_labels = split_arrays['train']
  np.savez_compressed(source / 'train-00000-of-00002.npz', image=train_images[:7], label=train_labels[:7])
  np.savez_compressed(source / 'train-00001-of-00002.npz', image=train_images[7:], label=train_labels[7:])
  np.savez_compressed(source / 'test.npz', image=split_arrays['test'][0], label=split_arrays['test'][1])

  assert offline.main(['cifar10', '--source', str(source), '--data_dir', data_dir]) == 0
  builder = tfds.builder('cifar10', data_dir=data_dir)
  assert type(builder).__name__ == 'Cifar10' and str(builder.version) == '3.0.2'
  assert builder.info.features['label'].names[:2] == ['airplane', 'automobile']
  for split, (images, labels) in split_arrays.items():
    stored = _load('cifar10', split, data_dir)
    order = np.argsort([int(i.decode().rsplit('_', 1)[1]) for i in stored['id']])
    np.testing.assert_array_equal(stored['image'][order], images)
    np.testing.assert_array_equal(stored['label'][order], labels)
  assert offline.main(['cifar10', '--source', str(source), '--data_dir', data_dir]) == 0
  assert 'already' in capsys.readouterr().out

  cfg = data.default_config('cifar10')
  cfg.update(data_dir=data_dir, normalize='dataset')
  data.ensure_available(cfg)
  batch = next(data.eval_batches(cfg, batch_size=6))
  mean, std = np.array([0.4914, 0.4822, 0.4465]), np.array([0.2470, 0.2435, 0.2616])
  reference = (split_arrays['test'][0] / 255.0 - mean) / std
  assert np.abs(np.sort(batch['image'].ravel()) - np.sort(reference.ravel())).max() < 1e-5


def test_offline_fashion_mnist_idx_round_trip(tmp_path):
  rng = np.random.default_rng(1)
  source, data_dir = tmp_path / 'idx', str(tmp_path / 'tfds')
  source.mkdir()
  split_arrays = {}
  for split, prefix, count in (('train', 'train', 10), ('test', 't10k', 4)):
    images, labels = rng.integers(0, 256, (count, 28, 28), dtype=np.uint8), rng.integers(0, 10, count)
    _write_idx(source / f'{prefix}-images-idx3-ubyte.gz', images)
    _write_idx(source / f'{prefix}-labels-idx1-ubyte.gz', labels)
    split_arrays[split] = (images[..., None], labels)

  offline.import_dataset('fashion_mnist', source=str(source), data_dir=data_dir, log=lambda _: None)
  builder = tfds.builder('fashion_mnist', data_dir=data_dir)
  assert type(builder).__name__ == 'FashionMNIST' and str(builder.version) == '3.0.1'
  for split, (images, labels) in split_arrays.items():
    stored = _load('fashion_mnist', split, data_dir)
    assert sorted(zip(_keys(stored['image']), stored['label'])) == sorted(zip(_keys(images), labels))
  cfg = data.default_config('fashion_mnist')
  cfg.data_dir = data_dir
  assert data.info(cfg) == data.DatasetInfo(10, (28, 28, 1), 10, 4)


def test_offline_download_fetches_the_four_idx_files_and_imports_them(tmp_path, monkeypatch, capsys):
  """``--download`` (and ``config.data.download=True``): the four IDX files from tfds's address (here
  served from memory), then the import, no TensorFlow; a dataset without a download is refused in one line."""
  rng = np.random.default_rng(2)
  served, fetched = {}, []
  for prefix, count in (('train', 12), ('t10k', 5)):
    for kind, array in (('images-idx3', rng.integers(0, 256, (count, 28, 28))), ('labels-idx1', np.arange(count) % 10)):
      path = tmp_path / f'{prefix}-{kind}-ubyte.gz'
      _write_idx(path, array)
      served[path.name] = path.read_bytes()

  def urlopen(url, timeout):
    assert url.startswith(tfds.builder_cls('fashion_mnist').URL) and timeout > 0
    fetched.append(url.rsplit('/', 1)[1])
    return io.BytesIO(served[fetched[-1]])

  monkeypatch.setattr(offline.urllib.request, 'urlopen', urlopen)
  data_dir = str(tmp_path / 'tfds')
  assert offline.main(['fashion_mnist', '--download', '--data_dir', data_dir]) == 0
  assert sorted(fetched) == sorted(offline.IDX_FILES)
  cfg = data.default_config('fashion_mnist')
  cfg.data_dir = data_dir
  assert data.info(cfg) == data.DatasetInfo(10, (28, 28, 1), 12, 5)
  assert offline.main(['cifar10', '--download', '--data_dir', data_dir]) == 1
  assert "--download fetches ['fashion_mnist', 'mnist'], not cifar10" in capsys.readouterr().err
  fetched.clear()                                   # config.data.download=True takes the same way
  cfg.update(data_dir=str(tmp_path / 'other'), download=True)
  data.ensure_available(cfg)
  assert sorted(fetched) == sorted(offline.IDX_FILES) and data.info(cfg).num_eval == 5


def test_offline_cifar10_class_sorted_split_is_mixed_once(tmp_path):
  """A test split stored class by class (as the shared CIFAR-10 copy is) is written in a fixed
  shuffled order: every slice samples all classes; a mixed split keeps its order."""
  source = tmp_path / 'npz'
  source.mkdir()
  rng = np.random.default_rng(0)
  sorted_labels = np.repeat(np.arange(10), 20)
  train_labels = rng.integers(0, 10, 50)
  test_images = np.arange(200, dtype=np.uint8)[:, None, None, None] * np.ones((1, 32, 32, 3), np.uint8)
  np.savez(source / 'train-00000-of-00001.npz', image=rng.integers(0, 256, (50, 32, 32, 3), dtype=np.uint8),
           label=train_labels)
  np.savez(source / 'test.npz', image=test_images, label=sorted_labels)
  first, second = offline.read_cifar10_npz(str(source)), offline.read_cifar10_npz(str(source))
  images, labels = first['test']
  np.testing.assert_array_equal(labels, second['test'][1])          # one fixed order
  np.testing.assert_array_equal(sorted_labels[images[:, 0, 0, 0]], labels)   # pairs kept
  assert len(set(labels[:40].tolist())) == 10                        # a slice sees every class
  np.testing.assert_array_equal(first['train'][1], train_labels)   # already mixed: untouched


def test_read_idx_rejects_other_files(tmp_path):
  path = os.path.join(tmp_path, 'bad-idx3-ubyte')
  with open(path, 'wb') as f:
    f.write(b'\x00\x00\x0d\x01' + b'\x00' * 8)  # float IDX, not uint8
  with pytest.raises(ValueError, match='not an uint8 IDX'):
    offline.read_idx(path)
