"""Inversion attacks: they invert what must be invertible, fail where the IR forgets, are pure
functions of their key, and refuse bad input."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REAL_DIR, SHIPPED_MODEL, needs_real
from experiments.configs import attacks as attack_configs
from maxpart_jax import checkpoint, data, runs
from maxpart_jax.privacy import attacks
from maxpart_jax.quant import QuantPolicy
from maxpart_jax.studies import attack_study
from maxpart_jax.jobs import rows as study_rows

# Small enough for the suite; results/attacks/ uses the study's larger settings.
FAST_DECODER = attacks.DecoderConfig(steps=100, batch_size=32, width=16)


# dm_pix computes SSIM in float32: its variance terms E[x^2] - mu^2 of [0, 1] images carry
# absolute errors of a few 2^-24, against the constant C2 = 0.03^2 = 9e-4 that bounds the
# denominator from below: up to ~1e-4 relative per pixel in the worst case (9e-6 measured
# on the stem's reconstructions). A window or constant unlike skimage's moves SSIM by > 1e-3.
SSIM_ATOL = 1e-4


@pytest.fixture(scope="module")
def shipped():
  model, variables, _ = checkpoint.load_model(SHIPPED_MODEL)
  return model, variables


@pytest.fixture(scope="module")
def real_images():
  """(auxiliary, victim) real CIFAR-100 test images in [0, 1], disjoint."""
  images = data.load_split("test", data_dir=REAL_DIR).images.astype(np.float32) / 255
  return images[:1000], images[5000:5064]


@needs_real
@pytest.mark.numerics
def test_decoder_inverts_the_stem_but_not_the_deepest_split(shipped, real_images):
  """Catches a decoder that cannot learn (or cheats with the victim images): from the stem's
  float IR (16 channels at full resolution) it must recover the images almost perfectly,
  from the 4x4 IR after the last block much worse."""
  model, variables = shipped
  aux, victims = real_images
  key = jax.random.key(0)
  stem = attacks.decoder_attack(model, variables, 1, None, aux, victims, key, FAST_DECODER)
  deep = attacks.decoder_attack(model, variables, model.info.max_split, None, aux, victims, key,
                                FAST_DECODER)
  assert stem["ssim"] > 0.8 and stem["psnr"] > 22
  assert deep["ssim"] < 0.5 and deep["ssim"] < stem["ssim"] - 0.3
  assert stem["losses"][-10:].mean() < stem["losses"][:10].mean() / 5
  # the reported scores are those of the returned reconstructions, by another implementation
  np.testing.assert_allclose(stem["ssim_per_image"],
                             _skimage_ssim(stem["reconstructions"], victims), atol=SSIM_ATOL)


@needs_real
def test_whitebox_inverts_the_stem_through_the_quantizer(shipped, real_images):
  """Catches a white-box attack whose gradient stops at the quantizer's rounding: at a 4-bit
  IR it would stay at its gray start (SSIM near 0); with straight-through gradients it
  recovers the images from the stem, and much less from the deepest split."""
  model, variables = shipped
  victims = real_images[1][:16]
  config = attacks.WhiteboxConfig(steps=100)
  key = jax.random.key(0)
  four_bit = QuantPolicy.ir_only(model.info.num_layers, 1, 4)
  stem = attacks.whitebox_attack(model, variables, 1, four_bit, victims, key, config)
  gray = attacks.reconstruction_scores(np.full_like(victims, 0.5), victims)
  assert stem["ssim"] > 0.7 and stem["ssim"] > gray["ssim"].mean() + 0.5
  assert stem["losses"][-1] < stem["losses"][0] / 10
  deep = attacks.whitebox_attack(model, variables, model.info.max_split, None, victims, key,
                                 config)
  assert deep["ssim"] < stem["ssim"] - 0.3


@pytest.fixture(scope="module")
def noise_images():
  return np.asarray(jax.random.uniform(jax.random.key(2), (40, 32, 32, 3)))


@pytest.mark.numerics
def test_attacks_are_pure_functions_of_their_key(shipped, noise_images):
  """Catches hidden state or host randomness: the same key gives the same reconstructions
  (fused or one call per step alike), another key other ones."""
  (model, variables), images = shipped, noise_images
  config = attacks.DecoderConfig(steps=4, batch_size=8, width=8)
  policy = QuantPolicy.ir_only(model.info.num_layers, 2, 8)
  run = lambda seed, fused: attacks.decoder_attack(
      model, variables, 2, policy, images[:32], images[32:], jax.random.key(seed), config,
      fused=fused)["reconstructions"]
  first = run(0, False)
  np.testing.assert_array_equal(first, run(0, False))
  np.testing.assert_allclose(first, run(0, True), atol=1e-5)
  assert np.abs(first - run(1, False)).max() > 1e-3
  white = lambda seed: attacks.whitebox_attack(
      model, variables, 2, policy, images[32:], jax.random.key(seed),
      attacks.WhiteboxConfig(steps=3))["reconstructions"]
  np.testing.assert_array_equal(white(0), white(0))
  assert np.abs(white(0) - white(1)).max() > 1e-4


@pytest.mark.numerics
def test_vmapped_decoders_equal_decoders_trained_one_by_one(shipped, noise_images):
  """Catches decoders that leak into each other under vmap: two deployments trained together
  give what each gives alone."""
  (model, variables), images = shipped, noise_images
  config = attacks.DecoderConfig(steps=3, batch_size=8, width=8)
  policies = [QuantPolicy.ir_only(model.info.num_layers, 3, b) for b in (32, 2)]
  key = jax.random.key(0)
  together = attacks.decoder_attacks(model, variables, 3, policies, images[:32], images[32:],
                                     key, config, vectorize=True)
  for policy, joint in zip(policies, together):
    alone = attacks.decoder_attack(model, variables, 3, policy, images[:32], images[32:], key,
                                   config)
    np.testing.assert_allclose(joint["reconstructions"], alone["reconstructions"], atol=1e-5)
    np.testing.assert_allclose(joint["losses"], alone["losses"], rtol=1e-4)
  assert np.abs(together[0]["reconstructions"] - together[1]["reconstructions"]).max() > 1e-3


def _skimage_ssim(recon, images):
  """SSIM per image by scikit-image: Gaussian window (sigma 1.5), data range 1, averaged over
  the valid region and the channels."""
  from skimage.metrics import structural_similarity
  return np.array([structural_similarity(
      np.asarray(r, np.float64), np.asarray(i, np.float64), data_range=1.0, channel_axis=-1,
      gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
      for r, i in zip(recon, images)])


@pytest.mark.numerics
def test_scores_and_total_variation_match_hand_computations():
  """PSNR by hand, SSIM by scikit-image (from near copies to unrelated images), total
  variation by hand."""
  rng = np.random.default_rng(0)
  images = rng.uniform(size=(3, 16, 16, 3)).astype(np.float32)
  recon = np.clip(images + rng.normal(0, 0.1, images.shape), 0, 1).astype(np.float32)
  scores = attacks.reconstruction_scores(recon, images)
  blurred = np.clip(images * rng.uniform(0.2, 1.0, (3, 1, 1, 3)) + 0.3, 0, 1).astype(np.float32)
  for other in (recon, blurred, rng.uniform(size=images.shape).astype(np.float32)):
    np.testing.assert_allclose(attacks.reconstruction_scores(other, images)["ssim"],
                               _skimage_ssim(other, images), atol=SSIM_ATOL)
  mse = ((recon - images) ** 2).mean(axis=(1, 2, 3))
  np.testing.assert_allclose(scores["psnr"], 10 * np.log10(1 / mse), rtol=1e-5)
  perfect = attacks.reconstruction_scores(images, images)
  np.testing.assert_allclose(perfect["ssim"], 1.0, atol=1e-5)
  np.testing.assert_allclose(perfect["psnr"], attacks.MAX_PSNR)
  tv = np.abs(np.diff(images, axis=1)).mean(axis=(1, 2, 3)) + np.abs(
      np.diff(images, axis=2)).mean(axis=(1, 2, 3))
  np.testing.assert_allclose(attacks.total_variation(jnp.asarray(images)), tv, rtol=1e-5)


def test_bad_input_is_refused_by_name(shipped, noise_images):
  (model, variables), images = shipped, noise_images
  key = jax.random.key(0)
  with pytest.raises(ValueError, match="in \\[0, 1\\]"):
    attacks.decoder_attack(model, variables, 1, None, images * 255, images, key)
  with pytest.raises(ValueError, match="\\(N, H, W, 3\\)"):
    attacks.whitebox_attack(model, variables, 1, None, images[..., :1], key)
  with pytest.raises(ValueError, match="split"):
    attacks.whitebox_attack(model, variables, model.info.max_split + 1, None, images, key)
  with pytest.raises(ValueError, match="decoder steps must be >= 1"):
    attacks.DecoderConfig(steps=0)
  with pytest.raises(ValueError, match="white-box"):
    attacks.WhiteboxConfig(learning_rate=0)


def test_attack_study_resumes_to_the_same_rows_and_refuses_other_settings(fake_data_dir,
                                                                          tmp_path, caplog):
  """Catches a resumed study that recomputes finished splits, mixes two configs in one
  workdir, or reports correlations that are not Spearman's rho of its own rows."""
  config = attack_configs.get_config("smoke")
  config.data_dir = fake_data_dir
  config.splits = (1, 2)
  config.models.resnet18.genomes = ""
  workdir, out = tmp_path / "work", tmp_path / "out"
  first = attack_study.run(config, str(workdir), str(out))
  assert [(r["split"], r["source"], r["ir_bits"]) for r in first["rows"]] == [
      (1, "ir_only", 32), (1, "ir_only", 2), (2, "ir_only", 32), (2, "ir_only", 2)]
  # a kill after the first split: only the second is attacked again
  rows_file = workdir / "resnet18" / study_rows.ROWS_FILE
  stored = json.loads(rows_file.read_text())
  stored["rows"] = stored["rows"][:2]
  rows_file.write_text(json.dumps(stored))
  with caplog.at_level("INFO"):
    resumed = attack_study.run(config, str(workdir), str(out))
  assert "1 splits to attack (2 settings); 2 settings already done" in caplog.text
  untimed = lambda rows: [{k: ({**v, "seconds": None} if isinstance(v, dict) else v)
                           for k, v in r.items()} for r in rows]
  assert untimed(resumed["rows"]) == untimed(first["rows"])
  ranks = lambda v: np.argsort(np.argsort(v))
  p = [r["privacy"]["mse"] for r in first["rows"]]
  ssim = [r["decoder"]["ssim"] for r in first["rows"]]
  np.testing.assert_allclose(first["correlations"]["all"]["mse~decoder_ssim"]["rho"],
                             np.corrcoef(ranks(p), ranks(ssim))[0, 1], atol=1e-9)
  assert (out / "scatter.png").exists() and (out / "grid_resnet18.png").exists()
  config.whitebox.tv_weight = 0.1
  with pytest.raises(runs.WorkdirError, match="whitebox.tv_weight: was 0.05, now 0.1"):
    attack_study.run(config, str(workdir), str(out))


def test_attack_images_are_disjoint_random_draws_not_the_source_order():
  """Catches an attacker and victims taken in source order (from class-sorted shards, as the
  offline test split is, they would come from a few classes each) or overlapping (a victim
  the decoder trained on)."""
  labels = np.repeat(np.arange(100), 20)  # sorted by class, like the local shards
  index = np.arange(2000)
  # Each image carries its class and its own index in its first pixel.
  images = np.zeros((2000, 4, 4, 3), np.uint8)
  images[:, 0, 0] = np.stack([labels, index // 256, index % 256], axis=-1)
  split = data.Split(images=images, labels=labels, num_classes=100, dataset="cifar100")
  config = attack_configs.get_config("cpu")
  config.aux_images, config.victim_images = 500, 100
  aux, victims = attack_study.image_sets(split, config)
  read = lambda x: np.round(x[:, 0, 0] * 255).astype(int)
  aux_classes, victim_classes = set(read(aux)[:, 0]), set(read(victims)[:, 0])
  assert len(aux_classes) > 90 and len(victim_classes) > 50
  ids = lambda x: set(read(x)[:, 1] * 256 + read(x)[:, 2])
  assert len(ids(aux)) == 500 and len(ids(victims)) == 100 and not ids(aux) & ids(victims)
  again = attack_study.image_sets(split, config)
  np.testing.assert_array_equal(again[1], victims)
  config.victim_images = 1001
  with pytest.raises(ValueError, match="at most 1000 auxiliary and 1000 victim images"):
    attack_study.image_sets(split, config)


def test_correlations_count_an_8_bit_repeat_of_the_float_ir_once():
  """At a split where the 8-bit IR is decoded like the float IR (SSIM within 0.01) it is the
  same observation and is left out; elsewhere, and at other widths, every row counts."""
  row = lambda split, bits, ssim, p: {
      "model": "m", "split": split, "source": "ir_only", "ir_bits": bits,
      "privacy": {"mse": p}, "decoder": {"ssim": ssim, "psnr": 30 - 20 * p},
      "whitebox": {"ssim": ssim, "psnr": 30 - 20 * p}}
  rows = [row(1, 32, 0.90, 0.1), row(1, 8, 0.895, 0.11), row(1, 2, 0.5, 1.2),
          row(2, 32, 0.70, 0.4), row(2, 8, 0.60, 0.5), row(3, 32, 0.40, 0.9)]
  kept = attack_study.deduplicated(rows)
  assert [(r["split"], r["ir_bits"]) for r in kept] == [(1, 32), (1, 2), (2, 32), (2, 8), (3, 32)]
  both = attack_study.study_correlations(rows, ["m"], ("mse",))
  assert both["correlations"]["m"]["mse~decoder_ssim"]["n"] == 5
  assert both["correlations_all_settings"]["all"]["mse~decoder_ssim"]["n"] == 6
