"""The solver: its knapsack against brute force, its plans against the exact energy, its
estimates against direct computations, and the algorithm and init operator that use it."""

import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import jittered
from maxpart_jax import data, energy
from maxpart_jax.genome import Genome, effective_bits
from maxpart_jax.models import get_model
from maxpart_jax.quant import FLOAT_BITS
from maxpart_jax.search import algorithms, evolution, solver
from maxpart_jax.search.checks import SPACE, check_legal_genome
from maxpart_jax.search.operators import get_operator, initial_population
from maxpart_jax.train import cross_entropy


def _brute_force(cost, weights, capacity):
  best = None
  n, m = cost.shape
  for choice in itertools.product(range(m), repeat=n):
    idx = (np.arange(n), np.array(choice))
    if np.all(weights[:, idx[0], idx[1]].sum(axis=1) <= capacity) and np.isfinite(cost[idx]).all():
      total = cost[idx].sum()
      best = total if best is None or total < best else best
  return best


@pytest.mark.parametrize("seed", range(12))
def test_knapsack_is_brute_force_on_small_layer_sets(seed):
  rng = np.random.default_rng(seed)
  n, m, c = rng.integers(1, 6), rng.integers(2, 5), rng.integers(1, 3)
  cost = rng.uniform(0, 1, (n, m))
  cost[rng.uniform(size=(n, m)) < 0.15] = np.inf  # options an item may not take
  weights = rng.uniform(0, 1, (c, n, m))
  capacity = rng.uniform(0.2, 0.6, c) * n
  want = _brute_force(cost, weights, capacity)
  got = solver.multiple_choice_knapsack(cost, weights, capacity)
  if want is None:
    assert got is None
    return
  choice, total = got
  assert total == pytest.approx(want, abs=1e-9)
  assert np.all(weights[:, np.arange(n), choice].sum(axis=1) <= capacity + 1e-9)
  assert np.all(np.isfinite(cost[np.arange(n), choice]))


def test_knapsack_says_none_when_nothing_fits():
  cost = np.ones((3, 2))
  assert solver.multiple_choice_knapsack(cost, np.ones((1, 3, 2)), np.array([2.5])) is None
  assert solver.multiple_choice_knapsack(np.full((2, 2), np.inf), np.zeros((1, 2, 2)),
                                         np.array([1.0])) is None
  assert solver.multiple_choice_knapsack(np.zeros((0, 2)), np.zeros((1, 0, 2)),
                                         np.array([0.0]))[1] == 0.0


TINY = dict(name="resnet18", width=0.0625, stage_sizes=(1, 1, 1, 1))


def _fake_estimates(info, w_choices=(2, 4, 6, 8), a_choices=(8,), seed=0):
  """Estimates with random, bits-decreasing costs (the knapsack does not care where they
  came from)."""
  rng = np.random.default_rng(seed)
  sens = rng.uniform(0.01, 1.0, info.num_layers) * np.asarray(info.quantizable)
  loss = sens[:, None, None] * 2.0 ** -np.asarray(w_choices, float)[None, :, None] * np.ones(
      (1, 1, len(a_choices)))
  s, a = info.max_split, len(a_choices)
  z = lambda *shape: np.zeros(shape)
  return solver.Estimates(
      w_choices=w_choices, a_choices=a_choices, loss=loss, accuracy_drop=0.1 * loss,
      act_loss=z(info.num_layers, a), hessian_trace=z(info.num_layers),
      weight_error=z(info.num_layers, len(w_choices)), weight_count=np.ones(info.num_layers),
      ir_loss=z(s, a), ir_accuracy_drop=z(s, a),
      privacy=np.linspace(0.1, 0.9, s)[:, None] * np.ones((1, a)),
      privacy_float=np.linspace(0.1, 0.9, s),
      privacy_gain=0.3 * loss[..., None] * (np.arange(1, s + 1)[None, None, None, :]
                                            > np.asarray(info.layer_block)[:, None, None, None]),
      float_loss=1.0, float_accuracy=0.5, seconds={})


@pytest.mark.parametrize("budget,objectives", [
    (0.0022, {"least_loss", "most_private"}),  # the margin's answers are the others' here
    (0.0028, {"least_loss", "most_private", "most_private_0.5"}),
    (0.004, {"least_loss", "most_private", "most_private_0.5"})])
def test_plan_keeps_every_genome_below_the_budget_and_is_optimal_per_split(budget, objectives):
  """Every planned genome's exact energy (energy.population_energy, transmission included)
  is below E_b; for the shallow splits, whose edges are small enough to enumerate, the
  least-loss bits have the least predicted loss of every assignment that fits, and the
  most-private bits the most predicted privacy of those whose predicted ε stays below ε_b
  (below half of it for the margin's answer)."""
  info = get_model(**TINY).info
  device = energy.DeviceConfig(budget_mj=budget)
  costs = lambda g: (np.asarray(energy.population_energy(info, g, device).total_mj),
                     np.asarray(energy.population_latency(info, g, device).total_ms))
  estimates = _fake_estimates(info)
  plan = solver.plan(info, estimates, costs, device, eps_bound=0.03, margins=(0.5,))
  assert plan, "the budgets were chosen so that some split fits"
  for c in plan:
    g = Genome.from_json(c.genome)
    exact = float(energy.edge_energy(info, g, device).total_mj)
    assert exact < budget and exact == pytest.approx(c.energy_mj, rel=1e-6)
  w_choices = np.array(estimates.w_choices)
  eps_bound, slope = 0.03, estimates.accuracy_per_loss
  for c in [c for c in plan if c.p <= 3]:
    edge = [l.id for l in info.layers if l.quantizable and l.block < c.p]
    every = np.array(list(itertools.product(range(len(w_choices)), repeat=len(edge))))
    w = np.tile(np.asarray(Genome.from_json(c.genome).w_bits), (len(every), 1))
    w[:, edge] = w_choices[every]
    genomes = Genome(p=jnp.full(len(every), c.p, jnp.int32), w_bits=jnp.asarray(w, jnp.int32),
                     a_bits=jnp.tile(jnp.asarray(c.genome["a_bits"], jnp.int32), (len(every), 1)))
    fits = np.asarray(energy.population_energy(info, genomes, device).total_mj) < budget
    pred = solver.predict(info, estimates, genomes)
    if c.objective == "least_loss":
      got, want = c.predicted_loss, pred["loss"][fits].min()
    else:
      fraction = 0.5 if c.objective == "most_private_0.5" else 1.0
      got = c.predicted_privacy
      want = pred["privacy"][fits & (pred["loss"] <= fraction * eps_bound / slope)].max()
    assert got == pytest.approx(want, abs=1e-9), (c.p, c.objective)
  assert {c.objective for c in plan} == objectives
  assert all(c.predicted_eps <= 0.5 * eps_bound + 1e-12 for c in plan
             if c.objective == "most_private_0.5")
  assert len({json.dumps(c.genome) for c in plan}) == len(plan)  # each genome once
  # The plan's predictions are what predict() says of its genomes (the study's ranking).
  predicted = solver.predict(info, estimates, solver.stacked_genomes(plan))
  np.testing.assert_allclose(predicted["loss"], [c.predicted_loss for c in plan], atol=1e-12)
  np.testing.assert_allclose(predicted["privacy"], [c.predicted_privacy for c in plan])
  # Splits predicted feasible come first, most private first.
  flags = [c.predicted_feasible for c in plan]
  assert flags == sorted(flags, reverse=True)
  feasible = [c.predicted_privacy for c in plan if c.predicted_feasible]
  assert feasible == sorted(feasible, reverse=True)


def test_plan_respects_a_latency_bound():
  """A bound just under the slowest planned genome's latency: every genome planned under it
  is faster than the bound."""
  info = get_model(**TINY).info
  loose = energy.DeviceConfig(budget_mj=0.004)
  latency = lambda c, d: float(energy.edge_latency(info, Genome.from_json(c.genome), d).total_ms)
  unbounded = solver.plan(info, _fake_estimates(info), _exact(info, loose), loose, 0.03)
  bound = 0.999 * max(latency(c, loose) for c in unbounded)
  device = energy.DeviceConfig(budget_mj=0.004, latency_bound_ms=bound)
  plan = solver.plan(info, _fake_estimates(info), _exact(info, device), device, 0.03)
  assert plan
  for c in plan:
    assert latency(c, device) < bound


def _exact(info, device):
  return lambda g: (np.asarray(energy.population_energy(info, g, device).total_mj),
                    np.asarray(energy.population_latency(info, g, device).total_ms))


def test_hutchinson_traces_agree_with_the_exact_hessian():
  """Two kernels probed together: each estimate within 4 standard errors of its exact trace,
  the errors computed from the exact joint Hessian (Rademacher probes: the variance of
  ``v_lᵀ(Hv)_l`` is 4 Σ_{i<j in l} H_ij² + Σ_{i in l, j not in l} H_ij²)."""
  model = get_model(**TINY)
  variables = jittered(model, seed=2)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(24, 32, 32, 3)).astype(np.float32)
  labels = rng.integers(0, 100, 24).astype(np.int32)
  layers = sorted((l for l in model.info.layers if l.quantizable),
                  key=lambda l: np.prod(solver.kernel_of(variables, l.name).shape))[:2]
  names = [l.name for l in layers]
  probes = 96
  got = solver.hessian_traces(model, variables, names, x, labels, probes, seed=5)
  kernels = [solver.kernel_of(variables, n) for n in names]
  sizes = [k.size for k in kernels]

  def loss_of(flat):
    params = jax.tree.map(lambda v: v, variables["params"])
    start = 0
    for name, k in zip(names, kernels):
      node = params
      for part in name.split("/"):
        node = node[part]
      node["kernel"] = flat[start:start + k.size].reshape(k.shape)
      start += k.size
    return cross_entropy(model.apply({**variables, "params": params}, jnp.asarray(x)),
                         jnp.asarray(labels))

  flat = jnp.concatenate([k.ravel() for k in kernels])
  h = np.asarray(jax.hessian(loss_of)(flat), np.float64)
  bounds = np.cumsum([0] + sizes)
  for i in range(2):
    inside = slice(bounds[i], bounds[i + 1])
    block = h[inside, inside]
    within = np.sum(np.triu(block, 1) ** 2) * 4
    across = np.sum(h[inside] ** 2) - np.sum(block ** 2)
    stderr = np.sqrt((within + across) / probes)
    assert abs(got[i] - np.trace(block)) < 4 * stderr + 1e-6, (i, got[i], np.trace(block), stderr)


def test_the_solver_init_seeds_the_population_in_order_then_mutates():
  space = SPACE
  population = initial_population(jax.random.key(0), space, get_operator("init", "solver"), 6)
  for i in range(6):
    check_legal_genome(jax.tree.map(lambda x: x[i], population), space, f"member {i}")
  np.testing.assert_array_equal(population.p[:2], space.seeds.p)
  np.testing.assert_array_equal(population.w_bits[:2], space.seeds.w_bits)
  # Beyond the plan: mutated copies of its candidates, not all equal to them.
  assert any(not np.array_equal(population.w_bits[i], space.seeds.w_bits[i % 2])
             or int(population.p[i]) != int(space.seeds.p[i % 2]) for i in range(2, 6))
  with pytest.raises(ValueError, match="solver's plan"):
    get_operator("init", "solver")(jax.random.key(0), space.replace(seeds=None))


def test_the_solver_algorithm_tries_the_plan_in_order_and_stops_when_nothing_can_win():
  """A plan of 5 candidates with predicted privacy 0.9, 0.8, 0.7, 0.6, 0.5; K = 2. The first
  batch (0.9, 0.8) is infeasible; the next takes 0.7 and 0.6; 0.7 is feasible, measured 0.75:
  candidate 4 (0.5) cannot win, so the search is done after 4 candidates."""
  m, k = 5, 2
  seeds = Genome(p=jnp.arange(1, m + 1, dtype=jnp.int32),
                 w_bits=jnp.full((m, 21), 8, jnp.int32), a_bits=jnp.full((m, 21), 8, jnp.int32))
  space = SPACE.replace(seeds=seeds, seed_privacy=jnp.array([0.9, 0.8, 0.7, 0.6, 0.5]))
  strategy = evolution.Strategy(pop_size=2, num_tournaments=k)
  alg = algorithms.get_algorithm("solver")
  state = alg.init(jax.random.key(0), space, strategy)
  np.testing.assert_array_equal(state.population.p, [1, 2])
  results = lambda privacy, violation: {"fitness": jnp.array(privacy) * 0.5,
                                        "privacy": jnp.array(privacy),
                                        "violation": jnp.array(violation)}
  state = alg.tell_initial(state, results([0.92, 0.85], [0.5, 0.1]))
  assert not bool(alg.done(state, space)) and float(state.best_feasible) == -np.inf
  children, state = alg.ask(jax.random.key(1), state, space, strategy)
  np.testing.assert_array_equal(children.p, [3, 4])
  state = alg.tell(state, children, results([0.75, 0.62], [0.0, 0.2]), strategy)
  assert float(state.best_feasible) == pytest.approx(0.75)
  assert bool(alg.done(state, space))  # 0.5 < 0.75: nothing left can win
  # With a weaker best, the last candidate is asked for, once (the second slot repeats it).
  weaker = state.replace(best_feasible=jnp.float32(0.3))
  children, _ = alg.ask(jax.random.key(2), weaker, space, strategy)
  np.testing.assert_array_equal(children.p, [5, 5])


@pytest.fixture(scope="module")
def solver_search(smoke, tmp_path_factory):
  from maxpart_jax.search import driver
  config = smoke.copy_and_resolve_references()
  config.search.algorithm = "solver"
  config.search.solver.hessian_probes = 2  # the smoke model: the traces' precision is tested apart
  workdir = tmp_path_factory.mktemp("solver_search")
  return config, driver.run_search(config, str(workdir)), workdir


def test_a_solver_search_evaluates_its_plan_in_order(solver_search):
  """On the smoke model: the plan is written, the evaluated genomes are its first
  candidates (in K-sized batches, skipping none before the first feasible one), each below
  E_b; the estimates were measured now (read back from beside the model: the next test)."""
  config, report, workdir = solver_search
  with open(workdir / solver.PLAN_FILE) as f:
    plan = json.load(f)
  assert report["solver"]["candidates"] == len(plan["plan"]) >= 1
  assert report["solver"]["estimates_measured_now"]
  with open(workdir / "evaluations.json") as f:
    evaluations = json.load(f)
  planned = [c["genome"] for c in plan["plan"]]
  k = config.search.num_tournaments
  assert len(evaluations) <= len(planned)
  for e in evaluations:
    g = Genome.from_json(e["genome"])
    match = [j for j, c in enumerate(planned)
             if int(c["p"]) == int(g.p) and np.array_equal(
                 np.asarray(effective_bits(_info(config), Genome.from_json(c))[0]),
                 np.asarray(effective_bits(_info(config), g)[0]))]
    assert match, e["genome"]
    assert e["energy_mj"] < config.fitness.budget_mj
  assert len(evaluations) >= min(k, len(planned))


def _info(config):
  return get_model(**{k: tuple(v) if isinstance(v, list) else v
                      for k, v in config.pretrain.model.to_dict().items()}).info


def test_float_bits_are_not_a_choice_the_plan_can_make():
  info = get_model(**TINY).info
  device = energy.DeviceConfig(budget_mj=0.004)
  for c in solver.plan(info, _fake_estimates(info), _exact(info, device), device, 0.03):
    w, a, _ = effective_bits(info, Genome.from_json(c.genome))
    on_edge = np.asarray(info.quantizable) & (np.asarray(info.layer_block) < c.p)
    assert set(np.asarray(w)[on_edge].tolist()) <= {2, 4, 6, 8}
    assert FLOAT_BITS not in np.asarray(a)[on_edge]


def test_the_estimates_match_a_direct_computation(solver_search):
  """The smoke search's estimates (cached beside its model) against model.apply on the same
  images: single-layer and IR loss increases, a layer's privacy gain at a split (the IR's
  privacy with that layer alone quantized, less the float IR's; nothing at splits whose
  edge does not hold the layer), and the weights' quantization error with numpy."""
  from maxpart_jax import privacy
  from maxpart_jax.quant import QuantPolicy
  from maxpart_jax.search import build
  config, _, _ = solver_search
  evaluator = build.build_evaluator(config)
  est, measured_now = solver.estimates_from_config(config, evaluator)
  assert not measured_now
  model, variables, split = get_model(**TINY), evaluator.variables, evaluator.val
  x = jnp.asarray(data.normalize(split.images, split.dataset))
  labels = jnp.asarray(split.labels)
  loss = lambda policy: float(cross_entropy(model.apply(variables, x, policy=policy), labels))
  base = loss(None)
  assert est.float_loss == pytest.approx(base, rel=1e-5)
  for layer, (i, w) in itertools.product((1, 5), ((0, 2), (3, 8))):
    policy = solver.single_layer_policy(model.info.num_layers, layer, w, 8)
    assert est.loss[layer, i, 0] == pytest.approx(loss(policy) - base, abs=1e-5)
  assert est.ir_loss[2, 0] == pytest.approx(
      loss(QuantPolicy.ir_only(model.info.num_layers, 3, 8)) - base, abs=1e-5)
  assert np.all(est.loss[~np.asarray(model.info.quantizable)] == 0)

  images = evaluator.privacy_images
  xp = jnp.asarray(data.normalize(images, split.dataset))
  score = lambda q, policy: float(jnp.mean(privacy.privacy_score(
      jnp.asarray(images), model.apply(variables, xp, stop=q, policy=policy), "mse",
      normalization="zscore")))
  q = model.info.max_split
  layer5 = solver.single_layer_policy(model.info.num_layers, 5, 2, 8)
  assert est.privacy_gain[5, 0, 0, q - 1] == pytest.approx(score(q, layer5) - score(q, None),
                                                           abs=1e-4)
  assert est.privacy_float[q - 1] == pytest.approx(score(q, None), abs=1e-5)
  assert np.all(est.privacy_gain[5, :, :, :model.info.layers[5].block] == 0)

  kernel = np.asarray(solver.kernel_of(variables, model.info.layers[1].name), np.float64)
  for i, b in enumerate(est.w_choices):
    step = np.abs(kernel).max() / (2 ** (b - 1) - 1)
    assert est.weight_error[1, i] == pytest.approx(
        np.sum((np.round(kernel / step) * step - kernel) ** 2), rel=1e-4)


def test_the_solvers_settings_count_in_a_search_identity_only_where_it_runs():
  """Searches that do not use the solver (every search stored before it existed) keep their
  identity; one that does is refused a resume with another estimator."""
  from experiments.configs import search as search_configs
  from maxpart_jax.search import storage
  config = search_configs.get_config("quick")
  assert not any(k.startswith("search.solver.") for k in storage.settings_identity(config))
  solver_config = search_configs.get_config("quick_solver")
  identity = storage.settings_identity(solver_config)
  assert identity["search.solver.estimator"] == solver_config.search.solver.estimator
  solver_config.search.init, solver_config.search.algorithm = "solver", "ga"
  assert "search.solver.hessian_probes" in storage.settings_identity(solver_config)


def test_solver_settings_are_checked_before_any_work():
  from experiments.configs import search as search_configs
  from maxpart_jax.search import settings
  for field, value, words in (("estimator", "fisher", "estimator must be one of"),
                              ("hessian_probes", 0, "hessian_probes must be >= 1"),
                              ("margins", (0.5, 1.0), "strictly between 0 and 1")):
    config = search_configs.get_config("quick_solver")
    config.search.solver[field] = value
    with pytest.raises(ValueError, match=words):
      settings.validate_config(config)
  config = search_configs.get_config("quick_solver")
  config.fitness.metric = "attack_ssim"
  with pytest.raises(ValueError, match="measured by attacks only"):
    settings.validate_config(config)


def test_a_solver_study_merges_earlier_studies_with_the_runs_it_finds(tmp_path):
  """Runs whose folders are gone stay in the comparison through the study that read them:
  every run joins, marked with its source; stored genomes merge by key (a search's own entry
  wins); a study that stored none keeps its ranking figures, not its per-genome arrays."""
  from experiments.configs import search as search_configs
  from maxpart_jax.search import settings
  from maxpart_jax.studies import solver_study
  fitness = settings.fitness_from_config(search_configs.get_config("quick"))

  def entry(key, privacy, eps):
    return {"key": key, "privacy": privacy, "fitness": privacy, "eps": eps, "energy_mj": 0.01,
            "latency_ms": 1.0, "accuracy": 0.5, "diverged": 0.0, "failed": 0.0,
            "collapsed": 0.0, "genome": {"p": 1, "w_bits": [8], "a_bits": [8]},
            "violations": [] if eps < fitness.eps_bound else ["ε"]}

  old = {"summary": {}, "runs": {
      "ga": [{"best_feasible_privacy": [0.9], "final_only": True, "evaluations": 57,
              "seconds": 10.0}],
      "solver[hessian; no margin]": [{"best_feasible_privacy": [0.0, 1.1], "evaluations": 2,
                                      "seconds": 3.0}]},
         "ranking": {"genomes": 330, "feasible": 200, "measured_eps": [0.01, 0.2],
                     "loss": {"spearman_eps": 0.85, "predicted_eps": [0.02, 0.1]},
                     "hessian": {"spearman_eps": 0.74, "predicted_eps": [0.01, 0.3]}}}
  new = {"summary": {}, "ranking": {}, "evaluated": [entry("a", 0.6, 0.0), entry("b", 0.7, 0.0)],
         "runs": {"random": [{"best_feasible_privacy": [0.6, 0.7], "evaluations": 2,
                              "seconds": 5.0, "from": "workdirs/x/random_seed0"}]}}
  paths = [str(tmp_path / "old.json"), str(tmp_path / "new.json")]
  for path, study in zip(paths, (old, new)):
    with open(path, "w") as f:
      json.dump(study, f)
  folder = tmp_path / "runs" / "ga_seed2"
  folder.mkdir(parents=True)
  # "b" again, measured infeasible this time, then "c"
  with open(folder / "evaluations.json", "w") as f:
    json.dump([entry("b", 0.95, 0.5), entry("c", 0.8, 0.01)], f)
  with open(folder / "best.json", "w") as f:
    json.dump({"search_seconds": 7.0, "p": 3, "privacy": 0.8, "feasible": True,
               "test_accuracy": 0.5, "float_test_accuracy": 0.51}, f)

  runs, evaluated, rankings = solver_study.collect(paths, [str(tmp_path / "runs")])
  assert sorted(runs) == ["ga", "random", "solver[hessian; no margin]"]
  assert [r["from"] for r in runs["ga"]] == [paths[0], str(folder)]
  assert runs["ga"][1]["best_feasible_privacy"] == [0.0, 0.8]  # b infeasible, then c
  assert runs["ga"][1]["evaluations"] == 2 and runs["ga"][1]["seconds"] == 7.0
  assert runs["solver[hessian; no margin]"][0]["best_feasible_privacy"] == [0.0, 1.1]
  assert runs["random"][0]["from"] == "workdirs/x/random_seed0"  # the first source is kept
  assert sorted(evaluated) == ["a", "b", "c"] and evaluated["b"]["privacy"] == 0.95
  assert rankings == {paths[0]: {"genomes": 330, "feasible": 200, "loss": {"spearman_eps": 0.85},
                                 "hessian": {"spearman_eps": 0.74}}}
