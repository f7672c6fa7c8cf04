"""Export a searched split into an edge artifact and a cloud artifact, and load them.

Edge artifact (a folder; docs/deploy.md):

* ``manifest.json``: format name and version, model, genome, split, IR spec, every edge
  layer's spec (:class:`~maxpart_jax.deploy.integer.LayerSpec`), the SHA-256 of the other
  files, and the artifact id: a hash of this manifest and the cloud's, so it names every
  file of both. Loading checks all of it and names the file that does not match.
* ``weights.npz``: per integer layer its weight codes packed at the layer's bit width
  (offset binary), the fixed-point multipliers and the wide biases; per float layer its
  float32 kernel and folded batch norm.
* ``edge.jax``: the edge program, serialized with ``jax.export`` (StableHLO; batch size
  symbolic): ``(uint8 images (N, H, W, 3), weights, noise keys (N, 4) uint32) -> (IR codes
  or float IR, scales (N,))``. A defended split (:func:`export_split` with a defense
  stack) runs its defenses' device layers after the IR: a bottleneck as one more integer
  layer (1x1, weights and input at the IR's bits), noise drawn from each image's 128-bit key
  (``threefry4x32``), which the device draws from the operating system's entropy and keeps
  (it never travels: whoever knew it could subtract the noise). Version 3 took 64-bit keys
  (N, 2); its artifacts are refused (export them again).
  It is lowered for CPUs whatever machine exports it, and runs on the host CPU: an edge
  device is a CPU-class processor, and XLA's GPU backend has no integer convolutions
  beyond cuDNN's int8 forms (int64 accumulators are out of reach on GPUs and TPUs).

Cloud artifact: ``manifest.json`` (likewise) and ``cloud.jax``, the float cloud part with its
weights inside: ``(IR codes or float IR, scales) -> logits``, lowered for CPUs, NVIDIA GPUs and
TPUs, so a split exported on one kind of machine serves on another.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import secrets
from typing import Any, Callable, Iterator

import jax
from jax import export as jax_export
import jax.numpy as jnp
import numpy as np

from maxpart_jax import data
from maxpart_jax.checkpoint import file_digest, write_json
from maxpart_jax.deploy import integer, wire
from maxpart_jax.genome import Genome, effective_bits, validate_genome
from maxpart_jax.models import SplitModel, Variables, model_from_spec
from maxpart_jax.models.layers import batch_norm
from maxpart_jax.privacy import defenses as defenses_lib
from maxpart_jax.quant import FLOAT_BITS, check_activation_levels
from maxpart_jax.registry import Registry

EDGE_FORMAT, CLOUD_FORMAT, FORMAT_VERSION = "maxpart-edge", "maxpart-cloud", 4
UNEXPORTED_ID = "0" * 16
"""The artifact id of an edge built in memory (:func:`build_edge`): no cloud accepts it."""
EDGE_PLATFORMS, CLOUD_PLATFORMS = ("cpu",), ("cpu", "cuda", "tpu")
"""What the exported programs are lowered for (see the module docstring)."""


@contextlib.contextmanager
def edge_device() -> Iterator[None]:
  """Where integer edge code runs: int64 enabled, the host CPU as the default device (on a
  GPU machine too, whose backend cannot run integer convolutions)."""
  with jax.enable_x64(True), jax.default_device(jax.local_devices(backend="cpu")[0]):
    yield


@dataclasses.dataclass(frozen=True)
class EdgeSpec:
  """Everything static about an edge program: the model, the split and each layer."""

  model: dict[str, Any]
  dataset: str
  genome: dict[str, Any]
  split: int
  block_label: str
  layers: tuple[integer.LayerSpec, ...]
  ir: wire.IRSpec
  per_channel: bool
  defenses: str = "none"

  @property
  def stack(self) -> defenses_lib.Stack:
    """The defenses between the IR and the message (:func:`defenses_lib.parse_stack`)."""
    return defenses_lib.parse_stack(self.defenses)

  def quantizer_settings(self) -> dict[str, Any]:
    """``{"per_channel", "activation_levels"}`` the program was exported with (keyword
    arguments of :func:`maxpart_jax.genome.quantized_apply`)."""
    return {"per_channel": self.per_channel, "activation_levels": self.ir.activation_levels}

  def to_json(self) -> dict[str, Any]:
    return {"format": EDGE_FORMAT, "version": FORMAT_VERSION, "model": self.model,
            "dataset": self.dataset, "genome": self.genome, "split": self.split,
            "block": self.block_label, "fraction_bits": integer.FRACTION_BITS,
            "per_channel": self.per_channel, "ir": self.ir.to_json(),
            "defenses": self.defenses,
            "layers": [dataclasses.asdict(layer) for layer in self.layers]}

  @classmethod
  def from_json(cls, manifest: dict[str, Any]) -> EdgeSpec:
    if manifest["fraction_bits"] != integer.FRACTION_BITS:
      raise ValueError(f"edge artifact uses {manifest['fraction_bits']} fractional bits; this "
                       f"runtime uses {integer.FRACTION_BITS}")
    return cls(model=manifest["model"], dataset=manifest["dataset"], genome=manifest["genome"],
               split=manifest["split"], block_label=manifest["block"],
               layers=tuple(integer.LayerSpec(**layer) for layer in manifest["layers"]),
               ir=wire.IRSpec.from_json(manifest["ir"]), per_channel=manifest["per_channel"],
               defenses=manifest["defenses"])


def _body_digest(manifest: dict[str, Any]) -> str:
  """SHA-256 of a manifest without its pairing fields (``pair``, the IR's artifact id)."""
  body = {k: v for k, v in manifest.items() if k != "pair"}
  body["ir"] = {k: v for k, v in body["ir"].items() if k != "artifact_id"}
  return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _pair_id(pair: dict[str, str]) -> str:
  """The artifact id of an edge / cloud pair: both manifests' digests, hashed together."""
  return hashlib.sha256(f"{pair['edge']}:{pair['cloud']}".encode()).hexdigest()[:16]


def _read_manifest(directory: str, kind: str) -> dict[str, Any]:
  """``directory/manifest.json``, checked: a ``kind`` artifact of the version this runtime
  reads, unchanged since export (its digest), of the pair its artifact id names, and every
  file it lists with the SHA-256 it lists. ``ValueError`` naming the file otherwise."""
  path = os.path.join(directory, "manifest.json")
  with open(path) as f:
    manifest = json.load(f)
  if manifest.get("format") != kind:
    raise ValueError(f"{path}: not a {kind} artifact (format {manifest.get('format')!r})")
  if manifest.get("version") != FORMAT_VERSION:
    raise ValueError(f"{path}: {kind} artifact version {manifest.get('version')}; this runtime "
                     f"reads version {FORMAT_VERSION} (export the split again)")
  side = "edge" if kind == EDGE_FORMAT else "cloud"
  if _body_digest(manifest) != manifest["pair"][side]:
    raise ValueError(f"{path} was changed after export: its content does not match its "
                     "digest")
  if _pair_id(manifest["pair"]) != manifest["ir"]["artifact_id"]:
    raise ValueError(f"{path}: artifact id {manifest['ir']['artifact_id']} is not the id of "
                     "the pair it names")
  for name, expected in manifest["files"].items():
    got = file_digest(os.path.join(directory, name))
    if got != expected:
      raise ValueError(f"{os.path.join(directory, name)}: SHA-256 {got[:16]}... is not the "
                       f"{expected[:16]}... its manifest lists: the file was changed or comes "
                       "from another export")
  return manifest


def fresh_noise_keys(n: int) -> np.ndarray:
  """``n`` noise keys' words, (n, 4) uint32, from the operating system's entropy: 128 fresh
  bits per image, so no image of a call shares key material with another image or call."""
  words = defenses_lib.NOISE_KEY_WORDS
  return np.frombuffer(secrets.token_bytes(4 * words * n), "<u4").reshape(n, words)


def _read_exported(path: str) -> jax_export.Exported:
  with open(path, "rb") as f:
    return jax_export.deserialize(bytearray(f.read()))


def _edge_layers(model: SplitModel, variables: Variables, genome: Genome, per_channel: bool,
                 activation_levels: str) -> tuple[list[integer.LayerSpec], list[dict[str, Any]]]:
  """Specs and arrays of every conv on the edge, in layer order."""
  info, p = model.info, int(genome.p)
  w_bits, a_bits, _ = (np.asarray(b) for b in effective_bits(info, genome))
  epsilon = batch_norm(False).epsilon
  specs, arrays = [], []
  for layer in info.layers:
    if layer.block >= p:
      continue
    block_name, conv = layer.name.split("/")
    block = model.chain.blocks[layer.block]
    spec = integer.LayerSpec(
        name=layer.name, layer_id=layer.id, block=layer.block, kernel=layer.kernel[0],
        stride=layer.stride, groups=layer.groups, w_bits=int(w_bits[layer.id]),
        a_bits=int(a_bits[layer.id]), signed_input=bool(getattr(block, "signed_input", False)),
        activation_levels=activation_levels, per_channel=per_channel)
    bn = integer.BATCH_NORM_OF[conv]
    spec, arr = integer.layer_arrays(
        spec, variables["params"][block_name][conv]["kernel"],
        variables["params"][block_name][bn], variables["batch_stats"][block_name][bn], epsilon)
    specs.append(spec)
    arrays.append(arr)
  return specs, arrays


@dataclasses.dataclass
class DeviceWork:
  """What a defense's integer form reads while the edge program runs it: the edge's spec,
  the images' noise keys (or None), the defenses' integer layers by name, the overflow
  recorder, and whether the value is still the IR itself (no device work before)."""

  spec: EdgeSpec
  keys: jax.Array | None
  layers: dict[str, tuple[integer.LayerSpec, dict[str, jax.Array]]]
  clipped_where: Callable[[jax.Array], None]
  on_ir: bool = True


@dataclasses.dataclass(frozen=True)
class IntegerDefense:
  """A defense's device work in the integer edge program (:data:`INTEGER_DEFENSES`).

  Attributes:
    layers: ``(index, strength, params, split, ir_bits, activation_levels) -> (specs,
      arrays)``: its integer layers, built at export from its trained parameters.
    run: ``(work, x, index, strength) -> x``: its work on the wide value ``x``, as the
      float defense does it (:class:`DeviceWork`).
    on_ir_only: it must act on the IR itself, before any other device work.
    draws_noise: it reads the images' noise keys.
  """

  layers: Callable[..., tuple[list[integer.LayerSpec], list[dict[str, Any]]]]
  run: Callable[[DeviceWork, jax.Array, int, float], jax.Array]
  on_ir_only: bool = False
  draws_noise: bool = False


def _no_layers(*args: Any) -> tuple[list, list]:
  del args
  return [], []


def _bottleneck_layers(index: int, strength: float, params: Any, split: int, ir_bits: int,
                       activation_levels: str) -> tuple[list[integer.LayerSpec], list[dict]]:
  """A 1x1 integer layer: weights per tensor and input at the IR's bits, its bias exact in
  the wide format."""
  del strength
  kernel = np.asarray(params["encode"]["kernel"], np.float32)
  channels = kernel.shape[-1]
  spec = integer.LayerSpec(
      name=f"defense{index}/bottleneck", layer_id=-1 - index, block=split, kernel=1, stride=1,
      groups=1, w_bits=ir_bits, a_bits=ir_bits, signed_input=False,
      activation_levels=activation_levels, per_channel=False)
  # no batch norm: the folding's scale is exactly 1 (var 1, epsilon 0) and its shift the bias
  spec, arr = integer.layer_arrays(
      spec, kernel[None, None], {"scale": np.ones(channels), "bias": params["encode"]["bias"]},
      {"mean": np.zeros(channels), "var": np.ones(channels)}, 0.0)
  return [spec], [arr]


def _bottleneck_run(work: DeviceWork, x: jax.Array, index: int, strength: float) -> jax.Array:
  """The bottleneck quantizes its input (the IR) at the IR's bits."""
  del index, strength
  layer, arr = work.layers["bottleneck"]
  x, clipped = (integer.integer_layer if layer.integer else integer.float_layer)(x, arr, layer)
  work.clipped_where(clipped)
  return x


def _noise_run(work: DeviceWork, x: jax.Array, index: int, strength: float) -> jax.Array:
  """``strength · rms · N(0, 1)`` per image, drawn from the image's key split once per
  defense (as ``Stack.send`` splits it), added to the quantized IR or to the work before."""
  stack, ir = work.spec.stack, work.spec.ir
  if work.keys is None:
    raise ValueError(f"{stack.spec()!r} draws noise on the device: pass one key per image")
  per_defense = jax.vmap(lambda k: jax.random.split(k, len(stack.items)))(work.keys)
  if work.on_ir and ir.bits < FLOAT_BITS:  # the quantized IR, as the fake quantizer hands it on
    codes, m = integer.activation_codes(x, ir.bits, False, ir.activation_levels)
    value = dequantize(codes, integer.to_float(m), dataclasses.replace(ir, signed=False))
  else:
    value = integer.to_float(x)
  noise = stack.defenses[index][0]
  noisy = jax.vmap(lambda v, k: noise.send({}, v[None], k, strength)[0])(
      value, per_defense[:, index])
  x, clipped = integer.saturate(integer.to_wide(noisy))
  work.clipped_where(clipped)
  return x


INTEGER_DEFENSES: Registry[IntegerDefense] = Registry("defense with an integer form")
"""The device work of each defense that has some, by the defense's name; a defense whose
``edge_layer`` costs something must register here (or export refuses it by name)."""
INTEGER_DEFENSES.register("bottleneck", IntegerDefense(_bottleneck_layers, _bottleneck_run,
                                                       on_ir_only=True))
INTEGER_DEFENSES.register("noise", IntegerDefense(_no_layers, _noise_run, draws_noise=True))


def integer_form(defense: defenses_lib.Defense, ir_shape: tuple[int, int, int],
                 strength: float) -> IntegerDefense | None:
  """The integer form of ``defense`` (None: it does nothing on the device); ``ValueError``
  naming the registry for a defense with device work and no integer form."""
  form = INTEGER_DEFENSES.get(defense.name, None)
  if form is None and defense.edge_layer(ir_shape, strength) != (0, 0):
    raise ValueError(f"defense {defense.name!r} works on the device but has no integer form "
                     "in the edge program: register one in "
                     "maxpart_jax.deploy.artifact.INTEGER_DEFENSES")
  return form


def _defense_layers(ir_shape: tuple[int, int, int], split: int, ir_bits: int,
                    stack: defenses_lib.Stack, defense_params: list, activation_levels: str
                    ) -> tuple[list[integer.LayerSpec], list[dict[str, Any]]]:
  """Specs and arrays of the defenses' integer layers. ``ValueError`` for a defense that has
  device work but no integer form, or one that must act on the IR placed after another."""
  specs, arrays, on_ir = [], [], True
  for i, ((defense, strength), params) in enumerate(zip(stack.defenses, defense_params)):
    form = integer_form(defense, ir_shape, strength)
    if form is None:
      continue
    if form.on_ir_only and not on_ir:
      raise ValueError(f"{stack.spec()!r}: the edge program runs a {defense.name} only on the "
                       "IR itself (put it first among the defenses that act on the device)")
    more_specs, more_arrays = form.layers(i, strength, params, split, ir_bits, activation_levels)
    specs += more_specs
    arrays += more_arrays
    on_ir = False
  return specs, arrays


def _device_defenses(spec: EdgeSpec, x: jax.Array, keys: jax.Array | None,
                     layers: dict[str, tuple[integer.LayerSpec, dict[str, jax.Array]]],
                     clipped_where: Callable[[jax.Array], None]) -> jax.Array:
  """The defenses' device work on the wide IR ``x``, in the stack's order, as
  :mod:`maxpart_jax.privacy.defended` does it in float."""
  work = DeviceWork(spec, keys, layers, clipped_where)
  for i, (defense, strength) in enumerate(spec.stack.defenses):
    form = INTEGER_DEFENSES.get(defense.name, None)
    if form is not None:
      x = form.run(work, x, i, strength)
      work.on_ir = False
  return x


def edge_forward(model: SplitModel, spec: EdgeSpec, images: jax.Array,
                 arrays: list[dict[str, jax.Array]], keys: jax.Array | None = None
                 ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The integer edge program: uint8 images to ``(IR codes, scales, overflowed (N,))``
  (a float IR and ones at 32 bits); a defended split's message codes, its noise drawn from
  ``keys`` (one per image; none needed without noise). Run it inside :func:`edge_device`."""
  x = data.normalize_on_device(images, spec.dataset)
  by_block: dict[int, dict[str, tuple[integer.LayerSpec, dict[str, jax.Array]]]] = {}
  for layer, arr in zip(spec.layers, arrays):
    by_block.setdefault(layer.block, {})[layer.name.split("/")[1]] = (layer, arr)
  overflow = jnp.zeros((images.shape[0],), bool)

  def clipped_where(clipped):
    nonlocal overflow
    overflow = overflow | integer.overflowed(clipped)

  for b, block in enumerate(model.chain.blocks[:spec.split]):

    def run(name, v, layers=by_block[b]):
      layer, arr = layers[name]
      out, clipped = (integer.integer_layer if layer.integer else integer.float_layer)(
          v, arr, layer)
      clipped_where(clipped)
      return out

    x, clipped = integer.saturate(integer.block_forward(block)(run, x, block))
    clipped_where(clipped)
  ir = spec.ir
  if spec.stack.items:  # its layers are filed under the block after the split
    x = _device_defenses(spec, x, keys, by_block.get(spec.split, {}), clipped_where)
  if ir.bits >= FLOAT_BITS:
    return integer.to_float(x), jnp.ones((x.shape[0],), jnp.float32), overflow
  codes, m = integer.activation_codes(x, ir.bits, ir.signed, ir.activation_levels)
  return codes, integer.to_float(m), overflow


def dequantize(payload: jax.Array, scales: jax.Array, ir: wire.IRSpec) -> jax.Array:
  """The float IR the cloud runs on: ``codes · (scale / L)``, as the fake quantizer computes it."""
  if ir.bits >= FLOAT_BITS:
    return payload.astype(jnp.float32)
  step = scales.astype(jnp.float32) / jnp.float32(ir.largest)
  return payload.astype(jnp.float32) * step[:, None, None, None]


def _pack_arrays(specs: list[integer.LayerSpec], arrays: list[dict[str, np.ndarray]]
                 ) -> dict[str, np.ndarray]:
  """weights.npz content: integer kernels packed at their bit width (offset binary)."""
  out = {}
  for spec, arr in zip(specs, arrays):
    for key, value in arr.items():
      if key == "w" and spec.integer:
        offset = integer.levels(spec.w_bits, True)
        out[f"{spec.name}/w_packed"] = np.frombuffer(
            wire.pack_bits(np.asarray(value, np.int64) + offset, spec.w_bits), np.uint8)
        out[f"{spec.name}/w_shape"] = np.asarray(value.shape, np.int64)
      else:
        out[f"{spec.name}/{key}"] = np.asarray(value)
  return out


def _unpack_arrays(specs: tuple[integer.LayerSpec, ...], stored: Any, path: str
                   ) -> list[dict[str, np.ndarray]]:
  """weights.npz content as each layer's arrays; ``ValueError`` naming the layer whose packed
  codes do not have the size its bit width gives."""
  arrays = []
  for spec in specs:
    prefix = f"{spec.name}/"
    arr = {k[len(prefix):]: np.asarray(stored[k]) for k in stored.files if k.startswith(prefix)}
    if spec.integer:
      shape = tuple(arr.pop("w_shape"))
      count, packed = int(np.prod(shape)), arr.pop("w_packed")
      if packed.size != -(-count * spec.w_bits // 8):
        raise ValueError(f"{path}: layer {spec.name} holds {packed.size} bytes of weight codes; "
                         f"{count} codes at {spec.w_bits} bits are {-(-count * spec.w_bits // 8)}")
      offset = integer.levels(spec.w_bits, True)
      codes = wire.unpack_bits(packed.tobytes(), spec.w_bits, count) - offset
      arr["w"] = codes.reshape(shape).astype(integer.code_dtype(offset))
    arrays.append(arr)
  return arrays


def _check_shape(path: str, what: str, aval: Any, ir: wire.IRSpec, against: str) -> None:
  """The program's IR ``what`` (input or output, batch dimension first) is ``ir``'s shape
  and element type."""
  dtype = np.float32 if ir.bits >= FLOAT_BITS else np.int32
  if tuple(aval.shape[1:]) != tuple(ir.shape) or np.dtype(aval.dtype) != dtype:
    raise ValueError(f"{path}: the program's {what} is {np.dtype(aval.dtype).name}"
                     f"{list(aval.shape[1:])} per image; {against} is "
                     f"{np.dtype(dtype).name}{list(ir.shape)}")


class EdgeProgram:
  """A loaded (or freshly exported) edge artifact: uint8 images in, IR messages out."""

  def __init__(self, spec: EdgeSpec, arrays: list[dict[str, np.ndarray]],
               exported: jax_export.Exported):
    self.spec, self.arrays, self.exported = spec, arrays, exported
    self.input_shape = tuple(model_from_spec(spec.model).input_shape)
    self._draws_noise = any(getattr(INTEGER_DEFENSES.get(d.name, None), "draws_noise", False)
                            for d, _ in spec.stack.defenses)
    with edge_device():  # on the CPU once, not at every call; int64 stays int64
      self._device_arrays = jax.device_put(arrays)

  @classmethod
  def load(cls, directory: str) -> EdgeProgram:
    """Reads an edge artifact; ``ValueError`` naming the file if it is of another format or
    version, changed since export, or inconsistent (weights, program and manifest)."""
    spec = EdgeSpec.from_json(_read_manifest(directory, EDGE_FORMAT))
    with np.load(os.path.join(directory, "weights.npz")) as stored:
      arrays = _unpack_arrays(spec.layers, stored, os.path.join(directory, "weights.npz"))
    exported = _read_exported(os.path.join(directory, "edge.jax"))
    _check_shape(os.path.join(directory, "edge.jax"), "output", exported.out_avals[0],
                 spec.ir, "its manifest's IR")
    return cls(spec, arrays, exported)

  def ir(self, images: np.ndarray, key: jax.Array | None = None
         ) -> tuple[np.ndarray, np.ndarray]:
    """``(codes or float IR (N, H, W, C), scales (N,))`` of a batch of uint8 images.

    ``key``: where a defended edge draws its noise (image ``i`` from
    ``defenses.image_keys(key, i, 1)``: reproducible, for tests and parity); by default a
    fresh 128-bit key per image from the operating system's entropy (:func:`fresh_noise_keys`),
    which stays on the device.
    """
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != self.input_shape:
      raise ValueError(f"the edge program takes uint8 images of shape (N, "
                       f"{', '.join(map(str, self.input_shape))}), got {images.dtype} "
                       f"{images.shape}")
    with edge_device():
      if not self._draws_noise:  # the program takes keys, but only noise reads them
        keys = np.zeros((len(images), defenses_lib.NOISE_KEY_WORDS), np.uint32)
      elif key is None:
        keys = fresh_noise_keys(len(images))
      else:
        keys = jax.random.key_data(defenses_lib.image_keys(key, 0, len(images)))
      payload, scales, overflow = (np.asarray(a) for a in self.exported.call(
          images, self._device_arrays, keys))
    if overflow.any():
      raise ValueError(f"activations of images {np.flatnonzero(overflow).tolist()} left the "
                       f"edge's fixed-point range ±{wire.MAX_VALUE:g}: their IR would be wrong")
    return payload, scales

  def messages(self, images: np.ndarray, key: jax.Array | None = None) -> list[bytes]:
    """One IR message per image (``key``: see :meth:`ir`)."""
    payload, scales = self.ir(images, key)
    return [wire.encode(p, float(s), self.spec.ir) for p, s in zip(payload, scales)]


class CloudProgram:
  """A loaded (or freshly exported) cloud artifact: IR messages in, logits out."""

  def __init__(self, ir: wire.IRSpec, num_classes: int, exported: jax_export.Exported):
    self.ir, self.num_classes, self.exported = ir, num_classes, exported

  @classmethod
  def load(cls, directory: str) -> CloudProgram:
    """Reads a cloud artifact; ``ValueError`` naming the file if it is of another format or
    version, changed since export, or its program does not take the manifest's IR."""
    manifest = _read_manifest(directory, CLOUD_FORMAT)
    ir = wire.IRSpec.from_json(manifest["ir"])
    exported = _read_exported(os.path.join(directory, "cloud.jax"))
    _check_shape(os.path.join(directory, "cloud.jax"), "input", exported.in_avals[0], ir,
                 "its manifest's IR")
    return cls(ir, manifest["num_classes"], exported)

  def logits(self, payload: np.ndarray, scales: np.ndarray) -> np.ndarray:
    return np.asarray(self.exported.call(np.asarray(payload), np.asarray(scales, np.float32)))

  def predict_messages(self, body: bytes) -> np.ndarray:
    """Logits of every message in a concatenation; :class:`wire.WireError` if one is bad."""
    payload, scales = wire.decode_all(body, self.ir)
    return self.logits(payload, scales)


def build_edge(model: SplitModel, variables: Variables, genome: Genome,
               model_spec: dict[str, Any], *, dataset: str = "cifar100", per_channel: bool = False,
               activation_levels: str = "paper",
               stack: defenses_lib.Stack = defenses_lib.Stack(), defense_params: list = ()
               ) -> tuple[EdgeSpec, list[dict[str, np.ndarray]]]:
  """The edge program's spec and arrays for ``genome`` (see :func:`export_split`); run them
  with :func:`edge_forward`."""
  validate_genome(model.info, genome)
  check_activation_levels(activation_levels)
  info, p = model.info, int(genome.p)
  stack.check(info.blocks[p - 1].out_shape)
  stack.check_params(list(defense_params))
  w_bits, a_bits, ir_bits = effective_bits(info, genome)
  specs, arrays = _edge_layers(model, variables, genome, per_channel, activation_levels)
  extra_specs, extra_arrays = _defense_layers(info.blocks[p - 1].out_shape, p, int(ir_bits),
                                              stack, list(defense_params), activation_levels)
  genome_json = Genome(p=genome.p, w_bits=w_bits, a_bits=a_bits).to_json()
  ir = wire.IRSpec(shape=stack.message_shape(info.blocks[p - 1].out_shape), bits=int(ir_bits),
                   activation_levels=activation_levels, artifact_id=UNEXPORTED_ID,
                   signed=stack.signed and int(ir_bits) < FLOAT_BITS)
  spec = EdgeSpec(model=model_spec, dataset=dataset, genome=genome_json, split=p,
                  block_label=info.blocks[p - 1].label, layers=tuple(specs + extra_specs), ir=ir,
                  per_channel=per_channel, defenses=stack.spec())
  return spec, arrays + extra_arrays


def export_split(model: SplitModel, variables: Variables, genome: Genome, model_spec: dict[str, Any],
                 directory: str, *, dataset: str = "cifar100", per_channel: bool = False,
                 activation_levels: str = "paper",
                 stack: defenses_lib.Stack = defenses_lib.Stack(), defense_params: list = ()
                 ) -> tuple[EdgeProgram, CloudProgram]:
  """Writes ``directory/edge`` and ``directory/cloud`` for ``genome`` and returns both programs.

  Args:
    model, variables: the model and the (fine-tuned) variables the genome runs with.
    genome: one concrete genome.
    model_spec: ``{"name": ..., **builder kwargs}`` (as in a pre-trained model's model.json).
    dataset: whose normalization the edge applies to its uint8 images.
    per_channel, activation_levels: the quantizer settings the search used.
    stack, defense_params: a defended split's defenses and their parameters
      (:class:`maxpart_jax.privacy.defended.DefendedSplit`; its ``export`` passes them).
  """
  spec, arrays = build_edge(model, variables, genome, model_spec, dataset=dataset,
                            per_channel=per_channel, activation_levels=activation_levels,
                            stack=stack, defense_params=defense_params)
  ir, p = spec.ir, spec.split
  batch = jax_export.symbolic_shape("n")[0]
  images = jax.ShapeDtypeStruct((batch, *model.input_shape), jnp.uint8)
  keys = jax.ShapeDtypeStruct((batch, defenses_lib.NOISE_KEY_WORDS), jnp.uint32)
  with edge_device():
    run = jax.jit(lambda x, arr, k: edge_forward(
        model, spec, x, arr, jax.random.wrap_key_data(k, impl=defenses_lib.NOISE_KEY_IMPL)))
    edge = jax_export.export(run, platforms=EDGE_PLATFORMS)(
        images, jax.tree.map(jnp.asarray, arrays), keys)
  payload_type = jnp.float32 if ir.bits >= FLOAT_BITS else jnp.int32
  cloud_vars, cloud_defenses = jax.device_get((variables, list(defense_params)))
  cloud = jax_export.export(jax.jit(
      lambda payload, scales: model.cloud(
          cloud_vars, stack.receive(cloud_defenses, dequantize(payload, scales, ir)), p)),
      platforms=CLOUD_PLATFORMS)(
          jax.ShapeDtypeStruct((batch, *ir.shape), payload_type),
          jax.ShapeDtypeStruct((batch,), jnp.float32))
  edge_dir, cloud_dir = os.path.join(directory, "edge"), os.path.join(directory, "cloud")
  os.makedirs(edge_dir, exist_ok=True)
  os.makedirs(cloud_dir, exist_ok=True)
  with open(os.path.join(edge_dir, "weights.npz"), "wb") as f:
    np.savez(f, **_pack_arrays(spec.layers, arrays))
  with open(os.path.join(edge_dir, "edge.jax"), "wb") as f:
    f.write(edge.serialize())
  with open(os.path.join(cloud_dir, "cloud.jax"), "wb") as f:
    f.write(cloud.serialize())
  # Each manifest lists its files' SHA-256; the artifact id hashes both manifests, so it
  # names exactly these files (docs/deploy.md §3).
  manifests = {
      "edge": {**spec.to_json(), "files": {name: file_digest(os.path.join(edge_dir, name))
                                           for name in ("weights.npz", "edge.jax")}},
      "cloud": {"format": CLOUD_FORMAT, "version": FORMAT_VERSION, "model": model_spec,
                "split": p, "ir": ir.to_json(), "defenses": stack.spec(),
                "num_classes": int(model.info.layers[-1].out_shape[-1]),
                "files": {"cloud.jax": file_digest(os.path.join(cloud_dir, "cloud.jax"))}}}
  pair = {side: _body_digest(manifest) for side, manifest in manifests.items()}
  for side, folder in (("edge", edge_dir), ("cloud", cloud_dir)):
    manifest = {**manifests[side], "pair": pair,
                "ir": {**manifests[side]["ir"], "artifact_id": _pair_id(pair)}}
    write_json(os.path.join(folder, "manifest.json"), manifest)
  return EdgeProgram.load(edge_dir), CloudProgram.load(cloud_dir)
