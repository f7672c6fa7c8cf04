"""Plots of a search: best fitness over iterations (Fig. 10), the searched policy (Fig. 12)."""

from __future__ import annotations

from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from maxpart_jax.models.metadata import ModelInfo


def fitness_curve(history: list[dict[str, Any]], path: str, title: str = "") -> None:
  """Best-ever, best feasible and population-mean fitness per search step."""
  steps = [h["step"] for h in history]
  fig, ax = plt.subplots(figsize=(6, 3.8))
  ax.plot(steps, [h["best_fitness"] for h in history], "-", label="best so far")
  feasible = [(s, h.get("best_feasible_fitness")) for s, h in zip(steps, history)]
  feasible = [(s, f) for s, f in feasible if f is not None]
  if feasible:
    ax.plot(*zip(*feasible), "--", label="best feasible so far (E < E_b, ε < ε_b)")
  ax.plot(steps, [h["mean_fitness"] for h in history], "-", alpha=0.6, label="population mean")
  ax.set_xlabel("search step"), ax.set_ylabel("fitness F"), ax.legend()
  ax.set_title(title)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def policy_bits(info: ModelInfo, report: dict[str, Any], path: str) -> None:
  """Weight and activation bits of every layer of the best genome, split marked."""
  w, a = np.asarray(report["w_bits"]), np.asarray(report["a_bits"])
  layers = np.arange(info.num_layers)
  edge = info.layer_block < report["p"]
  fig, ax = plt.subplots(figsize=(max(6, 0.3 * info.num_layers), 3.8))
  ax.bar(layers - 0.2, np.where(edge, w, 0), 0.4, label="weight bits (edge)")
  ax.bar(layers + 0.2, np.where(edge, a, 0), 0.4, label="activation bits (edge)")
  last_edge = int(np.flatnonzero(edge).max())
  ax.axvline(last_edge + 0.5, color="k", ls="--", label=f"split after {report['block']}")
  ax.set_xticks(layers, [l.name.replace("blocks_", "b") for l in info.layers], rotation=90,
                fontsize=7)
  ax.set_ylabel("bits (32 = float)"), ax.set_yticks([0, 2, 4, 6, 8, 16, 32])
  ax.set_title(f"{report['model']}: searched policy (Fig. 12); cloud layers run in float")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
