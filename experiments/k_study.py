r"""Does the batched variant (K children per step) search as well as Algorithm 1 (K = 1)?

  python -m experiments.k_study --out=results/search_k

Runs the paper's search settings (N = 20, S = 10, prob_p = 0.5, prob_Π = 0.3,
R_w = {2, 4, 6, 8}, R_a = {8}) with K = 1 and K = 8 for the same number of children
(``--iterations``) over ``--seeds`` seeds, on a cheap deterministic fitness with the
structure of the real one:

* energy: the analytic edge energy of the paper-size ResNet18, computation only,
  E_b = 0.35 mJ (exactly the search's energy term);
* privacy: ``0.3 + 0.08·p + 0.02·m``, with ``m`` the mean of ``(8 − w_l)/6`` over the
  quantized edge layers: deeper splits are more private, and lower bits a little
  (as in ``results/privacy/``);
* accuracy loss: ``Σ c_l·2^(-w_l)`` over the quantized edge layers, with fixed
  per-layer sensitivities ``c_l ~ U(0.1, 0.3)`` (a 2-bit layer costs about 0.05,
  an 8-bit one under 0.001), bound ε_b = 0.03;
* fitness: Eq. 11-12 with λ1 = λ2 = 0.1 (:func:`maxpart_jax.search.fitness.combine`).

Everything is one jitted program per K (``lax.scan`` over steps, ``vmap`` over seeds).
Writes ``k_study.json`` (per-seed final best fitness, best feasible fitness and the
children needed to reach the final best) and ``k_study.png`` (median and quartiles of
the best fitness against children evaluated).
"""

from __future__ import annotations

import json
import os

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

from experiments import k_compare
from experiments.configs import search as search_configs
from maxpart_jax import runs
from maxpart_jax.energy import population_energy
from maxpart_jax.genome import Genome, effective_bits
from maxpart_jax.models import get_model
from maxpart_jax.models.metadata import ModelInfo
from maxpart_jax.search import evolution
from maxpart_jax.jobs import settings
from maxpart_jax.search.fitness import FitnessConfig, combine

_OUT = flags.DEFINE_string("out", "results/search_k", "where k_study.json and the plot go")
_SEEDS = flags.DEFINE_integer("seeds", 20, "independent searches per K")
_ITERATIONS = flags.DEFINE_integer("iterations", 1000, "children per search (the paper's T)")
_KS = flags.DEFINE_list("ks", ["1", "8"], "children per step to compare")


def synthetic_fitness(info: ModelInfo, config: FitnessConfig):
  """``f(population) -> (fitness, feasible)``: the cheap fitness of the module docstring."""
  sensitivity = jax.random.uniform(jax.random.key(0), (info.num_layers,), minval=0.1, maxval=0.3)
  layer_block = jnp.asarray(info.layer_block)

  def metrics(g: Genome) -> tuple[jax.Array, jax.Array]:
    w, _, _ = effective_bits(info, g)
    quantized = (layer_block < g.p) & (w < 32)
    wf = w.astype(jnp.float32)
    eps = jnp.sum(jnp.where(quantized, sensitivity * jnp.exp2(-wf), 0.0))
    lower = jnp.sum(jnp.where(quantized, (8.0 - wf) / 6.0, 0.0)) / jnp.maximum(jnp.sum(quantized), 1)
    return 0.3 + 0.08 * g.p.astype(jnp.float32) + 0.02 * lower, eps

  def fitness(population: Genome) -> tuple[jax.Array, jax.Array]:
    privacy, eps = jax.vmap(metrics)(population)
    energy = population_energy(info, population, config.device, config.transmission).total_mj
    feasible = (energy < config.device.budget_mj) & (eps < config.eps_bound)
    return combine(privacy, energy, eps, config), feasible

  return fitness


def run(k: int, seeds: int, iterations: int) -> dict[str, np.ndarray]:
  """Best-so-far fitness (and best feasible) after every step of ``seeds`` searches with K = k."""
  config = search_configs.get_config("resnet18")
  config.search.num_tournaments = k
  info = get_model("resnet18").info
  strategy, space = settings.strategy_from_config(config), settings.space_from_config(config, info)
  fitness_of = synthetic_fitness(info, settings.fitness_from_config(config))
  steps = -(-iterations // k)

  def search(seed):
    init_key, step_key = jax.random.split(jax.random.key(seed))
    state = evolution.init(init_key, space, strategy)
    fitness, feasible = fitness_of(state.population)
    state = evolution.tell_initial(state, fitness)
    best_feasible = jnp.max(jnp.where(feasible, fitness, -jnp.inf))

    def step(carry, t):
      state, best_feasible = carry
      children, state = evolution.ask(jax.random.fold_in(step_key, t), state, space, strategy)
      fitness, feasible = fitness_of(children)
      state = evolution.tell(state, children, fitness, strategy)
      best_feasible = jnp.maximum(best_feasible, jnp.max(jnp.where(feasible, fitness, -jnp.inf)))
      return (state, best_feasible), (state.best_fitness, best_feasible)

    _, (best, feasible_best) = jax.lax.scan(step, (state, best_feasible), jnp.arange(steps))
    return best, feasible_best

  best, feasible_best = jax.jit(jax.vmap(search))(jnp.arange(seeds))
  return {"best": np.asarray(best), "best_feasible": np.asarray(feasible_best),
          "children": config.search.pop_size + k * np.arange(1, steps + 1)}


def main(argv: list[str]) -> None:
  del argv
  ks = [int(k) for k in _KS.value]
  outs = {k: run(k, _SEEDS.value, _ITERATIONS.value) for k in ks}
  rows = [k_compare.summarize(k, outs[k]) for k in ks]
  tests = k_compare.compare(rows) if len(ks) == 2 else {}
  result = {"seeds": _SEEDS.value, "iterations": _ITERATIONS.value, "rows": rows, **tests,
            "environment": runs.environment()}
  os.makedirs(_OUT.value, exist_ok=True)
  with open(os.path.join(_OUT.value, "k_study.json"), "w") as f:
    json.dump(result, f, indent=2)
  k_compare.plot(outs, os.path.join(_OUT.value, "k_study.png"),
                 f"Algorithm 1 (K = 1) vs batched, {_SEEDS.value} seeds, synthetic fitness")
  print(k_compare.report(rows, tests))


if __name__ == "__main__":
  app.run(main)
