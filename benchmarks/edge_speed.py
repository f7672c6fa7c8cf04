r"""Speed of the integer edge program: this version against an earlier one, in one run.

  .venv/bin/python -m benchmarks.edge_speed --json=results/deploy/edge_speed.json

Exports the same split with each version of the package (this checkout, and
``--baseline_commit`` unpacked from git: the version before requantization was made exact)
and times the edge program on the same random uint8 images, each version in its own
process, alternating ``--rounds`` times; reports the best images/s of each and their ratio.
The split is the quick search's genome (``--genome``) on the shipped ResNet18 ×0.25
(``--model_dir``), so no dataset is needed.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile

from absl import app, flags

from maxpart_jax import runs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_BASELINE = flags.DEFINE_string("baseline_commit", "28301ae", "the earlier version")
_MODEL = flags.DEFINE_string("model_dir", "pretrained/cpu_resnet18/model", "pre-trained model")
_GENOME = flags.DEFINE_string("genome", "results/search_quick/best.json", "a best.json")
_IMAGES = flags.DEFINE_integer("images", 2000, "images per pass")
_BATCH = flags.DEFINE_integer("batch_size", 500, "images per call of the edge program")
_PASSES = flags.DEFINE_integer("passes", 3, "timed passes per process (the best counts)")
_ROUNDS = flags.DEFINE_integer("rounds", 2, "processes per version, alternating")
_JSON = flags.DEFINE_string("json", None, "write the results here")

# Runs in a child process whose PYTHONPATH puts one version's maxpart_jax first.
_WORKER = r"""
import json, sys, time
import numpy as np
from maxpart_jax import checkpoint
from maxpart_jax.deploy import artifact
from maxpart_jax.genome import Genome
model_dir, genome_file, out, images, batch, passes = sys.argv[1:7]
images, batch, passes = int(images), int(batch), int(passes)
model, variables, meta = checkpoint.load_model(model_dir)
with open(genome_file) as f:
  genome = Genome.from_json(json.load(f)["genome"])
edge, _ = artifact.export_split(model, variables, genome, meta["model"], out)
x = np.random.default_rng(0).integers(0, 256, (images, 32, 32, 3), dtype=np.uint8)
edge.ir(x[:batch])  # compiles
best = 0.0
for _ in range(passes):
  start = time.perf_counter()
  for i in range(0, images, batch):
    edge.ir(x[i:i + batch])
  best = max(best, images / (time.perf_counter() - start))
print(json.dumps({"images_per_second": best}))
"""


def _measure(tree: str, out: str) -> float:
  result = subprocess.run(
      [sys.executable, "-c", _WORKER, os.path.join(REPO, _MODEL.value),
       os.path.join(REPO, _GENOME.value), out, str(_IMAGES.value), str(_BATCH.value),
       str(_PASSES.value)],
      env={**os.environ, "PYTHONPATH": tree}, cwd=tree, capture_output=True, text=True,
      check=False)
  if result.returncode:
    raise RuntimeError(f"the edge program of {tree} failed:\n{result.stderr[-3000:]}")
  return json.loads(result.stdout.strip().splitlines()[-1])["images_per_second"]


def main(argv: list[str]) -> None:
  del argv
  with tempfile.TemporaryDirectory() as tmp:
    baseline = os.path.join(tmp, "baseline")
    archive = subprocess.run(["git", "archive", _BASELINE.value, "maxpart_jax"], cwd=REPO,
                             capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
      tar.extractall(baseline, filter="data")
    speeds: dict[str, list[float]] = {"this version": [], _BASELINE.value: []}
    for r in range(_ROUNDS.value):
      for name, tree in (("this version", REPO), (_BASELINE.value, baseline)):
        speeds[name].append(_measure(tree, os.path.join(tmp, f"{r}-{len(speeds[name])}")))
        print(f"{name}: {speeds[name][-1]:.1f} images/s", flush=True)
  best = {name: max(v) for name, v in speeds.items()}
  result = {"images": _IMAGES.value, "batch_size": _BATCH.value, "genome": _GENOME.value,
            "images_per_second": speeds, "best": best,
            "ratio_this_over_baseline": best["this version"] / best[_BASELINE.value],
            "environment": runs.environment()}
  print(f"edge program: {best['this version']:.0f} images/s, {_BASELINE.value}: "
        f"{best[_BASELINE.value]:.0f} images/s (ratio {result['ratio_this_over_baseline']:.2f})")
  if _JSON.value:
    os.makedirs(os.path.dirname(os.path.abspath(_JSON.value)), exist_ok=True)
    with open(_JSON.value, "w") as f:
      json.dump(result, f, indent=1)


if __name__ == "__main__":
  app.run(main)
