"""Pure evolutionary operators and the registry that configs name them by.

Every operator is a module-level pure function of a PRNG key and arrays, so it
jits, vmaps and is reproducible from its key. Roles and signatures:

==============  =============================================================  ==========================
role            signature                                                      returns
==============  =============================================================  ==========================
``init``        ``(key, space) -> Genome``                                     one random genome
``sample``      ``(key, fitness (N,), space) -> (S,) int``                    tournament member indices
``select``      ``(fitness (N,), idx (S,)) -> int``                           the parent's index
``mutate``      ``(key, genome, space) -> Genome``                             the child
``crossover``   ``(key, parent, other, space) -> Genome``                      a mixed genome
``replace``     ``(fitness (N,), age (N,), idx (S,)) -> int``                 the member to remove
==============  =============================================================  ==========================

A new operator is one function plus ``@register(role, name)``; a search config then
names it (``config.search.mutate = "name"``) and the generic registry test checks it.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import struct

from maxpart_jax.genome import Genome
from maxpart_jax.registry import Registry


@struct.dataclass
class SearchSpace:
  """What a genome may contain.

  Attributes:
    max_split: partition points are ``1..max_split``.
    w_choices: allowed weight bits (R_w), e.g. ``[2, 4, 6, 8]``.
    a_choices: allowed activation bits (R_a), e.g. ``[8]``.
    num_layers: genes per genome.
    prob_p: probability that mutation re-draws ``p``.
    prob_gene: probability that mutation re-draws each bit gene (prob_Π).
    sample_size: tournament size S.
    seeds: (M, ...) genomes to start from, best first (the solver's plan,
      :mod:`maxpart_jax.search.solver`), or None.
    seed_privacy: (M,) their predicted privacy, or None.
    member: which member of an initial population an ``init`` call draws (0..N-1; the
      ``solver`` init operator takes the seeds in order).
  """

  w_choices: jax.Array
  a_choices: jax.Array
  prob_p: jax.Array
  prob_gene: jax.Array
  max_split: int = struct.field(pytree_node=False)
  num_layers: int = struct.field(pytree_node=False)
  sample_size: int = struct.field(pytree_node=False)
  seeds: Genome | None = None
  seed_privacy: jax.Array | None = None
  member: jax.Array | int = 0


OPERATORS: dict[str, Registry[Callable]] = {
    role: Registry(f"{role} operator")
    for role in ("init", "sample", "select", "mutate", "crossover", "replace")}


def _check_role(role: str) -> None:
  if role not in OPERATORS:
    raise ValueError(f"unknown operator role {role!r}; roles are {sorted(OPERATORS)}")


def register(role: str, name: str) -> Callable[[Callable], Callable]:
  """Decorator adding an operator under ``OPERATORS[role][name]``."""
  _check_role(role)

  return OPERATORS[role].register(name)


def get_operator(role: str, name: str) -> Callable:
  """The operator registered as ``name`` for ``role``, or a ``ValueError`` listing the options."""
  _check_role(role)
  return OPERATORS[role].get(name)


def initial_population(key: jax.Array, space: SearchSpace, init: Callable, n: int) -> Genome:
  """``n`` genomes from the ``init`` operator, member ``i`` drawn with ``space.member = i``."""
  members = jnp.arange(n, dtype=jnp.int32)
  return jax.vmap(lambda k, i: init(k, space.replace(member=i)))(jax.random.split(key, n),
                                                                  members)


def _draw_genes(key: jax.Array, choices: jax.Array, n: int) -> jax.Array:
  return choices[jax.random.randint(key, (n,), 0, choices.shape[0])].astype(jnp.int32)


@register("init", "uniform")
def uniform_init(key: jax.Array, space: SearchSpace) -> Genome:
  """``p`` uniform on ``1..max_split``; every gene uniform on its choices."""
  kp, kw, ka = jax.random.split(key, 3)
  return Genome(p=jax.random.randint(kp, (), 1, space.max_split + 1, jnp.int32),
                w_bits=_draw_genes(kw, space.w_choices, space.num_layers),
                a_bits=_draw_genes(ka, space.a_choices, space.num_layers))


@register("init", "solver")
def solver_init(key: jax.Array, space: SearchSpace) -> Genome:
  """Member ``i`` is the solver's candidate ``i`` (``space.seeds``, best first); members
  beyond the plan are its candidates again, each gene re-drawn with ``prob_gene`` (the
  paper's mutation), so the population stays diverse."""
  if space.seeds is None:
    raise ValueError("the solver init operator needs the solver's plan in space.seeds: the "
                     "search driver puts it there when search.init='solver'")
  m = space.seeds.p.shape[0]
  seed = jax.tree.map(lambda x: x[space.member % m], space.seeds)
  mutated = resample_mutation(key, seed, space)
  return jax.tree.map(lambda a, b: jnp.where(space.member < m, a, b), seed, mutated)


@register("sample", "uniform")
def uniform_sample(key: jax.Array, fitness: jax.Array, space: SearchSpace) -> jax.Array:
  """``S`` distinct members drawn uniformly (the paper's tournament)."""
  return jax.random.choice(key, fitness.shape[0], (space.sample_size,), replace=False)


@register("select", "best")
def best_of_sample(fitness: jax.Array, idx: jax.Array) -> jax.Array:
  """The fittest sampled member (first one on ties)."""
  return idx[jnp.argmax(fitness[idx])]


@register("mutate", "resample")
def resample_mutation(key: jax.Array, genome: Genome, space: SearchSpace) -> Genome:
  """Re-draws ``p`` with ``prob_p`` and each gene with ``prob_gene`` (the paper's mutation)."""
  kp, kpv, kw, kwv, ka, kav = jax.random.split(key, 6)
  new_p = jax.random.randint(kpv, (), 1, space.max_split + 1, jnp.int32)
  w = jnp.where(jax.random.bernoulli(kw, space.prob_gene, (space.num_layers,)),
                _draw_genes(kwv, space.w_choices, space.num_layers), genome.w_bits)
  a = jnp.where(jax.random.bernoulli(ka, space.prob_gene, (space.num_layers,)),
                _draw_genes(kav, space.a_choices, space.num_layers), genome.a_bits)
  return Genome(p=jnp.where(jax.random.bernoulli(kp, space.prob_p), new_p, genome.p),
                w_bits=w, a_bits=a)


@register("mutate", "step")
def step_mutation(key: jax.Array, genome: Genome, space: SearchSpace) -> Genome:
  """Local moves: ``p`` and each mutated gene step to a neighbouring allowed value."""
  kp, kpd, kw, kwd, ka, kad = jax.random.split(key, 6)

  def step_genes(k_on, k_dir, genes, choices):
    pos = jnp.argmin(jnp.abs(genes[:, None] - choices[None, :]), axis=1)
    move = jax.random.choice(k_dir, jnp.array([-1, 1]), genes.shape)
    new = choices[jnp.clip(pos + move, 0, choices.shape[0] - 1)]
    return jnp.where(jax.random.bernoulli(k_on, space.prob_gene, genes.shape), new,
                     genes).astype(jnp.int32)

  p_new = jnp.clip(genome.p + jax.random.choice(kpd, jnp.array([-1, 1])), 1, space.max_split)
  return Genome(p=jnp.where(jax.random.bernoulli(kp, space.prob_p), p_new, genome.p).astype(jnp.int32),
                w_bits=step_genes(kw, kwd, genome.w_bits, space.w_choices),
                a_bits=step_genes(ka, kad, genome.a_bits, space.a_choices))


@register("crossover", "none")
def no_crossover(key: jax.Array, parent: Genome, other: Genome, space: SearchSpace) -> Genome:
  """The paper's search: the child comes from the parent alone."""
  del key, other, space
  return parent


@register("crossover", "uniform")
def uniform_crossover(key: jax.Array, parent: Genome, other: Genome, space: SearchSpace) -> Genome:
  """Each gene (and ``p``) from either genome with probability 1/2."""
  kp, kw, ka = jax.random.split(key, 3)
  pick = lambda k, a, b: jnp.where(jax.random.bernoulli(k, 0.5, a.shape), b, a)
  return Genome(p=pick(kp, parent.p, other.p), w_bits=pick(kw, parent.w_bits, other.w_bits),
                a_bits=pick(ka, parent.a_bits, other.a_bits))


@register("replace", "worst")
def worst_of_sample(fitness: jax.Array, age: jax.Array, idx: jax.Array) -> jax.Array:
  """The least fit sampled member (the paper's Algorithm 1)."""
  del age
  return idx[jnp.argmin(fitness[idx])]


@register("replace", "oldest")
def oldest_in_population(fitness: jax.Array, age: jax.Array, idx: jax.Array) -> jax.Array:
  """The oldest member of the population (regularized evolution, Real et al. 2019)."""
  del fitness, idx
  return jnp.argmin(age)
