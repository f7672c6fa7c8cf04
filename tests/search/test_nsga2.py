"""NSGA-II: fronts, crowding and survival against pymoo, constraint domination by hand, and
the whole algorithm against pymoo's NSGA-II on a toy problem over the genome space."""

import copy
import functools

import jax
import jax.numpy as jnp
import moocore
import numpy as np
import pytest
from pymoo.algorithms.moo.nsga2 import NSGA2
from pymoo.core.crossover import Crossover
from pymoo.core.mutation import Mutation
from pymoo.core.population import Population
from pymoo.core.problem import Problem
from pymoo.core.sampling import Sampling
from pymoo.operators.survival.rank_and_crowding import RankAndCrowding
from pymoo.operators.survival.rank_and_crowding.metrics import get_crowding_function
from pymoo.optimize import minimize
from pymoo.util.nds.non_dominated_sorting import NonDominatedSorting

from maxpart_jax import checkpoint
from maxpart_jax.energy import DeviceConfig
from maxpart_jax.search import algorithms, nsga2
from maxpart_jax.jobs import caching, driver, settings, storage
from maxpart_jax.search.fitness import FitnessConfig, violation_degree, violations
from maxpart_jax.search.checks import SPACE, check_legal_genome
from maxpart_jax.search.evolution import Strategy
from maxpart_jax.search.operators import SearchSpace


@pytest.mark.parametrize("m,grid", [(2, None), (3, None), (2, 4), (3, 3)])
def test_fronts_and_crowding_match_pymoo(m, grid):
  """Continuous points, and points on a small integer grid (ties in every objective and
  duplicate points), a third of them infeasible: feasible fronts are pymoo's, infeasible
  points follow in fronts of equal violation (Deb's constraint domination), and crowding
  within every front is pymoo's. Catches a wrong peeling order (a point ranked before one
  that dominates it), ties or duplicates treated as dominating, infeasible points mixed
  into feasible fronts, and crowding not normalized per front and objective."""
  rng = np.random.default_rng(m + (grid or 0))
  for _ in range(5):
    f = rng.random((60, m)) if grid is None else rng.integers(0, grid, (60, m)).astype(float)
    violation = np.where(rng.random(60) < 1 / 3, rng.integers(1, 4, 60) / 4, 0.0)
    ranks = np.asarray(nsga2.front_ranks(nsga2.constrained_dominates(
        jnp.asarray(f), jnp.asarray(violation))))
    feasible = violation == 0
    _, want = NonDominatedSorting().do(f[feasible], return_rank=True)
    np.testing.assert_array_equal(ranks[feasible], want)
    levels = np.unique(violation[~feasible])
    np.testing.assert_array_equal(ranks[~feasible], want.max() + 1 + np.searchsorted(
        levels, violation[~feasible]))
    crowding = np.asarray(nsga2.crowding_distance(jnp.asarray(f, jnp.float32),
                                                  jnp.asarray(ranks)))
    cd = get_crowding_function("cd")
    for r in np.unique(ranks[feasible]):
      front = ranks == r
      # pymoo averages over objectives where Deb sums: the same order, m times smaller.
      np.testing.assert_allclose(crowding[front] / m, cd.do(f[front]), rtol=1e-5)
    if grid is not None:
      assert len(np.unique(f, axis=0)) < len(f)  # duplicates were there


def test_crowded_score_orders_like_the_crowded_comparison():
  """Every pair of members, with tied fronts, tied and infinite crowding: a higher score
  exactly when Deb's crowded comparison prefers the member (lower front, then larger
  crowding). Catches a reversed score, which makes mating prefer the worst front."""
  rng = np.random.default_rng(0)
  rank = rng.integers(0, 4, 80)
  crowding = rng.choice([0.0, 0.3, 0.3, 1.7, 12.0, np.inf], 80)
  score = np.asarray(nsga2.crowded_score(jnp.asarray(rank), jnp.asarray(crowding, jnp.float32)))
  for i in range(80):
    for j in range(80):
      better = rank[i] < rank[j] or (rank[i] == rank[j] and crowding[i] > crowding[j])
      assert (score[i] > score[j]) == better, (rank[i], crowding[i], rank[j], crowding[j])


def test_mating_tournaments_take_parents_from_the_better_fronts():
  """ask() on a population whose first front (a quarter of it) carries 2-bit genes and the
  rest 8-bit ones, with mutation off: a binary tournament picks a first-front parent with
  probability 1 - (3/4)^2 = 7/16, so that share of the children's genes is 2-bit (a reversed
  comparison gives (1/4)^2 = 1/16)."""
  n, quarter = 16, 4
  strategy = Strategy(pop_size=n, num_tournaments=n, crossover="uniform")
  space = SearchSpace(w_choices=SPACE.w_choices, a_choices=SPACE.a_choices,
                      prob_p=jnp.float32(0.0), prob_gene=jnp.float32(0.0),
                      max_split=SPACE.max_split, num_layers=SPACE.num_layers, sample_size=2)
  state = nsga2.init(jax.random.key(0), space, strategy)
  w = jnp.where(jnp.arange(n)[:, None] < quarter, 2, 8) * jnp.ones((1, SPACE.num_layers),
                                                                    jnp.int32)
  state = state.replace(population=state.population.replace(w_bits=w),
                        rank=jnp.where(jnp.arange(n) < quarter, 0, 1).astype(jnp.int32),
                        crowding=jnp.ones(n))
  ask = jax.jit(lambda k: nsga2.ask(k, state, space, strategy)[0])
  share = np.mean([np.mean(np.asarray(ask(jax.random.key(s)).w_bits) == 2) for s in range(60)])
  assert share == pytest.approx(7 / 16, abs=0.05)


def test_constraint_domination_by_hand():
  """Feasible beats infeasible whatever the objectives; infeasible ones compare by
  violation only; feasible ones by Pareto dominance. Catches penalties in disguise."""
  obj = jnp.array([[0.0, 0.0], [5.0, 5.0], [9.0, 9.0], [1.0, 2.0], [2.0, 1.0]])
  viol = jnp.array([0.5, 0.0, 0.2, 0.0, 0.0])
  dom = np.asarray(nsga2.constrained_dominates(obj, viol))
  assert dom[1, 0] and not dom[0, 1]  # feasible (worse objectives) beats infeasible
  assert dom[2, 0] and not dom[0, 2]  # smaller violation wins despite worse objectives
  assert dom[3, 1] and dom[4, 1]  # Pareto among the feasible
  assert not dom[3, 4] and not dom[4, 3]  # incomparable
  assert not dom.diagonal().any()
  np.testing.assert_array_equal(np.asarray(nsga2.front_ranks(jnp.asarray(dom))),
                                [3, 1, 2, 0, 0])


def _pymoo_survivors(f, cv, n):
  pop = Population.new(F=f, G=cv[:, None])
  survived = RankAndCrowding().do(Problem(n_var=1, n_obj=f.shape[1], n_ieq_constr=1), pop,
                                  n_survive=n)
  return {tuple(x) for x in survived.get("F")}


def test_survival_keeps_what_pymoo_keeps():
  """The N survivors of parents + children are pymoo's RankAndCrowding survivors, with
  feasible fronts first and infeasible points by violation. Catches a reversed crowding
  sort (keeping crowded points) or infeasible points admitted before feasible ones."""
  n = 12
  strategy = Strategy(pop_size=n, num_tournaments=n)
  rng = np.random.default_rng(0)
  state0 = nsga2.init(jax.random.key(0), SPACE, strategy)
  tell = jax.jit(lambda s, c, r: nsga2.tell(s, c, r, strategy))
  tell_initial, sort = jax.jit(nsga2.tell_initial), jax.jit(nsga2._sort)
  checked = 0
  for _ in range(20):
    f = rng.random((2 * n, 2)).astype(np.float32)
    cv = np.where(rng.random(2 * n) < 0.3, rng.random(2 * n), 0.0).astype(np.float32)
    told = {"privacy": -f[:, 0], "energy_mj": f[:, 1], "eps": np.zeros(2 * n, np.float32),
            "violation": cv, "fitness": np.zeros(2 * n, np.float32)}
    half = lambda sl: {k: jnp.asarray(v[sl]) for k, v in told.items()}
    state = tell_initial(state0, half(slice(0, n)))
    state = tell(state, state0.population, half(slice(n, None)))
    # pymoo breaks ties of crowding at random: compare where the cut is no tie.
    rank, crowding = (np.asarray(x) for x in sort(
        nsga2.objectives(half(slice(None))), jnp.asarray(cv)))
    order = np.lexsort((-crowding, rank))
    a, b = order[n - 1], order[n]
    if rank[a] == rank[b] and crowding[a] == crowding[b]:
      continue
    ours = {(float(x), float(y)) for x, y in np.asarray(state.objectives[:, :2])}
    assert ours == {tuple(float(v) for v in x) for x in _pymoo_survivors(f, cv, n)}
    checked += 1
  assert checked >= 10


# A toy problem over SPACE's genomes (21 layers, splits 1..9, w in {2, 4, 6, 8}) with a
# conflict like the real one: deeper splits and more bits cost, shallower and fewer lose.
_C = np.random.default_rng(7).random(21)
_BOUND = 1.1


def _toy(p, w):
  cost = p / 9.0 + (w * _C).sum(-1) / (8 * _C.sum())
  loss = (9.0 - p) / 9.0 + ((8 - w) * _C[::-1]).sum(-1) / (6 * _C.sum()) + 0.3 * np.cos(p)
  return np.stack([cost, loss], -1), np.maximum(0.0, cost - _BOUND)


@functools.cache
def _compiled(algorithm, n):
  """The toy search's strategy, space and jitted ask/tell (compiled once for all seeds)."""
  strategy = Strategy(pop_size=n, num_tournaments=n, crossover="uniform")
  space = SearchSpace(w_choices=SPACE.w_choices, a_choices=SPACE.a_choices,
                      prob_p=jnp.float32(0.2), prob_gene=jnp.float32(0.1),
                      max_split=SPACE.max_split, num_layers=SPACE.num_layers, sample_size=2)
  alg = algorithms.get_algorithm(algorithm)
  return (alg, space, strategy, jax.jit(lambda k, s: alg.ask(k, s, space, strategy)),
          jax.jit(lambda s, c, r: alg.tell(s, c, r, strategy)))


def _ours(seed, algorithm, n, generations):
  """Every (objectives, violation) one of our algorithms evaluated on the toy problem."""
  alg, space, strategy, ask, tell = _compiled(algorithm, n)

  def evaluate(genomes):
    f, cv = _toy(np.asarray(genomes.p), np.asarray(genomes.w_bits))
    seen.append((f, cv))
    return {"privacy": jnp.asarray(-f[:, 0]), "energy_mj": jnp.asarray(f[:, 1]),
            "eps": jnp.zeros(len(f)), "violation": jnp.asarray(cv),
            "fitness": jnp.asarray(-f.sum(-1) - 10 * cv)}

  seen = []
  key_init, key = jax.random.split(jax.random.key(seed))
  state = alg.init(key_init, space, strategy)
  state = alg.tell_initial(state, evaluate(state.population))
  for t in range(generations):
    children, state = ask(jax.random.fold_in(key, t), state)
    state = tell(state, children, evaluate(children))
  check_legal_genome(jax.tree.map(lambda x: x[0], state.population), space)
  return np.concatenate([s[0] for s in seen]), np.concatenate([s[1] for s in seen])


class _ToyProblem(Problem):
  """The toy problem for pymoo: x = (p, indices of w in {2, 4, 6, 8})."""

  def __init__(self):
    super().__init__(n_var=22, n_obj=2, n_ieq_constr=1, xl=0, xu=1)

  def _evaluate(self, x, out, *args, **kwargs):
    x = np.round(x).astype(int)
    f, cv = _toy(x[:, 0], np.array([2, 4, 6, 8])[x[:, 1:]])
    out["F"], out["G"] = f, cv


class _Sample(Sampling):
  def _do(self, problem, n_samples, random_state=None, **kwargs):
    return np.column_stack([random_state.integers(1, 10, n_samples),
                            random_state.integers(0, 4, (n_samples, 21))]).astype(float)


class _Uniform(Crossover):
  def __init__(self):
    super().__init__(2, 1)

  def _do(self, problem, x, random_state=None, **kwargs):
    return np.where(random_state.random(x.shape[1:]) < 0.5, x[1], x[0])[None]


class _Resample(Mutation):
  def _do(self, problem, x, random_state=None, **kwargs):
    x = x.copy()
    p_on = random_state.random(len(x)) < 0.2
    x[p_on, 0] = random_state.integers(1, 10, p_on.sum())
    genes = random_state.random((len(x), 21)) < 0.1
    x[:, 1:][genes] = random_state.integers(0, 4, genes.sum())
    return x


def _hypervolume(f, cv):
  feasible = f[cv <= 0]
  return moocore.hypervolume(feasible, ref=np.array([2.0, 3.0])) if len(feasible) else 0.0


def _pymoo(seed, n, generations):
  seen = []

  class Recorded(_ToyProblem):
    def _evaluate(self, x, out, *args, **kwargs):
      super()._evaluate(x, out)
      seen.append((out["F"], out["G"]))

  minimize(Recorded(), NSGA2(pop_size=n, sampling=_Sample(), crossover=_Uniform(),
                             mutation=_Resample(), eliminate_duplicates=False),
           ("n_gen", generations + 1), seed=seed)
  return np.concatenate([s[0] for s in seen]), np.concatenate([s[1] for s in seen])


def test_nsga2_matches_pymoo_nsga2_on_a_toy_problem():
  """With the same variation (uniform crossover, resample mutation) and the same budget,
  our NSGA-II's feasible hypervolume matches pymoo's NSGA-II and beats random search.
  Catches a broken survival or mating selection, which leaves the front behind."""
  n, generations, seeds = 20, 25, 4
  ours = [_hypervolume(*_ours(s, "nsga2", n, generations)) for s in range(seeds)]
  rand = [_hypervolume(*_ours(s, "random", n, generations)) for s in range(seeds)]
  ref = [_hypervolume(*_pymoo(s, n, generations)) for s in range(seeds)]
  print(f"hypervolume: ours {np.mean(ours):.4f} ± {np.std(ours):.4f}, pymoo {np.mean(ref):.4f} "
        f"± {np.std(ref):.4f}, random {np.mean(rand):.4f} ± {np.std(rand):.4f}")
  assert abs(np.mean(ours) - np.mean(ref)) < 0.03 * np.mean(ref)
  assert np.mean(ours) > np.mean(rand) + 2 * np.std(rand)


def test_violation_degree_is_zero_exactly_for_feasible_metrics():
  """Constraint domination sees the same feasible set as the report (Eq. 4). Catches a
  bound compared with <= where the report uses <, or a failed candidate counted feasible."""
  config = FitnessConfig(eps_bound=0.03, device=DeviceConfig(budget_mj=0.35))
  rows = [dict(energy_mj=e, eps=x, fitness=f, diverged=d, failed=0.0, collapsed=c)
          for e in (0.2, 0.35, 0.5) for x in (0.0, 0.03, 0.06) for f in (0.4, np.nan)
          for d in (0.0, 1.0) for c in (0.0, 1.0)]
  got = violation_degree({k: np.array([r[k] for r in rows]) for k in rows[0]}, config)
  for row, v in zip(rows, got):
    assert (v == 0) == (not violations(row, config)), row
  # Relative excess: E 0.5 over 0.35 and ε 0.06 over 0.03 (each + 1e-6).
  want = (0.5 - 0.35) / 0.35 + (0.06 - 0.03) / 0.03 + 2e-6
  assert got[[i for i, r in enumerate(rows) if r == dict(
      energy_mj=0.5, eps=0.06, fitness=0.4, diverged=0.0, failed=0.0, collapsed=0.0)][0]] == \
      pytest.approx(want)


def test_search_runs_nsga2_on_the_evaluated_metrics(smoke, tmp_path):
  """The driver tells NSGA-II each member's own metrics: the stored state's objectives and
  violations are those of the cached evaluation of the same genome, and the report names
  the most private feasible genome evaluated. Catches metrics told in the wrong order or
  the wrong column, and a state that does not save and load."""
  config = copy.deepcopy(smoke)
  config.search.update(algorithm="nsga2", crossover="uniform", sample_size=2)
  report = driver.run_search(config, str(tmp_path))
  info = checkpoint.load_model(config.model_dir)[0].info
  like = nsga2.init(jax.random.key(0), settings.space_from_config(config, info),
                    settings.strategy_from_config(config))
  state, meta = storage.load_state(str(tmp_path), like)
  assert int(state.step) == config.search.iterations // config.search.num_tournaments
  fitness_config = settings.fitness_from_config(config)
  for i, key in enumerate(caching.effective_keys(info, state.population)):
    entry = meta["cache"][key]
    np.testing.assert_allclose(np.asarray(state.objectives[i]),
                               [-entry["privacy"], entry["energy_mj"], entry["eps"]], rtol=1e-6)
    assert float(state.violation[i]) == pytest.approx(float(violation_degree(
        {k: np.array([entry[k]]) for k in caching.METRICS}, fitness_config)[0]))
  feasible = [e["privacy"] for e in meta["cache"].values() if not violations(e, fitness_config)]
  assert report["feasible"] == bool(feasible)
  if feasible:
    assert report["privacy"] == max(feasible)
