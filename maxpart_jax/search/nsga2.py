"""NSGA-II (Deb et al., IEEE TEVC 2002) on the search's genomes, with the same ask/tell loop.

    state = init(key, space, strategy)
    state = tell_initial(state, results)               # metrics of the N initial genomes
    for t in range(T):
      children, state = ask(jax.random.fold_in(key, t), state, space, strategy)
      state = tell(state, children, evaluate(children), strategy)

Where the paper's GA folds the objectives into one penalized fitness, NSGA-II keeps them
apart: privacy up, edge energy down, accuracy loss down (:func:`objectives`). The bounds
E < E_b and ε < ε_b are handled by *constraint domination* instead of penalties: a feasible
genome beats an infeasible one, two infeasible ones compare by how far they break the bounds
(``results["violation"]``, 0 when feasible; :func:`maxpart_jax.search.fitness.violation_degree`),
and two feasible ones by Pareto dominance.

``ask`` makes K children (``strategy.num_tournaments``) with the registered operators: mating
tournaments of ``space.sample_size`` members (2 in Deb's binary tournament) through the
``sample`` and ``select`` operators on the crowded-comparison score (:func:`crowded_score`),
then ``crossover`` and ``mutate``. ``tell`` is the elitist survival: parents and children
together are sorted into fronts, and the N best by (front, larger crowding distance) stay.
Everything is a pure, jittable function of immutable pytrees.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from maxpart_jax.genome import Genome
from maxpart_jax.search import pareto
from maxpart_jax.search.evolution import Strategy, keep_best
from maxpart_jax.search.operators import SearchSpace, initial_population

# A non-finite objective (a failed candidate) counts as this bad; its violation ranks it last.
WORST = 1e30


@struct.dataclass
class NSGA2State:
  """Population and bookkeeping; leading axis N.

  Attributes:
    population: the N current genomes.
    objectives: (N, 3) their objectives, all minimized: -privacy, energy (mJ), ε.
    violation: (N,) how far each breaks the bounds (0: feasible).
    rank: (N,) front of each member (0: not constraint-dominated by any member).
    crowding: (N,) crowding distance within its front (inf at the front's ends).
    fitness: (N,) the paper's penalized fitness, kept for the history and logs only.
    best, best_fitness: the genome of highest penalized fitness ever evaluated (what the
      driver's logs follow; the report takes the best *feasible* one from the cache).
    births: genomes created so far.
    step: completed ask/tell steps.
  """

  population: Genome
  objectives: jax.Array
  violation: jax.Array
  rank: jax.Array
  crowding: jax.Array
  fitness: jax.Array
  best: Genome
  best_fitness: jax.Array
  births: jax.Array
  step: jax.Array


def objectives(results: dict[str, jax.Array]) -> jax.Array:
  """``(n, 3)`` objectives to minimize, from evaluated metrics: -privacy, energy, ε.

  Non-finite values (failed candidates) become :data:`WORST`.
  """
  obj = jnp.stack([-jnp.asarray(results["privacy"], jnp.float32),
                   jnp.asarray(results["energy_mj"], jnp.float32),
                   jnp.asarray(results["eps"], jnp.float32)], axis=-1)
  return jnp.where(jnp.isfinite(obj), obj, WORST)


def constrained_dominates(obj: jax.Array, violation: jax.Array) -> jax.Array:
  """``(n, n)``: ``[i, j]`` true when ``i`` constraint-dominates ``j`` (Deb 2002, §V).

  Feasible beats infeasible; two infeasible: the smaller violation wins; two feasible:
  Pareto dominance on ``obj`` (minimized).
  """
  feasible = violation <= 0
  fi, fj = feasible[:, None], feasible[None, :]
  return jnp.where(fi & fj, pareto.dominates(obj, (False,) * obj.shape[-1]),
                   jnp.where(fi, ~fj, ~fj & (violation[:, None] < violation[None, :])))


def front_ranks(dominated_by: jax.Array) -> jax.Array:
  """``(n,)`` front index of every point from an ``(n, n)`` dominance matrix.

  Front 0 holds the points nobody dominates; front r those dominated only from fronts < r.
  """
  n = dominated_by.shape[0]

  def peel(r, ranks):
    open_ = ranks < 0
    beaten = jnp.any(dominated_by & open_[:, None], axis=0)
    return jnp.where(open_ & ~beaten, r, ranks)

  return jax.lax.fori_loop(0, n, peel, jnp.full((n,), -1, jnp.int32))


def crowding_distance(obj: jax.Array, ranks: jax.Array) -> jax.Array:
  """``(n,)`` crowding distance of every point within its front (Deb 2002, §III-B).

  Per objective, the gap between a point's two neighbours in its front, over the front's
  range of that objective, summed over objectives; a front's extreme points get inf
  (from each objective that varies over the front), and so do fronts of one or two points.
  """
  n = obj.shape[0]

  def one_objective(f):
    order = jnp.lexsort((f, ranks))
    r, v = ranks[order], f[order]
    inner = jnp.concatenate([jnp.array([False]), r[1:] == r[:-1]]) & jnp.concatenate(
        [r[:-1] == r[1:], jnp.array([False])])
    span = (jax.ops.segment_max(f, ranks, num_segments=n)
            - jax.ops.segment_min(f, ranks, num_segments=n))[r]
    gap = (jnp.roll(v, -1) - jnp.roll(v, 1)) / jnp.where(span > 0, span, 1.0)
    # An objective constant over a front tells its points apart nowhere: it adds 0 to all.
    d = jnp.where(span > 0, jnp.where(inner, gap, jnp.inf), 0.0)
    return jnp.zeros((n,), obj.dtype).at[order].set(d)

  size = jax.ops.segment_sum(jnp.ones_like(ranks), ranks, num_segments=n)[ranks]
  return jnp.where(size <= 2, jnp.inf, jnp.sum(jax.vmap(one_objective, in_axes=1)(obj), axis=0))


def crowded_score(rank: jax.Array, crowding: jax.Array) -> jax.Array:
  """One number per member ordering like Deb's crowded comparison: a lower front wins,
  in a tie the larger crowding distance. A ``select`` operator maximizing it is NSGA-II's
  mating tournament."""
  return -rank.astype(jnp.float32) + 0.5 * jnp.where(jnp.isinf(crowding), 1.0,
                                                      crowding / (1.0 + crowding))


def _sort(obj: jax.Array, violation: jax.Array) -> tuple[jax.Array, jax.Array]:
  rank = front_ranks(constrained_dominates(obj, violation))
  return rank, crowding_distance(obj, rank)


def init(key: jax.Array, space: SearchSpace, strategy: Strategy) -> NSGA2State:
  """N random genomes (from the ``init`` operator), not yet evaluated."""
  n = strategy.pop_size
  population = initial_population(key, space, strategy.op("init"), n)
  return NSGA2State(
      population=population, objectives=jnp.full((n, 3), WORST), violation=jnp.zeros((n,)),
      rank=jnp.zeros((n,), jnp.int32), crowding=jnp.zeros((n,)), fitness=jnp.full((n,), -jnp.inf),
      best=jax.tree.map(lambda x: x[0], population), best_fitness=jnp.array(-jnp.inf),
      births=jnp.int32(n), step=jnp.int32(0))


def tell_initial(state: NSGA2State, results: dict[str, jax.Array]) -> NSGA2State:
  """Records the initial population's metrics and sorts it into fronts."""
  obj, viol = objectives(results), jnp.asarray(results["violation"], jnp.float32)
  rank, crowding = _sort(obj, viol)
  fitness = jnp.asarray(results["fitness"], jnp.float32)
  best, best_fitness = keep_best(state.best, state.best_fitness, state.population, fitness)
  return state.replace(objectives=obj, violation=viol, rank=rank, crowding=crowding,
                       fitness=fitness, best=best, best_fitness=best_fitness)


def ask(key: jax.Array, state: NSGA2State, space: SearchSpace,
        strategy: Strategy) -> tuple[Genome, NSGA2State]:
  """K children: two crowded tournaments pick the parents, then crossover and mutation."""
  score = crowded_score(state.rank, state.crowding)
  member = lambda i: jax.tree.map(lambda x: x[i], state.population)

  def parent(k):
    return strategy.op("select")(score, strategy.op("sample")(k, score, space))

  def child(k):
    k1, k2, k_cross, k_mutate = jax.random.split(k, 4)
    mixed = strategy.op("crossover")(k_cross, member(parent(k1)), member(parent(k2)), space)
    return strategy.op("mutate")(k_mutate, mixed, space)

  return jax.vmap(child)(jax.random.split(key, strategy.num_tournaments)), state


def tell(state: NSGA2State, children: Genome, results: dict[str, jax.Array],
         strategy: Strategy) -> NSGA2State:
  """Elitist survival: the N best of parents and children by (front, -crowding)."""
  n = strategy.pop_size
  merged = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), state.population, children)
  obj = jnp.concatenate([state.objectives, objectives(results)])
  viol = jnp.concatenate([state.violation, jnp.asarray(results["violation"], jnp.float32)])
  fitness = jnp.concatenate([state.fitness, jnp.asarray(results["fitness"], jnp.float32)])
  rank, crowding = _sort(obj, viol)
  # The survivors keep the front and crowding measured in the merged set (as Deb's
  # algorithm and pymoo's RankAndCrowding do); the next mating tournaments compare those.
  keep = jnp.lexsort((-crowding, rank))[:n]
  best, best_fitness = keep_best(state.best, state.best_fitness, children,
                                 jnp.asarray(results["fitness"], jnp.float32))
  return state.replace(
      population=jax.tree.map(lambda x: x[keep], merged), objectives=obj[keep],
      violation=viol[keep], rank=rank[keep], crowding=crowding[keep], fitness=fitness[keep],
      best=best, best_fitness=best_fitness, births=state.births + strategy.num_tournaments,
      step=state.step + 1)
