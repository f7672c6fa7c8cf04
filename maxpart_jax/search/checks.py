"""Generic checks of a search operator, for the registry's tests and for users' own.

    from maxpart_jax.search.checks import check_operator
    check_operator("mutate", my_mutation)      # in your test; raises if something is wrong

An operator passes when, on a small search space, its output is legal (a genome of the
space's shapes, dtypes and choices; an index in range), it is pure (the same key gives
the same result), it compiles under ``jax.jit``, and it does its job (a mutation changes
something for some key; a crossover takes every gene from a parent; a sample draws
``S`` distinct members; a selection picks a sampled member).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from maxpart_jax.genome import Genome
from maxpart_jax.search.operators import OPERATORS, SearchSpace, get_operator

SPACE = SearchSpace(w_choices=jnp.array([2, 4, 6, 8]), a_choices=jnp.array([8]),
                    prob_p=jnp.float32(0.5), prob_gene=jnp.float32(0.3), max_split=9,
                    num_layers=21, sample_size=4,
                    seeds=Genome(p=jnp.array([7, 3], jnp.int32),
                                 w_bits=jnp.array([[4] * 21, [8, 2] * 10 + [6]], jnp.int32),
                                 a_bits=jnp.full((2, 21), 8, jnp.int32)),
                    seed_privacy=jnp.array([0.8, 0.3]))
"""The space the checks run on: 21 layers, splits 1..9, R_w = {2, 4, 6, 8}, R_a = {8}, S = 4,
and two seed genomes (a solver's plan) for operators that start from one."""


class OperatorCheckError(AssertionError):
  """An operator failed one of the generic checks; the message says which and why."""


def check_legal_genome(genome: Genome, space: SearchSpace = SPACE, what: str = "genome") -> None:
  """Raises :class:`OperatorCheckError` unless ``genome`` is one legal genome of ``space``."""
  _require(isinstance(genome, Genome), f"{what} is a {type(genome).__name__}, not a Genome")
  _require(genome.p.shape == () and genome.w_bits.shape == (space.num_layers,) and
           genome.a_bits.shape == (space.num_layers,),
           f"{what} has shapes p {genome.p.shape}, w_bits {genome.w_bits.shape}, a_bits "
           f"{genome.a_bits.shape}; expected (), ({space.num_layers},), ({space.num_layers},)")
  _require(all(x.dtype == jnp.int32 for x in (genome.p, genome.w_bits, genome.a_bits)),
           f"{what} has dtypes {genome.p.dtype}/{genome.w_bits.dtype}/{genome.a_bits.dtype}; "
           "expected int32")
  _require(1 <= int(genome.p) <= space.max_split,
           f"{what} has p={int(genome.p)} outside 1..{space.max_split}")
  for field, choices in (("w_bits", space.w_choices), ("a_bits", space.a_choices)):
    bad = set(np.asarray(getattr(genome, field)).tolist()) - set(np.asarray(choices).tolist())
    _require(not bad, f"{what} has {field} {sorted(bad)} outside the choices "
                      f"{np.asarray(choices).tolist()}")


def check_operator(role: str, fn: Callable, space: SearchSpace = SPACE) -> None:
  """Runs the generic checks of ``role`` on ``fn``; raises :class:`OperatorCheckError`.

  ``role`` is one of ``init``, ``sample``, ``select``, ``mutate``, ``crossover``,
  ``replace``; ``fn`` has that role's signature (see :mod:`maxpart_jax.search.operators`).
  """
  if role not in OPERATORS:
    raise ValueError(f"unknown operator role {role!r}; roles are {sorted(OPERATORS)}")
  name = getattr(fn, "__name__", repr(fn))
  # Eagerly first (host-side randomness shows there), then compiled.
  for how, op in (("called eagerly", fn), ("under jax.jit", jax.jit(fn))):
    try:
      _check(role, op, space)
    except OperatorCheckError as e:
      raise OperatorCheckError(f"{role} operator {name}, {how}: {e}") from None
    except Exception as e:  # a crash is a failed check too; say so with the cause
      raise OperatorCheckError(f"{role} operator {name} failed {how}: "
                               f"{type(e).__name__}: {e}") from e


def _check(role: str, op: Callable, space: SearchSpace) -> None:
  key = jax.random.key(3)
  n = 8
  fitness = jnp.arange(float(n))[::-1]
  idx = jnp.array([1, 5, 2, 7])[:space.sample_size]
  init = get_operator("init", "uniform")
  a, b = init(jax.random.key(0), space), init(jax.random.key(1), space)
  if role == "init":
    out = _repeat(lambda: op(key, space))
    check_legal_genome(out[0], space, "the genome")
  elif role == "mutate":
    out = _repeat(lambda: op(key, a, space))
    check_legal_genome(out[0], space, "the child")
    changed = [op(jax.random.key(s), a, space) for s in range(20)]
    _require(any(int(c.p) != int(a.p) or not np.array_equal(c.w_bits, a.w_bits) or
                 not np.array_equal(c.a_bits, a.a_bits) for c in changed),
             "20 keys never changed the genome")
  elif role == "crossover":
    out = _repeat(lambda: op(key, a, b, space))
    check_legal_genome(out[0], space, "the child")
    for field in ("w_bits", "a_bits"):
      child, pa, pb = (np.asarray(getattr(g, field)) for g in (out[0], a, b))
      _require(np.all((child == pa) | (child == pb)),
               f"the child's {field} has genes from neither parent")
  elif role == "sample":
    out = _repeat(lambda: op(key, fitness, space))
    got = np.asarray(out[0])
    _require(got.shape == (space.sample_size,), f"returned shape {got.shape}, expected "
                                                f"({space.sample_size},)")
    _require(np.all((got >= 0) & (got < n)), f"returned indices {got.tolist()} outside 0..{n - 1}")
    _require(len(set(got.tolist())) == space.sample_size, f"returned repeated members {got.tolist()}")
  elif role == "select":
    out = _repeat(lambda: op(fitness, idx))
    _require(int(out[0]) in np.asarray(idx).tolist(),
             f"picked {int(out[0])}, not one of the sampled members {np.asarray(idx).tolist()}")
  else:  # replace
    age = jnp.array([5, 3, 7, 0, 1, 2, 4, 6])
    out = _repeat(lambda: op(fitness, age, idx))
    _require(0 <= int(out[0]) < n, f"picked member {int(out[0])} outside 0..{n - 1}")
  for other in out[1:]:
    same = jax.tree.map(lambda x, y: bool(np.array_equal(x, y)), out[0], other)
    _require(all(jax.tree.leaves(same)), "the same key gave different results (not pure)")


# Calls with the same inputs in the purity check: host randomness over 9 values repeats
# all of them with probability (1/9)^7 ~ 2e-7 (with two calls: 1/9, a flaky check).
PURITY_CALLS = 8


def _repeat(call: Callable) -> list:
  return [call() for _ in range(PURITY_CALLS)]


def _require(ok: bool, message: str) -> None:
  if not ok:
    raise OperatorCheckError(message)
