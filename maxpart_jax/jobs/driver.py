"""The search job: config in, best genome and its report out, resumable at every step.

``run_search(config, workdir)`` validates the config before any work, loads (or
pre-trains) the model, runs the algorithm with K candidates per step, and after every step
saves its state (:mod:`~maxpart_jax.jobs.storage`), so a run killed at any point and
restarted with the same command ends with the same result. A resumed search must depend on
the same things (settings, data content, pre-trained weights, numerics) or it is refused.
Evaluations go through a cache keyed by the effective genome
(:mod:`~maxpart_jax.jobs.caching`); the final report is :mod:`~maxpart_jax.jobs.summary`'s.

The other steps have a module each: :mod:`~maxpart_jax.jobs.settings` (config to strategy,
space, fitness and device, validation), :mod:`~maxpart_jax.jobs.build` (the model and the
evaluator).
"""

from __future__ import annotations

import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from maxpart_jax import distributed, runs
from maxpart_jax.genome import validate_genome
from maxpart_jax.jobs import planning
from maxpart_jax.jobs.build import build_evaluator
from maxpart_jax.jobs.caching import CachedEvaluator, add_latency
from maxpart_jax.jobs.settings import (
  space_from_config,
  strategy_from_config,
  validate_config,
)
from maxpart_jax.jobs.storage import AUTO_HINT, load_state, save_state, search_identity
from maxpart_jax.jobs.summary import final_report, history_row
from maxpart_jax.metrics import MetricWriter, NullWriter
from maxpart_jax.search import algorithms, solver
from maxpart_jax.search.fitness import Evaluator, FitnessConfig, violation_degree
from maxpart_jax.train import Progress


def run_search(config: ml_collections.ConfigDict, workdir: str,
               evaluator: Evaluator | None = None) -> dict[str, Any]:
  """Runs (or resumes) the search of ``config`` in ``workdir``; returns the final report.

  ``evaluator``: one :func:`build_evaluator` made for ``config`` already (reused by
  callers that evaluate more genomes of the same setting, such as the baselines).
  """
  validate_config(config)  # before the workdir is created
  with runs.workdir_lock(workdir):
    evaluator = evaluator or build_evaluator(config)
    report = _run_search(config, workdir, evaluator)
  if report["failed_candidates"] == report["evaluations"]:
    raise SearchFailed(
        f"every one of the {report['evaluations']} evaluated candidates failed "
        f"({report['diverged_candidates']} diverged during fine-tuning, the others had a "
        f"non-finite privacy or fitness); {workdir}/best.json records the search. Lower "
        f"fitness.finetune_lr (now {config.fitness.finetune_lr}) or check the pre-trained model")
  return report


class SearchFailed(ValueError):
  """Every candidate of a search failed: its report means nothing."""


def _run_search(config: ml_collections.ConfigDict, workdir: str,
                evaluator: Evaluator) -> dict[str, Any]:
  """:func:`run_search` inside the workdir lock."""
  info = evaluator.model.info
  strategy, space = strategy_from_config(config), space_from_config(config, info)
  alg = algorithms.get_algorithm(config.search.algorithm)
  planned = None
  if planning.needs_plan(config):
    planned = planning.plan_from_config(config, evaluator)
    space = space.replace(seeds=solver.stacked_genomes(planned.candidates),
                          seed_privacy=jnp.asarray([c.predicted_privacy
                                                    for c in planned.candidates], jnp.float32))
    if distributed.is_leader():
      planned.write(os.path.join(workdir, planning.PLAN_FILE))
  done = (lambda st: bool(alg.done(st, space))) if alg.done else (lambda st: False)

  init_key, step_key = jax.random.split(jax.random.key(config.search.seed))
  ask = jax.jit(lambda k, st: alg.ask(k, st, space, strategy))
  tell = jax.jit(lambda st, c, r: alg.tell(st, c, r, strategy))
  state = alg.init(init_key, space, strategy)
  identity = search_identity(config, evaluator)
  meta_out: dict[str, Any] = {"identity": identity, "cache": {}, "history": [],
                              "seconds": 0.0, "lookups": 0, "hits": 0, "initialized": False}
  stored = _load_everywhere(workdir, state)
  if stored is not None:
    state, meta_out = stored
    runs.check_identity(meta_out.get("identity"), identity, workdir, "search",
                        hints={"resolved.": AUTO_HINT})
    logging.info("resuming the search at step %d", int(state.step))
  total_steps = math.ceil(config.search.iterations / strategy.num_tournaments)
  finished = meta_out.get("report")
  if finished and finished["steps"] == int(state.step) and (int(state.step) >= total_steps
                                                            or done(state)):
    logging.info("the search in %s had finished: its report is reused (a larger "
                 "search.iterations extends it)", workdir)
    return finished
  # Wall time and its fine-tune / accuracy / privacy split, summed over every process
  # that worked on this search.
  meta_out.setdefault("phase_seconds", {k: 0.0 for k in evaluator.seconds})
  if planned is not None:
    meta_out["solver"] = planned.summary()
  add_latency(meta_out["cache"], evaluator)
  cached = CachedEvaluator(evaluator, meta_out["cache"])
  cached.lookups, cached.hits = meta_out["lookups"], meta_out["hits"]
  segment, phases = time.time(), dict(evaluator.seconds)

  def checkpoint_now():
    nonlocal segment, phases
    meta_out.update(seconds=meta_out["seconds"] + time.time() - segment, lookups=cached.lookups,
                    hits=cached.hits)
    for k, v in evaluator.seconds.items():
      meta_out["phase_seconds"][k] += v - phases[k]
    segment, phases = time.time(), dict(evaluator.seconds)
    writer.flush()  # before the state: a resumed run rewrites the steps after its state's
    if distributed.is_leader():
      save_state(workdir, state, meta_out)

  # A resumed search rewrites the steps after its state's; TensorBoard hides older copies.
  writer = (MetricWriter(os.path.join(workdir, "tensorboard"),
                         resume_step=int(state.step) + 1 if meta_out["initialized"] else None)
            if distributed.is_leader() else NullWriter())

  def record(step: int) -> None:
    row = history_row(state, cached, step)
    meta_out["history"].append(row)
    writer.scalars(step, {f"search/{k}": v for k, v in row.items() if k != "step"})

  if not meta_out["initialized"]:
    validate_genome(info, state.population)

    def keep_initial(done: dict[str, dict[str, Any]]) -> None:
      meta_out["initial_evaluations"] = done  # a long first call checkpoints as it goes
      checkpoint_now()

    results = cached(state.population, progress="initial population",
                     partial=meta_out.pop("initial_evaluations", None), on_chunk=keep_initial)
    meta_out.pop("initial_evaluations", None)
    state = alg.tell_initial(state, _told(results, evaluator.config))
    meta_out["initialized"] = True
    record(0)
    checkpoint_now()

  progress = Progress(total_steps, first=int(state.step), every=config.log_every_steps,
                      name="search step")
  while int(state.step) < total_steps and not done(state):
    children, state = ask(jax.random.fold_in(step_key, int(state.step)), state)
    results = cached(children)
    state = tell(state, children, _told(results, evaluator.config))
    record(int(state.step))
    checkpoint_now()
    progress(int(state.step), f"best fitness {float(state.best_fitness):.4f} "
             f"cache hit rate {cached.hits / max(cached.lookups, 1):.2f}")

  writer.close()
  meta_out["report"] = final_report(config, workdir, evaluator, cached, state, meta_out)
  if distributed.is_leader():
    save_state(workdir, state, meta_out)
  return meta_out["report"]


def _load_everywhere(workdir: str, like: algorithms.State
                     ) -> tuple[algorithms.State, dict[str, Any]] | None:
  """:func:`load_state` of the leader's workdir, the same in every process (the others'
  workdirs are never read: they need not share a file system)."""
  stored = load_state(workdir, like) if distributed.is_leader() else None
  meta = distributed.broadcast(stored[1] if stored else None)
  if meta is None:
    return None
  return distributed.broadcast(stored[0] if stored else None, like=like), meta


def _told(results: dict[str, np.ndarray], config: FitnessConfig) -> dict[str, jax.Array]:
  """What an algorithm's ``tell`` receives: the metrics and the constraint violation."""
  told = {m: jnp.asarray(results[m], jnp.float32) for m in ("fitness", "privacy", "energy_mj",
                                                             "eps")}
  return {**told, "violation": jnp.asarray(violation_degree(results, config), jnp.float32)}
