"""The split deployment: integer arithmetic, the IR wire format, exported artifacts, parity
with the fake-quantized model and the HTTP service."""

import dataclasses
import json
import re
import shutil
import struct
import types
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REAL_DIR, REPO, SHIPPED_MODEL, needs_real
from conftest import images as _images, jittered as _jittered, mixed_genome as _mixed_genome
from maxpart_jax import checkpoint, data, energy, runs
from maxpart_jax.deploy import artifact, integer, parity, wire
from maxpart_jax.genome import Genome, quantized_edge
from maxpart_jax.models import get_model
from maxpart_jax.quant import quantize_activations, quantize_weights
from maxpart_jax.jobs import export, storage


def _reference_codes(model, variables, genome, images, largest):
  """The fake-quantized model's IR as codes, and its per-image scale."""
  ir = np.asarray(quantized_edge(model, variables, jnp.asarray(data.normalize(images)), genome))
  return parity.reference_codes(ir, largest)


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


def _requantized(acc, m, mantissa, shift, sign):
  """The requantization in Python integers: floor((sign·acc·m·mantissa + 2^(s-1)) / 2^s),
  clipped to ±WIDE_LIMIT, and whether it was."""
  value = (int(sign) * int(acc) * int(m) * int(mantissa) + (1 << (int(shift) - 1))) >> int(shift)
  return max(-integer.WIDE_LIMIT, min(integer.WIDE_LIMIT, value)), abs(value) > integer.WIDE_LIMIT


def test_requantize_is_exact_integer_arithmetic_rounded_once():
  """Against Python's big integers, on int32 and int64 (16-bit gene) accumulators, every
  shift, clipping values up to the limit, exact ties of both signs and results beyond the
  range. Catches a multiplier truncated before the product, a second rounding, ties
  rounded the wrong way for negative values, and a wrapped instead of clipped result."""
  rng = np.random.default_rng(1)
  n = 6000
  acc = np.concatenate([rng.integers(-2 ** 31, 2 ** 31, n // 2),
                        rng.integers(-2 ** 42, 2 ** 42, n // 2)])
  m = rng.integers(0, integer.WIDE_LIMIT + 1, n)
  mantissa = rng.integers(2 ** 30, 2 ** 31, n)
  shift = rng.integers(1, integer.MAX_SHIFT + 1, n)
  sign = rng.choice([-1, 1], n)
  ties = slice(0, n // 6)  # acc · m · mantissa = odd · 2^(shift - 1): exactly half a step
  m[ties] = 1 << rng.integers(0, 20, n // 6)
  mantissa[ties] = 2 ** 30
  shift[ties] = rng.integers(52, 80, n // 6)
  exponent = shift[ties] - 1 - 30 - np.log2(m[ties]).astype(np.int64)
  acc[ties] = (2 * rng.integers(-1000, 1000, n // 6) + 1) << exponent
  with jax.enable_x64(True):
    got, clipped = (np.asarray(a) for a in integer.requantize(
        jnp.asarray(acc), jnp.asarray(m), jnp.asarray(mantissa), jnp.asarray(shift),
        jnp.asarray(sign)))
  expected = [_requantized(*args) for args in zip(acc, m, mantissa, shift, sign)]
  np.testing.assert_array_equal(got, [e[0] for e in expected])
  np.testing.assert_array_equal(clipped, [e[1] for e in expected])
  assert 0.2 < clipped.mean() < 0.8  # both in and out of range were exercised
  # int32 accumulators take another path (|acc| · mantissa in one int64): the same results.
  small = np.abs(acc) < 2 ** 31
  assert small.sum() > n // 3 and small[ties].sum() > 100
  with jax.enable_x64(True):
    got32, clipped32 = (np.asarray(a) for a in integer.requantize(
        jnp.asarray(acc[small].astype(np.int32)), jnp.asarray(m[small]),
        jnp.asarray(mantissa[small]), jnp.asarray(shift[small]), jnp.asarray(sign[small])))
  np.testing.assert_array_equal(got32, got[small])
  np.testing.assert_array_equal(clipped32, clipped[small])
  products = (sign[ties] * acc[ties]).astype(object) * m[ties] * mantissa[ties]
  assert all(p % (1 << int(s)) == 1 << (int(s) - 1) for p, s in zip(products, shift[ties]))


def test_sixteen_bit_layer_is_exact_through_the_int64_accumulator():
  """A 16-bit-weight, 16-bit-input layer (int64 accumulator) against a numpy convolution of
  the same codes requantized in Python integers: equal to the last unit. Catches a
  pre-shift or rescaling of the wide accumulator that changes the result."""
  rng = np.random.default_rng(3)
  kernel = rng.normal(size=(3, 3, 4, 5)).astype(np.float32)
  spec = integer.LayerSpec(name="b/conv", layer_id=1, block=1, kernel=3, stride=1, groups=1,
                           w_bits=16, a_bits=16, signed_input=False, activation_levels="paper",
                           per_channel=True)
  bn = {"scale": rng.uniform(0.5, 1.5, 5), "bias": rng.uniform(-0.2, 0.2, 5)}
  stats = {"mean": rng.uniform(-0.2, 0.2, 5), "var": rng.uniform(0.5, 2.0, 5)}
  spec, arrays = integer.layer_arrays(spec, kernel, bn, stats, 1e-5)
  assert spec.acc_bits == 64
  x = np.maximum(rng.normal(size=(2, 6, 6, 4)), 0).astype(np.float32) * 3
  with jax.enable_x64(True):
    wide = integer.to_wide(jnp.asarray(x))
    out, clipped = integer.integer_layer(wide, jax.tree.map(jnp.asarray, arrays), spec)
    codes, m = (np.asarray(a) for a in integer.activation_codes(wide, 16, False, "paper"))
  assert not np.any(np.asarray(clipped))
  padded = np.pad(codes.astype(np.int64), ((0, 0), (1, 1), (1, 1), (0, 0)))
  w = arrays["w"].astype(np.int64)
  expected = np.zeros(np.asarray(out).shape, object)
  for i in range(2):
    for y in range(6):
      for x_ in range(6):
        acc = np.einsum("hwc,hwco->o", padded[i, y:y + 3, x_:x_ + 3], w)
        for o in range(5):
          expected[i, y, x_, o] = _requantized(acc[o], m[i], arrays["k"][o], arrays["shift"][o],
                                               arrays["sign"][o])[0] + int(arrays["bias"][o])
  assert np.abs(padded).max() > 2 ** 14 and np.abs(w).max() > 2 ** 14  # 16-bit codes
  np.testing.assert_array_equal(np.asarray(out), expected.astype(np.int64))


@pytest.mark.numerics
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
@pytest.mark.numerics
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
  """A bias beyond the wide range (±2^WIDE_BITS) must raise, not wrap or clip silently."""
  _, _, _, edge, _, _ = exported
  arrays = jax.tree.map(np.copy, edge.arrays)
  layer = next(i for i, spec in enumerate(edge.spec.layers) if spec.integer)
  arrays[layer]["bias"] = arrays[layer]["bias"] + 2 ** (integer.WIDE_BITS + 1)
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



def test_messages_beyond_what_an_edge_produces_are_refused():
  """Non-zero padding bits, a scale outside the edge's fixed-point range (huge, infinite, NaN,
  negative) and float IRs with NaN or huge values: a WireError at both ends, never an
  OverflowError or a NaN passed on."""
  spec = wire.IRSpec((3, 1, 1), 3, "paper", "0123456789abcdef")  # 9 bits: 7 padding bits
  codes = np.array([1, 2, 3]).reshape(3, 1, 1)
  good = wire.encode(codes, 0.5, spec)
  payload, scale, _ = wire.decode(good, spec)
  np.testing.assert_array_equal(payload, codes)
  assert scale == 0.5 and good[-1] >> 1 == 0  # the 9th bit is the last code's top bit
  with pytest.raises(wire.WireError, match="non-zero padding bits"):
    wire.decode(_with_crc(good[:-1] + bytes([good[-1] | 0x80])), spec)
  assert wire.decode(wire.encode(codes, wire.MAX_VALUE, spec), spec)[1] == wire.MAX_VALUE
  for bad in (1e38, 1e300, float("inf"), float("nan"), -1.0, 2 * wire.MAX_VALUE):
    with pytest.raises(wire.WireError, match="IR scale"):
      wire.encode(codes, bad, spec)
    if abs(bad) < 3e38:  # what a float32 header field can hold
      with pytest.raises(wire.WireError, match="IR scale"):
        wire.decode(_with_crc(good[:22] + struct.pack("<f", bad) + good[26:]), spec)
  floats = wire.IRSpec((2, 1, 1), 32, "paper", "0123456789abcdef")
  for values in ([np.nan, 0.0], [2 * wire.MAX_VALUE, 0.0]):
    ir = np.array(values, np.float32).reshape(2, 1, 1)
    with pytest.raises(wire.WireError, match="float IR"):
      wire.encode(ir, 1.0, floats)
    message = wire.encode(np.zeros((2, 1, 1), np.float32), 1.0, floats)
    forged = message[:wire.HEADER_BYTES] + ir.astype("<f4").tobytes()
    with pytest.raises(wire.WireError, match="float IR"):
      wire.decode(_with_crc(forged), floats)

def test_signed_codes_cross_the_wire_in_offset_binary():
  """A defended split's signed message: codes -L..L sent as code + L (by hand: 3-bit codes
  -3, 0, 3 are 0, 3, 6, packed LSB first), refused beyond ±L and by an unsigned receiver."""
  spec = wire.IRSpec((3, 1, 1), 3, "paper", "0123456789abcdef", signed=True)
  codes = np.array([-3, 0, 3]).reshape(3, 1, 1)
  message = wire.encode(codes, 0.5, spec)
  assert message[wire.HEADER_BYTES:] == bytes([0b10011000, 0b1])  # offsets 0, 3, 6, LSB first
  assert message[6] == 3  # the levels code of signed codes
  np.testing.assert_array_equal(wire.decode(message, spec)[0], codes)
  with pytest.raises(wire.WireError, match=r"codes outside -3\.\.3"):
    wire.encode(codes - 1, 0.5, spec)
  with pytest.raises(wire.WireError, match="message levels 3 does not match"):
    wire.decode(message, dataclasses.replace(spec, signed=False))
  # offset 7 would be code 4 > L: a forged payload is refused
  with pytest.raises(wire.WireError, match="codes above 3"):
    wire.decode(_with_crc(message[:wire.HEADER_BYTES] + bytes([0b11111111, 0b1])), spec)


# --- artifacts ------------------------------------------------------------------------


def _in_memory_ir(model, variables, genome, images):
  """The edge program straight from :func:`artifact.build_edge`: not packed, serialized or
  loaded."""
  spec, arrays = artifact.build_edge(model, variables, genome, {"name": "resnet18", "width": 0.125})
  with artifact.edge_device():  # the host CPU, also on a GPU machine
    codes, scales, _ = jax.jit(lambda x: artifact.edge_forward(model, spec, x, arrays))(images)
  return spec, arrays, np.asarray(codes), np.asarray(scales)


@pytest.mark.numerics
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
  # The cloud artifact: the float model on the dequantized IR. The exported program and this
  # jit round differently in float32 (they used 0.4 of rtol = atol = 1e-5 here); the wrong
  # weights, split or dequantization would be off by O(1).
  ir = artifact.dequantize(jnp.asarray(payload), jnp.asarray(scales), cloud.ir)
  np.testing.assert_allclose(artifact.CloudProgram.load(str(out / "cloud")).logits(payload, scales),
                             model.cloud(variables, ir, int(genome.p)), rtol=1e-4, atol=1e-4)
  manifest = json.loads((out / "edge" / "manifest.json").read_text())
  for key, value, match in (("version", 1, "version 1"),
                            # version 3 took 64-bit noise keys (N, 2): its programs are refused
                            ("version", 3, "version 3; this runtime reads version 4"),
                            ("format", "other", "not a maxpart-edge")):
    target = tmp_path / f"{key}_{value}"
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


def test_deployed_noise_draws_128_fresh_bits_per_image_at_every_call(tmp_path, monkeypatch):
  """Issue 39: the edge drew a call's noise from one 32-bit seed, which a search of seeds
  finds. Now every image's key is 128 bits of the operating system's entropy at every call:
  the program gets exactly those words, 4 uint32 per image, and each word changes the noise;
  no two images or calls share key material; the noise is still strength · rms · N(0, 1)
  (a float split: the message is the IR plus the noise, against numpy)."""
  from maxpart_jax.genome import uniform_genome
  from maxpart_jax.privacy import defenses
  model = get_model("resnet18", width=0.125, stage_sizes=(1, 1, 1, 1))
  variables, genome = _jittered(model), uniform_genome(model.info, 1, 32, 32)
  model_spec = {"name": "resnet18", "width": 0.125, "stage_sizes": [1, 1, 1, 1]}
  edge, _ = artifact.export_split(model, variables, genome, model_spec, str(tmp_path),
                                  stack=defenses.parse_stack("noise:0.5"), defense_params=[{}])
  images = _images(6, seed=3)
  spec, arrays = artifact.build_edge(model, variables, genome, model_spec)  # undefended
  with artifact.edge_device():
    ir = np.asarray(jax.jit(lambda x: artifact.edge_forward(model, spec, x, arrays))(images)[0],
                    np.float64)

  received, drawn = [], []
  program = edge.exported

  def spy_call(*args):
    received.append(np.asarray(args[2]))
    return program.call(*args)

  def token_bytes(n):
    drawn.append(np.random.default_rng(len(drawn)).bytes(n))
    return drawn[-1]

  monkeypatch.setattr(edge, "exported", types.SimpleNamespace(call=spy_call))
  with monkeypatch.context() as m:
    m.setattr(artifact.secrets, "token_bytes", token_bytes)
    first = edge.ir(images)[0]
    assert [len(d) for d in drawn] == [6 * 16]  # 128 bits per image, drawn once per call
    np.testing.assert_array_equal(received[0], np.frombuffer(drawn[0], "<u4").reshape(6, 4))
    m.setattr(artifact.secrets, "token_bytes", lambda n: drawn[0])
    np.testing.assert_array_equal(edge.ir(images)[0], first)  # the words decide the noise
    for j in range(4):  # and every word of an image's key changes it
      flipped = bytearray(drawn[0])
      flipped[4 * j::16] = bytes(v ^ 1 for v in flipped[4 * j::16])
      m.setattr(artifact.secrets, "token_bytes", lambda n, f=bytes(flipped): f)
      assert np.all(np.any(edge.ir(images)[0] != first, axis=(1, 2, 3))), j
  # the real source: two calls on the same images share no key word and no noise
  a, b = edge.ir(images)[0], edge.ir(images)[0]
  keys = np.concatenate(received[-2:])
  assert keys.shape == (12, 4) and len(np.unique(keys)) == keys.size
  assert np.all(np.any(a != b, axis=(1, 2, 3)))
  # an explicit key gives the same draws every time (tests, parity)
  key = jax.random.key(7)
  np.testing.assert_array_equal(edge.ir(images, key)[0], edge.ir(images, key)[0])
  rms = np.sqrt((ir ** 2).mean(axis=(1, 2, 3), keepdims=True))
  z = (np.stack([first, a, b]) - ir) / (0.5 * rms)
  assert abs(z.mean()) < 0.015 and z.std() == pytest.approx(1.0, rel=0.02)


def _copy_artifacts(out, to):
  """A copy of an export's edge/ and cloud/ folders."""
  import shutil
  for side in ("edge", "cloud"):
    shutil.copytree(out / side, to / side)
  return to


def _rehash(folder):
  """A manifest edited on purpose, its digests and id recomputed so that they agree with the
  edit: what the checks beyond the digest must still catch."""
  path = folder / "manifest.json"
  manifest = json.loads(path.read_text())
  side = "edge" if manifest["format"] == artifact.EDGE_FORMAT else "cloud"
  manifest["pair"][side] = artifact._body_digest(manifest)  # pylint: disable=protected-access
  manifest["ir"]["artifact_id"] = artifact._pair_id(manifest["pair"])  # pylint: disable=protected-access
  path.write_text(json.dumps(manifest))


def test_artifacts_that_were_changed_or_swapped_are_refused_naming_the_file(exported, tmp_path):
  """A flipped bit in cloud.jax or weights.npz, another export's cloud manifest beside this
  cloud.jax, an edge manifest whose weight bits were edited, and a cloud manifest whose IR
  shape was edited (with its digests recomputed): each is refused at load with the file
  named, instead of serving wrong answers or dropping connections."""
  model, variables, genome, _, _, out = exported
  other = tmp_path / "other"
  artifact.export_split(model, variables, _mixed_genome(model.info, 4, seed=1),
                        {"name": "resnet18", "width": 0.125}, str(other))

  def refused(folder, load, match):
    with pytest.raises(ValueError, match=match):
      load(str(folder))

  for side, name in (("cloud", "cloud.jax"), ("edge", "weights.npz"), ("edge", "edge.jax")):
    bad = _copy_artifacts(out, tmp_path / f"flip_{name}")
    data_ = bytearray((bad / side / name).read_bytes())
    data_[len(data_) // 2] ^= 0x10
    (bad / side / name).write_bytes(bytes(data_))
    load = artifact.CloudProgram.load if side == "cloud" else artifact.EdgeProgram.load
    refused(bad / side, load, re.escape(str(bad / side / name)) + ": SHA-256")
  swapped = _copy_artifacts(out, tmp_path / "swapped")
  (swapped / "cloud" / "manifest.json").write_bytes((other / "cloud" / "manifest.json").read_bytes())
  refused(swapped / "cloud", artifact.CloudProgram.load, "cloud.jax: SHA-256")
  edited = _copy_artifacts(out, tmp_path / "edited")
  manifest = json.loads((edited / "edge" / "manifest.json").read_text())
  layer = next(l for l in manifest["layers"] if l["w_bits"] == 4)
  layer["w_bits"] = 8
  (edited / "edge" / "manifest.json").write_text(json.dumps(manifest))
  refused(edited / "edge", artifact.EdgeProgram.load, "manifest.json was changed after export")
  _rehash(edited / "edge")
  refused(edited / "edge", artifact.EdgeProgram.load,
          f"weights.npz: layer {layer['name']} holds .* bytes of weight codes")
  shape = _copy_artifacts(out, tmp_path / "shape")
  manifest = json.loads((shape / "cloud" / "manifest.json").read_text())
  manifest["ir"]["shape"] = [8, 8, 16]
  (shape / "cloud" / "manifest.json").write_text(json.dumps(manifest))
  _rehash(shape / "cloud")
  refused(shape / "cloud", artifact.CloudProgram.load,
          r"cloud.jax: the program's input is int32\[16, 16, 16\] per image; its manifest's IR")
  # the two halves of different exports name different deployments
  assert (artifact.EdgeProgram.load(str(other / "edge")).spec.ir.artifact_id
          != artifact.CloudProgram.load(str(out / "cloud")).ir.artifact_id)


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


@pytest.mark.numerics
@pytest.mark.parametrize("per_channel,levels", [(True, "paper"), (False, "unsigned")])
def test_parity_measures_against_the_quantizer_the_export_used(per_channel, levels, tmp_path):
  """An edge exported per channel or with all 2^b levels is compared with the fake-quantized
  model of the same settings: its codes agree but for ties (catches a reference built with
  the default quantizer, whose codes differ on about half of the IR)."""
  model = get_model("resnet18", width=0.125)
  variables = _jittered(model, seed=4)
  genome = _mixed_genome(model.info, 4, seed=4)
  edge, cloud = artifact.export_split(model, variables, genome, {"name": "resnet18",
                                      "width": 0.125}, str(tmp_path), per_channel=per_channel,
                                      activation_levels=levels)
  assert edge.spec.quantizer_settings() == {"per_channel": per_channel,
                                            "activation_levels": levels}
  result = parity.parity(model, variables, genome, edge, cloud, _images(16, seed=4))
  assert result["ir_share_of_values_that_differ"] < 0.01, result
  assert result["ir_max_difference"] <= 1 and result["top1_agreement"] >= 15 / 16, result


@pytest.mark.slow
def test_export_of_a_search_is_the_searched_genome_and_refuses_another_config(
    smoke, smoke_search, tmp_path):
  """The smoke search's reported genome, fine-tuned as it was evaluated: the exported split
  has the test accuracy the search reported; a config other than the search's is refused
  with the field that differs (it would fine-tune or quantize another way)."""
  report, workdir = smoke_search
  edge, cloud, made = export.export_searched(smoke, str(workdir), str(tmp_path / "a"))
  assert made["genome"].to_json() == report["genome"]
  test = made["test"]
  result = parity.parity(made["model"], made["variables"], made["genome"], edge, cloud,
                         test.images, test.labels)
  assert result["accuracy_fake_quant"] == pytest.approx(report["test_accuracy"],
                                                        abs=1.01 / len(test))
  other = smoke.copy_and_resolve_references()
  other.fitness.finetune_lr = 2 * smoke.fitness.finetune_lr
  with pytest.raises(ValueError, match="fitness.finetune_lr: searched with"):
    export.export_searched(other, str(workdir), str(tmp_path / "b"))
  # A result committed without its search state: best.json carries the whole identity; a
  # result written before it did has its settings in config.json, and those are checked.
  committed = tmp_path / "committed"
  committed.mkdir()
  shutil.copy(workdir / "best.json", committed / "best.json")
  (committed / "config.json").write_text(smoke.to_json_best_effort())  # as experiments/ do
  assert report["identity"] == storage.stored_identity(str(workdir))[0]
  assert storage.stored_identity(str(committed)) == (report["identity"], True)
  older = {k: v for k, v in report.items() if k != "identity"}
  (committed / "best.json").write_text(json.dumps(older))
  settings, complete = storage.stored_identity(str(committed))
  assert not complete and settings == {k: v for k, v in report["identity"].items()
                                       if k in settings}
  assert "fitness.finetune_lr" in settings and "data_content" not in settings
  _, _, made_c = export.export_searched(smoke, str(committed), str(tmp_path / "c"))
  assert made_c["genome"].to_json() == report["genome"]
  assert jax.tree.all(jax.tree.map(np.array_equal, made_c["variables"], made["variables"]))
  with pytest.raises(ValueError, match="fitness.finetune_lr: searched with"):
    export.export_searched(other, str(committed), str(tmp_path / "d"))
  (committed / "config.json").unlink()
  with pytest.raises(runs.WorkdirError, match="nothing records its settings"):
    export.export_searched(smoke, str(committed), str(tmp_path / "e"))


@pytest.mark.slow
@needs_real
@pytest.mark.numerics
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


@pytest.mark.numerics
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
