"""Baselines (docs/method.md §8): deepest splits, offload counts, and their measured metrics."""

import jax.numpy as jnp
import numpy as np
import pytest

from maxpart_jax import checkpoint, data, privacy
from maxpart_jax.energy import DeviceConfig, edge_energy
from maxpart_jax.models import get_model
from maxpart_jax.jobs import build
from maxpart_jax.studies import baselines


def _numpy_split_energy(info, w, a, tx=True):
  """Eq. 7-9 by hand from the layer table: quantizable layers at (w, a), the rest at 32 bits."""
  out = []
  for p in range(1, info.max_split + 1):
    total = 0.0
    for layer in info.layers:
      if layer.block >= p:
        continue
      wb, ab = (w, a) if layer.quantizable else (32, 32)
      total += layer.macs * (3.1 / 32 * wb + 0.1) + layer.in_elems * 2.5 * ab + layer.params * 2.5 * wb
    last = info.layers[info.blocks[p - 1].layer_ids[-1]]
    ir_bits = a if last.quantizable else 32
    total += tx * np.prod(info.blocks[p - 1].out_shape) * ir_bits * 100.0
    out.append(total / 1e9)
  return np.array(out)


@pytest.mark.parametrize("name,w,a,tx", [("resnet18", 8, 8, True), ("resnet18", 32, 32, True),
                                         ("mobilenet_v1", 4, 8, False)])
def test_split_energies_and_deepest_split_match_a_hand_computation(name, w, a, tx):
  info = get_model(name).info
  expected = _numpy_split_energy(info, w, a, tx)
  got = np.asarray(baselines.split_energies(info, w, a, transmission=tx).total_mj)
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  for budget in (0.05, 0.2, 0.35, 1.0):
    fits = np.flatnonzero(expected < budget)
    want = int(fits.max()) + 1 if fits.size else 0
    assert baselines.deepest_split(info, w, a, DeviceConfig(budget_mj=budget), tx) == want


def test_paper_size_splits_at_the_paper_budget():
  """ResNet18 at E_b = 0.35 mJ: float fits only the stem, 8-bit reaches layer2.1 (p = 5)."""
  info = get_model("resnet18").info
  assert baselines.deepest_split(info, 32, 32) == 1
  assert baselines.deepest_split(info, 8, 8) == 5
  names = {b.name: b for b in baselines.make_baselines(info, searched_p=7)}
  assert [names[k].p for k in baselines.STRATEGIES] == [1, 5, 9, 7]
  assert not names["full_precision"].finetune and names["uniform8"].finetune


def test_deepest_split_is_not_fooled_by_non_monotone_energy():
  """MobileNet at 32 bits: p = 2 costs more than p = 3..8, so the deepest fit is not the first."""
  info = get_model("mobilenet_v1").info
  energy = np.asarray(baselines.split_energies(info, 32, 32).total_mj)
  assert energy[1] > 0.2 > energy[2]  # p = 2 over, p = 3 under a 0.2 mJ budget
  assert baselines.deepest_split(info, 32, 32, DeviceConfig(budget_mj=0.2)) == 8


def test_nothing_fits_sends_the_raw_image():
  info = get_model("resnet18").info
  device = DeviceConfig(budget_mj=1e-4)
  assert baselines.deepest_split(info, 8, 8, device) == 0
  assert baselines.raw_image_energy_mj(info, device) == pytest.approx(32 * 32 * 3 * 8 * 100 / 1e9)
  assert baselines.raw_image_energy_mj(info, device, transmission=False) == 0.0


def test_offloaded_counts_blocks_and_weight_layers():
  info = get_model("resnet18").info
  # stem conv; two BasicBlocks of two convs; layer2.0 adds two convs and a 1x1 projection.
  assert baselines.offloaded(info, 1) == (1, 1)
  assert baselines.offloaded(info, 3) == (3, 5)
  assert baselines.offloaded(info, 4) == (4, 8)
  assert baselines.offloaded(info, info.max_split) == (9, info.num_layers - 1)  # all but the fc


def test_bad_input_is_named():
  info = get_model("resnet18").info
  with pytest.raises(ValueError, match="partition point"):
    baselines.make_baselines(info, searched_p=10)
  with pytest.raises(ValueError, match="bits out of range"):
    baselines.deepest_split(info, 1, 8)


@pytest.mark.numerics
@pytest.mark.slow
def test_evaluated_baselines_match_independent_computations(smoke):
  evaluator = build.build_evaluator(smoke)
  info, config = evaluator.model.info, evaluator.config
  test = build.load_test_split(smoke, evaluator)
  todo = [baselines.Baseline("full_precision", 3, 32, 32, False),
          baselines.Baseline("uniform8", 0, 8, 8, True),
          baselines.Baseline("conv_fc8", info.max_split, 8, 8, True)]
  rows = {r["strategy"]: r for r in baselines.evaluate_baselines(evaluator, todo, test)}

  fp = rows["full_precision"]  # not fine-tuned, not quantized: the pre-trained float model
  assert (fp["num_blocks"], fp["num_layers"], fp["block"]) == (3, 6, "layer2.0")  # 1 + 2 + 3 convs
  assert fp["accuracy"] == evaluator.float_accuracy and fp["eps"] == 0.0
  assert fp["test_accuracy"] == pytest.approx(evaluator.float_accuracy_on(test))
  model, variables, _ = checkpoint.load_model(smoke.model_dir)
  images = jnp.asarray(evaluator.privacy_images)
  ir = model.edge(variables, data.normalize(images, "cifar100"), 3)
  assert fp["privacy"] == pytest.approx(float(privacy.mean_privacy(images, ir)), rel=1e-4)
  assert fp["energy_mj"] == pytest.approx(
      float(edge_energy(info, todo[0].genome(info), config.device).total_mj), rel=1e-6)

  raw = rows["uniform8"]  # p = 0: the raw image goes to the cloud
  assert raw["privacy"] == pytest.approx(float(privacy.mean_privacy(images, images)), rel=1e-5)
  assert raw["energy_mj"] == pytest.approx(32 * 32 * 3 * 8 * 100 / 1e9)
  assert raw["test_eps"] == 0.0 and raw["block"] == "none"

  cf = rows["conv_fc8"]
  assert cf["energy_mj"] == pytest.approx(
      float(edge_energy(info, todo[2].genome(info), config.device).total_mj), rel=1e-6)
  assert cf["eps"] == pytest.approx(evaluator.float_accuracy - cf["accuracy"])
