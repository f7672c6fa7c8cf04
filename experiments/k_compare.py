"""Shared by the K studies: per-K summaries, the test between two K, and the plot."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from scipy import stats


def summarize(k: int, out: dict[str, np.ndarray]) -> dict[str, object]:
  """Per-seed final best, best feasible and children-to-best of one K.

  ``out``: ``best`` and ``best_feasible`` (seeds, steps + 1) after every step, and
  ``children`` (steps + 1,) evaluated by then.
  """
  best = out["best"]
  final = best[:, -1]
  first = np.argmax(best >= final[:, None], axis=1)  # first step at the final best
  to_best = out["children"][first]
  return {"k": k, "final_best": final.tolist(),
          "final_best_feasible": out["best_feasible"][:, -1].tolist(),
          "children_to_best": to_best.tolist(),
          "median_final_best": float(np.median(final)), "mean_final_best": float(np.mean(final)),
          "median_children_to_best": float(np.median(to_best))}


def compare(rows: list[dict[str, object]]) -> dict[str, float]:
  """Mann-Whitney U p-values between two K: are their final best fitnesses, and their
  children needed to reach it, from one distribution?"""
  out = {}
  for name in ("final_best", "children_to_best"):
    a, b = (np.asarray(r[name]) for r in rows)
    out[f"mann_whitney_p_{name}"] = float(stats.mannwhitneyu(a, b).pvalue)
  return out


def plot(outs: dict[int, dict[str, np.ndarray]], path: str, title: str) -> None:
  """Median and quartiles of the best fitness against children evaluated, one band per K."""
  fig, ax = plt.subplots(figsize=(6, 3.8))
  for k, out in outs.items():
    q = np.percentile(out["best"], [25, 50, 75], axis=0)
    line, = ax.plot(out["children"], q[1], label=f"K = {k} (median, quartiles)")
    ax.fill_between(out["children"], q[0], q[2], color=line.get_color(), alpha=0.2)
  ax.set_xlabel("children evaluated"), ax.set_ylabel("best fitness so far"), ax.legend()
  ax.set_title(title)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def report(rows: list[dict[str, object]], tests: dict[str, float]) -> str:
  """The summary lines both studies print."""
  lines = [f"K={r['k']}: final best median {r['median_final_best']:.4f} (mean "
           f"{r['mean_final_best']:.4f}), children to best median "
           f"{r['median_children_to_best']:.0f}" for r in rows]
  if tests:
    lines.append(f"Mann-Whitney p: final best {tests['mann_whitney_p_final_best']:.3f}, "
                 f"children to best {tests['mann_whitney_p_children_to_best']:.3f}")
  return "\n".join(lines)
