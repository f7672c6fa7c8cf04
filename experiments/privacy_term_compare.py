r"""The best genomes of searches made with different privacy terms, each measured by every term.

  python -m experiments.privacy_term_compare --config=experiments/configs/search.py:quick \
      --searches=results/search_quick,results/search_quick_attack \
      --metrics=mse,attack_ssim --out=results/search_attack

A search that maximises the paper's score P (``fitness.metric="mse"``) and one that maximises
an attack's failure (``attack_ssim``: 1 − SSIM of a learned decoder's reconstructions) may
choose different splits and bit widths. This fine-tunes and evaluates the best genome of
every search in ``--searches`` (folders with a ``best.json``) under every term in
``--metrics``, with ``--config`` otherwise unchanged, exactly as the search evaluates a
candidate: privacy, fitness, energy, ε and test accuracy. A genome measured by the term its
own search used gets the value its search reported. Writes ``compare.json`` and
``compare.md`` to ``--out``.
"""

from __future__ import annotations

import os

from absl import app, flags, logging

from experiments import common
from maxpart_jax import checkpoint, runs
from maxpart_jax.jobs.privacy_terms import compare, markdown

_CONFIG = common.define_config("experiments/configs/search.py:quick", "search config and variant")
_SEARCHES = flags.DEFINE_list("searches", ["results/search_quick", "results/search_quick_attack"],
                              "folders of finished searches (best.json, config.json)")
_METRICS = flags.DEFINE_list("metrics", ["mse", "attack_ssim"], "privacy terms to measure by")
_OUT = flags.DEFINE_string("out", "results/search_attack", "where compare.json / .md go")


def main(argv: list[str]) -> None:
  del argv
  common.quiet_logs()
  rows = compare(_CONFIG.value, _SEARCHES.value, _METRICS.value)
  os.makedirs(_OUT.value, exist_ok=True)
  checkpoint.write_json(os.path.join(_OUT.value, "compare.json"), {"rows": rows, "environment": runs.environment()})
  with open(os.path.join(_OUT.value, "compare.md"), "w") as f:
    f.write(markdown(rows))
  print(markdown(rows))
  logging.info("wrote %s", _OUT.value)


if __name__ == "__main__":
  app.run(main, flags_parser=common.parse_flags)
