"""The deployments the searched policy is compared with (docs/method.md §8; Tables 4-5, Fig. 11).

* ``full_precision``: the deepest block split whose 32-bit edge fits E_b;
* ``uniform8``: the deepest block split whose 8-bit edge fits E_b;
* ``conv_fc8``: every convolutional block on the edge at 8 bits, the classifier in
  the cloud (it may exceed E_b: the paper compares energies);
* ``same_split8``: the searched split at 8-bit uniform (energy at the same split).

As in the search, the first conv and the classifier are never quantized, and the
quantized baselines are fine-tuned exactly like a search candidate. "Fits" is the
strict ``E < E_b`` of Eq. 4. When no split fits, the device sends the raw 8-bit
image (``p = 0``): nothing is computed on the edge and nothing is private.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from maxpart_jax import data, privacy
from maxpart_jax.energy import (DeviceConfig, Energy, edge_energy, link_cost,
                                population_energy)
from maxpart_jax.genome import Genome, uniform_genome
from maxpart_jax.models.metadata import ModelInfo
from maxpart_jax.quant import FLOAT_BITS, check_bits
from maxpart_jax.search.fitness import ATTACK_METRIC, Evaluator, combine, violations

STRATEGIES = ("full_precision", "uniform8", "conv_fc8", "same_split8")
RAW_IMAGE_BITS = 8


@dataclasses.dataclass(frozen=True)
class Baseline:
  """One reference deployment.

  Attributes:
    name: one of :data:`STRATEGIES`.
    p: blocks on the edge (0: the raw image is sent).
    w_bits, a_bits: uniform bits of the quantizable edge layers (32 = float).
    finetune: fine-tuned like a search candidate (the quantized ones).
  """

  name: str
  p: int
  w_bits: int
  a_bits: int
  finetune: bool

  def genome(self, info: ModelInfo) -> Genome:
    """The baseline as a genome (``p >= 1`` only)."""
    return uniform_genome(info, self.p, self.w_bits, self.a_bits)


def split_energies(info: ModelInfo, w_bits: int, a_bits: int, device: DeviceConfig = DeviceConfig(),
                   transmission: bool = True) -> Energy:
  """(max_split,) edge energy of every split ``p = 1..max_split`` at uniform bits."""
  check_bits([w_bits, a_bits], "uniform bits")
  splits = jnp.arange(1, info.max_split + 1, dtype=jnp.int32)
  population = jax.vmap(lambda p: uniform_genome(info, p, w_bits, a_bits))(splits)
  return population_energy(info, population, device, transmission)


def deepest_split(info: ModelInfo, w_bits: int, a_bits: int, device: DeviceConfig = DeviceConfig(),
                  transmission: bool = True) -> int:
  """The largest ``p`` whose uniform edge costs ``< E_b``; 0 when none does.

  Energy is not monotone in ``p`` (a deeper IR can be smaller), so every split is checked.
  """
  total = np.asarray(split_energies(info, w_bits, a_bits, device, transmission).total_mj)
  fits = np.flatnonzero(total < device.budget_mj)
  return int(fits.max()) + 1 if fits.size else 0


def energy_both_ways(info: ModelInfo, genome: Genome | None,
                     device: DeviceConfig = DeviceConfig()) -> dict[str, float]:
  """Edge energy of a deployment in both conventions (``genome`` None: the raw image is sent).

  ``compute_mj`` is the paper's convention (Table 5's energies count computation only);
  ``with_transmission_mj`` adds sending the IR, this project's default for its own searches.
  """
  if genome is None:
    return dict(compute_mj=0.0, with_transmission_mj=raw_image_energy_mj(info, device, True))
  energy = edge_energy(info, genome, device, transmission=True)
  return dict(compute_mj=float(energy.compute_mj), with_transmission_mj=float(energy.total_mj))


def raw_image_energy_mj(info: ModelInfo, device: DeviceConfig = DeviceConfig(),
                        transmission: bool = True) -> float:
  """Energy of sending the raw image instead of an IR (``p = 0``)."""
  if not transmission:
    return 0.0
  return float(link_cost(_raw_image_bits(info), device)[0])


def raw_image_latency_ms(info: ModelInfo, device: DeviceConfig = DeviceConfig()) -> float:
  """Time to deliver the raw image over the link (``p = 0``: nothing is computed)."""
  return float(link_cost(_raw_image_bits(info), device)[1])


def _raw_image_bits(info: ModelInfo) -> float:
  return float(np.prod(info.input_shape)) * RAW_IMAGE_BITS


def offloaded(info: ModelInfo, p: int) -> tuple[int, int]:
  """``(#B, #L)``: blocks and weight (conv / dense) layers that run on the edge at split ``p``."""
  return p, int(np.sum(np.asarray(info.layer_block) < p))


def after_stem(info: ModelInfo, p: int) -> tuple[int, int]:
  """``(#B, #L)`` the paper's way: edge blocks and weight layers after the stem.

  The paper's ResNet rows do not count the stem ("1 block (2 conv layers)" is the stem
  plus layer1.0). Models without a block labelled ``stem`` (VGG) count everything.
  """
  num_blocks, num_layers = offloaded(info, p)
  if p and info.blocks[0].label == "stem":
    return num_blocks - 1, num_layers - len(info.blocks[0].layer_ids)
  return num_blocks, num_layers


def deployment_row(info: ModelInfo, strategy: str, p: int) -> dict[str, Any]:
  """The columns every strategy's row starts with: strategy, p, block, #B, #L.

  ``num_blocks``/``num_layers`` count the stem; ``blocks_after_stem``/``layers_after_stem``
  do not, like the paper's tables.
  """
  num_blocks, num_layers = offloaded(info, p)
  blocks_after, layers_after = after_stem(info, p)
  return dict(strategy=strategy, p=p, block=info.blocks[p - 1].label if p else "none",
              num_blocks=num_blocks, num_layers=num_layers, blocks_after_stem=blocks_after,
              layers_after_stem=layers_after)


def make_baselines(energy_info: ModelInfo, device: DeviceConfig = DeviceConfig(),
                   transmission: bool = True, searched_p: int | None = None,
                   bits: int = 8) -> list[Baseline]:
  """The baselines of docs/method.md §8 for a model whose energy is described by ``energy_info``.

  ``same_split8`` is included when ``searched_p`` is given.
  """
  out = [
      Baseline("full_precision", deepest_split(energy_info, FLOAT_BITS, FLOAT_BITS, device,
                                               transmission), FLOAT_BITS, FLOAT_BITS, False),
      Baseline("uniform8", deepest_split(energy_info, bits, bits, device, transmission), bits, bits,
               True),
      Baseline("conv_fc8", energy_info.max_split, bits, bits, True),
  ]
  if searched_p is not None:
    energy_info.check_split(searched_p)
    out.append(Baseline("same_split8", int(searched_p), bits, bits, True))
  return out


def evaluate_baselines(evaluator: Evaluator, baselines: list[Baseline],
                       test: data.Split) -> list[dict[str, Any]]:
  """Energy, privacy and accuracy of every baseline, measured like a search candidate.

  Args:
    evaluator: the search's evaluator (same data, fine-tuning, privacy images and
      energy model as the search).
    baselines: from :func:`make_baselines`.
    test: the test split, for the reported top-1 accuracy.

  Returns:
    One row per baseline: strategy, p, block, num_blocks (#B), num_layers (#L),
    energy_mj, privacy, fitness, accuracy / eps (validation), test_accuracy, the energy
    in both conventions (:func:`energy_both_ways`) and the constraints of Eq. 4 it breaks.
  """
  info, config = evaluator.model.info, evaluator.config
  float_test = evaluator.float_accuracy_on(test)
  # Identical deployments (e.g. 8-bit uniform and 8-bit conv/fc when every block fits)
  # are measured once.
  measured: dict[tuple[int, int, int, bool], dict[str, float]] = {}
  for finetune in (False, True):
    group = list(dict.fromkeys((b.p, b.w_bits, b.a_bits, b.finetune) for b in baselines
                               if b.finetune == finetune and b.p >= 1))
    if group:
      genomes = jax.tree.map(lambda *xs: jnp.stack(xs),
                             *[uniform_genome(info, p, w, a) for p, w, a, _ in group])
      metrics = evaluator.evaluate(genomes, test=test, finetune=finetune)
      for i, key in enumerate(group):
        measured[key] = {k: float(v[i]) for k, v in metrics.items()}
  if any(b.p == 0 for b in baselines):  # the raw image goes to the cloud's float model
    images = jnp.asarray(evaluator.privacy_images)
    # The attacker of attack_ssim receives the image itself: SSIM 1, privacy 0.
    score = (jnp.float32(0.0) if config.metric == ATTACK_METRIC else
             privacy.mean_privacy(images, images, config.metric,
                                  normalization=config.normalization))
    energy = raw_image_energy_mj(info, config.device, config.transmission)
    latency = raw_image_latency_ms(info, config.device)
    raw = dict(privacy=float(score), energy_mj=energy, eps=0.0, latency_ms=latency,
               diverged=0.0, failed=0.0, collapsed=0.0,
               accuracy=evaluator.float_accuracy, test_accuracy=float_test,
               fitness=float(combine(score, jnp.float32(energy), jnp.float32(0.0), config,
                                     jnp.float32(latency))))
  out = []
  for b in baselines:
    row = raw if b.p == 0 else measured[(b.p, b.w_bits, b.a_bits, b.finetune)]
    both = energy_both_ways(evaluator.energy_info, b.genome(evaluator.energy_info) if b.p else None,
                            config.device)
    out.append(dict(**deployment_row(info, b.name, b.p), w_bits=b.w_bits, a_bits=b.a_bits,
                    finetuned=b.finetune, test_eps=float_test - row["test_accuracy"], **row,
                    **both, violations=violations(row, config)))
  return out
