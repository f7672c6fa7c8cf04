"""The IR message the edge sends to the cloud (docs/deploy.md, format version 1).

A message is a 34-byte little-endian header and the payload::

    magic "MPIR" | version u8 | bits u8 | levels u8 | reserved u8 (0)
    | height u16 | width u16 | channels u16 | artifact id (8 bytes)
    | scale f32 | payload bytes u32 | CRC-32 u32

``bits < 32``: the payload is the IR's codes (``0..L``), ``bits`` each, packed
least-significant bit first, zero-padded to a whole byte: exactly the
``elements · bits`` payload the energy model charges (:func:`maxpart_jax.energy.ir_payload_bits`)
rounded up to a byte. The IR is ``codes · scale / L``. ``bits == 32``: the payload is
float32 values and ``scale`` is 1. ``levels``: 0 for the paper's step
(``L = 2^(b-1) - 1``), 1 for all ``2^b - 1`` levels, 2 for float, 3 for signed codes
(``-L..L``, ``L = 2^(b-1) - 1``, sent as ``code + L``: the message of a defended split
whose defenses make it negative, docs/method.md §13). The CRC-32 covers the header before
it and the payload.

:func:`decode` rejects, with a :class:`WireError` naming the problem, a message that is
truncated, corrupt, larger than announced, from another deployment (artifact id), or
whose shape, bits, codes, padding or scale do not fit what the receiver expects.
"""

from __future__ import annotations

import dataclasses
import struct
import zlib
from typing import Any

import numpy as np

from maxpart_jax.deploy.integer import FRACTION_BITS, WIDE_BITS, levels as largest_code
from maxpart_jax.quant import FLOAT_BITS

MAGIC = b"MPIR"
VERSION = 1
HEADER = struct.Struct("<4sBBBBHHH8sfII")
HEADER_BYTES = HEADER.size
LEVELS = {"paper": 0, "unsigned": 1, "float": 2, "signed": 3}
MAX_VALUE = 2.0 ** (WIDE_BITS - FRACTION_BITS)
"""The largest IR value (and scale) an edge program produces: its fixed-point range."""


class WireError(ValueError):
  """A message that cannot be decoded as the receiver's IR."""


@dataclasses.dataclass(frozen=True)
class IRSpec:
  """What an IR message of one deployment carries.

  Attributes:
    shape: (height, width, channels) of one image's IR.
    bits: bits per element (``FLOAT_BITS``: float32).
    activation_levels: ``paper`` or ``unsigned`` (ignored for float).
    artifact_id: 16 hex digits naming the exported edge / cloud pair.
    signed: codes in ``-L..L`` (a defended split's message that can be negative).
  """

  shape: tuple[int, int, int]
  bits: int
  activation_levels: str
  artifact_id: str
  signed: bool = False

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, stored: dict[str, Any]) -> IRSpec:
    return cls(**dict(stored, shape=tuple(stored["shape"])))

  @property
  def elements(self) -> int:
    return int(np.prod(self.shape))

  @property
  def levels_code(self) -> int:
    if self.bits >= FLOAT_BITS:
      return LEVELS["float"]
    return LEVELS["signed" if self.signed else self.activation_levels]

  @property
  def largest(self) -> int:
    """Largest code ``L``."""
    return largest_code(self.bits, self.signed, self.activation_levels)

  @property
  def smallest(self) -> int:
    """Smallest code: ``-L`` if signed, else 0."""
    return -self.largest if self.signed else 0

  @property
  def payload_bytes(self) -> int:
    return -(-self.elements * self.bits // 8)

  @property
  def message_bytes(self) -> int:
    return HEADER_BYTES + self.payload_bytes


def pack_bits(values: np.ndarray, bits: int) -> bytes:
  """Unsigned integers below ``2^bits``, ``bits`` each, least-significant bit first."""
  values = np.asarray(values).astype(np.uint64).ravel()
  planes = (values[:, None] >> np.arange(bits, dtype=np.uint64)) & np.uint64(1)
  return np.packbits(planes.astype(np.uint8).ravel(), bitorder="little").tobytes()


def unpack_bits(data: bytes, bits: int, count: int) -> np.ndarray:
  """The inverse of :func:`pack_bits`: ``count`` values as int64."""
  planes = np.unpackbits(np.frombuffer(data, np.uint8), count=count * bits, bitorder="little")
  weights = np.left_shift(np.int64(1), np.arange(bits, dtype=np.int64))
  return planes.reshape(count, bits).astype(np.int64) @ weights


def _check_scale(scale: float) -> None:
  if not 0.0 <= scale <= MAX_VALUE:  # also NaN
    raise WireError(f"IR scale {scale} is outside [0, {MAX_VALUE:g}], the range an edge "
                    "program produces")


def _check_float_values(payload: np.ndarray) -> None:
  if not np.all(np.abs(payload) <= MAX_VALUE):  # also NaN
    raise WireError(f"float IR holds values outside ±{MAX_VALUE:g} (or NaN), beyond what an "
                    "edge program produces")


def encode(payload: np.ndarray, scale: float, spec: IRSpec) -> bytes:
  """One image's IR message: ``payload`` is its codes (``bits < 32``) or float32 values."""
  payload = np.asarray(payload)
  if tuple(payload.shape) != tuple(spec.shape):
    raise WireError(f"IR of shape {tuple(payload.shape)}; this deployment sends {spec.shape}")
  if spec.bits >= FLOAT_BITS:
    _check_float_values(payload)
    body, scale = payload.astype("<f4").tobytes(), 1.0
  else:
    if payload.min() < spec.smallest or payload.max() > spec.largest:
      raise WireError(f"codes outside {spec.smallest}..{spec.largest} for a {spec.bits}-bit IR")
    body = pack_bits(payload.astype(np.int64) - spec.smallest, spec.bits)
  _check_scale(scale)
  head = HEADER.pack(MAGIC, VERSION, spec.bits, spec.levels_code, 0, *spec.shape,
                     bytes.fromhex(spec.artifact_id), scale, len(body), 0)[:-4]
  return head + struct.pack("<I", zlib.crc32(body, zlib.crc32(head))) + body


def decode(data: bytes, spec: IRSpec) -> tuple[np.ndarray, float, int]:
  """The first message in ``data``: ``(payload, scale, bytes used)``; raises :class:`WireError`.

  ``payload`` is the codes (int32) or the float32 IR, shaped ``spec.shape``.
  """
  if len(data) < HEADER_BYTES:
    raise WireError(f"truncated message: {len(data)} bytes, the header alone is {HEADER_BYTES}")
  (magic, version, bits, levels_code, reserved, h, w, c, artifact, scale, size,
   crc) = HEADER.unpack_from(data)
  if magic != MAGIC:
    raise WireError(f"not an IR message (magic {magic!r}, expected {MAGIC!r})")
  if version != VERSION:
    raise WireError(f"message format version {version}; this receiver reads {VERSION}")
  if artifact.hex() != spec.artifact_id:
    raise WireError(f"message from deployment {artifact.hex()}; this cloud serves "
                    f"{spec.artifact_id} (export the edge and cloud together)")
  for name, got, want in (("shape", (h, w, c), tuple(spec.shape)), ("bits", bits, spec.bits),
                          ("levels", levels_code, spec.levels_code), ("reserved byte", reserved, 0)):
    if got != want:
      raise WireError(f"message {name} {got} does not match the deployment's {want}")
  if size != spec.payload_bytes:
    raise WireError(f"message announces {size} payload bytes; a {spec.shape} IR at {bits} bits "
                    f"is {spec.payload_bytes}")
  end = HEADER_BYTES + size
  if len(data) < end:
    raise WireError(f"truncated message: {len(data)} bytes of {end}")
  body = bytes(data[HEADER_BYTES:end])
  if zlib.crc32(body, zlib.crc32(bytes(data[:HEADER_BYTES - 4]))) != crc:
    raise WireError("corrupt message: CRC-32 mismatch")
  _check_scale(scale)
  if bits >= FLOAT_BITS:
    payload = np.frombuffer(body, "<f4").astype(np.float32)
    _check_float_values(payload)
  else:
    used_bits = spec.elements * bits % 8
    if used_bits and body[-1] >> used_bits:
      raise WireError("non-zero padding bits after the last code")
    payload = unpack_bits(body, bits, spec.elements) + spec.smallest
    if payload.max(initial=0) > spec.largest:
      raise WireError(f"codes above {spec.largest}, the largest {bits}-bit code")
    payload = payload.astype(np.int32)
  return payload.reshape(spec.shape), float(scale), end


def decode_all(data: bytes, spec: IRSpec) -> tuple[np.ndarray, np.ndarray]:
  """Every message of a concatenation: ``(payloads (N, ...), scales (N,))``."""
  payloads, scales, offset = [], [], 0
  view = memoryview(data)
  while offset < len(data):
    payload, scale, used = decode(view[offset:], spec)
    payloads.append(payload)
    scales.append(scale)
    offset += used
  if not payloads:
    raise WireError("no message in an empty body")
  return np.stack(payloads), np.asarray(scales, np.float32)
