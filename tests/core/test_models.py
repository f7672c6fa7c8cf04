"""Models, block metadata and the exact edge / cloud split (docs/method.md §2)."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maxpart_jax.genome import to_policy, uniform_genome
from maxpart_jax.models import available_models, get_model
from maxpart_jax.models.layers import Numerics, QConv, resolve_numerics
from maxpart_jax.models.mobilenet import MOBILENET_V1_CIFAR

ARCHS = ["vgg11", "resnet18", "resnet50", "mobilenet_v1"]


def _tiny(name):
  kwargs = dict(width=0.125)
  if name == "resnet50":
    kwargs["stage_sizes"] = (1, 1, 1, 1)
  return get_model(name, **kwargs)


def _valid_macs(layer):
  """MACs over kernel taps that fall inside the (unpadded) input, as XLA counts them."""
  if layer.kind == "dense":
    return layer.macs
  k, pad = layer.kernel[0], layer.kernel[0] // 2
  (h, w, c), (ho, wo, co) = layer.in_shape, layer.out_shape

  def taps(n_in, n_out):
    return sum(0 <= o * layer.stride - pad + t < n_in for o in range(n_out) for t in range(k))

  return taps(h, ho) * taps(w, wo) * c * co // layer.groups


# Published totals for the CIFAR variants, convolution layers only.
@pytest.mark.parametrize("name,macs_m,params_m", [
    ("resnet18", 555.4, 11.16), ("resnet50", 1297.8, 23.45), ("mobilenet_v1", 46.3, 3.19)])
def test_known_totals(name, macs_m, params_m):
  convs = [l for l in get_model(name).info.layers if l.kind != "dense"]
  assert sum(l.macs for l in convs) / 1e6 == pytest.approx(macs_m, abs=0.05)
  assert sum(l.params for l in convs) / 1e6 == pytest.approx(params_m, abs=0.005)


def test_vgg11_macs_by_hand():
  # CIFAR VGG11: (channels, input resolution) of the 8 convs; 3x3 kernels, stride 1.
  convs = [(3, 64, 32), (64, 128, 16), (128, 256, 8), (256, 256, 8), (256, 512, 4),
           (512, 512, 4), (512, 512, 2), (512, 512, 2)]
  info = get_model("vgg11").info
  assert [l.macs for l in info.layers[:-1]] == [9 * ci * co * r * r for ci, co, r in convs]
  assert info.layers[-1].macs == 512 * 100 and info.layers[-1].params == 512 * 100 + 100


@pytest.mark.parametrize("name,blocks,layers,first_out,last_out", [
    ("vgg11", 9, 9, (16, 16, 64), (1, 1, 512)),
    ("resnet18", 10, 21, (32, 32, 64), (4, 4, 512)),
    ("resnet50", 18, 54, (32, 32, 64), (4, 4, 2048)),
    ("mobilenet_v1", 15, 28, (32, 32, 32), (2, 2, 1024))])
def test_structure(name, blocks, layers, first_out, last_out):
  info = get_model(name).info
  assert (info.num_blocks, info.num_layers) == (blocks, layers)
  assert info.blocks[0].out_shape == first_out and info.blocks[-2].out_shape == last_out
  assert info.blocks[0].label == "stem" or name == "vgg11"
  assert info.blocks[-1].label == "head" and info.layers[-1].kind == "dense"
  # By default only the first conv and the classifier are unquantizable.
  assert [l.id for l in info.layers if not l.quantizable] == [0, layers - 1]


def test_resnet_projection_and_stride_placement():
  info = get_model("resnet50").info
  projections = [l for l in info.layers if l.name.endswith("proj")]
  assert len(projections) == 4 and all(l.kernel == (1, 1) for l in projections)
  strided = [l for l in info.layers if l.stride == 2]
  # Stride on the 3x3 conv (and its projection) of the first block of stages 2-4.
  assert sorted((l.kernel, info.blocks[l.block].label) for l in strided) == sorted(
      [((3, 3), f"layer{s}.0") for s in (2, 3, 4)] + [((1, 1), f"layer{s}.0") for s in (2, 3, 4)])


def test_mobilenet_matches_spec():
  info = get_model("mobilenet_v1").info
  dw = [l for l in info.layers if l.kind == "depthwise_conv"]
  pw = [l for l in info.layers if l.kind == "conv" and l.kernel == (1, 1)]
  assert len(dw) == len(pw) == 13
  assert [(l.out_shape[-1], l.stride) for l in pw] == [(c, 1) for c, _ in MOBILENET_V1_CIFAR]
  assert [l.stride for l in dw] == [s for _, s in MOBILENET_V1_CIFAR]
  assert all(l.groups == l.in_shape[-1] and l.params == 9 * l.in_shape[-1] for l in dw)


@pytest.mark.parametrize("name", ARCHS)
def test_metadata_params_match_variables(name):
  model = _tiny(name)
  params = jax.eval_shape(model.init, jax.random.key(0))["params"]
  kernels = [x for path, x in jax.tree_util.tree_leaves_with_path(params)
             if path[-1].key == "kernel" or (path[-1].key == "bias" and "bn" not in path[-2].key)]
  assert sum(l.params for l in model.info.layers) == sum(int(np.prod(k.shape)) for k in kernels)


@pytest.mark.skipif(jax.default_backend() != "cpu",
                    reason="only the CPU compiler's cost analysis counts convolutions: on GPUs "
                    "they are cuDNN library calls that it does not see")
@pytest.mark.parametrize("name", ARCHS)
def test_macs_against_xla_cost_analysis(name):
  """XLA counts 2 flops per multiply-add over in-bounds taps, plus a few per element."""
  model = get_model(name)
  info = model.info
  variables = jax.eval_shape(model.init, jax.random.key(0))
  valid = sum(_valid_macs(l) for l in info.layers)
  x = jax.ShapeDtypeStruct((1, *info.input_shape), jnp.float32)
  flops = jax.jit(model.full).lower(variables, x).compile().cost_analysis()["flops"]
  assert valid <= flops / 2 <= 1.025 * valid
  for b in info.blocks:  # block by block, so no block's count can hide in the total
    shape = info.input_shape if b.index == 0 else info.blocks[b.index - 1].out_shape
    xb = jax.ShapeDtypeStruct((1, *shape), jnp.float32)
    run = lambda v, x, i=b.index: model.apply(v, x, start=i, stop=i + 1)
    flops = jax.jit(run).lower(variables, xb).compile().cost_analysis()["flops"]
    layers = [info.layers[i] for i in b.layer_ids]
    elementwise = sum(np.prod(l.out_shape) for l in layers) + np.prod(shape)
    extra = flops - 2 * sum(_valid_macs(l) for l in layers)
    assert 0 <= extra <= 6 * elementwise, (b.label, extra, elementwise)


@pytest.mark.numerics
@pytest.mark.slow
@pytest.mark.parametrize("name", ARCHS)
def test_split_is_exact(name):
  model = _tiny(name)
  variables = model.init(jax.random.key(0))
  x = jax.random.normal(jax.random.key(1), (3, 32, 32, 3))
  # Op by op, so that the halves run exactly the whole's operations: equal to the bit, and
  # twice as fast as compiling two programs per split (compiled, XLA would fuse the halves
  # differently from the whole and round differently).
  with jax.disable_jit():
    full = model.full(variables, x)
    assert full.shape == (3, 100)
    for p in range(1, model.info.max_split + 1):
      ir = model.edge(variables, x, p)
      assert ir.shape[1:] == model.info.blocks[p - 1].out_shape
      np.testing.assert_array_equal(model.cloud(variables, ir, p), full)


@pytest.mark.slow
def test_split_out_of_range_and_bad_inputs():
  model = _tiny("resnet18")
  variables = model.init(jax.random.key(0))
  x = jnp.zeros((2, 32, 32, 3))
  for p in (0, model.info.num_blocks, -1, 2.5):
    with pytest.raises(ValueError, match="out of range: legal splits are 1..9"):
      model.edge(variables, x, p)
  with pytest.raises(ValueError, match=r"expects images of shape \(N, 32, 32, 3\)"):
    model.full(variables, jnp.zeros((2, 28, 28, 3)))
  with pytest.raises(ValueError, match="NaN or inf"):
    model.full(variables, x.at[0, 0, 0, 0].set(jnp.nan))
  with pytest.raises(ValueError, match="float images"):
    model.full(variables, jnp.zeros((2, 32, 32, 3), jnp.uint8))
  with pytest.raises(ValueError, match="does not match split p=2"):
    model.cloud(variables, model.edge(variables, x, 4), 2)


def test_equal_architectures_compare_equal_and_share_their_init():
  """Models are static arguments of compiled programs: equal builds must be equal (to share
  them) and any other width or numerics unequal (never to run another model's program)."""
  a, b = _tiny("resnet18"), _tiny("resnet18")
  assert a == b and hash(a) == hash(b) and a is not b
  assert a != get_model("resnet18", width=0.25)
  assert a != a.with_numerics(Numerics("bfloat16"))
  assert a != _tiny("vgg11")
  from maxpart_jax import models
  first = a.init(jax.random.key(0))
  size = models._init._cache_size()
  second = b.init(jax.random.key(0))
  assert models._init._cache_size() == size
  for x, y in zip(jax.tree.leaves(first), jax.tree.leaves(second)):
    np.testing.assert_array_equal(x, y)


def test_unknown_model_lists_available():
  with pytest.raises(ValueError, match="unknown model 'vgg19'.*mobilenet_v1.*resnet18"):
    get_model("vgg19")
  assert get_model("mobilenet").name == "mobilenet_v1"
  assert set(ARCHS) <= set(available_models())


@pytest.mark.slow
def test_train_mode_updates_batch_stats():
  model = _tiny("resnet18")
  variables = model.init(jax.random.key(0))
  x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3)) * 3 + 1
  logits, updates = model.apply(variables, x, train=True)
  assert logits.shape == (4, 100)
  before = variables["batch_stats"]["blocks_0"]["bn"]["mean"]
  after = updates["batch_stats"]["blocks_0"]["bn"]["mean"]
  assert not np.allclose(before, after)


def _bf16(x):
  """Rounds to the nearest bfloat16 (ml_dtypes, independent of XLA), back as float64."""
  import ml_dtypes
  return np.asarray(x, np.float32).astype(ml_dtypes.bfloat16).astype(np.float64)


def _conv_reference(x, kernel):
  """A 3x3 'same' convolution in float64 by explicit loops over the taps (NHWC, HWIO)."""
  padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  out = np.zeros((*x.shape[:3], kernel.shape[-1]))
  for dy in range(3):
    for dx in range(3):
      out += padded[:, dy:dy + x.shape[1], dx:dx + x.shape[2]] @ kernel[dy, dx]
  return out


@pytest.mark.numerics
def test_bfloat16_convolution_rounds_operands_after_quantization():
  """A bf16 QConv equals the float64 convolution of bf16-rounded operands, rounded to bf16.

  Catches numerics that are ignored (float32 results differ from the rounded reference by
  up to half a bf16 step), operands cast before the quantizer (8-bit codes times a scale
  that bf16 cannot hold are then quantized from rounded values), and accumulation in
  bf16 (errors of many steps over 144 taps).
  """
  x = jax.random.uniform(jax.random.key(0), (2, 6, 6, 16), minval=0.0, maxval=3.0)
  conv = QConv(8, 3, layer_id=0, numerics=Numerics("bfloat16"))
  variables = conv.init(jax.random.key(1), x)
  out = conv.apply(variables, x)
  assert out.dtype == jnp.bfloat16
  kernel = np.asarray(variables["params"]["kernel"])
  expected = _bf16(_conv_reference(_bf16(x), _bf16(kernel)))
  np.testing.assert_allclose(np.asarray(out, np.float64), expected, rtol=2 ** -8, atol=1e-6)
  f32 = QConv(8, 3, layer_id=0).apply(variables, x)
  assert f32.dtype == jnp.float32
  assert np.max(np.abs(np.asarray(f32) - expected)) > 1e-4  # bf16 really changed something

  # With a policy, the quantizer sees float32 and bf16 sees its output.
  from maxpart_jax.quant import QuantPolicy, quantize_activations, quantize_weights
  policy = QuantPolicy(w_bits=jnp.array([4]), a_bits=jnp.array([8]), split=jnp.int32(0),
                       ir_bits=jnp.int32(32))
  out_q = conv.apply(variables, x, policy=policy)
  xq = quantize_activations(x, jnp.int32(8))
  kq = quantize_weights(variables["params"]["kernel"], jnp.int32(4))
  expected_q = _bf16(_conv_reference(_bf16(xq), _bf16(kq)))
  np.testing.assert_allclose(np.asarray(out_q, np.float64), expected_q, rtol=2 ** -8, atol=1e-6)


@pytest.mark.numerics
@pytest.mark.slow
def test_numerics_keep_parameters_and_logits_float32_and_stay_close():
  model = _tiny("resnet18")
  variables = model.init(jax.random.key(0))
  x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
  bf16 = model.with_numerics(Numerics("bfloat16"))
  assert jax.tree.map(lambda a: a.dtype, jax.eval_shape(bf16.init, jax.random.key(0))) == \
      jax.tree.map(lambda a: a.dtype, variables)
  genome = uniform_genome(model.info, 3, 4, 8)
  for policy in (None, to_policy(model.info, genome)):
    ref = model.apply(variables, x, policy=policy)
    low = bf16.apply(variables, x, policy=policy)
    assert low.dtype == jnp.float32
    assert 0 < float(jnp.linalg.norm(low - ref) / jnp.linalg.norm(ref)) < 0.05
  assert model.with_numerics(Numerics()) is model
  assert bf16.kwargs["width"] == 0.125 and bf16.info.num_layers == model.info.num_layers


def test_numerics_names_are_checked_and_auto_follows_the_platform():
  with pytest.raises(ValueError, match="compute dtype must be one of.*float16"):
    Numerics("float16")
  with pytest.raises(ValueError, match="matmul precision must be one of.*'fast'"):
    Numerics("float32", "fast")
  assert resolve_numerics("auto", "highest", "cpu") == Numerics("float32", "highest")
  assert resolve_numerics("auto", "default", "gpu") == Numerics("bfloat16", "default")
  assert resolve_numerics("bfloat16", "highest", "cpu").dtype == "bfloat16"


ISA_PROBE = """
import hashlib, jax, numpy as np
x = jax.random.normal(jax.random.key(0), (16, 16, 16, 8))
w = jax.random.normal(jax.random.key(1), (3, 3, 8, 16))
y = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
print(hashlib.sha256(np.asarray(y).tobytes()).hexdigest())
"""


def test_the_readme_isa_flag_is_accepted_and_changes_float_rounding():
  """The numerics tests are checked under other CPU code paths with
  XLA_FLAGS=--xla_cpu_max_isa=... (docs/testing.md, "Tests on other CPUs"): XLA still accepts the
  flag, and on a CPU with AVX-512 or AVX2, SSE4.2 rounds a convolution differently (so the
  check exercises other rounding, as another machine would)."""
  import subprocess, sys
  def run(flags):
    proc = subprocess.run([sys.executable, "-c", ISA_PROBE], capture_output=True, text=True,
                          env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": flags},
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.strip()
  default, sse = run(""), run("--xla_cpu_max_isa=SSE4_2")
  assert run("--xla_cpu_max_isa=AVX2")
  with open("/proc/cpuinfo") as f:
    vector = {"avx2", "avx512f"} & set(f.read().split())
  if vector:
    assert default != sse
