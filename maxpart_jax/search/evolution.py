"""Functional tournament evolution (docs/method.md §7, Algorithm 1) with K tournaments per step.

    state = init(key, space, strategy)                 # N random genomes, unevaluated
    state = tell_initial(state, fitness)               # their fitness
    for t in range(T):
      children, state = ask(jax.random.fold_in(key, t), state, space, strategy)
      state = tell(state, children, evaluate(children), strategy)

``ask`` runs K tournaments on the same population: each samples S members, takes
the best as parent (crossed with the second best if a crossover is configured),
and mutates it. ``tell`` then handles the K children in order: each removes the
member its tournament's replacement rule picks (by default the worst of its
sample, re-read after the earlier children of the step went in) and takes its
place. With K = 1 this is exactly the paper's algorithm. Everything is a pure
function of immutable pytrees and jits.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
from flax import struct

from maxpart_jax.genome import Genome
from maxpart_jax.search.operators import (OPERATORS, SearchSpace, get_operator,
                                         initial_population)


@dataclasses.dataclass(frozen=True)
class Strategy:
  """Static settings: population size, tournaments per step and operator names."""

  pop_size: int
  num_tournaments: int = 1
  init: str = "uniform"
  sample: str = "uniform"
  select: str = "best"
  mutate: str = "resample"
  crossover: str = "none"
  replace: str = "worst"

  def __post_init__(self):
    if self.pop_size < 2:
      raise ValueError(f"population size must be >= 2, got {self.pop_size}")
    if self.num_tournaments < 1:
      raise ValueError(f"tournaments per step must be >= 1, got {self.num_tournaments}")
    for role in OPERATORS:
      get_operator(role, getattr(self, role))

  def op(self, role: str) -> Callable:
    """The registered function this strategy uses for ``role``."""
    return get_operator(role, getattr(self, role))


@struct.dataclass
class SearchState:
  """Population and bookkeeping; leading axis N (population) or K (tournaments).

  Attributes:
    population: the N current genomes.
    fitness: (N,) their fitness (-inf until evaluated).
    age: (N,) birth number of each member (for age-based replacement).
    samples: (K, S) member indices of the tournaments of the last ``ask``.
    best, best_fitness: the best genome ever evaluated and its fitness.
    births: genomes created so far.
    step: completed ask/tell steps.
  """

  population: Genome
  fitness: jax.Array
  age: jax.Array
  samples: jax.Array
  best: Genome
  best_fitness: jax.Array
  births: jax.Array
  step: jax.Array


def init(key: jax.Array, space: SearchSpace, strategy: Strategy) -> SearchState:
  """N random genomes (from the ``init`` operator), not yet evaluated."""
  n = strategy.pop_size
  population = initial_population(key, space, strategy.op("init"), n)
  return SearchState(
      population=population, fitness=jnp.full((n,), -jnp.inf), age=jnp.arange(n, dtype=jnp.int32),
      samples=jnp.zeros((strategy.num_tournaments, space.sample_size), jnp.int32),
      best=jax.tree.map(lambda x: x[0], population), best_fitness=jnp.array(-jnp.inf),
      births=jnp.int32(n), step=jnp.int32(0))


def tell_initial(state: SearchState, fitness: jax.Array) -> SearchState:
  """Records the fitness of the initial population."""
  i = jnp.argmax(fitness)
  return state.replace(fitness=jnp.asarray(fitness, jnp.float32),
                       best=jax.tree.map(lambda x: x[i], state.population),
                       best_fitness=jnp.asarray(fitness[i], jnp.float32))


def ask(key: jax.Array, state: SearchState, space: SearchSpace,
        strategy: Strategy) -> tuple[Genome, SearchState]:
  """K children from K independent tournaments on the current population."""

  def tournament(k):
    k_sample, k_cross, k_mutate = jax.random.split(k, 3)
    idx = strategy.op("sample")(k_sample, state.fitness, space)
    parent = strategy.op("select")(state.fitness, idx)
    runner_up = idx[jnp.argsort(-state.fitness[idx])[jnp.minimum(1, idx.shape[0] - 1)]]
    member = lambda i: jax.tree.map(lambda x: x[i], state.population)
    child = strategy.op("crossover")(k_cross, member(parent), member(runner_up), space)
    return strategy.op("mutate")(k_mutate, child, space), idx

  keys = jax.random.split(key, strategy.num_tournaments)
  children, samples = jax.vmap(tournament)(keys)
  return children, state.replace(samples=samples.astype(jnp.int32))


def keep_best(best: Genome, best_fitness: jax.Array, genomes: Genome,
              fitness: jax.Array) -> tuple[Genome, jax.Array]:
  """``(best, best_fitness)`` after seeing ``genomes`` (leading axis) with ``fitness``: the
  fittest of them if it beats ``best_fitness`` strictly, else the old best (the earlier
  genome wins a tie). Every algorithm's ``tell`` keeps its best this way."""
  i = jnp.argmax(fitness)
  improved = fitness[i] > best_fitness
  return (jax.tree.map(lambda b, g: jnp.where(improved, g[i], b), best, genomes),
          jnp.where(improved, fitness[i], best_fitness))


def tell(state: SearchState, children: Genome, fitness: jax.Array,
         strategy: Strategy) -> SearchState:
  """Inserts the K evaluated children, each replacing one member, in order."""
  fitness = jnp.asarray(fitness, jnp.float32)

  def insert(k, st):
    r = strategy.op("replace")(st.fitness, st.age, st.samples[k])
    return st.replace(
        population=jax.tree.map(lambda pop, c: pop.at[r].set(c[k]), st.population, children),
        fitness=st.fitness.at[r].set(fitness[k]), age=st.age.at[r].set(st.births + k))

  state = jax.lax.fori_loop(0, strategy.num_tournaments, insert, state)
  best, best_fitness = keep_best(state.best, state.best_fitness, children, fitness)
  return state.replace(best=best, best_fitness=best_fitness,
                       births=state.births + strategy.num_tournaments, step=state.step + 1)
