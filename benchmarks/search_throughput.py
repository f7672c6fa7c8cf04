r"""Candidate evaluations per second with K = 1, 4, 8 candidates per step, in one run.

  python -m benchmarks.search_throughput --model=resnet18 --width=0.25 --json=results/benchmarks/search_throughput.json

Reports, all measured in this one process on the same model and data:
  * evaluations/s of the fitness (fine-tuning + accuracy + privacy) for each K, and the
    speed-up over K = 1;
  * the share of a short search's wall time spent outside fine-tuning and evaluation
    (ask/tell, caching, checkpointing, energy);
  * the cache hit rate of a 1000-iteration search (paper settings N=20, S=10, K=1) with a
    cheap deterministic fitness: how many children repeat an effective genome.
With ``--paper_time`` the measured K=1 rate is also projected to a 1000-iteration search.
"""

from __future__ import annotations

import os
import tempfile
import time

from absl import app, flags
import jax
import jax.numpy as jnp

from experiments.configs import search as search_configs
from maxpart_jax import checkpoint, data, runs
from maxpart_jax.models import get_model
from maxpart_jax.search import evolution
from maxpart_jax.jobs import caching, driver, settings
from maxpart_jax.search.fitness import Evaluator, FitnessConfig
from maxpart_jax.search.operators import get_operator

_MODEL = flags.DEFINE_string("model", "resnet18", "architecture")
_WIDTH = flags.DEFINE_float("width", 0.25, "channel multiplier")
_STEPS = flags.DEFINE_integer("finetune_steps", 10, "fine-tuning steps per candidate")
_BATCH = flags.DEFINE_integer("batch_size", 64, "fine-tuning batch size")
_KS = flags.DEFINE_list("ks", ["1", "4", "8"], "candidates per step to compare")
_REPEATS = flags.DEFINE_integer("repeats", 2, "timed evaluate() calls per K (after warm-up)")
_VAL = flags.DEFINE_integer("val_images", 500, "validation images for the accuracy")
_PRIV = flags.DEFINE_integer("privacy_images", 64, "images for the privacy score")
_JSON = flags.DEFINE_string("json", None, "write the results here")


def throughput(ks: list[int]) -> list[dict[str, float]]:
  """Evaluations per second of :class:`Evaluator` for each K (random genomes, warm compile)."""
  model = get_model(_MODEL.value, width=_WIDTH.value)
  variables = model.init(jax.random.key(0))
  train = data.load_split("train")
  val = data.load_split("val").take(_VAL.value, seed=0)
  images = val.take(_PRIV.value, seed=1).float_images()
  config = FitnessConfig(finetune_steps=_STEPS.value, batch_size=_BATCH.value)
  space = settings.space_from_config(search_configs.get_config("quick"), model.info)
  init = get_operator("init", "uniform")
  rows = []
  for k in ks:
    evaluator = Evaluator(model, variables, train, val, images, config, candidates_per_call=k)
    genomes = jax.vmap(lambda key: init(key, space))(jax.random.split(jax.random.key(k), k))
    evaluator.evaluate(genomes)  # compile
    start = time.perf_counter()
    for _ in range(_REPEATS.value):
      evaluator.evaluate(genomes)
    seconds = (time.perf_counter() - start) / _REPEATS.value
    rows.append({"k": k, "seconds_per_step": seconds, "evaluations_per_second": k / seconds})
    print(f"K={k}: {seconds:.2f} s per step, {k / seconds:.3f} evaluations/s", flush=True)
  for row in rows:
    row["speedup_vs_k1"] = row["evaluations_per_second"] / rows[0]["evaluations_per_second"]
  return rows


def overhead_share() -> dict[str, float]:
  """Share of a short quick-variant search spent outside the fitness evaluation."""
  config = search_configs.get_config("quick")
  config.search.update(iterations=8, num_tournaments=4)
  config.fitness.update(finetune_steps=_STEPS.value, batch_size=_BATCH.value)
  config.val_images, config.privacy_images = _VAL.value, _PRIV.value
  with tempfile.TemporaryDirectory() as workdir:
    report = driver.run_search(config, workdir)
  inside = sum(report["phase_seconds"].values())
  return {"search_seconds": report["search_seconds"], "evaluation_seconds": inside,
          "outside_share": 1.0 - inside / report["search_seconds"]}


def cache_hit_rate(iterations: int = 1000) -> dict[str, float]:
  """Hit rate of the effective-genome cache over a paper-setting search, cheap fitness."""
  info = get_model("resnet18").info
  config = search_configs.get_config("resnet18")
  space = settings.space_from_config(config, info)
  strategy = evolution.Strategy(pop_size=20, num_tournaments=1)
  fitness_of = lambda g: g.p * 10.0 - jnp.mean(g.w_bits, axis=-1)
  key_init, key_steps = jax.random.split(jax.random.key(0))
  state = evolution.init(key_init, space, strategy)
  state = evolution.tell_initial(state, fitness_of(state.population))
  ask = jax.jit(lambda k, s: evolution.ask(k, s, space, strategy))
  tell = jax.jit(lambda s, c, f: evolution.tell(s, c, f, strategy))
  seen = set(caching.effective_keys(info, state.population))
  hits = 0
  for t in range(iterations):
    children, state = ask(jax.random.fold_in(key_steps, t), state)
    key = caching.effective_keys(info, children)[0]
    hits += key in seen
    seen.add(key)
    state = tell(state, children, fitness_of(children))
  return {"iterations": iterations, "hit_rate": hits / iterations, "distinct": len(seen)}


def main(argv: list[str]) -> None:
  del argv
  ks = [int(k) for k in _KS.value]
  results = {"device": str(jax.devices()[0]), "device_count": jax.device_count(),
             "model": _MODEL.value, "width": _WIDTH.value, "finetune_steps": _STEPS.value,
             "batch_size": _BATCH.value, "throughput": throughput(ks)}
  print("\n  K   s/step   evals/s   speed-up")
  for r in results["throughput"]:
    print(f"{r['k']:>3} {r['seconds_per_step']:>8.2f} {r['evaluations_per_second']:>9.3f} "
          f"{r['speedup_vs_k1']:>9.2f}x")
  results["cache"] = cache_hit_rate()
  print(f"cache hit rate over {results['cache']['iterations']} iterations (N=20, S=10, K=1): "
        f"{results['cache']['hit_rate']:.3f}")
  if os.path.exists(os.path.join(search_configs.get_config("quick").model_dir, "model.json")):
    results["overhead"] = overhead_share()
    print(f"share of search wall time outside fine-tuning/evaluation: "
          f"{results['overhead']['outside_share']:.3f}")
  if _JSON.value:
    os.makedirs(os.path.dirname(os.path.abspath(_JSON.value)), exist_ok=True)
    checkpoint.write_json(_JSON.value, {**results, "environment": runs.environment()})


if __name__ == "__main__":
  app.run(main)
