r"""Puts the reports of several reproductions side by side.

  python -m experiments.reproduction_summary --out=results/reproduction/summary.md \
      results/reproduction/cpu_resnet18 results/reproduction/cpu_resnet50 results/reproduction/cpu_mobilenet

Each positional argument is a directory holding a ``report.json`` written by
``experiments/reproduce.py``.
"""

import json
import os

from absl import app, flags

from maxpart_jax.studies.reporting import summary_markdown

_OUT = flags.DEFINE_string("out", None, "where the markdown goes (default: print it)")


def main(argv: list[str]) -> None:
  if len(argv) < 2:
    raise app.UsageError("give one or more report directories")
  reports = []
  for directory in argv[1:]:
    path = os.path.join(directory, "report.json")
    if not os.path.exists(path):
      raise app.UsageError(f"{path} does not exist: run experiments.reproduce first")
    with open(path) as f:
      reports.append(json.load(f))
  text = summary_markdown(reports)
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      f.write(text)
  print(text)


if __name__ == "__main__":
  app.run(main)
