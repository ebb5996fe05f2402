"""Input pipeline: tfds array_record datasets through grain (no TensorFlow), with offline import of
local copies.

``info`` / ``steps_per_epoch`` describe a ``config.data``; ``train_batches`` is the endless,
resumable, per-process training stream; ``eval_batches`` one padded pass over the eval split;
``ensure_available`` checks (or downloads) the data before training starts.
"""
from ghl_jax.train.data.pipeline import (DatasetInfo, DatasetMissingError, default_config, ensure_available,
                                   eval_batches, info, steps_per_epoch, train_batches)

__all__ = ['DatasetInfo', 'DatasetMissingError', 'default_config', 'ensure_available', 'eval_batches',
           'info', 'steps_per_epoch', 'train_batches']
