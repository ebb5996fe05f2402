"""Image views in numpy and PIL, each drawn from uniforms of (key, example index): an example gets
the same view for the same key on any host, in any order, at any batch size.

    uniform(key, i)[j]   splitmix64 hash of (key, i, j) as a float in [0, 1)
    pad_crop             zero-pad by CROP_PAD, crop the original size at (⌊(2·PAD+1)·u₀⌋, ⌊(2·PAD+1)·u₁⌋)
    flip                 mirror left-right where u₀ < 1/2
    inception_crop       a box of 8–100 % of the area and aspect 3/4–4/3 (log-uniform), the first of
                         10 tries that fits, else the whole image; resized to size×size
    center_view          shorter side to size / crop_fraction, then the central size×size
    normalize            (x/255 − mean) / std in float32

Resizing is PIL's bilinear filter, which widens its support when shrinking (antialiased).
"""
from __future__ import annotations

import math

import numpy as np
from PIL import Image

CROP_PAD = 4
INCEPTION_TRIES = 10
INCEPTION_UNIFORMS = 2 * INCEPTION_TRIES + 2   # (area, aspect) per try, then (top, left)

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix(x: np.ndarray) -> np.ndarray:
  """splitmix64's finaliser on uint64 arrays (wrapping arithmetic)."""
  with np.errstate(over='ignore'):
    x = x + _GOLDEN
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def uniform(key: int, indices, count: int) -> np.ndarray:
  """``[len(indices), count]`` floats in [0, 1): draw ``j`` of example ``indices[n]`` under ``key``."""
  example = _mix(np.uint64(key) ^ _mix(np.asarray(indices, np.uint64)))
  with np.errstate(over='ignore'):
    draws = _mix(example[:, None] + _GOLDEN * np.arange(1, count + 1, dtype=np.uint64))
  return (draws >> np.uint64(11)).astype(np.float64) * 2.0 ** -53


def pad_crop(images: np.ndarray, u: np.ndarray) -> np.ndarray:
  """``[B, H, W, C]`` zero-padded by CROP_PAD, each cropped back to H×W at its offset from ``u[:, :2]``."""
  batch, height, width, _ = images.shape
  padded = np.pad(images, ((0, 0), (CROP_PAD, CROP_PAD), (CROP_PAD, CROP_PAD), (0, 0)))
  top, left = (np.floor(u[:, :2] * (2 * CROP_PAD + 1)).astype(np.int64)).T
  rows = top[:, None, None] + np.arange(height)[None, :, None]
  cols = left[:, None, None] + np.arange(width)[None, None, :]
  return padded[np.arange(batch)[:, None, None], rows, cols]


def flip(images: np.ndarray, u: np.ndarray) -> np.ndarray:
  """``[B, H, W, C]``, each mirrored left-right where its ``u`` < 1/2."""
  return np.where((u < 0.5)[:, None, None, None], images[:, :, ::-1], images)


def resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
  """uint8 ``[H, W, C]`` resized to ``height × width`` (bilinear, antialiased when shrinking)."""
  if image.shape[:2] == (height, width):
    return image
  pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
  out = np.asarray(pil.resize((width, height), Image.BILINEAR))
  return out[..., None] if image.shape[-1] == 1 else out


def inception_crop(image: np.ndarray, size: int, u: np.ndarray) -> np.ndarray:
  """A random box of the module docstring from ``u`` (INCEPTION_UNIFORMS floats), resized to size×size."""
  height, width = image.shape[:2]
  box = (0, 0, height, width)
  for t in range(INCEPTION_TRIES):
    area = height * width * (0.08 + 0.92 * u[2 * t])
    aspect = math.exp(math.log(3 / 4) + math.log(16 / 9) * u[2 * t + 1])
    h, w = int(round(math.sqrt(area / aspect))), int(round(math.sqrt(area * aspect)))
    if 0 < h <= height and 0 < w <= width:
      top = int(u[-2] * (height - h + 1))
      left = int(u[-1] * (width - w + 1))
      box = (top, left, h, w)
      break
  top, left, h, w = box
  return resize(image[top:top + h, left:left + w], size, size)


def center_view(image: np.ndarray, size, crop_fraction: float) -> np.ndarray:
  """Shorter side resized to ``size / crop_fraction``, then the central size×size (``size`` None:
  the image as it is)."""
  height, width = image.shape[:2]
  if not size or (height == width == size and crop_fraction == 1.0):
    return image
  scale = (size / crop_fraction) / min(height, width)
  new_h, new_w = max(int(round(height * scale)), size), max(int(round(width * scale)), size)
  image = resize(image, new_h, new_w)
  top, left = (new_h - size) // 2, (new_w - size) // 2
  return image[top:top + size, left:left + size]


def normalize(images: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
  """``(images / 255 − mean) / std`` in float32, per channel."""
  scale, shift = (1.0 / (255.0 * std)).astype(np.float32), (mean / std).astype(np.float32)
  return images.astype(np.float32) * scale - shift
