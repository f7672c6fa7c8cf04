"""Check an exported split against the model: :func:`parity` runs the integer edge and the
float cloud beside the fake-quantized model on the same images and measures how far apart
they are (:func:`maxpart_jax.jobs.export.export_searched` exports a search's answer).
"""

from __future__ import annotations

import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from maxpart_jax import data
from maxpart_jax.deploy import artifact
from maxpart_jax.genome import Genome, quantized_apply, quantized_edge
from maxpart_jax.models import SplitModel, Variables
from maxpart_jax.quant import FLOAT_BITS


def reference_codes(ir: np.ndarray, largest: int, signed: bool = False
                    ) -> tuple[np.ndarray, np.ndarray]:
  """The codes and per-image scales of a fake-quantized IR (N, ...): its maximum (of the
  magnitude, if ``signed``) is the clipping value ``c`` (the largest code sits at ``c``),
  and the codes are ``IR · L / c``."""
  scale = (np.abs(ir) if signed else ir).reshape(len(ir), -1).max(axis=1)
  codes = np.round(ir * largest / np.maximum(scale, 1e-30).reshape((-1,) + (1,) * (ir.ndim - 1)))
  return codes, scale


def parity(model: SplitModel, variables: Variables, genome: Genome, edge: artifact.EdgeProgram,
           cloud: artifact.CloudProgram, images: np.ndarray, labels: np.ndarray | None = None,
           batch_size: int = 500) -> dict[str, Any]:
  """Integer edge + float cloud against the fake-quantized model on uint8 ``images``
  (:func:`compare`)."""
  settings = edge.spec.quantizer_settings()  # the reference quantizes as the export did

  def reference(batch, key):
    del key
    x = jnp.asarray(data.normalize(batch, edge.spec.dataset))
    return (np.asarray(quantized_edge(model, variables, x, genome, **settings)),
            np.asarray(quantized_apply(model, variables, x, genome, **settings)))

  return compare(edge, cloud, images, reference, labels, batch_size=batch_size)


def compare(edge: artifact.EdgeProgram, cloud: artifact.CloudProgram, images: np.ndarray,
            reference: Callable[[np.ndarray, jax.Array | None], tuple[np.ndarray, np.ndarray]],
            labels: np.ndarray | None = None, key: jax.Array | None = None,
            batch_size: int = 500) -> dict[str, Any]:
  """An exported edge and cloud against a reference on uint8 ``images``.

  ``reference(batch, batch_key) -> (float IR or message, logits)``; with ``key``, batch
  ``i`` (starting at image ``i``) is drawn from ``fold_in(key, i)`` by both sides.
  Reports the share of images with the same top-1, the IR codes' largest difference in
  quantization steps and the shares of codes that differ (at all, and by more than a
  step), the scales' largest relative difference, both accuracies (with ``labels``), the edge program's images per second,
  and the bytes sent per image against the raw image.
  """
  agree, code_diff, codes_differ, codes_far, codes_total, scale_rel = 0, 0, 0, 0, 0, 0.0
  correct_int = correct_ref = 0
  edge_seconds = 0.0
  spec = edge.spec.ir
  quantized = spec.bits < FLOAT_BITS
  for i in range(0, len(images), batch_size):
    batch = images[i:i + batch_size]
    batch_key = None if key is None else jax.random.fold_in(key, i)
    t0 = time.perf_counter()
    payload, scales = edge.ir(batch, batch_key)
    edge_seconds += time.perf_counter() - t0
    logits = cloud.logits(payload, scales)
    ref_ir, ref_logits = reference(batch, batch_key)
    if quantized:
      ref_codes, ref_scale = reference_codes(ref_ir, spec.largest, spec.signed)
      diff = np.abs(payload - ref_codes)
      scale_rel = max(scale_rel, float(np.max(np.abs(scales - ref_scale)
                                              / np.maximum(ref_scale, 1e-30))))
    else:
      diff = np.abs(payload - ref_ir)
    code_diff = max(code_diff, float(diff.max()))
    codes_differ += int(np.count_nonzero(diff))
    codes_far += int(np.count_nonzero(diff > 1))
    codes_total += diff.size
    agree += int(np.sum(logits.argmax(-1) == ref_logits.argmax(-1)))
    if labels is not None:
      correct_int += int(np.sum(logits.argmax(-1) == labels[i:i + batch_size]))
      correct_ref += int(np.sum(ref_logits.argmax(-1) == labels[i:i + batch_size]))
  n = len(images)
  out = {"images": n, "top1_agreement": agree / n,
         "ir_max_difference": code_diff, "ir_difference_unit": "quantization steps" if quantized
         else "float", "ir_share_of_values_that_differ": codes_differ / codes_total,
         "ir_share_of_values_off_by_more_than_one": codes_far / codes_total,
         "scale_max_relative_difference": scale_rel,
         "edge_images_per_second": n / edge_seconds,
         "ir_bits": spec.bits, "message_bytes": spec.message_bytes,
         "payload_bytes": spec.payload_bytes,
         "raw_image_bytes": int(np.prod(images.shape[1:]))}
  if labels is not None:
    out.update(accuracy_integer_split=correct_int / n, accuracy_fake_quant=correct_ref / n)
  return out
