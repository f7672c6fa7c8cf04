"""Evaluations cached by the *effective* genome: genomes that differ only in masked genes
(cloud layers, unquantized layers) are the same candidate and are evaluated once."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from maxpart_jax.genome import Genome, effective_bits
from maxpart_jax.models.metadata import ModelInfo
from maxpart_jax.search.fitness import Evaluator, FitnessConfig, violations

METRICS = ("fitness", "privacy", "energy_mj", "eps", "latency_ms", "accuracy", "diverged",
           "failed", "collapsed")


def effective_keys(info: ModelInfo, genomes: Genome) -> list[str]:
  """Strings naming what K genomes really run: ``p`` and the unmasked bits only.

  One vmapped computation and one device-to-host copy for the whole batch.
  """
  w, a, ir_bits = jax.device_get(jax.vmap(lambda g: effective_bits(info, g))(genomes))
  ps = np.asarray(jax.device_get(genomes.p))
  layer_block = np.asarray(info.layer_block)
  keys = []
  for p, wi, ai, ir in zip(ps, w, a, ir_bits):
    genes = ",".join(f"{x}/{y}" for x, y in zip(wi[layer_block < p], ai[layer_block < p]))
    keys.append(f"p{p}|ir{ir}|{genes}")
  return keys


def effective_key(info: ModelInfo, genome: Genome) -> str:
  """:func:`effective_keys` of one genome."""
  return effective_keys(info, jax.tree.map(lambda x: x[None], genome))[0]


class CachedEvaluator:
  """Evaluates genomes through a cache keyed by the effective genome.

  Each entry holds the :data:`METRICS` and, under ``"genome"``, the first genome
  evaluated with that key (what the final report re-evaluates).
  """

  def __init__(self, evaluator: Evaluator, cache: dict[str, dict[str, float]]):
    self.evaluator, self.cache = evaluator, cache
    self.lookups = self.hits = 0

  def __call__(self, genomes: Genome, progress: str = "",
               partial: dict[str, dict[str, Any]] | None = None,
               on_chunk: Callable[[dict[str, dict[str, Any]]], None] | None = None
               ) -> dict[str, np.ndarray]:
    """Metrics of K genomes (leading axis), evaluating only those not in the cache.

    ``partial``: entries of this very call that a killed run evaluated (what ``on_chunk``
    was given), used instead of evaluating them again; they enter the cache, and count as
    misses, as in an uninterrupted call. ``on_chunk``: called with those entries, grown,
    after every compiled call of the evaluator (to checkpoint a long call).
    """
    info = self.evaluator.model.info
    k = int(genomes.p.shape[0])
    keys = effective_keys(info, genomes)
    todo = [keys.index(key) for key in dict.fromkeys(keys) if key not in self.cache]
    done = dict(partial or {})
    missing = [i for i in todo if keys[i] not in done]
    if missing:
      on_host = jax.device_get(genomes)  # one copy, not one per candidate

      def keep(first: int, metrics: dict[str, np.ndarray], tell: bool = True) -> None:
        for j, i in enumerate(missing[first:first + len(metrics["fitness"])]):
          if keys[i] not in done:
            done[keys[i]] = {**{m: float(metrics[m][j]) for m in METRICS},
                             "genome": jax.tree.map(lambda x: x[i], on_host).to_json()}
        if tell and on_chunk:
          on_chunk(done)

      # The returned metrics fill what an evaluator without on_chunk calls left out.
      keep(0, self.evaluator.evaluate(jax.tree.map(lambda x: x[np.array(missing)], genomes),
                                      progress=progress, on_chunk=keep), tell=False)
    for i in todo:  # in the order a straight call evaluates them
      self.cache[keys[i]] = done[keys[i]]
    self.lookups += k  # counted once the call is done: a checkpoint inside it has the old counts
    self.hits += k - len(todo)
    return {m: np.array([self.cache[key][m] for key in keys]) for m in METRICS}


def add_latency(cache: dict[str, dict[str, Any]], evaluator: Evaluator) -> None:
  """Gives evaluations cached before ``latency_ms`` existed their (analytic) latency."""
  missing = [key for key, entry in cache.items() if "latency_ms" not in entry]
  if missing:
    genomes = jax.tree.map(lambda *xs: jnp.stack(xs),
                           *[Genome.from_json(cache[key]["genome"]) for key in missing])
    _, latency = evaluator.costs(genomes)
    for key, value in zip(missing, latency):
      cache[key]["latency_ms"] = float(value)


def best_feasible(cache: dict[str, dict[str, Any]],
                  config: FitnessConfig) -> tuple[str, dict[str, Any]] | None:
  """The cache entry ``(key, entry)`` of highest fitness that meets Eq. 4; None if none does.

  The first evaluated wins a tie, like the search's own best.
  """
  feasible = [(k, e) for k, e in cache.items() if "genome" in e and not violations(e, config)]
  return max(feasible, key=lambda ke: ke[1]["fitness"]) if feasible else None


def evaluations_list(cache: dict[str, dict[str, Any]], config: FitnessConfig
                     ) -> list[dict[str, Any]]:
  """Every evaluated genome with its metrics and the constraints it breaks, in the order
  evaluated (what ``evaluations.json`` holds and :func:`maxpart_jax.search.pareto.front` reads)."""
  return [{"key": key, **entry, "violations": violations(entry, config)}
          for key, entry in cache.items()]


def failure_counts(cache: dict[str, dict[str, Any]]) -> dict[str, int]:
  """How many evaluated candidates failed (fitness set to 0), diverged, or collapsed."""
  return {f"{m}_candidates": sum(bool(e[m]) for e in cache.values())
          for m in ("failed", "diverged", "collapsed")}
