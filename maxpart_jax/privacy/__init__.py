"""Privacy of an intermediate representation (IR): the paper's score (docs/method.md §4, Eq. 1-2).

This package is where privacy lives: the score here, the inversion attacks that test it in
:mod:`~maxpart_jax.privacy.attacks`, privacy per block and layer in
:mod:`~maxpart_jax.privacy.profile`.

    P(x, IR) = min_i dist(x, resize(IR[..., i]))

Every channel of the IR the edge sends is read as a grayscale image, resized to the input's
height and width and compared with the input; the most input-like channel decides, since an
eavesdropper would look at exactly that one. A low score means the IR reveals the input.

Decisions (the paper leaves them open; docs/method.md §4 summarizes them):

* Resize: ``jax.image.resize(..., method="bilinear")`` of each (h, w) channel to (H, W):
  half-pixel centres with edge clamping (TF2 / PyTorch ``align_corners=False`` convention);
  when the IR is larger than the input, jax antialiases with the scaled triangle filter.
  Resizing happens before normalization, so the compared images are normalized exactly.
* ``mse``: the input becomes grayscale (ITU-R BT.601 luma), both images are normalized per
  image (``normalization``: ``"zscore"`` by default, or ``"minmax"`` to [0, 1]) and the mean
  squared difference is taken. Normalization makes the score independent of the arbitrary
  scale and offset of activations. With z-scores, MSE = 2 (1 - Pearson r): 0 for a perfect
  copy, 2 for an uncorrelated channel, 4 for an inverted copy; a constant image correlates
  with nothing, so its z-score MSE is set to 2 (comparing its zeros would give 1 and let a
  dead channel look more input-like than noise). Under min-max a constant image is all zeros.
* ``mse_abs``: ``mse`` that also counts a channel's negative as a copy: the smaller of the
  distances to the channel and to its negative, 2 (1 - |r|) under z-scores. Plain ``mse``
  scores an inverted copy of the input (r = -1) as 4, "more private" than noise, although
  an eavesdropper sees the image in it just as well. The search uses ``mse`` (the paper's
  Eq. 1) unless ``fitness.metric`` says otherwise; ``results/options/`` compares the two.
* ``ssim``: ``1 - SSIM`` with the Wang et al. (2004) Gaussian window (11x11, sigma 1.5,
  K1 = 0.01, K2 = 0.03), means over the valid region. SSIM's constants assume a known data
  range and its luminance term assumes intensities, so both images are always min-max scaled
  to [0, 1] and the data range is 1, whatever ``normalization`` says (a z-scored image has no
  fixed range; any per-image affine normalization followed by min-max scaling gives the same
  images anyway). Needs H, W >= 11.
* ``kl``: KL(softmax(f(x)) || softmax(f(c))), where f is ``classify_fn`` (images in [0, 1] to
  logits; the caller wraps the model's input normalization into it), x the RGB input and c
  the resized channel min-max scaled to [0, 1] and replicated to three channels, i.e. shown to
  the classifier as a gray image. ``normalization`` does not apply.
* A constant image (range <= 1e-5 of its peak magnitude, which also catches the rounding
  ripple that resizing leaves on a constant channel) normalizes to all zeros instead of
  amplifying that ripple into a unit-variance pattern.
"""

from __future__ import annotations

from typing import Callable

import dm_pix
import jax
import jax.numpy as jnp

METRICS = ("mse", "mse_abs", "ssim", "kl")
NORMALIZATIONS = ("zscore", "minmax")
LUMA_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R BT.601
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03
FLAT_RTOL = 1e-5  # an image whose range is below this fraction of its peak counts as constant
ZSCORE_MSE_UNCORRELATED = 2.0  # z-score MSE = 2 (1 - r) at r = 0

ClassifyFn = Callable[[jax.Array], jax.Array]


def to_grayscale(images: jax.Array) -> jax.Array:
  """BT.601 luma ``0.299 R + 0.587 G + 0.114 B`` of images (..., 3) -> (...)."""
  # an elementwise sum, not a matmul: accelerators may run matmuls at reduced precision
  return jnp.sum(images * jnp.asarray(LUMA_WEIGHTS, dtype=images.dtype), axis=-1)


def standardize(x: jax.Array, method: str = "zscore") -> jax.Array:
  """Normalize one image over all its elements: z-score or min-max to [0, 1].

  Removes the arbitrary scale and offset of activations before images are compared.
  A constant image (see ``FLAT_RTOL``) maps to zeros instead of dividing by ~0. For a
  batch, ``jax.vmap`` this function.
  """
  return _normalize(x, method)[0]


def channel_distances(
    images: jax.Array,
    ir: jax.Array,
    metric: str = "mse",
    *,
    normalization: str = "zscore",
    classify_fn: ClassifyFn | None = None,
) -> jax.Array:
  """Distance between each input and each of its IR channels, shape (B, C).

  ``images`` (B, H, W, 3) in [0, 1]; ``ir`` (B, h, w, C) of any scale. Vmapped over
  channels, then over the batch. See the module docstring for the metrics. For ``kl``,
  ``classify_fn`` runs on all B * C channel images at once: chunk the batch to bound memory.
  """
  images, ir = jnp.asarray(images), jnp.asarray(ir)
  _validate(images, ir, metric, normalization, classify_fn)
  dtype = jnp.result_type(images.dtype, ir.dtype, jnp.float32)
  images, ir = images.astype(dtype), ir.astype(dtype)
  height, width = images.shape[1:3]

  def one_image(image: jax.Array, feature_map: jax.Array) -> jax.Array:
    if metric in ("mse", "mse_abs"):
      ref, ref_flat = _normalize(to_grayscale(image), normalization)
    elif metric == "ssim":
      ref = standardize(to_grayscale(image), "minmax")
    else:
      ref = jax.nn.log_softmax(_logits(classify_fn, image))

    def one_channel(channel: jax.Array) -> jax.Array:
      channel = jax.image.resize(channel, (height, width), method="bilinear")
      if metric in ("mse", "mse_abs"):
        normalized, flat = _normalize(channel, normalization)
        mse = jnp.mean((ref - normalized)**2)
        if metric == "mse_abs":
          mse = jnp.minimum(mse, jnp.mean((ref - _normalize(-channel, normalization)[0])**2))
        if normalization == "zscore":
          mse = jnp.where(ref_flat | flat, ZSCORE_MSE_UNCORRELATED, mse)
        return mse
      if metric == "ssim":
        channel = standardize(channel, "minmax")
        ssim = dm_pix.ssim(
            ref[..., None],
            channel[..., None],
            max_val=1.0,
            filter_size=SSIM_WINDOW,
            filter_sigma=SSIM_SIGMA,
            k1=SSIM_K1,
            k2=SSIM_K2,
        )
        return 1.0 - ssim
      gray = jnp.repeat(standardize(channel, "minmax")[..., None], 3, axis=-1)
      log_q = jax.nn.log_softmax(_logits(classify_fn, gray))
      return jnp.sum(jnp.exp(ref) * (ref - log_q))

    return jax.vmap(one_channel)(jnp.moveaxis(feature_map, -1, 0))

  return jax.vmap(one_image)(images, ir)


def flat_channels(ir: jax.Array) -> jax.Array:
  """(B, C) whether each IR channel is constant over its image (the ``FLAT_RTOL`` rule).

  An edge whose every channel is flat for every image sends nothing about its input, and
  nothing the cloud can classify: its privacy score (2 under z-scores) is meaningless.
  """
  per_channel = jax.vmap(lambda c: _normalize(c, "zscore")[1], in_axes=-1)
  return jax.vmap(per_channel)(jnp.asarray(ir))


def privacy_score(
    images: jax.Array,
    ir: jax.Array,
    metric: str = "mse",
    *,
    normalization: str = "zscore",
    classify_fn: ClassifyFn | None = None,
    return_index: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
  """P(x, IR) per image, shape (B,): the distance to the most input-like IR channel.

  Higher is more private. With ``return_index`` also returns the (B,) index of that
  channel, e.g. to show it next to the input. Jittable with ``metric``, ``normalization``,
  ``classify_fn`` and ``return_index`` static.
  """
  distances = channel_distances(images,
                                ir,
                                metric,
                                normalization=normalization,
                                classify_fn=classify_fn)
  scores = jnp.min(distances, axis=-1)
  if return_index:
    return scores, jnp.argmin(distances, axis=-1)
  return scores


def mean_privacy(
    images: jax.Array,
    ir: jax.Array,
    metric: str = "mse",
    *,
    normalization: str = "zscore",
    classify_fn: ClassifyFn | None = None,
) -> jax.Array:
  """Model-level privacy: the mean of P over a fixed set of evaluation images."""
  return jnp.mean(
      privacy_score(images, ir, metric, normalization=normalization, classify_fn=classify_fn))


def _normalize(x: jax.Array, method: str) -> tuple[jax.Array, jax.Array]:
  """``standardize`` plus a flag saying whether ``x`` was constant."""
  _check_choice("normalization", method, NORMALIZATIONS)
  peak = jnp.max(jnp.abs(x))
  x = x / jnp.where(peak > 0, peak, 1)  # now in [-1, 1]: the tolerance is relative
  lo, hi = jnp.min(x), jnp.max(x)
  flat = hi - lo <= FLAT_RTOL
  if method == "zscore":
    centered = x - jnp.mean(x)
    scale = jnp.sqrt(jnp.mean(centered**2))
    out = centered / jnp.where(flat, 1, scale)
  else:
    out = (x - lo) / jnp.where(flat, 1, hi - lo)
  return jnp.where(flat, jnp.zeros_like(out), out), flat


def _logits(classify_fn: ClassifyFn, image: jax.Array) -> jax.Array:
  """Logits (K,) of one (H, W, 3) image, through the caller's batched classifier."""
  logits = classify_fn(image[None])
  if logits.ndim != 2 or logits.shape[0] != 1:
    raise ValueError("classify_fn must map images (N, H, W, 3) to logits (N, num_classes); "
                     f"for N=1 it returned shape {logits.shape}")
  return logits[0]


def _check_choice(name: str, value: str, valid: tuple[str, ...]) -> None:
  if value not in valid:
    raise ValueError(f"unknown {name} {value!r}; valid: {', '.join(valid)}")


def _validate(
    images: jax.Array,
    ir: jax.Array,
    metric: str,
    normalization: str,
    classify_fn: ClassifyFn | None,
) -> None:
  """Shape, option and (for concrete arrays) finiteness checks with explicit messages."""
  _check_choice("metric", metric, METRICS)
  _check_choice("normalization", normalization, NORMALIZATIONS)
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"images must have shape (B, H, W, 3); got {images.shape}")
  if not jnp.issubdtype(images.dtype, jnp.floating):
    raise ValueError(f"images must be floating point in [0, 1]; got dtype {images.dtype}")
  if ir.ndim != 4:
    raise ValueError(f"ir must have shape (B, h, w, C); got {ir.shape}")
  if images.shape[0] != ir.shape[0]:
    raise ValueError(f"batch sizes differ: images has {images.shape[0]}, ir has {ir.shape[0]}")
  if metric == "ssim" and min(images.shape[1:3]) < SSIM_WINDOW:
    raise ValueError(f"ssim needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW} (its window); "
                     f"got {images.shape[1]}x{images.shape[2]}")
  if metric == "kl" and classify_fn is None:
    raise ValueError("metric 'kl' needs classify_fn (images in [0, 1] -> logits)")
  for name, array in (("images", images), ("ir", ir)):
    if not isinstance(array, jax.core.Tracer):
      bad = int(jnp.sum(~jnp.isfinite(array)))
      if bad:
        raise ValueError(f"{name} contains {bad} NaN or inf value(s) of {array.size}")
