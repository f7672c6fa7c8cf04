"""The split deployment: integer arithmetic, the IR wire format, exported artifacts, parity
with the fake-quantized model and the HTTP service."""

import json
import os
import re
import struct
import subprocess
import sys
import urllib.error
import urllib.request
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REAL_DIR, REPO, SHIPPED_MODEL, needs_real
from maxpart_jax import checkpoint, data, energy
from maxpart_jax.deploy import artifact, integer, parity, service, wire
from maxpart_jax.genome import Genome, quantized_edge
from maxpart_jax.models import get_model
from maxpart_jax.quant import quantize_activations, quantize_weights


def _jittered(model, seed=0):
  """Random variables in numpy (no compiled init): He-scaled kernels, and batch norm
  statistics and affines away from 0 / 1, so that folding them wrongly shows."""
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = jax.tree_util.keystr(path)
    if name.endswith("['kernel']"):
      fan_in = int(np.prod(leaf.shape[:-1]))
      return rng.normal(0.0, np.sqrt(2.0 / fan_in), leaf.shape).astype(np.float32)
    lo, hi = ((0.5, 1.5) if name.endswith("['scale']") else (0.5, 2.0) if name.endswith("['var']")
              else (-0.2, 0.2))
    return rng.uniform(lo, hi, leaf.shape).astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, jax.eval_shape(model.init, jax.random.key(0)))


def _mixed_genome(info, p, seed=0):
  """A genome with 2-8-bit weights and 4-8-bit inputs drawn per layer."""
  rng = np.random.default_rng(seed)
  return Genome(p=jnp.int32(p),
                w_bits=jnp.asarray(rng.choice([2, 4, 6, 8], info.num_layers), jnp.int32),
                a_bits=jnp.asarray(rng.choice([4, 8], info.num_layers), jnp.int32))


def _images(n, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def _reference_codes(model, variables, genome, images, largest):
  """The fake-quantized model's IR as codes, and its per-image scale."""
  ir = np.asarray(quantized_edge(model, variables, jnp.asarray(data.normalize(images)), genome))
  return parity.reference_codes(ir, largest)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  """A ResNet18 ×0.125 split after block 4 (a projection shortcut on the edge), mixed bits."""
  model = get_model("resnet18", width=0.125)
  variables = _jittered(model)
  genome = _mixed_genome(model.info, 4)
  out = tmp_path_factory.mktemp("deploy")
  edge, cloud = artifact.export_split(model, variables, genome,
                                     {"name": "resnet18", "width": 0.125}, str(out))
  return model, variables, genome, edge, cloud, out


# --- integer arithmetic ----------------------------------------------------------------


def test_fixed_point_holds_values_to_31_bits():
  """Catches a wrong shift sign or a mantissa that overflows on rounding up."""
  rng = np.random.default_rng(0)
  values = np.concatenate([rng.normal(size=200) * 10.0 ** rng.uniform(-9, 4, 200),
                           [0.0, 1.0, -0.5, 2.0 ** -40, 1 - 2.0 ** -40]])
  mantissa, shift, sign = integer.fixed_point(values)
  nonzero = values != 0
  assert np.all((mantissa[nonzero] >= 2 ** 30) & (mantissa[nonzero] < 2 ** 31))
  back = sign * mantissa * np.exp2(-shift.astype(np.float64))
  np.testing.assert_allclose(back, values, rtol=2.0 ** -30, atol=0)


def test_round_shift_rounds_like_exact_integer_arithmetic():
  """Catches a shift that truncates instead of rounding, or a wrong negative-shift branch."""
  rng = np.random.default_rng(1)
  v = rng.integers(-2 ** 40, 2 ** 40, 300)
  s = rng.integers(-3, 30, 300)
  with jax.enable_x64(True):
    got = np.asarray(integer.round_shift(jnp.asarray(v, jnp.int64), jnp.asarray(s, jnp.int64)))
  # Python integers: floor((v + 2^(s-1)) / 2^s), i.e. halves rounded up.
  expected = [(int(a) + (1 << (int(b) - 1))) >> int(b) if b > 0 else int(a) << -int(b)
              for a, b in zip(v, s)]
  np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("signed,levels", [(False, "paper"), (False, "unsigned"), (True, "paper")])
def test_activation_codes_match_the_fake_quantizer(signed, levels):
  """Integer codes of wide activations = the fake quantizer's codes, but where float
  rounding decides a tie; an all-zero image gets zero codes (catches an off-by-one level
  count, the wrong clipping value or a division by zero)."""
  rng = np.random.default_rng(2)
  x = rng.normal(size=(6, 5, 5, 4)).astype(np.float32) * 3
  x = x if signed else np.maximum(x, 0)
  x[-1] = 0.0
  for bits in (2, 4, 8):
    with jax.enable_x64(True):
      codes, m = integer.activation_codes(integer.to_wide(jnp.asarray(x)), bits, signed, levels)
    largest = integer.levels(bits, signed, levels)
    q = np.asarray(quantize_activations(jnp.asarray(x), jnp.int32(bits), signed=signed,
                                        levels=levels))
    c = np.abs(x).reshape(6, -1).max(1)
    step = np.where(c > 0, c / largest, 1.0)[:, None, None, None]
    reference = np.round(q / step)
    exact = x * largest / np.where(c > 0, c, 1)[:, None, None, None]
    tie = np.abs(np.abs(exact - np.floor(exact)) - 0.5) < 1e-3
    np.testing.assert_array_equal(np.asarray(codes)[~tie], reference[~tie])
    assert np.all(np.asarray(codes)[-1] == 0)
    np.testing.assert_allclose(np.asarray(m) * 2.0 ** -integer.FRACTION_BITS, c, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("name,kwargs,p", [
    ("resnet50", {"width": 0.125, "stage_sizes": (1, 1, 1, 1)}, 2),  # Bottleneck + projection
    ("vgg11", {"width": 0.125}, 3),                                   # conv units + max-pool
    ("mobilenet_v1", {"width": 0.25, "num_blocks": 2}, 2),            # depthwise + pointwise
])
def test_integer_edge_matches_the_fake_quantized_edge(name, kwargs, p):
  """Every block type's integer form computes the fake-quantized model's IR: codes differ only
  where rounding of a near-tie flips them (catches a wrong batch-norm fold, a missing ReLU,
  pool or shortcut, a wrong stride or group count)."""
  model = get_model(name, **kwargs)
  variables = _jittered(model, seed=3)
  genome = _mixed_genome(model.info, p, seed=3)
  spec, arrays = artifact.build_edge(model, variables, genome, {"name": name, **kwargs})
  images = _images(8, seed=3)
  with artifact.edge_device():  # the host CPU, also on a GPU machine
    codes, scales, overflow = jax.jit(lambda x: artifact.edge_forward(model, spec, x, arrays))(
        images)
  assert not np.any(overflow)
  reference, ref_scale = _reference_codes(model, variables, genome, images, spec.ir.largest)
  diff = np.abs(codes - reference)
  assert diff.max() <= 2 and np.mean(diff > 0) < 0.01, (diff.max(), np.mean(diff > 0))
  np.testing.assert_allclose(scales, ref_scale, rtol=1e-3)


def test_exported_edge_convolves_in_integers(exported):
  """The serialized edge program: the float stem is the only float convolution; every
  quantized layer convolves int8 codes into int32 accumulators."""
  _, _, _, edge, _, _ = exported
  convs = [line for line in edge.exported.mlir_module().splitlines()
           if "stablehlo.convolution" in line]
  results = [re.search(r"-> tensor<[^>]*x(\w+)>", line).group(1) for line in convs]
  float_layers = sum(not layer.integer for layer in edge.spec.layers)
  assert float_layers == 1 and len(results) == len(edge.spec.layers)
  assert results.count("f32") == float_layers and results.count("i32") == len(results) - 1
  assert all("xi8>" in line for line, r in zip(convs, results) if r == "i32")


def test_edge_reports_activations_outside_its_fixed_point_range(exported):
  """A bias far beyond ±2^(31-F) must raise, not wrap or clip silently."""
  _, _, _, edge, _, _ = exported
  arrays = jax.tree.map(np.copy, edge.arrays)
  layer = next(i for i, spec in enumerate(edge.spec.layers) if spec.integer)
  arrays[layer]["bias"] = arrays[layer]["bias"] + 2 ** 40
  broken = artifact.EdgeProgram(edge.spec, arrays, edge.exported)
  with pytest.raises(ValueError, match="fixed-point range"):
    broken.ir(_images(2))


# --- wire format ----------------------------------------------------------------------


def test_pack_bits_matches_a_hand_packing():
  """LSB-first packing, worked by hand; round trip at every width."""
  assert wire.pack_bits(np.array([1, 2, 15, 0]), 4) == bytes([0x21, 0x0F])
  # 5, 3, 7 at 3 bits: bit stream 1,0,1, 1,1,0, 1,1,1 -> 0b11011101, 0b1
  assert wire.pack_bits(np.array([5, 3, 7]), 3) == bytes([0xDD, 0x01])
  rng = np.random.default_rng(4)
  for bits in range(1, 17):
    values = rng.integers(0, 2 ** bits, 37)
    np.testing.assert_array_equal(wire.unpack_bits(wire.pack_bits(values, bits), bits, 37), values)


def test_message_size_is_what_the_energy_model_charges(exported):
  """Payload bytes · 8 = the IR bits the energy model charges; the header is 34 bytes."""
  model, _, genome, edge, cloud, _ = exported
  message = edge.messages(_images(1))[0]
  charged = float(energy.ir_payload_bits(model.info, genome))
  assert charged % 8 == 0
  assert len(message) == wire.HEADER_BYTES + charged / 8 == edge.spec.ir.message_bytes
  assert wire.HEADER_BYTES == 34
  payload, scale, used = wire.decode(message, cloud.ir)
  codes, scales = edge.ir(_images(1))
  np.testing.assert_array_equal(payload, codes[0])
  assert used == len(message) and scale == pytest.approx(float(scales[0]), rel=1e-7)


def _with_crc(message: bytes) -> bytes:
  """Recomputes a (deliberately altered) message's CRC, so that only the alteration shows."""
  head, body = message[:wire.HEADER_BYTES - 4], message[wire.HEADER_BYTES:]
  return head + struct.pack("<I", zlib.crc32(body, zlib.crc32(head))) + body


def test_bad_messages_are_rejected_with_the_reason(exported):
  _, _, _, edge, cloud, _ = exported
  good = edge.messages(_images(1))[0]
  spec = cloud.ir
  bad = {
      "truncated message: 20": good[:20],
      "truncated message: 100": good[:100],
      "corrupt message": good[:-1] + bytes([good[-1] ^ 1]),
      "not an IR message": b"XXXX" + good[4:],
      "version 2": _with_crc(good[:4] + bytes([2]) + good[5:]),
      "from deployment 0000000000000000": _with_crc(good[:14] + bytes(8) + good[22:]),
      "bits 4": _with_crc(good[:5] + bytes([4]) + good[6:]),
      f"shape (17, {spec.shape[1]}, {spec.shape[2]})":
          _with_crc(good[:8] + struct.pack("<H", 17) + good[10:]),
      "announces 9000 payload bytes": _with_crc(good[:26] + struct.pack("<I", 9000) + good[30:]),
  }
  for reason, message in bad.items():
    with pytest.raises(wire.WireError, match=re.escape(reason)):
      wire.decode(message, spec)
  # Codes above L (127 at 8 bits, paper levels) with a valid CRC.
  over = good[:wire.HEADER_BYTES] + bytes([255]) + good[wire.HEADER_BYTES + 1:]
  with pytest.raises(wire.WireError, match="codes above 127"):
    wire.decode(_with_crc(over), spec)
  with pytest.raises(wire.WireError, match="truncated"):
    wire.decode_all(good + good[:50], spec)  # a second message cut short
  with pytest.raises(wire.WireError, match="no message"):
    wire.decode_all(b"", spec)


# --- artifacts ------------------------------------------------------------------------


def _in_memory_ir(model, variables, genome, images):
  """The edge program straight from :func:`artifact.build_edge`: not packed, serialized or
  loaded."""
  spec, arrays = artifact.build_edge(model, variables, genome, {"name": "resnet18", "width": 0.125})
  with artifact.edge_device():  # the host CPU, also on a GPU machine
    codes, scales, _ = jax.jit(lambda x: artifact.edge_forward(model, spec, x, arrays))(images)
  return spec, arrays, np.asarray(codes), np.asarray(scales)


def test_artifacts_reload_and_refuse_other_versions(exported, tmp_path):
  """The artifact on disk runs exactly the program it was made from (catches a packing,
  manifest or serialization step that changes it), for the platforms it names, and other
  formats are refused."""
  model, variables, genome, edge, cloud, out = exported
  images = _images(8, seed=5)
  _, _, codes, scales = _in_memory_ir(model, variables, genome, images)
  loaded = artifact.EdgeProgram.load(str(out / "edge"))
  for a, b in zip(loaded.ir(images), (codes, scales)):
    np.testing.assert_array_equal(a, b)
  payload, scales = edge.ir(images)
  # The cloud artifact: the float model on the dequantized IR.
  ir = artifact.dequantize(jnp.asarray(payload), jnp.asarray(scales), cloud.ir)
  np.testing.assert_allclose(artifact.CloudProgram.load(str(out / "cloud")).logits(payload, scales),
                             model.cloud(variables, ir, int(genome.p)), rtol=1e-5, atol=1e-5)
  manifest = json.loads((out / "edge" / "manifest.json").read_text())
  for key, value, match in (("version", 2, "version 2"), ("format", "other", "not a maxpart-edge")):
    target = tmp_path / key
    target.mkdir()
    for name in ("weights.npz", "edge.jax"):
      (target / name).write_bytes((out / "edge" / name).read_bytes())
    (target / "manifest.json").write_text(json.dumps({**manifest, key: value}))
    with pytest.raises(ValueError, match=match):
      artifact.EdgeProgram.load(str(target))
  with pytest.raises(ValueError, match="uint8 images of shape"):
    edge.ir(images.astype(np.float32))
  # Portable programs: the edge is lowered for CPUs (an edge device; a GPU could not run its
  # integer convolutions), the cloud for every backend, whichever machine exported them.
  assert loaded.exported.platforms == ("cpu",)
  assert artifact.CloudProgram.load(str(out / "cloud")).exported.platforms == (
      "cpu", "cuda", "tpu")


def test_packed_weights_are_smaller_and_decode_to_the_codes(exported):
  """Sub-8-bit kernels are stored at their bit width (a 2-bit kernel in a quarter of its
  int8 bytes) and unpack to exactly the codes they were made from, in their dtype."""
  model, variables, genome, edge, _, out = exported
  _, built, _, _ = _in_memory_ir(model, variables, genome, _images(1))
  with np.load(out / "edge" / "weights.npz") as stored:
    for spec, arrays, original in zip(edge.spec.layers, edge.arrays, built):
      if spec.integer:
        packed = stored[f"{spec.name}/w_packed"]
        assert packed.size == -(-arrays["w"].size * spec.w_bits // 8)
        np.testing.assert_array_equal(arrays["w"], original["w"])
        assert arrays["w"].dtype == original["w"].dtype


@pytest.mark.slow
@needs_real
def test_integer_split_agrees_with_the_model_on_real_cifar100(tmp_path):
  """The shipped model at the quick search's genome on 500 real test images: same top-1 on at
  least 99 % of them (the committed results/deploy run checks all 10 000)."""
  model, variables, meta = checkpoint.load_model(SHIPPED_MODEL)
  genome = Genome.from_json(json.loads((REPO / "results" / "search_quick" / "best.json")
                                       .read_text())["genome"])
  edge, cloud = artifact.export_split(model, variables, genome, meta["model"], str(tmp_path))
  test = data.load_split("test", data_dir=str(REAL_DIR))
  result = parity.parity(model, variables, genome, edge, cloud, test.images[:500],
                         test.labels[:500])
  assert result["top1_agreement"] >= 0.99
  assert result["ir_share_of_values_that_differ"] < 0.01
  assert abs(result["accuracy_integer_split"] - result["accuracy_fake_quant"]) <= 0.01


# --- the service ----------------------------------------------------------------------


def _post(url, body):
  request = urllib.request.Request(url, data=body, method="POST")
  try:
    with urllib.request.urlopen(request, timeout=60) as response:
      return response.status, json.loads(response.read())
  except urllib.error.HTTPError as e:
    return e.code, json.loads(e.read())


@pytest.mark.slow
def test_service_and_client_predict_end_to_end_and_survive_bad_requests(exported, tmp_path):
  """Both scripts on loopback: the client's predictions are the cloud's on the edge's IRs;
  malformed, truncated and oversized requests get errors and the service keeps serving."""
  _, _, _, edge, cloud, out = exported
  images = _images(12, seed=6)
  np.savez(tmp_path / "images.npz", image=images)
  expected = cloud.logits(*edge.ir(images)).argmax(-1).tolist()
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  max_body = 4 * edge.spec.ir.message_bytes
  server = subprocess.Popen(
      [sys.executable, "-m", "experiments.serve_cloud", f"--artifact={out / 'cloud'}",
       "--port=0", f"--max_body_bytes={max_body}"],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
  try:
    line = server.stdout.readline()
    url = re.search(r"serving on (http://\S+)", line).group(1)
    client = subprocess.run(
        [sys.executable, "-m", "experiments.edge_client", f"--artifact={out / 'edge'}",
         f"--server={url}", f"--images={tmp_path / 'images.npz'}", "--batch_size=4",
         f"--out={tmp_path / 'client.json'}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert client.returncode == 0, client.stderr[-2000:]
    result = json.loads((tmp_path / "client.json").read_text())
    assert result["predictions"] == expected
    assert result["bytes_per_image"] == edge.spec.ir.message_bytes
    messages = edge.messages(images[:3])
    predict = f"{url}/v1/predict"
    status, body = _post(predict, b"not a message")
    assert status == 400 and "truncated" in body["error"]
    status, body = _post(predict, messages[0][:-10])
    assert status == 400 and "truncated" in body["error"]
    status, body = _post(predict, b"".join(messages) * 2)  # 6 messages > 4 allowed
    assert status == 413 and "exceeds the limit" in body["error"]
    status, body = _post(f"{url}/v2/other", b"")
    assert status == 404
    status, body = _post(predict, b"".join(messages))
    assert status == 200 and body["predictions"] == expected[:3]
    assert service.info(url)["ir"]["artifact_id"] == cloud.ir.artifact_id
  finally:
    server.terminate()
    server.wait(timeout=30)


@pytest.mark.parametrize("per_channel", [False, True])
def test_weight_codes_are_the_fake_quantized_kernel(per_channel):
  """The codes are those of quantize_weights' output and codes · step is that output, up to
  the float32 rounding of the step: the fake quantizer's step is c / (exp2(b - 1) - 1), and
  XLA's exp2 is not exact at integers, so at 16 bits (32 767 levels) a code at a near-tie can
  come out one step apart. Catches a step, clip or rounding unlike the model's quantizer."""
  kernel = np.random.default_rng(7).normal(size=(3, 3, 8, 16)).astype(np.float32)
  for bits in (2, 4, 6, 8, 16):
    codes, step = integer.weight_codes(kernel, bits, per_channel)
    fake = np.asarray(quantize_weights(jnp.asarray(kernel), jnp.int32(bits), per_channel))
    fake_codes = np.round(fake / step.astype(np.float32))
    if bits <= 8:
      np.testing.assert_array_equal(codes, fake_codes)
    else:
      assert np.abs(codes - fake_codes).max() <= 1 and np.mean(codes != fake_codes) < 0.02
    np.testing.assert_allclose(codes * step, fake, rtol=1e-6,
                               atol=1.01 * step.max() if bits > 8 else 1e-7)
    assert np.abs(codes).max() == integer.levels(bits, True)
