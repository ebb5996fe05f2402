"""TensorBoard event files without TensorFlow.

Each summary is written as the protocol buffer ``tf.summary`` would write (a tensor plus the plugin
that reads it), in TensorBoard's record format (TensorBoard's ``RecordWriter`` over a local file,
``events.out.tfevents.<time>.<host>``), so the Scalars, Text, Images and HParams tabs show them:

    scalar   float tensor []                      plugin 'scalars'
    text     string tensor []                     plugin 'text'
    image    string tensor [width, height, PNG]   plugin 'images'
    hparams  TensorBoard's hparams session summary (dotted names of a nested dict)
"""
from __future__ import annotations

import os
import socket
import time
from typing import Any, Mapping

import numpy as np
from tensorboard.compat.proto import event_pb2, summary_pb2, tensor_pb2, tensor_shape_pb2, types_pb2
from tensorboard.plugins.hparams import summary_v2 as hparams_summary
from tensorboard.summary.writer.record_writer import RecordWriter

from ghl_jax.train.data import store

HPARAM_TYPES = (bool, int, float, str, np.bool_, np.integer, np.floating)


def _tensor(dtype, shape, **values) -> tensor_pb2.TensorProto:
  dims = [tensor_shape_pb2.TensorShapeProto.Dim(size=size) for size in shape]
  return tensor_pb2.TensorProto(dtype=dtype, tensor_shape=tensor_shape_pb2.TensorShapeProto(dim=dims), **values)


def _value(tag: str, plugin: str, tensor: tensor_pb2.TensorProto) -> summary_pb2.Summary.Value:
  metadata = summary_pb2.SummaryMetadata(plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name=plugin))
  return summary_pb2.Summary.Value(tag=tag, metadata=metadata, tensor=tensor)


def png(image: np.ndarray) -> bytes:
  """``[H, W, C]`` uint8, or floats in [0, 1], as PNG bytes (:func:`ghl_jax.train.data.store.png`)."""
  image = np.asarray(image)
  if image.dtype != np.uint8:
    image = np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)
  return store.png(image)


def flat_hparams(tree: Mapping[str, Any], prefix: str = '') -> dict:
  """``{'a.b': value}`` of a nested mapping; values TensorBoard cannot show as hparams become text."""
  out = {}
  for key, value in tree.items():
    name = f'{prefix}{key}'
    if isinstance(value, Mapping):
      out.update(flat_hparams(value, name + '.'))
    else:
      out[name] = value if isinstance(value, HPARAM_TYPES) else str(value)
  return out


class SummaryWriter:
  """Scalars, text, images and hparams into ``logdir``'s event file."""

  def __init__(self, logdir: str):
    os.makedirs(logdir, exist_ok=True)
    now = time.time()
    self.path = os.path.join(logdir, f'events.out.tfevents.{now:.0f}.{socket.gethostname()}.{os.getpid()}')
    self._writer = RecordWriter(open(self.path, 'wb'))  # pylint: disable=consider-using-with
    self._write(event_pb2.Event(wall_time=now, file_version='brain.Event:2'))

  def _write(self, event: event_pb2.Event) -> None:
    self._writer.write(event.SerializeToString())

  def _add(self, step: int, *values: summary_pb2.Summary.Value) -> None:
    self._write(event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary_pb2.Summary(value=list(values))))

  def scalar(self, tag: str, value: float, step: int) -> None:
    self._add(step, _value(tag, 'scalars', _tensor(types_pb2.DT_FLOAT, (), float_val=[float(value)])))

  def text(self, tag: str, text: str, step: int) -> None:
    self._add(step, _value(tag, 'text', _tensor(types_pb2.DT_STRING, (), string_val=[text.encode()])))

  def image(self, tag: str, image: np.ndarray, step: int) -> None:
    """One ``[H, W, C]`` image (uint8, or floats in [0, 1])."""
    height, width = np.shape(image)[:2]
    data = [str(width).encode(), str(height).encode(), png(image)]
    self._add(step, _value(tag, 'images', _tensor(types_pb2.DT_STRING, (3,), string_val=data)))

  def hparams(self, tree: Mapping[str, Any]) -> None:
    self._add(0, *hparams_summary.hparams_pb(flat_hparams(tree)).value)

  def flush(self) -> None:
    self._writer.flush()

  def close(self) -> None:
    self._writer.close()
