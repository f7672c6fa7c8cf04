r"""Does bfloat16 rank genomes like float32? Fitness of random genomes under both, one run.

  python -m benchmarks.bf16_ranking --config=experiments/configs/search.py:quick \
      --genomes=16 --json=results/benchmarks/bf16_ranking.json

Evaluates the same random genomes of the config's search space with the config's
fitness (fine-tuning, validation and privacy images) with float32 convolutions
(``highest`` precision), with bfloat16, and, as the noise floor, with float32 again on
pre-trained weights changed by relative noise of 2^-20 (float32 rounding scale: how
much the fitness moves when nothing but rounding changes). Reports the Spearman rank
correlation with the float32 run of the fitness, privacy and accuracy, the largest
differences and whether the best genome is the same.
"""

from __future__ import annotations

from absl import app, flags
import jax
import numpy as np
from ml_collections import config_flags
from scipy import stats

from maxpart_jax import checkpoint, runs
from maxpart_jax.jobs import build, settings
from maxpart_jax.search.operators import get_operator

_CONFIG = config_flags.DEFINE_config_file("config", None, "search config")
_GENOMES = flags.DEFINE_integer("genomes", 16, "random genomes to evaluate")
_SEED = flags.DEFINE_integer("seed", 0, "draws the genomes")
_JSON = flags.DEFINE_string("json", None, "write the results here")


SETTINGS = {"float32": ("float32", 0.0), "bfloat16": ("bfloat16", 0.0),
            "float32_perturbed": ("float32", 2.0**-20)}


def perturbed(variables, scale: float, key: jax.Array):
  """``variables`` times (1 + scale · N(0, 1)), leaf by leaf."""
  leaves, treedef = jax.tree.flatten(variables)
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(treedef, [x * (1 + scale * jax.random.normal(k, x.shape))
                                      for x, k in zip(leaves, keys)])


def main(argv: list[str]) -> None:
  del argv
  results = {"device": str(jax.devices()[0]), "genomes": _GENOMES.value}
  metrics = {}
  for name, (dtype, noise) in SETTINGS.items():
    config = _CONFIG.value.copy_and_resolve_references()
    config.fitness.compute_dtype = dtype
    config.fitness.matmul_precision = "highest"
    evaluator = build.build_evaluator(config)
    if noise:
      evaluator.variables = perturbed(evaluator.variables, noise, jax.random.key(1))
      evaluator.float_accuracy = evaluator.float_accuracy_on()  # ε against the moved weights
    space = settings.space_from_config(config, evaluator.model.info)
    init = get_operator("init", config.search.init)
    keys = jax.random.split(jax.random.key(_SEED.value), _GENOMES.value)
    genomes = jax.vmap(lambda k: init(k, space))(keys)
    out = evaluator.evaluate(genomes)
    metrics[name] = {k: np.asarray(v, float).tolist() for k, v in out.items()}
    metrics[name]["float_accuracy"] = evaluator.float_accuracy
    print(f"{name}: fitness {np.round(out['fitness'], 4).tolist()}", flush=True)
  results["metrics"] = metrics
  results["p"] = np.asarray(genomes.p).tolist()
  ref = metrics["float32"]
  for other in ("bfloat16", "float32_perturbed"):
    results[other] = {"same_best": int(np.argmax(ref["fitness"])) ==
                                   int(np.argmax(metrics[other]["fitness"]))}
    for name in ("fitness", "privacy", "accuracy"):
      rho = stats.spearmanr(ref[name], metrics[other][name]).statistic
      diff = np.abs(np.subtract(ref[name], metrics[other][name]))
      results[other][name] = {"spearman": float(rho), "max_abs_diff": float(diff.max()),
                              "mean_abs_diff": float(diff.mean())}
      print(f"{other} vs float32, {name}: Spearman {rho:.4f}, max |diff| {diff.max():.4g}, "
            f"mean {diff.mean():.4g}")
    print(f"{other}: same best genome as float32: {results[other]['same_best']}")
  if _JSON.value:
    checkpoint.write_json(_JSON.value, {**results, "environment": runs.environment()})


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  app.run(main)
