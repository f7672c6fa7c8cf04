r"""How close the integer edge program and the float32 fake-quantized model each come to the
fake-quantized model computed in float64 (docs/deploy.md §1).

  .venv/bin/python -m experiments.deploy_precision --out=results/deploy/precision.json

For each genome (8-bit genes at each ``--splits`` split, and the quick search's reported
genome), on ``--images`` test images: the share of IR codes that differ from the float64
reference's, and the largest difference, for the float32 model and for the integer program.
"""

from __future__ import annotations

import json
import os

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

from experiments import common
from maxpart_jax import checkpoint, data, runs
from maxpart_jax.deploy import artifact, parity
from maxpart_jax.genome import Genome, quantized_edge, uniform_genome
from maxpart_jax.models.layers import Numerics

_MODEL = flags.DEFINE_string("model_dir", "pretrained/cpu_resnet18/model", "pre-trained model")
_GENOME = flags.DEFINE_string("genome", "results/search_quick/best.json",
                              "a search's best.json whose genome is measured too ('' for none)")
_SPLITS = flags.DEFINE_list("splits", ["4", "9"], "splits measured with 8-bit genes")
_IMAGES = flags.DEFINE_integer("images", 500, "test images")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "dataset folder (default: $MAXPART_DATA_DIR)")
_OUT = flags.DEFINE_string("out", None, "write the rows as JSON here")


def codes_by_arithmetic(model, variables, genome: Genome, images: np.ndarray,
                        dataset: str) -> dict[str, np.ndarray]:
  """The IR codes of ``genome`` on uint8 ``images`` as the float64 and float32 fake-quantized
  models and the integer edge program compute them."""
  spec, arrays = artifact.build_edge(model, variables, genome, {"name": model.name},
                                     dataset=dataset)
  largest = spec.ir.largest
  x = data.normalize(images, dataset)
  out = {"float32": parity.reference_codes(
      np.asarray(quantized_edge(model, variables, jnp.asarray(x), genome)), largest)[0]}
  with jax.enable_x64(True):
    wide = jax.tree.map(lambda v: jnp.asarray(v, jnp.float64), variables)
    reference = model.with_numerics(Numerics("float64"))
    out["float64"] = parity.reference_codes(np.asarray(quantized_edge(
        reference, wide, jnp.asarray(x, jnp.float64), genome)), largest)[0]
  with artifact.edge_device():
    out["integer"] = np.asarray(jax.jit(
        lambda im: artifact.edge_forward(model, spec, im, arrays))(images)[0])
  return out


def main(argv: list[str]) -> None:
  del argv
  common.quiet_logs()
  model, variables, meta = checkpoint.load_model(_MODEL.value)
  test = data.load_split("test", dataset=meta["dataset"], data_dir=_DATA_DIR.value)
  images = test.images[:_IMAGES.value]
  genomes = [(f"split {p}, 8-bit genes", uniform_genome(model.info, int(p), 8, 8))
             for p in _SPLITS.value]
  if _GENOME.value:
    with open(_GENOME.value) as f:
      report = json.load(f)
    genomes.append((f"{_GENOME.value} (split {report['p']})", Genome.from_json(report["genome"])))
  rows = []
  for name, genome in genomes:
    codes = codes_by_arithmetic(model, variables, genome, images, meta["dataset"])
    row = {"genome": name, "codes": int(codes["float64"].size)}
    for what in ("float32", "integer"):
      diff = np.abs(codes[what] - codes["float64"])
      row[what] = {"share_differing": float(np.mean(diff > 0)), "max_difference": float(diff.max())}
    row["integer_vs_float32_share_differing"] = float(np.mean(codes["integer"] != codes["float32"]))
    rows.append(row)
    print(f"{name}: codes differing from float64: float32 {100 * row['float32']['share_differing']:.3f} %"
          f", integer {100 * row['integer']['share_differing']:.3f} % (max "
          f"{row['float32']['max_difference']:.0f} / {row['integer']['max_difference']:.0f} steps)",
          flush=True)
  if _OUT.value:
    os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
    checkpoint.write_json(_OUT.value, {"model_dir": _MODEL.value, "images": len(images),
                                       "rows": rows, "environment": runs.environment()})


if __name__ == "__main__":
  app.run(main)
