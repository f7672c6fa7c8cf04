r"""The paper's protocol on one accelerator: new paths against the old one, in one run.

  python -m benchmarks.accelerator --synthetic --json=results/benchmarks/accelerator_<device>.json

Measures, in this one process on the paper-size model (ResNet18 by default):
  * the bf16 matrix-product rate of the device (the ceiling the other numbers are shared of);
  * pre-training: seconds per epoch (351 steps of 128) on the old path (numpy batches,
    one call per step, float32 at the backend's default precision) and on the fused
    device path in float32 (``highest``) and bfloat16;
  * candidate evaluation at the paper protocol (351 fine-tuning steps of 128, validation
    5 000 images, privacy 256): seconds per candidate for K candidates per call, for each
    way of running them (``vmap``: one batched program; ``map``: a loop of one-candidate
    programs), on the old path and the new one;
  * achieved TFLOP/s (analytic: 2 flops per multiply-add, a training step is 3 passes)
    and its share of the matmul rate; the projected time of a T=1000 search
    (N + 0.84·T ≈ 860 distinct candidates, the cache hit rate of ``search_throughput``) and
    of 200 pre-training epochs.
Compilation is timed apart from the work (each program is compiled with one step first).
The measurements run in priority order and stop starting new ones after ``--budget_s``;
whatever was skipped is listed. ``--synthetic`` makes CIFAR-shaped random data, so the
benchmark runs on a bare machine; without it the real CIFAR-100 is read.
"""

from __future__ import annotations

import functools
import os
import platform
import time
from typing import Any, Callable

from absl import app, flags, logging
import jax
import jax.numpy as jnp
import numpy as np

from experiments.configs import search as search_configs
from experiments.configs import train as train_configs
from maxpart_jax import checkpoint, data, runs, train
from maxpart_jax.models import get_model
from maxpart_jax.models.layers import Numerics
from maxpart_jax.jobs import pretrain, settings
from maxpart_jax.search.fitness import Evaluator, FitnessConfig
from maxpart_jax.search.operators import get_operator

_SYNTHETIC = flags.DEFINE_bool("synthetic", False, "random CIFAR-shaped data instead of CIFAR-100")
_MODEL = flags.DEFINE_string("model", "resnet18", "architecture")
_WIDTH = flags.DEFINE_float("width", 1.0, "channel multiplier (1.0: the paper's size)")
_STEPS = flags.DEFINE_integer("finetune_steps", 351, "fine-tuning steps per candidate")
_BATCH = flags.DEFINE_integer("batch_size", 128, "batch size of fine-tuning and pre-training")
_VAL = flags.DEFINE_integer("val_images", 5000, "validation images of the accuracy")
_PRIV = flags.DEFINE_integer("privacy_images", 256, "images of the privacy score")
_KS = flags.DEFINE_list("ks", ["1", "8", "4", "16", "2"], "candidates per call, in this order")
_OLD_KS = flags.DEFINE_list("old_ks", ["1", "8"], "candidates per call on the old path")
_PRE_STEPS = flags.DEFINE_integer("pretrain_steps", 0, "pre-training steps timed on the new "
                                  "paths (0: a whole epoch), scaled to an epoch")
_OLD_STEPS = flags.DEFINE_integer("old_pretrain_steps", 100,
                                  "pre-training steps timed on the old path (scaled to an epoch)")
_BUDGET = flags.DEFINE_float("budget_s", 270.0, "start no new measurement after this many seconds")
_JSON = flags.DEFINE_string("json", None, "write the results here (also after every measurement)")
_ONLY = flags.DEFINE_list("only", [], "run only these measurements (names as printed, e.g. "
                          "eval_new_bf16_vmap_k1,pretrain_old), still in priority order")

TRAIN_IMAGES = 45000  # CIFAR-100 training set minus the 10 % hold-out
DISTINCT_CANDIDATES = 860  # N + 0.84·T at the paper's settings (results/benchmarks)
OLD = dict(pipeline="host", compute_dtype="float32", matmul_precision="default")
NEW_BF16 = dict(pipeline="auto", compute_dtype="bfloat16", matmul_precision="highest")
NEW_F32 = dict(pipeline="auto", compute_dtype="float32", matmul_precision="highest")


class Run:
  """Results, the clock and the budget of one benchmark run."""

  def __init__(self, budget_s: float, json_path: str | None, only: list[str] | None = None):
    self.start, self.budget_s, self.json_path = time.perf_counter(), budget_s, json_path
    self.only = set(only or [])
    self.results: dict[str, Any] = {"skipped": []}

  def elapsed(self) -> float:
    return time.perf_counter() - self.start

  def measure_all(self, plan: list[tuple[str, Callable[[], dict[str, Any]]]]) -> None:
    """Measures ``plan`` in its order, only the names in ``only`` if any were given; a name
    in ``only`` that the plan lacks is an error before anything is measured."""
    unknown = self.only - {name for name, _ in plan}
    if unknown:
      raise ValueError(f"--only names unknown measurements {sorted(unknown)}; this run "
                       f"offers {[name for name, _ in plan]}")
    for name, fn in plan:
      if not self.only or name in self.only:
        self.measure(name, fn)

  def measure(self, name: str, fn: Callable[[], dict[str, Any]]) -> None:
    """Runs ``fn`` unless the budget is spent; records and prints its row."""
    if self.elapsed() > self.budget_s:
      self.results["skipped"].append(name)
      print(f"[{self.elapsed():6.0f}s] skipped {name} (budget)", flush=True)
      return
    row = fn()
    self.results.setdefault("rows", {})[name] = row
    shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}
    print(f"[{self.elapsed():6.0f}s] {name}: {shown}", flush=True)
    self.save()

  def save(self) -> None:
    if self.json_path:
      os.makedirs(os.path.dirname(os.path.abspath(self.json_path)), exist_ok=True)
      checkpoint.write_json(self.json_path, {**self.results, "wall_seconds": self.elapsed(),
                                              "environment": runs.environment()})


def matmul_tflops(dtype=jnp.bfloat16) -> float:
  """Median TFLOP/s of a square matrix product (8192 on accelerators, 2048 on CPUs)."""
  n = 2048 if jax.default_backend() == "cpu" else 8192
  a, b = (jax.random.normal(jax.random.key(i), (n, n), dtype) for i in (0, 1))
  f = jax.jit(jnp.matmul)
  f(a, b).block_until_ready()
  times = []
  for _ in range(10):
    t = time.perf_counter()
    f(a, b).block_until_ready()
    times.append(time.perf_counter() - t)
  return 2 * n**3 / float(np.median(times)) / 1e12


def synthetic_splits(num_classes: int = 100) -> tuple[data.Split, data.Split]:
  """Random uint8 images with random labels, shaped like the CIFAR-100 train / val splits."""
  rng = np.random.default_rng(0)
  make = lambda n: data.Split(rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
                              rng.integers(0, num_classes, n).astype(np.int32), num_classes,
                              "cifar100")
  return make(TRAIN_IMAGES), make(_VAL.value)


def time_pretraining(model, train_split: data.Split, numerics: Numerics, pipeline: str,
                     steps: int) -> dict[str, float]:
  """Seconds per epoch of pre-training (the paper's SGD), as ``train_and_evaluate`` runs it:
  chunks of ``log_every_steps`` steps on the device path, one call per step on the host."""
  config = train_configs.get_config("resnet18")
  config.batch_size = _BATCH.value
  per_epoch = data.steps_per_epoch(len(train_split), config.batch_size, drop_remainder=True)
  model = model.with_numerics(numerics)
  pipeline = train.resolve_pipeline(pipeline)
  tx = pretrain.make_optimizer(config, per_epoch * config.num_epochs)
  state = train.TrainState.create(model.init(jax.random.key(0)), tx)
  run_steps = train.StepRunner(functools.partial(train.train_step, model, tx), train_split,
                               pipeline)
  draws = data.train_draws(len(train_split), config.batch_size, seed=0, epoch=0)
  steps = min(steps, per_epoch)
  chunk = lambda st, i, j: run_steps(st, draws, i, j)
  t = time.perf_counter()
  state, metrics = chunk(state, 0, 1)
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - t
  t = time.perf_counter()
  for i in range(1, steps, config.log_every_steps):
    state, metrics = chunk(state, i, min(i + config.log_every_steps, steps))
    float(jax.tree.leaves(metrics)[0])  # the host reads the loss at every log line
  seconds = time.perf_counter() - t
  epoch_s = seconds / (steps - 1) * per_epoch
  flops = 3 * 2 * _macs(model) * config.batch_size * per_epoch
  return {"pipeline": pipeline, "compile_and_first_step_s": compile_s, "timed_steps": steps - 1,
          "seconds_per_epoch": epoch_s, "tflops": flops / epoch_s / 1e12,
          "projected_200_epochs_min": 200 * epoch_s / 60}


def _macs(model) -> float:
  return float(sum(l.macs for l in model.info.layers))


def random_genomes(model, k: int, seed: int):
  """K random genomes of the paper's search space (R_w = {2,4,6,8}, R_a = {8})."""
  space = settings.space_from_config(search_configs.get_config(_MODEL.value), model.info)
  init = get_operator("init", "uniform")
  return jax.vmap(lambda key: init(key, space))(jax.random.split(jax.random.key(seed), k))


def time_evaluation(model, variables, train_split, val_split, privacy_images, k: int,
                    layout: str, settings: dict[str, str]) -> dict[str, float]:
  """Seconds per candidate of :meth:`Evaluator.evaluate` for K candidates per step."""
  config = FitnessConfig(finetune_steps=_STEPS.value, batch_size=_BATCH.value,
                         candidate_loop=layout, **settings)
  t = time.perf_counter()
  evaluator = Evaluator(model, variables, train_split, val_split, privacy_images, config,
                        candidates_per_call=k)
  genomes = random_genomes(model, k, seed=k)
  evaluator.warm_up(genomes)
  compile_s = time.perf_counter() - t
  t = time.perf_counter()
  evaluator.evaluate(genomes)
  seconds = time.perf_counter() - t
  per = seconds / k
  flops = 2 * _macs(model) * (3 * _STEPS.value * _BATCH.value + len(val_split)
                              + len(privacy_images))
  return {"k": k, "layout": evaluator.candidate_loop, **settings,
          "pipeline": evaluator.pipeline, "setup_and_compile_s": compile_s,
          "seconds_per_step": seconds, "seconds_per_candidate": per,
          "tflops": flops / per / 1e12,
          "phase_seconds": {n: v / k for n, v in evaluator.seconds.items()},
          "projected_t1000_search_min": DISTINCT_CANDIDATES * per / 60}


def main(argv: list[str]) -> None:
  del argv
  logging.set_verbosity(logging.WARNING)
  run = Run(_BUDGET.value, _JSON.value, _ONLY.value)
  device = jax.devices()[0]
  run.results.update(device=getattr(device, "device_kind", str(device)),
                     backend=jax.default_backend(), device_count=jax.device_count(),
                     jax=jax.__version__, host=platform.node(), model=_MODEL.value,
                     width=_WIDTH.value, finetune_steps=_STEPS.value, batch_size=_BATCH.value,
                     val_images=_VAL.value, privacy_images=_PRIV.value,
                     synthetic=_SYNTHETIC.value)
  print(f"device: {run.results['device']} ({run.results['backend']}), jax {jax.__version__}",
        flush=True)
  if _SYNTHETIC.value:
    train_split, val_split = synthetic_splits()
  else:
    train_split = data.load_split("train")
    val_split = data.load_split("val").take(_VAL.value, seed=0)
  privacy_images = val_split.take(_PRIV.value, seed=1).float_images()
  model = get_model(_MODEL.value, width=_WIDTH.value, num_classes=train_split.num_classes)
  variables = model.init(jax.random.key(0))
  run.results["macs_per_image"] = _macs(model)

  evaluation = functools.partial(time_evaluation, model, variables, train_split, val_split,
                                 privacy_images)
  pretraining = functools.partial(time_pretraining, model, train_split)
  ks, old_ks = [int(k) for k in _KS.value], [int(k) for k in _OLD_KS.value]
  new_steps = _PRE_STEPS.value or data.steps_per_epoch(len(train_split), _BATCH.value, True)
  # Priority order: the headline numbers and their baselines first.
  plan = [
      ("matmul_bf16", lambda: {"tflops": matmul_tflops()}),
      ("eval_new_bf16_vmap_k1", lambda: evaluation(1, "vmap", NEW_BF16)),
      (f"eval_old_vmap_k{old_ks[0]}", lambda: evaluation(old_ks[0], "vmap", OLD)),
      ("pretrain_new_bf16", lambda: pretraining(Numerics("bfloat16"), "auto", new_steps)),
      ("pretrain_old", lambda: pretraining(Numerics("float32", "default"), "host",
                                           _OLD_STEPS.value)),
      *[(f"eval_new_bf16_vmap_k{k}", lambda k=k: evaluation(k, "vmap", NEW_BF16))
        for k in ks[1:]],
      ("eval_new_bf16_map_k4", lambda: evaluation(4, "map", NEW_BF16)),
      ("pretrain_new_f32", lambda: pretraining(Numerics("float32"), "auto", new_steps)),
      ("eval_new_f32_vmap_k1", lambda: evaluation(1, "vmap", NEW_F32)),
      *[(f"eval_old_vmap_k{k}", lambda k=k: evaluation(k, "vmap", OLD)) for k in old_ks[1:]]]
  if jax.default_backend() == "cpu":  # why `auto` avoids compiled loops on CPUs (few steps:
    plan.append(("pretrain_new_f32_fused",  # each is tens of times slower there)
                 lambda: pretraining(Numerics("float32"), "fused", min(new_steps, 4))))
  run.measure_all(plan)
  summarize(run)
  run.save()


def summarize(run: Run) -> None:
  """Ratios of this run, and a table printed last."""
  rows = run.results.get("rows", {})
  matmul = rows.get("matmul_bf16", {}).get("tflops")
  evals = {n: r for n, r in rows.items() if n.startswith("eval_")}
  summary: dict[str, Any] = {}
  if evals:
    best = min(evals, key=lambda n: evals[n]["seconds_per_candidate"] if "new" in n else 1e9)
    old = min((n for n in evals if "old" in n), key=lambda n: evals[n]["seconds_per_candidate"],
              default=None)
    summary["best_new_eval"] = best
    summary["best_new_seconds_per_candidate"] = evals[best]["seconds_per_candidate"]
    summary["projected_t1000_search_min"] = evals[best]["projected_t1000_search_min"]
    if old:
      summary["best_old_eval"] = old
      summary["eval_speedup"] = (evals[old]["seconds_per_candidate"]
                                 / evals[best]["seconds_per_candidate"])
  if "pretrain_old" in rows and "pretrain_new_bf16" in rows:
    summary["pretrain_speedup_bf16"] = (rows["pretrain_old"]["seconds_per_epoch"]
                                        / rows["pretrain_new_bf16"]["seconds_per_epoch"])
  run.results["summary"] = summary
  print("\nmeasurement                      s/candidate   s/epoch   TFLOP/s   share of matmul")
  for name, r in rows.items():
    if name == "matmul_bf16":
      continue
    share = f"{r['tflops'] / matmul:7.1%}" if matmul else "   -"
    print(f"{name:<32} {r.get('seconds_per_candidate', float('nan')):>10.3f} "
          f"{r.get('seconds_per_epoch', float('nan')):>9.2f} {r['tflops']:>9.1f}   {share}")
  if matmul:
    print(f"bf16 matmul: {matmul:.0f} TFLOP/s")
  print("summary:", {k: round(v, 3) if isinstance(v, float) else v for k, v in summary.items()})
  if run.results["skipped"]:
    print("skipped (budget):", run.results["skipped"])


if __name__ == "__main__":
  app.run(main)
