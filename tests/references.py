"""Independent numpy re-implementations the tests compare the package against (float64,
written from the definitions, sharing no code with the package)."""

import numpy as np


def luma_np(images):
  return np.asarray(images, np.float64) @ np.array([0.299, 0.587, 0.114])


def zscore_np(x):
  x = np.asarray(x, np.float64)
  return (x - x.mean()) / x.std()


def minmax_np(x):
  x = np.asarray(x, np.float64)
  return (x - x.min()) / (x.max() - x.min())


def _axis_weights(n_in, n_out):
  """Bilinear upsampling along one axis: half-pixel centres, clamped at the edges."""
  src = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
  lo = np.floor(src).astype(int)
  hi = np.minimum(lo + 1, n_in - 1)
  frac = src - lo
  weights = np.zeros((n_out, n_in))
  np.add.at(weights, (np.arange(n_out), lo), 1 - frac)
  np.add.at(weights, (np.arange(n_out), hi), frac)
  return weights


def resize_np(channel, height, width):
  channel = np.asarray(channel, np.float64)
  h, w = channel.shape
  return _axis_weights(h, height) @ channel @ _axis_weights(w, width).T
