"""The solver: its knapsack against brute force, its plans against the exact energy, its
estimates against direct computations, and the algorithm and init operator that use it."""

import itertools
import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import jittered
from maxpart_jax import data, energy
from maxpart_jax.genome import Genome, effective_bits
from maxpart_jax.models import get_model
from maxpart_jax.quant import FLOAT_BITS
from maxpart_jax.jobs import planning
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


@pytest.mark.parametrize("seed", (3, 10, 12))
def test_knapsack_is_brute_force_on_near_ties(seed):
  """Costs 1 + U(0, 1e-3): the best choices differ by less than HiGHS's default relative
  gap (1e-4 of the total, 7e-4 here), at which it stops with a worse choice on these
  instances (found by trying seeds): the knapsack runs at gap 0."""
  rng = np.random.default_rng(seed)
  n, m = 7, 4
  cost = 1 + rng.uniform(0, 1e-3, (n, m))
  weights = rng.uniform(0, 1, (1, n, m))
  capacity = np.array([0.4 * n])
  _, total = solver.multiple_choice_knapsack(cost, weights, capacity)
  assert total == pytest.approx(_brute_force(cost, weights, capacity), abs=1e-9)


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
  eps_bound = 0.03
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
      want = pred["privacy"][fits & (pred["eps"] < fraction * eps_bound)].max()
    assert got == pytest.approx(want, abs=1e-9), (c.p, c.objective)
  assert {c.objective for c in plan} == objectives
  assert all(c.predicted_eps < 0.5 * eps_bound for c in plan
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


def _dyadic_estimates(info, w_choices=(2, 4, 8), a_choices=(4, 8), seed=0):
  """Estimates whose every number is a multiple of 2^-13 (and the accuracy slope exactly
  0.125), so that any sum of them, in any order, is exact: predictions can land exactly on
  ε_b. The Hessian estimator's parts (traces, weight errors, input costs) and the IR's
  loss are all non-zero."""
  rng = np.random.default_rng(seed)
  n, s, a = info.num_layers, info.max_split, len(a_choices)
  quantizable = np.asarray(info.quantizable)
  trace = rng.integers(1, 9, n) * quantizable  # ½ Tr / n_l = Tr / 16
  weight_error = (rng.integers(1, 5, (n, len(w_choices)))
                  * 4.0 ** -np.arange(len(w_choices))[None, :] * 32 / 64)  # fewer bits: more
  act_loss = np.where(np.asarray(a_choices)[None, :] < 8, rng.integers(1, 17, (n, a)),
                      rng.integers(0, 2, (n, a))) / 1024 * quantizable[:, None]
  ir_loss = np.where(np.asarray(a_choices)[None, :] < 8, rng.integers(40, 80, (s, a)), 2) / 1024
  loss = rng.integers(1, 64, (n, len(w_choices), a)) / 1024 * quantizable[:, None, None]
  on_edge = np.arange(1, s + 1)[None, :] > np.asarray(info.layer_block)[:, None]  # (n, s)
  bits_gain = (len(w_choices) - np.arange(len(w_choices)))[None, :, None] / 64  # fewest: most
  gain = (bits_gain * rng.integers(1, 5, (n, 1, a)) / 4 * quantizable[:, None, None])[
      ..., None] * on_edge[:, None, None, :]
  return solver.Estimates(
      w_choices=w_choices, a_choices=a_choices, loss=loss, accuracy_drop=0.125 * loss,
      act_loss=act_loss, hessian_trace=trace.astype(float),
      weight_error=weight_error, weight_count=np.full(n, 8.0), ir_loss=ir_loss,
      ir_accuracy_drop=0.125 * ir_loss,
      privacy=np.arange(1, s + 1)[:, None] / 8 + np.asarray(a_choices)[None, :] / 256,
      privacy_float=np.arange(1, s + 1) / 8 + 1 / 16, privacy_gain=gain, float_loss=1.0,
      float_accuracy=0.5, seconds={})


def _every_assignment(info, estimates, p):
  """Every genome of split ``p`` (each edge layer at every (w, a)), with its loss and privacy
  computed by hand from the estimates' parts: ``½ Tr(H_l) / n_l · ‖Q_w(W_l) − W_l‖²`` plus
  the layer's input cost, plus the IR's loss at its width; the IR's privacy plus the
  layers' gains."""
  edge = [l.id for l in info.layers if l.quantizable and l.block < p]
  options = list(itertools.product(range(len(estimates.w_choices)),
                                   range(len(estimates.a_choices))))
  every = np.array(list(itertools.product(range(len(options)), repeat=len(edge))), np.int64)
  wi = np.array([i for i, _ in options])[every]
  ai = np.array([j for _, j in options])[every]
  est = estimates
  loss = sum(0.5 * est.hessian_trace[l] / est.weight_count[l] * est.weight_error[l, wi[:, k]]
             + est.act_loss[l, ai[:, k]] for k, l in enumerate(edge)) + np.zeros(len(every))
  privacy = sum(est.privacy_gain[l, wi[:, k], ai[:, k], p - 1] for k, l in enumerate(edge)) + (
      np.zeros(len(every)))
  last = int(info.block_last_layer[p - 1])
  if last in edge:  # the IR is quantized at the last edge layer's input width
    ir = ai[:, edge.index(last)]
    loss, privacy = loss + est.ir_loss[p - 1, ir], privacy + est.privacy[p - 1, ir]
    ir_bits = np.asarray(est.a_choices)[ir]
  else:
    privacy, ir_bits = privacy + est.privacy_float[p - 1], np.full(len(every), FLOAT_BITS)
  w = np.full((len(every), info.num_layers), max(est.w_choices), np.int32)
  a = np.full((len(every), info.num_layers), max(est.a_choices), np.int32)
  w[:, edge] = np.asarray(est.w_choices)[wi]
  a[:, edge] = np.asarray(est.a_choices)[ai]
  genomes = Genome(p=jnp.full(len(every), p, jnp.int32), w_bits=jnp.asarray(w),
                   a_bits=jnp.asarray(a))
  return genomes, loss, privacy, ir_bits


def test_plan_with_the_hessian_estimator_is_the_brute_force_answer_by_hand():
  """The default (Hessian) estimator with every part non-zero, the IR's loss included, for
  splits 2 and 3 (every assignment enumerated, 7 776 at split 3): each planned genome's
  predicted loss and privacy are the hand-computed ones; per split and IR width the plan holds the
  least predicted loss among the genomes under E_b and the most predicted privacy among
  those whose predicted ε is strictly below ε_b (and 0.5 ε_b), as the search's feasibility
  is strict. ε_b is set exactly on the predicted ε of the most private genome under E_b at
  split 3, so a knapsack that allowed ε = ε_b would plan that one."""
  info = get_model(**TINY).info
  est = _dyadic_estimates(info)
  assert est.accuracy_per_loss == 0.125
  energy_of = lambda g: np.asarray(
      energy.population_energy(info, g, energy.DeviceConfig()).total_mj)
  every = {p: _every_assignment(info, est, p) for p in (2, 3)}
  at_3 = np.unique(energy_of(every[3][0]))
  budget = float(at_3[len(at_3) // 2] + at_3[len(at_3) // 2 + 1]) / 2  # the budget binds
  device = energy.DeviceConfig(budget_mj=budget)
  fits = {p: energy_of(g) < budget for p, (g, _, _, _) in every.items()}
  _, loss3, privacy3, _ = every[3]
  most = fits[3] & (privacy3 == privacy3[fits[3]].max())
  eps_bound = 0.125 * loss3[most].min()  # exactly on the most private genome's prediction
  plan = solver.plan(info, est, _exact(info, device), device, eps_bound, "hessian",
                     margins=(0.5,))
  assert plan
  for c in plan:
    assert c.energy_mj < budget
    if c.p not in every:
      continue
    genomes, loss, privacy, ir_bits = every[c.p]
    g = Genome.from_json(c.genome)
    k, = np.flatnonzero(np.all(np.asarray(genomes.w_bits) == np.asarray(g.w_bits), axis=1)
                        & np.all(np.asarray(genomes.a_bits) == np.asarray(g.a_bits), axis=1))
    assert (c.predicted_loss, c.predicted_privacy, c.ir_bits) == (loss[k], privacy[k], ir_bits[k])
    assert c.predicted_eps == 0.125 * loss[k] and fits[c.p][k]
    assert c.predicted_feasible == (0.125 * loss[k] < eps_bound)
    ok = fits[c.p] & (ir_bits == c.ir_bits)
    if c.objective == "least_loss":
      assert c.predicted_loss == loss[ok].min(), (c.p, c.ir_bits)
    else:
      fraction = 0.5 if c.objective == "most_private_0.5" else 1.0
      allowed = ok & (0.125 * loss < fraction * eps_bound)
      assert c.predicted_eps < fraction * eps_bound, (c.p, c.objective)
      assert c.predicted_privacy == privacy[allowed].max(), (c.p, c.ir_bits, c.objective)
  # Every answer is there (an answer equal to an earlier one is planned once, under its name).
  for p, (_, loss, privacy, ir_bits) in every.items():
    for width in np.unique(ir_bits[fits[p]]):
      here = [c for c in plan if c.p == p and c.ir_bits == width]
      ok = fits[p] & (ir_bits == width)
      assert min(c.predicted_loss for c in here) == loss[ok].min(), (p, width)
      for fraction in (1.0, 0.5):
        allowed = ok & (0.125 * loss < fraction * eps_bound)
        if allowed.any():
          assert max(c.predicted_privacy for c in here
                     if c.predicted_eps < fraction * eps_bound) == privacy[allowed].max()
  assert privacy3[most].max() > max(c.predicted_privacy for c in plan if c.p == 3)


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


def test_hutchinson_traces_are_unbiased_probes_of_the_exact_hessian():
  """Two kernels probed together, against their exact joint Hessian H (jax.hessian).

  * The estimate is the mean over its probes v (solver.rademacher_probe) of ``v_lᵀ (H v)_l``
    computed with H, to 1e-5 of the terms' size: a 10 % error in it fails.
  * Those probes have mean ``Tr(H_l)``: over 20 000 of them (numpy, with H), within 4
    standard errors of it, the standard error from H (Rademacher probes: the variance of
    ``v_lᵀ(Hv)_l`` is ``2 (‖H_ll‖_F² − Σ_i H_ii²)`` plus
    ``Σ_{i in l, j not in l} H_ij²``), and those 4 standard errors are under 5 % of the
    trace: probes 10 % off fail.
  """
  model = get_model(**TINY)
  variables = jittered(model, seed=2)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(8, 32, 32, 3)).astype(np.float32)
  labels = rng.integers(0, 100, 8).astype(np.int32)
  names = ["blocks_1/conv2", "blocks_3/proj"]  # small, and their probes vary little
  got = solver.hessian_traces(model, variables, names, x, labels, probes=8, seed=5)
  kernels = [solver.kernel_of(variables, n) for n in names]

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

  h = np.asarray(jax.jit(jax.hessian(loss_of))(jnp.concatenate([k.ravel() for k in kernels])),
                 np.float64)
  bounds = np.cumsum([0] + [k.size for k in kernels])
  layer = [slice(bounds[i], bounds[i + 1]) for i in range(2)]

  many = 20000
  vs = jax.jit(jax.vmap(lambda i: solver.rademacher_probe(5, i, kernels)))(jnp.arange(many))
  v = np.concatenate([np.asarray(a, np.float64).reshape(many, -1) for a in vs], axis=1)
  assert set(np.unique(v)) == {-1.0, 1.0}
  hv = v @ h
  forms = np.stack([np.sum(v[:, s] * hv[:, s], axis=1) for s in layer], axis=1)  # (many, 2)
  same = forms[:8]  # the estimate's probes
  np.testing.assert_allclose(got, same.mean(axis=0), rtol=0,
                             atol=1e-5 * np.sqrt(np.mean(same ** 2)))
  for i, s in enumerate(layer):
    block = h[s, s]
    variance = 2 * (np.sum(block ** 2) - np.sum(np.diag(block) ** 2)) + (
        np.sum(h[s] ** 2) - np.sum(block ** 2))
    stderr, trace = np.sqrt(variance / many), np.trace(block)
    assert 4 * stderr < 0.05 * trace, (i, stderr, trace)  # the check's power
    assert abs(forms[:, i].mean() - trace) < 4 * stderr, (i, forms[:, i].mean(), trace, stderr)


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
  candidate 4 (0.5, plus the largest under-prediction so far, 0.05) cannot win, so the
  search is done after 4 candidates."""
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


def test_the_solver_stops_on_its_calibrated_bound_and_resumes_from_its_stored_state(tmp_path):
  """By hand, K = 1, a plan predicted 0.9, 0.86, 0.85, 0.84, 0.75, 0.6. The bound is each
  prediction plus the largest under-prediction (measured − predicted) so far, at least 0,
  over the candidates that did not fail:

  * candidate 0 fails (privacy 3.0 of a collapsed edge): it calibrates nothing;
  * 1 measures 0.81, feasible: over-predicted, so the bound stays the prediction (not below
    it): 2 and 3 can still win, 4 (0.75) cannot;
  * 2 measures 0.95, infeasible: under-predicted by 0.10, so 4 (0.75 + 0.10 > 0.81) can win;
  * 3 measures 0.84, feasible: 4 (0.85 > 0.84) still can; 4 measures 0.86: under by 0.11,
    5 (0.6 + 0.11) cannot: done after 5 fine-tunings (a bound without calibration stops
    after 4).

  The same search saved and loaded after step 2 (storage, as the driver checkpoints) asks
  for the same candidates and ends in the same state."""
  from maxpart_jax.jobs import storage
  from maxpart_jax.search.fitness import FAILED_VIOLATION
  predicted = np.array([0.9, 0.86, 0.85, 0.84, 0.75, 0.6], np.float32)
  m = len(predicted)
  seeds = Genome(p=jnp.arange(1, m + 1, dtype=jnp.int32),
                 w_bits=jnp.full((m, 21), 8, jnp.int32), a_bits=jnp.full((m, 21), 8, jnp.int32))
  space = SPACE.replace(seeds=seeds, seed_privacy=jnp.asarray(predicted))
  strategy = evolution.Strategy(pop_size=2, num_tournaments=1)
  alg = algorithms.get_algorithm("solver")
  measured = {0: (3.0, FAILED_VIOLATION), 1: (0.81, 0.0), 2: (0.95, 0.2), 3: (0.84, 0.0),
              4: (0.86, 0.0), 5: (0.7, 0.0)}
  told = lambda i: {"fitness": jnp.array([measured[i][0] / 2]),
                    "privacy": jnp.array([measured[i][0]]),
                    "violation": jnp.array([measured[i][1]])}
  calibration = {0: 0.0, 1: 0.0, 2: 0.95 - 0.85, 3: 0.95 - 0.85, 4: 0.86 - 0.75}

  def run(state, asked, stop_after=None):
    while not bool(alg.done(state, space)) and len(asked) != stop_after:
      children, state = alg.ask(jax.random.key(0), state, space, strategy)
      asked.append(int(children.p[0]) - 1)
      state = alg.tell(state, children, told(asked[-1]), strategy)
      np.testing.assert_allclose(algorithms.solver_bound(state, space),
                                 predicted + calibration[asked[-1]], atol=1e-6)
    return state, asked

  state = alg.tell_initial(alg.init(jax.random.key(0), space, strategy), told(0))
  np.testing.assert_array_equal(algorithms.solver_bound(state, space), predicted)
  straight, asked = run(state, [0])
  assert asked == [0, 1, 2, 3, 4]
  assert float(straight.best_feasible) == pytest.approx(0.86)

  part, asked = run(state, [0], stop_after=3)
  storage.save_state(str(tmp_path), part, {})
  loaded, _ = storage.load_state(str(tmp_path), alg.init(jax.random.key(0), space, strategy))
  resumed, asked = run(loaded, asked)
  assert asked == [0, 1, 2, 3, 4]
  for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(straight)):
    np.testing.assert_array_equal(a, b)


class _Lines(logging.Handler):
  """The messages logged while it is attached."""

  def __init__(self):
    super().__init__(logging.INFO)
    self.lines = []

  def emit(self, record):
    self.lines.append(record.getMessage())


@pytest.fixture(scope="module")
def solver_search(smoke, tmp_path_factory):
  """The smoke search by the solver: (config, report, workdir, the lines it logged)."""
  from maxpart_jax.jobs import driver
  config = smoke.copy_and_resolve_references()
  config.search.algorithm = "solver"
  config.search.solver.hessian_probes = 2  # the smoke model: the traces' precision is tested apart
  config.val_images = 16  # of the 32 held out: the estimates take the other 16
  workdir = tmp_path_factory.mktemp("solver_search")
  root, handler = logging.getLogger(), _Lines()
  level = root.level
  root.addHandler(handler)
  root.setLevel(logging.INFO)
  try:
    report = driver.run_search(config, str(workdir))
  finally:
    root.removeHandler(handler)
    root.setLevel(level)
  return config, report, workdir, handler.lines


def test_a_solver_search_evaluates_its_plan_in_order(solver_search):
  """On the smoke model: the plan is written, the evaluated genomes are its first
  candidates (in K-sized batches, skipping none before the first feasible one), each below
  E_b; the estimates were measured now (read back from beside the model: the next test),
  with a progress line and its ETA after every group of policies, every probe and every
  privacy call."""
  config, report, workdir, lines = solver_search
  with open(workdir / planning.PLAN_FILE) as f:
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
  progress = lambda part: [l for l in lines if l.startswith(f"solver estimates, {part}")]
  info = _info(config)
  edge = sum(l.quantizable and l.block < info.max_split for l in info.layers)
  w, a = len(config.search.w_bits), len(config.search.a_bits)
  policies = 1 + edge * (w + 1) * a + info.max_split * a
  for part, total in (("losses: policy group", -(-policies // 8)),
                      ("Hessian traces: probe", config.search.solver.hessian_probes),
                      ("privacy: profile or policy group", a + 1 + -(-edge * w * a // 8))):
    assert [l.split("  ")[0] for l in progress(part)] == [
        f"solver estimates, {part} {i}/{total}" for i in range(1, total + 1)], part
    assert all(" ETA " in l for l in progress(part))
  assert any(l.startswith("solver estimates measured in") for l in lines)


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
  from maxpart_jax.jobs import build
  config, _, _, _ = solver_search
  evaluator = build.build_evaluator(config)
  est, measured_now = planning.estimates_from_config(config, evaluator)
  assert not measured_now
  model, variables = get_model(**TINY), evaluator.variables
  # As many hold-out images as ε is judged on, none of them one of those.
  split = planning.estimates_images(config, evaluator)
  holdout = data.load_split("val", dataset=config.pretrain.dataset, data_dir=config.data_dir,
                            val_fraction=config.pretrain.val_fraction,
                            seed=config.pretrain.data_seed)
  bytes_of = lambda images: {np.ascontiguousarray(i).tobytes() for i in images}
  assert len(split) == len(evaluator.val) == config.val_images
  assert len(bytes_of(split.images) & bytes_of(evaluator.val.images)) == 0
  assert len(bytes_of(split.images) - bytes_of(holdout.images)) == 0
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


def test_estimates_images_are_apart_from_the_eps_images_by_content():
  """A hold-out of 10 images, two of them equal: excluding the ε images leaves the 6 whose
  content none of those has (a copy of an ε image is left out too), drawn by the seed; more
  than remain is a clear error."""
  images = np.arange(10, dtype=np.uint8)[:, None, None, None] * np.ones((1, 32, 32, 3), np.uint8)
  images[9] = images[2]
  holdout = data.Split(images=images, labels=np.arange(10, dtype=np.int32), num_classes=100,
                       dataset="cifar100")
  eps_images = images[[2, 5, 7]]
  rest = solver.estimate_split(holdout, eps_images, 6, seed=0)
  assert sorted(rest.labels.tolist()) == [0, 1, 3, 4, 6, 8]
  assert np.array_equal(rest.images[:, 0, 0, 0], rest.labels)  # labels stay with their images
  assert len(solver.estimate_split(holdout, eps_images, 4, seed=1)) == 4
  with pytest.raises(ValueError, match="only 6 of the 10 held out are apart from them"):
    solver.estimate_split(holdout, eps_images, 7, seed=0)


def test_estimates_of_other_settings_are_not_reused_and_the_log_says_why(tmp_path, caplog):
  """Estimates stored under the key of version 2 (measured on the ε images) beside the model:
  a version-3 search measures its own, and the log names what differs; the next call reads
  them back."""
  info = get_model(**TINY).info
  split = data.Split(images=np.zeros((2, 32, 32, 3), np.uint8), labels=np.zeros(2, np.int32),
                     num_classes=100, dataset="cifar100")
  privacy_images, meta = np.zeros((1, 32, 32, 3), np.float32), {"variables_sha256": "abc"}
  old = {"estimator": "hessian", "version": 2}
  stored = _fake_estimates(info, seed=1)
  old_key = solver.estimates_key(meta, split, privacy_images, old)
  old_path = tmp_path / "estimates" / f"{old_key}.json"
  old_path.parent.mkdir()
  old_path.write_text(json.dumps({"settings": old, "estimates": stored.to_json()}))
  calls = []
  measure = lambda: calls.append(1) or _fake_estimates(info, seed=2)
  new = {**old, "version": 3}
  with caplog.at_level("INFO"):
    got, measured_now = solver.cached_estimates(str(tmp_path), meta, measure, split,
                                                privacy_images, new)
  assert measured_now and calls == [1]
  np.testing.assert_array_equal(got.loss, _fake_estimates(info, seed=2).loss)
  assert f"{old_path.name}: version 2 (now 3)" in caplog.text
  again, measured_now = solver.cached_estimates(str(tmp_path), meta, measure, split,
                                                privacy_images, new)
  assert not measured_now and calls == [1]
  np.testing.assert_array_equal(again.loss, got.loss)


def test_the_solvers_settings_count_in_a_search_identity_only_where_it_runs():
  """Searches that do not use the solver (every search stored before it existed) keep their
  identity; one that does is refused a resume with another estimator."""
  from experiments.configs import search as search_configs
  from maxpart_jax.jobs import storage
  config = search_configs.get_config("quick")
  assert not any(k.startswith("search.solver.") for k in storage.settings_identity(config))
  solver_config = search_configs.get_config("quick_solver")
  identity = storage.settings_identity(solver_config)
  assert identity["search.solver.estimator"] == solver_config.search.solver.estimator
  solver_config.search.init, solver_config.search.algorithm = "solver", "ga"
  assert "search.solver.hessian_probes" in storage.settings_identity(solver_config)


def test_solver_settings_are_checked_before_any_work():
  from experiments.configs import search as search_configs
  from maxpart_jax.jobs import settings
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
  config = search_configs.get_config("quick_solver")
  config.val_images = 0  # ε on the whole hold-out: no image left for the estimates
  with pytest.raises(ValueError, match="val_images=0 judges ε on the whole hold-out"):
    settings.validate_config(config)
  # Before the model loads: the estimates need as many hold-out images again.
  holdout = data.Split(images=np.zeros((1999, 32, 32, 3), np.uint8),
                       labels=np.zeros(1999, np.int32), num_classes=100, dataset="cifar100")
  config = search_configs.get_config("quick_solver")
  with pytest.raises(ValueError, match="lower val_images to at most 999"):
    settings.check_data_sizes(config, holdout, holdout)
  config.search.algorithm = "ga"  # no solver: ε may take the whole hold-out
  settings.check_data_sizes(config, holdout, holdout)


def test_a_solver_study_merges_earlier_studies_with_the_runs_it_finds(tmp_path):
  """Runs whose folders are gone stay in the comparison through the study that read them:
  every run joins, marked with its source; stored genomes merge by key (a search's own entry
  wins); a study that stored none keeps its ranking figures, not its per-genome arrays."""
  from experiments.configs import search as search_configs
  from maxpart_jax.jobs import settings
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
                                      "seconds": 3.0, "solver": {"candidates": 22}}]},
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

  solver_folder = tmp_path / "runs" / "solver_seed0"
  solver_folder.mkdir()
  with open(solver_folder / "evaluations.json", "w") as f:
    json.dump([entry("d", 0.85, 0.01)], f)
  with open(solver_folder / "best.json", "w") as f:
    json.dump({"search_seconds": 2.0, "p": 3, "privacy": 0.85, "feasible": True,
               "test_accuracy": 0.5, "float_test_accuracy": 0.51,
               "solver": {"estimator": "hessian", "candidates": 9},
               "identity": {"search.solver.margins": [0.75, 0.5]}}, f)

  runs, evaluated, rankings = solver_study.collect(paths, [str(tmp_path / "runs")])
  assert sorted(runs) == ["ga", "random", "solver[hessian; margins 0.75,0.5]",
                          "solver[hessian; no margin]"]
  assert [r["from"] for r in runs["ga"]] == [paths[0], str(folder)]
  assert runs["ga"][1]["best_feasible_privacy"] == [0.0, 0.8]  # b infeasible, then c
  assert runs["ga"][1]["evaluations"] == 2 and runs["ga"][1]["seconds"] == 7.0
  assert runs["solver[hessian; no margin]"][0]["best_feasible_privacy"] == [0.0, 1.1]
  assert runs["random"][0]["from"] == "workdirs/x/random_seed0"  # the first source is kept
  assert sorted(evaluated) == ["a", "b", "c", "d"] and evaluated["b"]["privacy"] == 0.95
  assert rankings == {paths[0]: {"genomes": 330, "feasible": 200, "loss": {"spearman_eps": 0.85},
                                 "hessian": {"spearman_eps": 0.74}}}
  # The summary puts each solver run's plan length (its fine-tunings without the early
  # stop) beside the fine-tunings it spent.
  summary = solver_study.summarize(runs, target=0.805, tolerance=0.01)
  assert summary["solver[hessian; no margin]"]["fine_tunings"] == [2]
  assert summary["solver[hessian; no margin]"]["plan_candidates"] == [22]
  assert summary["solver[hessian; margins 0.75,0.5]"]["fine_tunings"] == [1]
  assert summary["solver[hessian; margins 0.75,0.5]"]["plan_candidates"] == [9]
  assert summary["ga"]["plan_candidates"] == [None, None]
  assert summary["ga"]["fine_tunings_to_reach"] == [None, 2]  # the first: its final answer only
  assert summary["ga"]["after"] == {1: [0.0], 2: [0.8]}
  # A rerun supersedes: the run folders' GA replaces the files' GA rows; the other rows stay.
  rerun, _, _ = solver_study.collect(paths, [str(tmp_path / "runs")], supersede=True)
  assert [r["from"] for r in rerun["ga"]] == [str(folder)]
  assert {k: v for k, v in rerun.items() if k != "ga"} == {k: v for k, v in runs.items()
                                                           if k != "ga"}
