"""Tests for maxpart_jax.privacy against independent numpy / scikit-image references."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from skimage.metrics import structural_similarity

from maxpart_jax import privacy
from references import luma_np, minmax_np, resize_np, zscore_np

NUM_CLASSES = 10
STATIC = ("metric", "normalization", "classify_fn", "return_index")

pytestmark = pytest.mark.numerics  # tolerances that face float rounding (docs/testing.md)


# ----------------------------------------------------------------------------- references
def log_softmax_np(logits):
  logits = logits - logits.max()
  return logits - np.log(np.exp(logits).sum())


def make_linear_classifier(height, width, seed=0):
  """A fixed random linear map of the flattened image to logits, in jnp and in numpy."""
  rng = np.random.default_rng(seed)
  dim = height * width * 3
  weights = (rng.normal(size=(dim, NUM_CLASSES)) * 3 / np.sqrt(dim)).astype(np.float32)
  bias = rng.normal(size=NUM_CLASSES).astype(np.float32)

  def classify_fn(x):
    return jnp.dot(x.reshape(x.shape[0], -1), weights, precision="highest") + bias

  def classify_np(image):
    return np.asarray(image, np.float64).reshape(-1) @ weights.astype(np.float64) + bias

  return classify_fn, classify_np


def random_inputs(seed, batch=2, size=(16, 16), ir_size=(8, 8), channels=4, ir_scale=5.0):
  rng = np.random.default_rng(seed)
  images = rng.random((batch, *size, 3)).astype(np.float32)
  ir = (ir_scale * rng.normal(size=(batch, *ir_size, channels))).astype(np.float32)
  return images, ir


# -------------------------------------------------------------------------------- helpers
def test_to_grayscale_is_bt601_luma():
  images, _ = random_inputs(0)
  np.testing.assert_allclose(privacy.to_grayscale(images), luma_np(images), atol=1e-6)


@pytest.mark.parametrize("method,reference", [("zscore", zscore_np), ("minmax", minmax_np)])
def test_standardize_matches_numpy(method, reference):
  x = 7.0 * np.random.default_rng(1).normal(size=(9, 11)).astype(np.float32) + 3.0
  np.testing.assert_allclose(privacy.standardize(x, method), reference(x), atol=1e-5)


# ------------------------------------------------------------------------------- resizing
def test_resize_is_bilinear_half_pixel_exact_on_linear_ramp():
  """A linear ramp IR, upsampled by different factors along each axis, is reproduced
  exactly (clamped at the borders), so a gray input equal to that ramp scores 0."""
  (h, w), (height, width) = (6, 10), (18, 20)
  ramp = 0.7 * np.arange(h)[:, None] - 0.3 * np.arange(w)[None, :]
  src_i = np.clip((np.arange(height) + 0.5) * h / height - 0.5, 0, h - 1)
  src_j = np.clip((np.arange(width) + 0.5) * w / width - 0.5, 0, w - 1)
  expected = 0.7 * src_i[:, None] - 0.3 * src_j[None, :]
  np.testing.assert_allclose(resize_np(ramp, height, width), expected, atol=1e-12)

  gray = minmax_np(expected).astype(np.float32)
  images = np.repeat(gray[None, :, :, None], 3, axis=-1)
  ir = np.stack([ramp, np.flipud(ramp)], axis=-1)[None].astype(np.float32)
  distances = privacy.channel_distances(images, ir, "mse")
  assert distances[0, 0] < 1e-10
  assert distances[0, 1] > 0.1  # the same values upside down are not a copy


def test_constant_channel_is_uncorrelated_not_amplified_ripple():
  images, _ = random_inputs(2, batch=1)
  ir = np.full((1, 7, 7, 2), 3.3, np.float32)
  ir[..., 1] = 0.0  # a dead ReLU channel
  ripple = np.ptp(np.asarray(jax.image.resize(ir[0, :, :, 0], (16, 16), "bilinear")))
  if jax.default_backend() == "cpu":
    # On the CPU, resizing a constant leaves rounding ripple, so the guard is exercised;
    # a GPU's resize kept this constant exact (seen on an H200), and the score must agree.
    assert ripple > 0
  np.testing.assert_allclose(privacy.channel_distances(images, ir, "mse"), 2.0, atol=1e-6)
  gray = minmax_np(luma_np(images[0]))
  np.testing.assert_allclose(
      privacy.channel_distances(images, ir, "mse", normalization="minmax"),
      np.full((1, 2), np.mean(gray**2)),
      rtol=1e-5,
  )
  assert np.all(np.isfinite(privacy.channel_distances(images, ir, "ssim")))


# ------------------------------------------------------------------------------ mse / ssim
@pytest.mark.parametrize("metric", ["mse", "ssim"])
@pytest.mark.parametrize("normalization", ["zscore", "minmax"])
def test_copy_of_grayscale_input_scores_zero(metric, normalization):
  images, _ = random_inputs(3, batch=3, ir_size=(16, 16))
  rng = np.random.default_rng(4)
  ir = rng.normal(size=(3, 16, 16, 5)).astype(np.float32)
  copy_at = np.array([0, 4, 2])
  for b, c in enumerate(copy_at):
    ir[b, :, :, c] = 40.0 * luma_np(images[b]) - 3.0
  scores, index = privacy.privacy_score(images,
                                        ir,
                                        metric,
                                        normalization=normalization,
                                        return_index=True)
  np.testing.assert_allclose(scores, 0.0, atol=1e-5)
  np.testing.assert_array_equal(index, copy_at)
  distances = privacy.channel_distances(images, ir, metric, normalization=normalization)
  others = np.ones(distances.shape, bool)
  others[np.arange(3), copy_at] = False
  assert np.min(np.asarray(distances)[others]) > 0.05  # noise channels are far away


@pytest.mark.parametrize("ir_size", [(16, 16), (8, 4)])
@pytest.mark.parametrize("normalization", ["zscore", "minmax"])
def test_mse_matches_numpy_loop(ir_size, normalization):
  images, ir = random_inputs(5, ir_size=ir_size, channels=3)
  # make channel 1 close to the input so the minimum is not decided by noise alone
  for b in range(2):
    ir[b, :, :, 1] += 5.0 * resize_np(luma_np(images[b]), *ir_size)
  normalize = zscore_np if normalization == "zscore" else minmax_np
  expected = np.empty((2, 3))
  for b in range(2):
    ref = normalize(luma_np(images[b]))
    for c in range(3):
      channel = normalize(resize_np(ir[b, :, :, c], 16, 16))
      expected[b, c] = np.mean((ref - channel)**2)
  distances = privacy.channel_distances(images, ir, "mse", normalization=normalization)
  np.testing.assert_allclose(distances, expected, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(
      privacy.privacy_score(images, ir, normalization=normalization),
      expected.min(axis=1),
      rtol=1e-4,
  )


@pytest.mark.parametrize("normalization", ["zscore", "minmax"])
def test_mse_abs_scores_an_inverted_copy_as_a_copy(normalization):
  """Catches mse_abs ignoring the sign (an inverted copy scoring 4) or changing plain mse."""
  images, ir = random_inputs(7, ir_size=(16, 16), channels=3)
  for b in range(2):
    ir[b, :, :, 0] = -luma_np(images[b])  # an inverted copy of the input
  mse = privacy.channel_distances(images, ir, "mse", normalization=normalization)
  both = privacy.channel_distances(images, ir, "mse_abs", normalization=normalization)
  normalize = zscore_np if normalization == "zscore" else minmax_np
  for b in range(2):
    ref = normalize(luma_np(images[b]))
    for c in range(3):
      plain = np.mean((ref - normalize(ir[b, :, :, c]))**2)
      negated = np.mean((ref - normalize(-ir[b, :, :, c]))**2)
      assert mse[b, c] == pytest.approx(plain, rel=1e-4, abs=1e-6)
      assert both[b, c] == pytest.approx(min(plain, negated), rel=1e-4, abs=1e-6)
      if normalization == "zscore":  # 2 (1 - |r|)
        r = np.corrcoef(ref.ravel(), ir[b, :, :, c].ravel())[0, 1]
        assert both[b, c] == pytest.approx(2 * (1 - abs(r)), rel=1e-4, abs=1e-6)
  np.testing.assert_allclose(both[:, 0], 0.0, atol=1e-5)
  if normalization == "zscore":
    np.testing.assert_allclose(mse[:, 0], 4.0, rtol=1e-5)


def test_ssim_matches_skimage():
  images, ir = random_inputs(6, size=(24, 20), ir_size=(12, 5), channels=3)
  # a smooth first image and a channel that resembles it, so the SSIMs span a wide range
  coarse = np.random.default_rng(60).random((12, 5, 3))
  images[0] = np.stack([resize_np(coarse[..., k], 24, 20) for k in range(3)], axis=-1)
  ir[0, :, :, 2] = 8.0 * luma_np(coarse) + 0.5 * ir[0, :, :, 2]
  expected = np.empty((2, 3))
  for b in range(2):
    ref = minmax_np(luma_np(images[b]))
    for c in range(3):
      channel = minmax_np(resize_np(ir[b, :, :, c], 24, 20))
      expected[b, c] = 1.0 - structural_similarity(
          ref,
          channel,
          gaussian_weights=True,
          sigma=1.5,
          use_sample_covariance=False,
          data_range=1.0,
      )
  distances = privacy.channel_distances(images, ir, "ssim")
  np.testing.assert_allclose(distances, expected, atol=1e-4)
  assert expected[0, 2] < 0.5 < expected[0, :2].min()  # the similar channel stands out


@pytest.mark.parametrize("metric", ["mse", "ssim"])
@pytest.mark.parametrize("normalization", ["zscore", "minmax"])
def test_invariant_to_positive_scale_and_shift_of_ir(metric, normalization):
  images, ir = random_inputs(7, channels=3)
  ir[..., 0] += 3.0 * np.stack([resize_np(luma_np(im), 8, 8) for im in images])
  base = privacy.channel_distances(images, ir, metric, normalization=normalization)
  for scale, shift in [(37.0, 0.0), (0.01, 0.0), (2.5, 11.0), (1.0, -4.0)]:
    moved = privacy.channel_distances(images,
                                      scale * ir + shift,
                                      metric,
                                      normalization=normalization)
    np.testing.assert_allclose(moved, base, atol=2e-5)


# ------------------------------------------------------------------------------------- kl
def test_kl_matches_numpy_loop():
  images, ir = random_inputs(8, size=(12, 12), ir_size=(6, 6), channels=3)
  classify_fn, classify_np = make_linear_classifier(12, 12)
  expected = np.empty((2, 3))
  for b in range(2):
    log_p = log_softmax_np(classify_np(images[b]))
    for c in range(3):
      gray = minmax_np(resize_np(ir[b, :, :, c], 12, 12))
      log_q = log_softmax_np(classify_np(np.repeat(gray[..., None], 3, axis=-1)))
      expected[b, c] = np.sum(np.exp(log_p) * (log_p - log_q))
  assert expected.min() > 1e-3  # the reference is not trivially zero
  distances = privacy.channel_distances(images, ir, "kl", classify_fn=classify_fn)
  np.testing.assert_allclose(distances, expected, rtol=1e-4, atol=1e-6)
  scores, index = privacy.privacy_score(images,
                                        ir,
                                        "kl",
                                        classify_fn=classify_fn,
                                        return_index=True)
  np.testing.assert_allclose(scores, expected.min(axis=1), rtol=1e-4, atol=1e-6)
  np.testing.assert_array_equal(index, expected.argmin(axis=1))


def test_kl_is_zero_for_a_channel_that_shows_the_classifier_the_input():
  """A gray input spanning [0, 1] and an IR channel equal to it: after min-max scaling and
  replication the classifier sees the input itself, so the KL is 0."""
  rng = np.random.default_rng(9)
  gray = rng.random((2, 12, 12))
  gray[:, 0, 0], gray[:, -1, -1] = 0.0, 1.0
  images = np.repeat(gray[..., None], 3, axis=-1).astype(np.float32)
  ir = rng.normal(size=(2, 12, 12, 4)).astype(np.float32)
  ir[0, :, :, 3] = gray[0]
  ir[1, :, :, 1] = gray[1]
  classify_fn, _ = make_linear_classifier(12, 12, seed=1)
  scores, index = privacy.privacy_score(images,
                                        ir,
                                        "kl",
                                        classify_fn=classify_fn,
                                        return_index=True)
  np.testing.assert_allclose(scores, 0.0, atol=1e-6)
  np.testing.assert_array_equal(index, [3, 1])
  distances = privacy.channel_distances(images, ir, "kl", classify_fn=classify_fn)
  assert np.sort(np.asarray(distances), axis=1)[:, 1].min() > 1e-3


# ------------------------------------------------------------------------------------ jit
@pytest.mark.parametrize("metric", ["mse", "ssim", "kl"])
def test_jit_matches_eager(metric):
  images, ir = random_inputs(10, channels=3)
  classify_fn, _ = make_linear_classifier(16, 16)
  kwargs = dict(classify_fn=classify_fn if metric == "kl" else None, return_index=True)
  eager = privacy.privacy_score(images, ir, metric, **kwargs)
  jitted = jax.jit(privacy.privacy_score, static_argnames=STATIC)(images, ir, metric, **kwargs)
  np.testing.assert_allclose(jitted[0], eager[0], rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(jitted[1], eager[1])
  mean = jax.jit(privacy.mean_privacy,
                 static_argnames=STATIC[:3])(images, ir, metric, classify_fn=kwargs["classify_fn"])
  np.testing.assert_allclose(mean, np.mean(eager[0]), rtol=1e-5)


# --------------------------------------------------------------------------------- errors
def _bad_classifier(x):
  return jnp.zeros((NUM_CLASSES,))


_IMAGES, _IR = random_inputs(11, ir_size=(4, 4), channels=2)
_NAN_IMAGES = _IMAGES.copy()
_NAN_IMAGES[0, 1, 2, 0] = np.nan
_INF_IR = _IR.copy()
_INF_IR[1, 0, 0, 1] = np.inf


@pytest.mark.parametrize(
    "images,ir,kwargs,message",
    [
        (_IMAGES, _IR, dict(metric="psnr"), r"unknown metric 'psnr'; valid: mse, mse_abs, ssim, kl"),
        (_IMAGES, _IR, dict(normalization="l2"), r"unknown normalization 'l2'; valid: zscore"),
        (_IMAGES[0], _IR, {}, r"images must have shape \(B, H, W, 3\); got \(16, 16, 3\)"),
        (_IMAGES[..., :1], _IR, {}, r"images must have shape \(B, H, W, 3\)"),
        ((_IMAGES * 255).astype(np.uint8), _IR, {}, r"images must be floating point"),
        (_IMAGES, _IR[0], {}, r"ir must have shape \(B, h, w, C\); got \(4, 4, 2\)"),
        (_IMAGES, _IR[:1], {}, r"batch sizes differ: images has 2, ir has 1"),
        (_NAN_IMAGES, _IR, {}, r"images contains 1 NaN or inf"),
        (_IMAGES, _INF_IR, {}, r"ir contains 1 NaN or inf"),
        (_IMAGES, _IR, dict(metric="kl"), r"metric 'kl' needs classify_fn"),
        (_IMAGES[:, :10], _IR, dict(metric="ssim"), r"ssim needs images of at least 11x11"),
        (
            _IMAGES,
            _IR,
            dict(metric="kl", classify_fn=_bad_classifier),
            r"classify_fn must map .* returned shape \(10,\)",
        ),
    ],
)
def test_bad_inputs_raise_clear_errors(images, ir, kwargs, message):
  with pytest.raises(ValueError, match=message):
    privacy.privacy_score(images, ir, **kwargs)


def test_errors_also_raised_under_jit_for_static_problems():
  scorer = jax.jit(functools.partial(privacy.privacy_score, metric="kl"))
  with pytest.raises(ValueError, match="needs classify_fn"):
    scorer(_IMAGES, _IR)
