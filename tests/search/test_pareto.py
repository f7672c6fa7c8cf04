"""Pareto fronts: exactly the non-dominated set, checked by brute force."""

import itertools
import json
import shutil

import numpy as np
import pytest

from maxpart_jax.energy import DeviceConfig
from maxpart_jax.search import pareto
from maxpart_jax.jobs import settings, storage
from maxpart_jax.search.fitness import FitnessConfig

BOUNDS = FitnessConfig(eps_bound=0.03, device=DeviceConfig(budget_mj=0.4))


def _row(privacy, energy_mj, eps, **kw):
  """An evaluation as the search stores it (a working candidate unless ``kw`` says not)."""
  return {"privacy": privacy, "energy_mj": energy_mj, "eps": eps, "accuracy": 0.5,
          "fitness": privacy, "diverged": 0.0, "failed": 0.0, "collapsed": 0.0,
          "latency_ms": 1.0, **kw}


def _brute_force(values: np.ndarray, maximize) -> np.ndarray:
  """Point i is kept unless some j is >= in every objective and > in one (signs applied)."""
  x = values * np.where(maximize, 1.0, -1.0)
  keep = np.ones(len(x), bool)
  for i, j in itertools.product(range(len(x)), repeat=2):
    if np.all(x[j] >= x[i]) and np.any(x[j] > x[i]):
      keep[i] = False
  return keep


@pytest.mark.parametrize("maximize", [(True, False), (True, False, True), (False, False, True)])
def test_non_dominated_is_the_brute_force_front(maximize):
  """Catches a strict/non-strict mix-up (ties on a small integer grid are frequent, and equal
  points must both stay) and a sign error in the minimized objectives."""
  rng = np.random.default_rng(len(maximize))
  for _ in range(20):
    values = rng.integers(0, 5, size=(30, len(maximize))).astype(float)
    np.testing.assert_array_equal(np.asarray(pareto.non_dominated(values, maximize)),
                                  _brute_force(values, maximize))
  # a hand-made case: (privacy up, energy down)
  values = np.array([[0.5, 1.0], [0.5, 1.0], [0.6, 2.0], [0.4, 1.5], [0.7, 2.0]])
  np.testing.assert_array_equal(np.asarray(pareto.non_dominated(values, (True, False))),
                                [True, True, False, False, True])


def test_hypervolume_by_hand_and_by_sampling():
  """Two feasible genomes in the privacy-energy box [0, E_b): the union of their rectangles,
  by hand; infeasible and failed genomes add nothing; in three objectives, a Monte Carlo
  estimate agrees. Catches a reference point outside the feasible box, a sign error in
  privacy, or infeasible genomes counted."""
  evals = [_row(0.5, 0.1, 0.0), _row(0.8, 0.3, 0.01), _row(2.0, 0.5, 0.0),  # over E_b
           _row(3.0, 0.1, 0.05), _row(9.0, 0.1, 0.0, failed=1.0)]  # over ε_b; failed
  two = pareto.hypervolume(evals, BOUNDS, ("privacy", "energy_mj"))
  assert two == pytest.approx(0.5 * 0.3 + (0.8 - 0.5) * 0.1)  # 0.18
  assert pareto.hypervolume(evals[2:], BOUNDS) == 0.0
  rng = np.random.default_rng(0)
  pts = np.array([[e["privacy"], e["energy_mj"], e["eps"]] for e in evals[:2]])
  samples = rng.random((200_000, 3)) * [1.0, 0.4, 0.03]
  dominated = ((samples[:, None, 0] <= pts[None, :, 0]) & (samples[:, None, 1] >= pts[None, :, 1])
               & (samples[:, None, 2] >= pts[None, :, 2])).any(1)
  assert pareto.hypervolume(evals, BOUNDS) == pytest.approx(
      dominated.mean() * 1.0 * 0.4 * 0.03, rel=0.02)


def test_front_and_hypervolume_judge_feasibility_as_the_search_does():
  """With a latency bound, a genome that breaks only that bound is infeasible on the front,
  off the within-bounds privacy-energy front and out of the hypervolume, exactly as
  fitness.violations says (catches feasibility read from energy and ε alone)."""
  bounded = FitnessConfig(eps_bound=0.03, device=DeviceConfig(budget_mj=0.4,
                                                              latency_bound_ms=2.0))
  evals = [_row(0.5, 0.1, 0.0, key="ok"), _row(0.9, 0.2, 0.0, key="slow", latency_ms=3.0),
           _row(0.7, 0.3, 0.0, key="ok2")]
  result = pareto.front(evals, bounded)
  feasible = {p["key"]: p["feasible"] for p in result["points"]}
  assert feasible == {"ok": True, "slow": False}  # "slow" dominates "ok2" in 3 objectives
  assert [p["key"] for p in result["privacy_energy"]] == ["ok", "ok2"]
  assert result["latency_bound_ms"] == 2.0
  assert pareto.hypervolume(evals, bounded, ("privacy", "energy_mj")) == pytest.approx(
      0.5 * 0.3 + 0.2 * 0.1)  # "ok" and "ok2" only
  assert pareto.hypervolume(evals, BOUNDS, ("privacy", "energy_mj")) == pytest.approx(
      0.5 * 0.3 + 0.4 * 0.2)  # without the bound "slow" counts (and shadows "ok2")


def test_search_writes_its_evaluations_and_their_front(smoke, smoke_search, tmp_path):
  """Catches a front computed over other candidates than the search evaluated, failed
  candidates on it, a privacy-energy front with genomes outside ε_b, and a killed search
  whose evaluations cannot be read back."""
  report, workdir = smoke_search
  evaluations = json.loads((workdir / "evaluations.json").read_text())
  assert len(evaluations) == report["evaluations"]
  front = json.loads((workdir / "pareto.json").read_text())
  assert (workdir / "pareto.png").exists()
  eps_bound = smoke.fitness.eps_bound
  values = np.array([[e["privacy"], e["energy_mj"], e["accuracy"]] for e in evaluations])
  expected = {evaluations[i]["key"] for i in np.flatnonzero(
      _brute_force(values, (True, False, True)))}
  assert {p["key"] for p in front["points"]} == expected
  assert all(p["feasible"] == (p["energy_mj"] < smoke.fitness.budget_mj and p["eps"] < eps_bound)
             for p in front["points"])  # the smoke config sets no latency bound
  within = [e for e in evaluations if e["eps"] < eps_bound]
  keep = _brute_force(np.array([[e["privacy"], e["energy_mj"]] for e in within]), (True, False))
  assert {p["key"] for p in front["privacy_energy"]} == {e["key"] for e, k in zip(within, keep) if k}
  # a failed candidate, however good its numbers, is left out
  failed = {**evaluations[0], "key": "failed", "privacy": 99.0, "failed": 1.0}
  again = pareto.front(evaluations + [failed], settings.fitness_from_config(smoke))
  assert again["left_out"] == 1 and "failed" not in {p["key"] for p in again["points"]}
  # a search killed before its report: the same evaluations from its state
  killed = tmp_path / "killed"
  shutil.copytree(workdir, killed)
  (killed / "evaluations.json").unlink()
  strip = lambda rows: [{k: v for k, v in r.items() if k != "violations"} for r in rows]
  assert storage.load_evaluations(str(killed)) == strip(evaluations)


def test_strategy_study_gives_every_algorithm_the_same_candidates():
  """Catches a comparison at unequal budgets: every algorithm makes N + iterations
  candidates (GA one per step, NSGA-II and random search N per step), and NSGA-II runs
  Deb's binary tournaments with crossover."""
  from experiments.configs import search as search_configs
  from maxpart_jax.studies.strategy_study import algorithm_config, curves
  base = search_configs.get_config("quick")
  base.search.iterations = 48
  for name in ("ga", "nsga2", "random"):
    c = algorithm_config(base, name, seed=2)
    assert c.search.algorithm == name and c.search.seed == 2
    steps = c.search.iterations // c.search.num_tournaments
    assert c.search.pop_size + steps * c.search.num_tournaments == 8 + 48
  nsga = algorithm_config(base, "nsga2", 0)
  assert (nsga.search.sample_size, nsga.search.crossover) == (2, "uniform")
  base.search.iterations = 20
  with pytest.raises(ValueError, match="multiple of the population size"):
    algorithm_config(base, "nsga2", 0)
  # Curves after each evaluation: the hypervolume of what was seen so far, and the best
  # feasible privacy (infeasible genomes never count).
  evals = [_row(0.5, 0.1, 0.0, violations=[]),
           _row(0.9, 0.5, 0.0, violations=["E over"]),
           _row(0.8, 0.3, 0.01, violations=[])]
  got = curves(evals, BOUNDS)
  assert got["best_feasible_privacy"] == [0.5, 0.5, 0.8]
  assert got["hypervolume_pe"] == pytest.approx([0.15, 0.15, 0.18])
  assert got["hypervolume"][-1] == pytest.approx(pareto.hypervolume(evals, BOUNDS))


def test_link_study_picks_the_most_private_genome_that_fits_the_link():
  """Two genomes of a small ResNet18: a deep, private one with a small IR and a shallow one
  with a large IR. A cheap link admits both and picks the private one; a costly link
  breaks the shallow one's budget first (its IR is 4x larger); a latency bound below the
  deep one's compute time picks the shallow one. Catches energy or latency not recomputed
  per link."""
  from experiments.configs import search as search_configs
  from maxpart_jax.studies.link_study import best_per_link
  from maxpart_jax.energy import DeviceConfig, edge_energy, edge_latency
  from maxpart_jax.genome import uniform_genome
  from maxpart_jax.models import get_model
  info = get_model("resnet18", width=0.25).info
  config = search_configs.get_config("quick")
  deep, shallow = uniform_genome(info, 7, 8, 8), uniform_genome(info, 2, 8, 8)
  pool = [dict(key="deep", privacy=0.9, eps=0.0, genome=deep.to_json()),
          dict(key="shallow", privacy=0.3, eps=0.0, genome=shallow.to_json())]
  cost = lambda g, tx: float(edge_energy(info, g, DeviceConfig(tx_pj_per_bit=tx)).total_mj)
  # A budget between the two genomes' energies at 10 nJ/bit, above both at 100 pJ/bit.
  budget = (cost(deep, 1e4) + cost(shallow, 1e4)) / 2
  assert cost(deep, 1e4) < budget < cost(shallow, 1e4) and cost(shallow, 100) < budget
  config.fitness.budget_mj = budget
  assert best_per_link(pool, config, info, 100.0, 1.0, 0.0, 0.0)["best"]["key"] == "deep"
  row = best_per_link(pool, config, info, 1e4, 1.0, 0.0, 0.0)
  assert row["best"]["key"] == "deep" and row["feasible_genomes"] == 1
  # On a 100 Mbps link latency is mostly compute: the deep genome is the slow one.
  slow, fast = (float(edge_latency(info, g, DeviceConfig(bandwidth_mbps=100.0)).total_ms)
                for g in (deep, shallow))
  assert fast < slow
  row = best_per_link(pool, config, info, 100.0, 100.0, (fast + slow) / 2, 0.0)
  assert row["best"]["key"] == "shallow"
