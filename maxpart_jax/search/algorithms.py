"""The search algorithms a config names (``config.search.algorithm``), behind one interface.

Every algorithm is four pure functions; the driver runs any of them the same way:

    state = alg.init(key, space, strategy)
    state = alg.tell_initial(state, results)
    children, state = alg.ask(key, state, space, strategy)
    state = alg.tell(state, children, results, strategy)

``results`` holds the evaluated metrics of the genomes told, as arrays: ``fitness``,
``privacy``, ``energy_mj``, ``eps`` and ``violation`` (0 when E < E_b and ε < ε_b, else how
far the bounds are broken). Each algorithm uses what it needs. Every state carries
``population``, ``fitness`` (N,), ``best``, ``best_fitness``, ``births`` and ``step``, which
the driver logs.

==========  ==================================================================================
``ga``      the paper's tournament GA (Algorithm 1; K > 1 is its batched variant), one
            penalized fitness (:mod:`maxpart_jax.search.evolution`)
``nsga2``   NSGA-II: three objectives, constraint domination instead of penalties
            (:mod:`maxpart_jax.search.nsga2`)
``random``  random search: K fresh genomes from the ``init`` operator per step, the baseline
            any search must beat
``solver``  the solver's plan (:mod:`maxpart_jax.search.solver`), K candidates at a time in
            its order, skipping those that cannot beat the best feasible one measured even
            with the largest under-prediction seen so far added (:func:`solver_bound`); it
            stops when none is left (``done``)
==========  ==================================================================================

An algorithm may also have ``done(state, space) -> bool``: the driver then stops before
``search.iterations`` when it says so.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
from flax import struct

from maxpart_jax.genome import Genome
from maxpart_jax.search import evolution, nsga2
from maxpart_jax.search.fitness import FAILED_VIOLATION
from maxpart_jax.search.operators import SearchSpace
from maxpart_jax.registry import Registry


@struct.dataclass
class SolverState:
  """The ``solver`` algorithm's state: which candidates of the plan were tried, what they
  measured, the best. Saved with the search after every step, so a resumed search
  recomputes the same bound (:func:`solver_bound`) from it.

  Attributes:
    population: the first K candidates (the first batch).
    fitness: (K,) their fitness.
    tried: (M,) which of the plan's M candidates were evaluated (or skipped).
    asked: (K,) the plan indices of the batch being evaluated.
    measured: (M,) the measured privacy of each evaluated candidate that did not fail (NaN:
      not evaluated, or failed).
    best_feasible: the highest privacy of a feasible evaluated candidate (-inf: none yet).
    best, best_fitness, births, step: as every algorithm's.
  """

  population: Genome
  fitness: jax.Array
  tried: jax.Array
  asked: jax.Array
  measured: jax.Array
  best_feasible: jax.Array
  best: Genome
  best_fitness: jax.Array
  births: jax.Array
  step: jax.Array


State = evolution.SearchState | nsga2.NSGA2State | SolverState
"""The state of any registered algorithm."""


@dataclasses.dataclass(frozen=True)
class Algorithm:
  """The four pure functions of one search algorithm, and optionally when it is done."""

  init: Callable
  tell_initial: Callable
  ask: Callable
  tell: Callable
  done: Callable | None = None


def _ga_tell_initial(state: evolution.SearchState, results: dict) -> evolution.SearchState:
  return evolution.tell_initial(state, results["fitness"])


def _ga_tell(state: evolution.SearchState, children: Genome, results: dict,
             strategy: evolution.Strategy) -> evolution.SearchState:
  return evolution.tell(state, children, results["fitness"], strategy)


def random_ask(key: jax.Array, state: evolution.SearchState, space: SearchSpace,
               strategy: evolution.Strategy) -> tuple[Genome, evolution.SearchState]:
  """K genomes drawn by the ``init`` operator, independent of everything seen."""
  keys = jax.random.split(key, strategy.num_tournaments)
  return jax.vmap(lambda k: strategy.op("init")(k, space))(keys), state


def random_tell(state: evolution.SearchState, children: Genome, results: dict,
                strategy: evolution.Strategy) -> evolution.SearchState:
  """Keeps the best genome seen; the population stays the initial one."""
  best, best_fitness = evolution.keep_best(state.best, state.best_fitness, children,
                                           jnp.asarray(results["fitness"], jnp.float32))
  return state.replace(best=best, best_fitness=best_fitness,
                       births=state.births + strategy.num_tournaments, step=state.step + 1)


def _plan(space: SearchSpace) -> tuple[Genome, jax.Array]:
  if space.seeds is None or space.seed_privacy is None:
    raise ValueError("the solver algorithm needs the solver's plan in space.seeds: the search "
                     "driver puts it there when search.algorithm='solver'")
  return space.seeds, space.seed_privacy


def solver_init(key: jax.Array, space: SearchSpace, strategy: evolution.Strategy) -> SolverState:
  """The plan's first K candidates (repeated if the plan is shorter: repeats cost nothing,
  the cache answers them)."""
  del key
  seeds, _ = _plan(space)
  m, k = seeds.p.shape[0], strategy.num_tournaments
  asked = jnp.minimum(jnp.arange(k), m - 1)
  population = jax.tree.map(lambda x: x[asked], seeds)
  return SolverState(population=population, fitness=jnp.full((k,), -jnp.inf),
                     tried=jnp.arange(m) < k, asked=asked,
                     measured=jnp.full((m,), jnp.nan, jnp.float32),
                     best_feasible=jnp.array(-jnp.inf),
                     best=jax.tree.map(lambda x: x[0], population),
                     best_fitness=jnp.array(-jnp.inf), births=jnp.int32(k), step=jnp.int32(0))


def _solver_seen(state: SolverState, genomes: Genome, results: dict) -> SolverState:
  """Records the results of the batch ``state.asked`` (``genomes``)."""
  fitness = jnp.asarray(results["fitness"], jnp.float32)
  privacy = jnp.asarray(results["privacy"], jnp.float32)
  violation = jnp.asarray(results["violation"])
  feasible = jnp.where(violation == 0, privacy, -jnp.inf)
  # A failed candidate's privacy (a diverged or collapsed edge) says nothing of the estimates.
  measured = jnp.where(violation < FAILED_VIOLATION, privacy, jnp.nan)
  best, best_fitness = evolution.keep_best(state.best, state.best_fitness, genomes, fitness)
  return state.replace(best=best, best_fitness=best_fitness,
                       measured=state.measured.at[state.asked].set(measured),
                       best_feasible=jnp.maximum(state.best_feasible, jnp.max(feasible)))


def solver_tell_initial(state: SolverState, results: dict) -> SolverState:
  """Records the first batch."""
  state = _solver_seen(state, state.population, results)
  return state.replace(fitness=jnp.asarray(results["fitness"], jnp.float32))


def solver_bound(state: SolverState, space: SearchSpace) -> jax.Array:
  """(M,) the calibrated upper bound on each candidate's privacy: its prediction plus the
  largest under-prediction measured so far in this search (``max(measured − predicted)``
  over the evaluated candidates that did not fail, at least 0). Predictions err both ways;
  this bound holds for every candidate evaluated so far."""
  _, predicted = _plan(space)
  under = jnp.where(jnp.isnan(state.measured), -jnp.inf, state.measured - predicted)
  return predicted + jnp.maximum(jnp.max(under), 0.0)


def _eligible(state: SolverState, space: SearchSpace) -> jax.Array:
  """(M,) the candidates not tried yet whose calibrated bound (:func:`solver_bound`) is
  above the best feasible privacy measured (the others are not expected to beat it)."""
  return ~state.tried & (solver_bound(state, space) > state.best_feasible)


def solver_ask(key: jax.Array, state: SolverState, space: SearchSpace,
               strategy: evolution.Strategy) -> tuple[Genome, SolverState]:
  """The next K eligible candidates in the plan's order (fewer eligible: the first one
  repeated, which the cache answers)."""
  del key
  seeds, _ = _plan(space)
  m = seeds.p.shape[0]
  eligible = _eligible(state, space)
  order = jnp.argsort(jnp.where(eligible, jnp.arange(m), m + jnp.arange(m)))
  idx = order[jnp.minimum(jnp.arange(strategy.num_tournaments), m - 1)]
  idx = jnp.where(eligible[idx], idx, idx[0])
  return (jax.tree.map(lambda x: x[idx], seeds),
          state.replace(tried=state.tried.at[idx].set(True), asked=idx))


def solver_tell(state: SolverState, children: Genome, results: dict,
                strategy: evolution.Strategy) -> SolverState:
  """Keeps the best by fitness, the best feasible privacy and what each candidate measured."""
  state = _solver_seen(state, children, results)
  return state.replace(births=state.births + strategy.num_tournaments, step=state.step + 1)


def solver_done(state: SolverState, space: SearchSpace) -> jax.Array:
  """No candidate left whose calibrated bound (:func:`solver_bound`) beats the best feasible
  privacy measured."""
  return ~jnp.any(_eligible(state, space))


ALGORITHMS: Registry[Algorithm] = Registry("search algorithm")
"""The algorithms a config names (``search.algorithm``); a new one registers here."""
ALGORITHMS.register("ga", Algorithm(evolution.init, _ga_tell_initial, evolution.ask, _ga_tell))
ALGORITHMS.register("nsga2", Algorithm(nsga2.init, nsga2.tell_initial, nsga2.ask, nsga2.tell))
ALGORITHMS.register("random", Algorithm(evolution.init, _ga_tell_initial, random_ask,
                                        random_tell))
ALGORITHMS.register("solver", Algorithm(solver_init, solver_tell_initial, solver_ask,
                                        solver_tell, solver_done))

NEEDS_PLAN = ("solver",)
"""Algorithms that run on the solver's plan (as does the ``solver`` init operator)."""


def get_algorithm(name: str) -> Algorithm:
  """The algorithm registered as ``name``, or a ``ValueError`` listing them."""
  return ALGORITHMS.get(name)
