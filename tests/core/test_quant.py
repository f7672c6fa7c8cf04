"""Fake quantization (docs/method.md §3, Eq. 5-6) and genomes with traced bit widths."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maxpart_jax.genome import (Genome, effective_bits, quantized_apply, quantized_edge,
                                to_policy, uniform_genome, validate_genome)
from maxpart_jax.models import get_model
from maxpart_jax.models.layers import QConv
from maxpart_jax.quant import (ACTIVATION_LEVELS, FLOAT_BITS, QuantPolicy, check_bits,
                               quantize_activations, quantize_weights)

pytestmark = pytest.mark.numerics  # tolerances that face float rounding (docs/testing.md)


def np_quantize(x, bits, lo_zero=False, axes=None):
  """Plain numpy Eq. 5-6: s = c / (2^(b-1) - 1), round(clip(x) / s) * s."""
  x = np.asarray(x, np.float64)
  c = np.max(np.maximum(x, 0) if lo_zero else np.abs(x), axis=axes, keepdims=axes is not None)
  s = c / (2.0 ** (bits - 1) - 1)
  return np.round(np.clip(x, 0 if lo_zero else -c, c) / s) * s


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8, 12])
def test_weights_match_numpy(bits):
  w = np.asarray(jax.random.normal(jax.random.key(bits), (3, 3, 4, 5)))
  got = quantize_weights(jnp.asarray(w), jnp.int32(bits))
  np.testing.assert_allclose(got, np_quantize(w, bits), rtol=1e-5, atol=1e-6)
  got = quantize_weights(jnp.asarray(w), jnp.int32(bits), per_channel=True)
  np.testing.assert_allclose(got, np_quantize(w, bits, axes=(0, 1, 2)), rtol=1e-5, atol=1e-6)
  # A b-bit symmetric quantizer has at most 2^b - 1 levels per clipping range.
  assert len(np.unique(np.asarray(got[..., 0]))) <= 2**bits - 1


def test_two_bit_weights_by_hand():
  # c = 2, s = 2 / (2^1 - 1) = 2: levels {-2, 0, 2}; round-half-to-even at +-1.
  w = jnp.array([-2.0, -1.2, -0.9, 0.3, 1.0, 1.1, 2.0])
  np.testing.assert_array_equal(quantize_weights(w, jnp.int32(2)), [-2, -2, 0, 0, 0, 2, 2])


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_activations_match_numpy(bits):
  x = np.asarray(jax.random.normal(jax.random.key(0), (4, 5, 5, 3))) * 2
  got = quantize_activations(jnp.asarray(x), jnp.int32(bits))
  ref = np.stack([np_quantize(xi, bits, lo_zero=True) for xi in x])  # one c per example
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
  assert np.all(np.asarray(got) >= 0)
  got = quantize_activations(jnp.asarray(x), jnp.int32(bits), signed=True)
  np.testing.assert_allclose(got, np.stack([np_quantize(xi, bits) for xi in x]), rtol=1e-5,
                             atol=1e-6)


def test_unsigned_activation_levels_use_all_codes_by_hand():
  """Catches the unsigned option falling back to Eq. 5's signed step (half the codes unused)
  or leaking into signed inputs. c = 1 at 2 bits: paper step 1/(2^1 - 1) = 1, levels {0, 1};
  unsigned step 1/(2^2 - 1) = 1/3, levels {0, 1/3, 2/3, 1}."""
  x = jnp.array([[0.0, 0.3, 0.55, 0.7, 1.0]])
  np.testing.assert_allclose(quantize_activations(x, jnp.int32(2)), [[0, 0, 1, 1, 1]])
  np.testing.assert_allclose(quantize_activations(x, jnp.int32(2), levels="unsigned"),
                             [[0, 1 / 3, 2 / 3, 2 / 3, 1]], rtol=1e-6)
  rng = np.random.default_rng(0)
  relu = np.maximum(rng.normal(size=(3, 32, 32, 4)), 0)
  for bits in (2, 4, 8):
    got = np.asarray(quantize_activations(jnp.asarray(relu), jnp.int32(bits), levels="unsigned"))
    assert all(len(np.unique(g)) <= 2**bits for g in got)
    assert max(len(np.unique(g)) for g in got) > 2**(bits - 1)  # more than the paper's codes
  signed = jnp.asarray(rng.normal(size=(2, 5)))
  np.testing.assert_array_equal(quantize_activations(signed, jnp.int32(4), signed=True),
                                quantize_activations(signed, jnp.int32(4), signed=True,
                                                     levels="unsigned"))
  with pytest.raises(ValueError, match="activation_levels must be one of"):
    quantize_activations(x, jnp.int32(2), levels="half")


def test_sentinel_is_identity_and_zero_tensor_is_safe():
  x = jax.random.normal(jax.random.key(0), (2, 4, 4, 3))
  np.testing.assert_array_equal(quantize_weights(x, jnp.int32(FLOAT_BITS)), x)
  np.testing.assert_array_equal(quantize_activations(x, jnp.int32(FLOAT_BITS)), x)
  zeros = jnp.zeros((2, 3))
  np.testing.assert_array_equal(quantize_activations(zeros, jnp.int32(4)), zeros)
  np.testing.assert_array_equal(quantize_weights(zeros, jnp.int32(4)), zeros)


def test_straight_through_gradients():
  w = jax.random.normal(jax.random.key(0), (5, 7))
  g = jax.random.normal(jax.random.key(1), (5, 7))
  grad = jax.grad(lambda w: jnp.sum(quantize_weights(w, jnp.int32(2)) * g))(w)
  np.testing.assert_allclose(grad, g)  # identity inside [-c, c], where all weights are
  x = jnp.array([[-1.0, 0.5, 2.0]])
  grad = jax.grad(lambda x: jnp.sum(quantize_activations(x, jnp.int32(4))))(x)
  np.testing.assert_array_equal(grad, [[0.0, 1.0, 1.0]])  # clipped below 0: no gradient


def test_check_bits():
  check_bits([2, 8, 16, 32])
  for bad in (1, 0, 17, 31, 33):
    with pytest.raises(ValueError, match=rf"out of range: \[{bad}\]"):
      check_bits([8, bad])


def test_qconv_layer_matches_numpy_quantized_reference():
  x = jax.nn.relu(jax.random.normal(jax.random.key(0), (2, 6, 6, 3)))
  layer = QConv(4, 3, strides=2, layer_id=1)
  params = layer.init(jax.random.key(1), x)
  policy = QuantPolicy(w_bits=jnp.array([32, 3]), a_bits=jnp.array([32, 5]), split=jnp.int32(0),
                       ir_bits=jnp.int32(32), per_channel=True)
  got = layer.apply(params, x, policy)
  wq = np_quantize(params["params"]["kernel"], 3, axes=(0, 1, 2)).astype(np.float32)
  xq = np.stack([np_quantize(xi, 5, lo_zero=True) for xi in np.asarray(x)]).astype(np.float32)
  ref = jax.lax.conv_general_dilated(xq, wq, (2, 2), ((1, 1), (1, 1)),
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def tiny():
  model = get_model("resnet18", width=0.125)
  variables = model.init(jax.random.key(0))
  x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  return model, variables, x


def test_activation_levels_reach_every_quantizer_of_the_model(tiny):
  """Catches the option set on the policy but ignored by the layers or by the IR quantizer."""
  model, variables, x = tiny
  info = model.info
  ir_only = Genome(p=jnp.int32(3), w_bits=jnp.full(info.num_layers, FLOAT_BITS),
                   a_bits=jnp.full(info.num_layers, FLOAT_BITS).at[info.block_last_layer[2]].set(2))
  inner_only = Genome(p=jnp.int32(3), w_bits=jnp.full(info.num_layers, FLOAT_BITS),
                      a_bits=jnp.full(info.num_layers, FLOAT_BITS).at[2].set(2))
  irs = {levels: model.edge(variables, x, 3, to_policy(info, ir_only, activation_levels=levels))
         for levels in ACTIVATION_LEVELS}
  assert max(len(np.unique(ir)) for ir in irs["paper"]) <= 2  # {0, c}
  assert max(len(np.unique(ir)) for ir in irs["unsigned"]) == 4  # {0, c/3, 2c/3, c}
  inner = [model.apply(variables, x, policy=to_policy(info, inner_only, activation_levels=levels))
           for levels in ACTIVATION_LEVELS]
  assert not np.allclose(inner[0], inner[1])
  with pytest.raises(ValueError, match="activation_levels must be one of"):
    to_policy(info, ir_only, activation_levels="signed")


def test_effective_bits_masks_cloud_and_end_layers(tiny):
  model, _, _ = tiny
  info = model.info
  genome = Genome(p=jnp.int32(3), w_bits=jnp.arange(info.num_layers) % 7 + 2,
                  a_bits=jnp.full(info.num_layers, 6))
  w, a, ir_bits = effective_bits(info, genome)
  # stem (layer 0) unquantizable; layers 1-4 in blocks 2-3 on the edge; the rest cloud.
  np.testing.assert_array_equal(w, [32, 3, 4, 5, 6] + [32] * (info.num_layers - 5))
  np.testing.assert_array_equal(a, [32, 6, 6, 6, 6] + [32] * (info.num_layers - 5))
  assert int(ir_bits) == 6
  assert int(effective_bits(info, genome.replace(p=jnp.int32(1)))[2]) == 32  # float stem


def test_quantized_forward_equals_static_edge_then_float_cloud(tiny):
  model, variables, x = tiny
  genome = uniform_genome(model.info, 4, 3, 4)
  ir = quantized_edge(model, variables, x, genome)
  np.testing.assert_allclose(quantized_apply(model, variables, x, genome),
                             model.cloud(variables, ir, 4), rtol=1e-5, atol=1e-5)
  # The IR is really quantized: at most 2^(4-1) levels per example.
  assert all(len(np.unique(np.asarray(ir[i]))) <= 8 for i in range(len(ir)))
  float_genome = uniform_genome(model.info, 4, FLOAT_BITS)
  np.testing.assert_allclose(quantized_apply(model, variables, x, float_genome),
                             model.full(variables, x), rtol=1e-5, atol=1e-5)


def test_masked_genes_do_not_matter(tiny):
  model, variables, x = tiny
  base = uniform_genome(model.info, 4, 4)
  run = lambda g: quantized_apply(model, variables, x, g)
  ref = run(base)
  # Changing the stem's gene, or a gene after the split, changes nothing...
  for layer in (0, 9, model.info.num_layers - 1):
    np.testing.assert_array_equal(run(base.replace(w_bits=base.w_bits.at[layer].set(2))), ref)
  # ...but an edge layer's gene does.
  assert not np.allclose(run(base.replace(w_bits=base.w_bits.at[2].set(2))), ref)


def test_one_compilation_serves_every_policy_and_vmap_works(tiny):
  model, variables, x = tiny
  info = model.info

  @jax.jit
  @chex.assert_max_traces(n=1)
  def forward(genome):
    return quantized_apply(model, variables, x, genome)

  # Float activations here: a quantized network is discontinuous, so the 1e-6
  # differences between batched and unbatched convolutions can flip an activation's
  # rounding and cascade. Weight rounding sees identical inputs on both paths.
  genomes = [uniform_genome(info, p, b, FLOAT_BITS) for p, b in ((1, 8), (3, 2), (6, 4), (9, 32))]
  genomes.append(Genome(p=jnp.int32(7), w_bits=jnp.arange(info.num_layers) % 4 * 2 + 2,
                        a_bits=jnp.full(info.num_layers, FLOAT_BITS, jnp.int32)))
  genomes.append(uniform_genome(info, 5, 8, 4))  # activation bits change under the same trace
  singles = [forward(g) for g in genomes]
  population = jax.tree.map(lambda *xs: jnp.stack(xs), *genomes[:-1])
  batched = jax.jit(jax.vmap(lambda g: quantized_apply(model, variables, x, g)))(population)
  for i, single in enumerate(singles[:-1]):
    np.testing.assert_allclose(batched[i], single, rtol=1e-4, atol=1e-4)
  assert not np.allclose(singles[0], singles[1])
  assert not np.allclose(singles[-1], model.full(variables, x), atol=1e-3)


def test_activation_quantization_is_exact_under_vmap():
  x = jax.nn.relu(jax.random.normal(jax.random.key(1), (2, 8, 8, 4))) * 3.3
  bits = jnp.array([2, 4, 8, 32], jnp.int32)
  batched = jax.vmap(lambda b: quantize_activations(x, b))(bits)
  for i, b in enumerate(bits):
    np.testing.assert_array_equal(batched[i], quantize_activations(x, b))


def test_validate_genome_errors(tiny):
  info = tiny[0].info
  good = uniform_genome(info, 3, 8)
  validate_genome(info, good)
  with pytest.raises(ValueError, match="out of range: legal splits are 1..9"):
    validate_genome(info, good.replace(p=jnp.int32(10)))
  with pytest.raises(ValueError, match=r"genome w_bits out of range: \[1\]"):
    validate_genome(info, good.replace(w_bits=good.w_bits.at[3].set(1)))
  with pytest.raises(ValueError, match="genome a_bits has shape"):
    validate_genome(info, good.replace(a_bits=good.a_bits[:5]))
