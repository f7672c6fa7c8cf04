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
==========  ==================================================================================
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from maxpart_jax.genome import Genome
from maxpart_jax.search import evolution, nsga2
from maxpart_jax.search.operators import SearchSpace


State = evolution.SearchState | nsga2.NSGA2State
"""The state of any registered algorithm."""


@dataclasses.dataclass(frozen=True)
class Algorithm:
  """The four pure functions of one search algorithm."""

  init: Callable
  tell_initial: Callable
  ask: Callable
  tell: Callable


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


ALGORITHMS: dict[str, Algorithm] = {
    "ga": Algorithm(evolution.init, _ga_tell_initial, evolution.ask, _ga_tell),
    "nsga2": Algorithm(nsga2.init, nsga2.tell_initial, nsga2.ask, nsga2.tell),
    "random": Algorithm(evolution.init, _ga_tell_initial, random_ask, random_tell),
}


def get_algorithm(name: str) -> Algorithm:
  """The algorithm registered as ``name``, or a ``ValueError`` listing them."""
  if name not in ALGORITHMS:
    raise ValueError(f"unknown search algorithm {name!r}; choose from {sorted(ALGORITHMS)}")
  return ALGORITHMS[name]
