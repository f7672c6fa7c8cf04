"""Privacy profiles: every split scored on the IR the edge would really send."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maxpart_jax import data, privacy
from maxpart_jax.genome import quantized_edge, uniform_genome
from maxpart_jax.models import get_model
from maxpart_jax.privacy import profile
from maxpart_jax.quant import quantize_activations

pytestmark = pytest.mark.numerics  # tolerances that face float rounding (docs/testing.md)


@pytest.fixture(scope="module")
def setup():
  model = get_model("resnet18", width=0.125, stage_sizes=(1, 1, 1, 1))
  variables = model.init(jax.random.key(0))
  images = np.asarray(jax.random.uniform(jax.random.key(1), (6, 32, 32, 3)))
  return model, variables, images


@pytest.mark.slow
def test_block_profile_matches_direct_scores(setup):
  model, variables, images = setup
  x = data.normalize(images)
  genome = uniform_genome(model.info, 1, 4)
  edge = jax.jit(model.edge, static_argnums=2)
  profiles = []
  for g in (None, genome):
    prof = profile.block_profile(model, variables, images, genome=g, batch_size=3)  # 2 batches
    profiles.append(prof)
    assert [b["index"] for b in prof["blocks"]] == list(range(1, model.info.max_split + 1))
    for row in prof["blocks"]:
      q = row["index"]
      ir = (edge(variables, x, q) if g is None else
            quantized_edge(model, variables, x, g.replace(p=jnp.int32(q))))
      scores = privacy.privacy_score(jnp.asarray(images), ir)
      assert row["privacy"] == pytest.approx(float(scores.mean()), rel=1e-5)
      assert row["label"] == model.info.blocks[q - 1].label
  # 4-bit IRs are coarser than float ones, so they score differently after the stem.
  float_prof, quant_prof = profiles
  assert float_prof["blocks"][0]["privacy"] == pytest.approx(quant_prof["blocks"][0]["privacy"])
  assert float_prof["blocks"][2]["privacy"] != pytest.approx(quant_prof["blocks"][2]["privacy"])


def test_ir_only_profile_quantizes_the_ir_and_nothing_else(setup):
  """Catches Fig. 8's IR-only curve quantizing the edge too (or not the IR): every split,
  the stem's included, scores the float IR quantized to b bits."""
  model, variables, images = setup
  x = data.normalize(images)
  prof = profile.block_profile(model, variables, images, ir_bits=2, batch_size=6)
  for row in prof["blocks"]:
    ir = quantize_activations(model.edge(variables, x, row["index"]), jnp.int32(2))
    scores = privacy.privacy_score(jnp.asarray(images), ir)
    assert row["privacy"] == pytest.approx(float(scores.mean()), rel=1e-5)
  float_stem = profile.block_profile(model, variables, images)["blocks"][0]["privacy"]
  assert prof["blocks"][0]["privacy"] != pytest.approx(float_stem)  # the stem IR too
  with pytest.raises(ValueError, match="not both"):
    profile.block_profile(model, variables, images, ir_bits=2,
                          genome=uniform_genome(model.info, 1, 4))


def test_layer_outputs_are_the_raw_convolutions(setup):
  model, variables, images = setup
  x = jnp.asarray(data.normalize(images))
  outs = profile.layer_outputs(model, variables, x)
  assert list(outs) == [l.name for l in model.info.layers]
  kernel = variables["params"]["blocks_0"]["conv"]["kernel"]
  ref = jax.lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)),
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
  np.testing.assert_allclose(outs["blocks_0/conv"], ref, rtol=1e-5, atol=1e-5)
  prof = profile.layer_profile(model, variables, images, batch_size=4)
  assert [r["name"] for r in prof["layers"]] == [l.name for l in model.info.layers[:-1]]
  stem = float(privacy.privacy_score(jnp.asarray(images), ref).mean())
  assert prof["layers"][0]["privacy"] == pytest.approx(stem, rel=1e-5)


def test_kl_profile_uses_the_model_as_classifier(setup):
  model, variables, images = setup
  prof = profile.block_profile(model, variables, images[:2], metric="kl")
  classify = profile.classifier(model, variables)
  x = data.normalize(images[:2])
  ir = model.edge(variables, x, 2)
  ref = privacy.privacy_score(jnp.asarray(images[:2]), ir, "kl", classify_fn=classify)
  assert prof["blocks"][1]["privacy"] == pytest.approx(float(ref.mean()), rel=1e-4)


def test_normalize_01():
  assert profile.normalize_01([2.0, 4.0, 3.0]) == [0.0, 1.0, 0.5]
  assert profile.normalize_01([1.0, 1.0]) == [0.0, 0.0]
