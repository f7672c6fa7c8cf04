"""A defended split as the two deployed programs: :func:`export` writes the integer edge
(the genome's layers, then the defenses' device work) and the float cloud of a
:class:`~maxpart_jax.privacy.defended.DefendedSplit`; :func:`export_parity` measures them
against the fake-quantized deployment."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from maxpart_jax.deploy import artifact, parity
from maxpart_jax.genome import Genome, to_policy
from maxpart_jax.privacy.defended import DefendedSplit, logits, message
from maxpart_jax.privacy.defenses import image_keys


def export(d: DefendedSplit, genome: Genome, model_spec: dict[str, Any], directory: str
           ) -> tuple[artifact.EdgeProgram, artifact.CloudProgram]:
  """Writes the defended deployment as an integer edge artifact and a cloud artifact
  (:func:`maxpart_jax.deploy.artifact.export_split`): the edge runs the genome's layers,
  then the defenses' device work (a bottleneck as one more integer layer at the IR's bits,
  noise from each image's key) and sends the message's codes; the cloud opens it with the
  defenses' ``receive``. ``genome`` is the one ``d`` was made from."""
  policy = to_policy(d.model.info, genome, d.policy.per_channel, d.policy.activation_levels)
  same = jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), policy, d.policy)
  if int(genome.p) != d.split or not all(jax.tree.leaves(same)):
    raise ValueError(f"genome (split {int(genome.p)}) is not the one this defended split "
                     f"(split {d.split}) was made from")
  return artifact.export_split(
      d.model, jax.device_get(d.variables), genome, model_spec, directory, dataset=d.dataset,
      per_channel=d.policy.per_channel, activation_levels=d.policy.activation_levels,
      stack=d.stack, defense_params=jax.device_get(d.defense_params))


def export_parity(d: DefendedSplit, edge: artifact.EdgeProgram, cloud: artifact.CloudProgram,
                  images: np.ndarray, key: jax.Array, labels: np.ndarray | None = None
                  ) -> dict[str, Any]:
  """The exported edge and cloud against the fake-quantized defended deployment on uint8
  ``images``, both drawing noise from ``key``
  (:func:`maxpart_jax.deploy.parity.compare`)."""
  def reference(batch, batch_key):
    floats = jnp.asarray(batch.astype(np.float32) / 255.0)
    keys = image_keys(batch_key, 0, len(batch))  # as the edge program draws them
    return np.asarray(message(d, floats, keys)), np.asarray(logits(d, floats, keys))

  return parity.compare(edge, cloud, images, reference, labels, key=key)
