"""The functional search: operators, K = 1 equals Algorithm 1, batched tournaments, caching."""

import os
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO
from maxpart_jax.genome import Genome
from maxpart_jax.models import get_model
from maxpart_jax.search import evolution
from maxpart_jax.jobs.caching import METRICS, CachedEvaluator, effective_key
from maxpart_jax.search.checks import (SPACE, OperatorCheckError, check_legal_genome,
                                       check_operator)
from maxpart_jax.search.operators import OPERATORS, SearchSpace, get_operator, register



def cheap_fitness(genomes: Genome) -> jax.Array:
  """Deterministic stand-in: deeper splits and fewer bits score higher."""
  return genomes.p * 10.0 - jnp.mean(genomes.w_bits, axis=-1)


def _legal(genome: Genome, space: SearchSpace = SPACE) -> None:
  check_legal_genome(genome, space)


def _random_genome(seed: int) -> Genome:
  return get_operator("init", "uniform")(jax.random.key(seed), SPACE)


@pytest.mark.parametrize("role,name", [(r, n) for r in OPERATORS for n in OPERATORS[r]])
def test_every_registered_operator(role, name):
  """Generic checks of each registered operator (legal, pure, jittable, does its job)."""
  check_operator(role, get_operator(role, name))


def _bad_mutations():
  """Plausible bugs in a user's mutation, each with the words its check must say."""
  def out_of_choices(key, genome, space):
    return genome.replace(w_bits=genome.w_bits.at[0].set(3))

  def host_random(key, genome, space):
    return genome.replace(p=jnp.int32(np.random.randint(1, space.max_split + 1)))

  def does_nothing(key, genome, space):
    return genome

  def p_out_of_range(key, genome, space):
    return genome.replace(p=genome.p + space.max_split)

  def float_genes(key, genome, space):
    return genome.replace(w_bits=genome.w_bits.astype(jnp.float32))

  return [(out_of_choices, r"w_bits \[3\] outside the choices"),
          (host_random, "not pure"), (does_nothing, "never changed the genome"),
          (p_out_of_range, "outside 1..9"), (float_genes, "expected int32")]


@pytest.mark.parametrize("fn,message", _bad_mutations(), ids=lambda x: getattr(x, "__name__", ""))
def test_check_operator_catches_broken_user_operators(fn, message):
  with pytest.raises(OperatorCheckError, match=message):
    check_operator("mutate", fn)


def test_check_operator_on_a_user_module(tmp_path, monkeypatch):
  """A user's module, imported from the working directory as config.operator_modules does,
  checked with the same function the registry's tests use."""
  (tmp_path / "user_ops_for_check.py").write_text(textwrap.dedent("""
      import jax.numpy as jnp
      from maxpart_jax.search.operators import register

      @register("select", "last_sampled")
      def last_sampled(fitness, idx):
        return idx[-1]

      @register("replace", "off_by_one")
      def off_by_one(fitness, age, idx):
        return jnp.int32(fitness.shape[0])  # one past the last member
      """))
  monkeypatch.syspath_prepend(str(tmp_path))
  __import__("user_ops_for_check")
  try:
    check_operator("select", get_operator("select", "last_sampled"))
    with pytest.raises(OperatorCheckError, match="replace operator off_by_one.*outside 0..7"):
      check_operator("replace", get_operator("replace", "off_by_one"))
  finally:
    OPERATORS["select"].unregister("last_sampled")
    OPERATORS["replace"].unregister("off_by_one")


def test_paper_operators_by_hand():
  fitness = jnp.array([3.0, 9.0, 1.0, 7.0, 5.0])
  idx = jnp.array([0, 2, 3])
  assert int(get_operator("select", "best")(fitness, idx)) == 3
  assert int(get_operator("replace", "worst")(fitness, jnp.arange(5), idx)) == 2
  assert int(get_operator("replace", "oldest")(fitness, jnp.array([4, 2, 9, 0, 5]), idx)) == 3
  a = _random_genome(0)
  never = SPACE.replace(prob_p=jnp.float32(0.0), prob_gene=jnp.float32(0.0))
  jax.tree.map(np.testing.assert_array_equal,
               get_operator("mutate", "resample")(jax.random.key(1), a, never), a)
  rates = np.mean([np.asarray(get_operator("mutate", "resample")(jax.random.key(s), a, SPACE).w_bits
                              != a.w_bits) for s in range(200)])
  assert rates == pytest.approx(0.3 * 0.75, abs=0.03)  # re-drawn w.p. 0.3, changed w.p. 3/4


def test_register_and_unknown_names():
  @register("mutate", "test_identity")
  def identity(key, genome, space):
    del key, space
    return genome

  try:
    strategy = evolution.Strategy(pop_size=4, mutate="test_identity")
    assert strategy.op("mutate") is identity
    with pytest.raises(ValueError, match="already registered"):
      register("mutate", "test_identity")(identity)
  finally:
    OPERATORS["mutate"].unregister("test_identity")
  with pytest.raises(ValueError, match=r"unknown mutate operator 'nope'; registered: \['resample'"):
    evolution.Strategy(pop_size=4, mutate="nope")
  with pytest.raises(ValueError, match="unknown operator role"):
    register("breed", "x")


def reference_algorithm_1(key, space, n, iterations):
  """Algorithm 1 written plainly: Python lists, one tournament at a time."""
  init_op = get_operator("init", "uniform")
  mutate = jax.jit(get_operator("mutate", "resample"))  # compiled once: the same numbers
  keys = jax.random.split(key, 2)
  population = [init_op(k, space) for k in jax.random.split(keys[0], n)]
  fitness = [float(cheap_fitness(g)) for g in population]
  best, best_f = population[int(np.argmax(fitness))], max(fitness)
  trajectory = []
  for t in range(iterations):
    k_sample, _, k_mutate = jax.random.split(jax.random.split(jax.random.fold_in(keys[1], t), 1)[0], 3)
    sample = np.asarray(jax.random.choice(k_sample, n, (space.sample_size,), replace=False))
    parent = max(sample, key=lambda i: (fitness[i], -list(sample).index(i)))
    child = mutate(k_mutate, population[parent], space)
    worst = min(sample, key=lambda i: (fitness[i], list(sample).index(i)))
    child_f = float(cheap_fitness(child))
    population[worst], fitness[worst] = child, child_f
    if child_f > best_f:
      best, best_f = child, child_f
    trajectory.append((int(child.p), np.asarray(child.w_bits).tolist(), best_f))
  return trajectory, best


def run_functional(key, space, strategy, iterations):
  keys = jax.random.split(key, 2)
  state = evolution.init(keys[0], space, strategy)
  state = evolution.tell_initial(state, cheap_fitness(state.population))
  ask = jax.jit(lambda k, s: evolution.ask(k, s, space, strategy))
  tell = jax.jit(lambda s, c, f: evolution.tell(s, c, f, strategy))
  trajectory = []
  for t in range(iterations):
    children, state = ask(jax.random.fold_in(keys[1], t), state)
    state = tell(state, children, cheap_fitness(children))
    trajectory.append((int(children.p[0]), np.asarray(children.w_bits[0]).tolist(),
                       float(state.best_fitness)))
  return trajectory, state


def test_k1_is_exactly_algorithm_1():
  key = jax.random.key(42)
  expected, best = reference_algorithm_1(key, SPACE, n=8, iterations=60)
  got, state = run_functional(key, SPACE, evolution.Strategy(pop_size=8), 60)
  assert got == expected
  jax.tree.map(np.testing.assert_array_equal, state.best, best)


def test_batched_tournaments_improve_and_keep_population_legal():
  strategy = evolution.Strategy(pop_size=8, num_tournaments=4)
  _, state = run_functional(jax.random.key(0), SPACE, strategy, 30)
  assert state.population.p.shape == (8,) and int(state.births) == 8 + 30 * 4
  for i in range(8):
    _legal(jax.tree.map(lambda x: x[i], state.population))
  np.testing.assert_allclose(state.fitness, cheap_fitness(state.population))
  assert int(state.best.p) == 9 and float(state.best_fitness) > 85.0  # optimum: 88
  # The recorded best fitness is the best genome's own (catches an index mix-up in tell).
  assert float(state.best_fitness) == float(cheap_fitness(state.best))


def test_tell_replaces_sequentially_within_a_step():
  strategy = evolution.Strategy(pop_size=4, num_tournaments=2)
  space = SPACE.replace(sample_size=2)
  state = evolution.init(jax.random.key(0), space, strategy)
  state = evolution.tell_initial(state, jnp.array([1.0, 2.0, 3.0, 4.0]))
  children = jax.tree.map(lambda x: jnp.stack([x, x]), _random_genome(7))
  # Both tournaments sampled members 0 and 1: the first child replaces 0 (worst, 1.0),
  # the second then replaces 1 (now the worst of {child 10.0, 2.0}).
  state = state.replace(samples=jnp.array([[0, 1], [0, 1]], jnp.int32))
  state = evolution.tell(state, children, jnp.array([10.0, 20.0]), strategy)
  np.testing.assert_array_equal(state.fitness, [10.0, 20.0, 3.0, 4.0])
  np.testing.assert_array_equal(state.age, [4, 5, 2, 3])


def test_effective_key_ignores_masked_genes_and_cache_counts_hits():
  info = get_model("resnet18", width=0.125).info
  base = Genome(p=jnp.int32(3), w_bits=jnp.full(21, 4, jnp.int32), a_bits=jnp.full(21, 8, jnp.int32))
  masked = base.replace(w_bits=base.w_bits.at[0].set(2).at[10].set(6))  # stem and a cloud layer
  assert effective_key(info, base) == effective_key(info, masked)
  assert effective_key(info, base) != effective_key(info, base.replace(w_bits=base.w_bits.at[2].set(2)))
  assert effective_key(info, base) != effective_key(info, base.replace(p=jnp.int32(4)))

  class Counting:
    model = type("M", (), {"info": info})()
    calls = []

    def evaluate(self, genomes, **kwargs):
      self.calls.append(int(genomes.p.shape[0]))
      f = np.asarray(cheap_fitness(genomes), float)
      return {m: f for m in METRICS}

  evaluator = Counting()
  cached = CachedEvaluator(evaluator, {})
  batch = jax.tree.map(lambda *xs: jnp.stack(xs), base, masked, base.replace(p=jnp.int32(5)))
  first = cached(batch)
  assert evaluator.calls == [2]  # base and masked are one candidate
  second = cached(batch)
  assert evaluator.calls == [2] and cached.hits == 1 + 3 and cached.lookups == 6
  np.testing.assert_array_equal(first["fitness"], second["fitness"])


def test_the_docs_operator_example_registers_and_runs(tmp_path, monkeypatch):
  """docs/search.md's worked example registers through config.operator_modules and runs."""
  from experiments.configs import search as search_configs
  from maxpart_jax.jobs import settings
  readme = open(os.path.join(REPO, "docs", "search.md")).read()
  section = readme[readme.index("## Adding a search operator"):]
  code = section[section.index("```python") + len("```python"):section.index("```\n", section.index("```python") + 3)]
  (tmp_path / "my_ops.py").write_text(code)
  monkeypatch.syspath_prepend(str(tmp_path))
  config = search_configs.get_config("smoke")
  config.operator_modules = "my_ops"
  config.search.mutate = "lower_bits"
  try:
    settings.validate_config(config)
    strategy = settings.strategy_from_config(config)
    a = _random_genome(0)
    child = strategy.op("mutate")(jax.random.key(0), a, SPACE.replace(prob_gene=jnp.float32(1.0)))
    np.testing.assert_array_equal(child.w_bits, np.full(SPACE.num_layers, 2))
  finally:
    OPERATORS["mutate"].unregister("lower_bits", missing_ok=True)


@pytest.mark.slow
def test_the_docs_ask_tell_loop_is_algorithm_1():
  """docs/search.md's init/ask/tell example runs as printed and is Algorithm 1 (catches a
  page that drifted from the API, or a K = 1 default that is not the paper's algorithm)."""
  readme = open(os.path.join(REPO, "docs", "search.md")).read()
  section = readme[readme.index("The evolution itself is a pure"):]
  start = section.index("```python") + len("```python")
  namespace = {}
  exec(section[start:section.index("```\n", start)], namespace)
  state, space = namespace["state"], namespace["space"]
  _, best = reference_algorithm_1(jax.random.key(0), space, n=20, iterations=20)
  jax.tree.map(np.testing.assert_array_equal, state.best, best)
