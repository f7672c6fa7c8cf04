"""Plots of a search: best fitness over iterations (Fig. 10), the searched policy (Fig. 12)."""

from __future__ import annotations

from typing import Any

import numpy as np
from matplotlib.patches import Patch

from maxpart_jax import plotting


def fitness_curve(history: list[dict[str, Any]], path: str, title: str = "") -> None:
  """Best-ever, best feasible and population-mean fitness per search step."""
  steps = [h["step"] for h in history]
  fig, ax = plotting.subplots(figsize=(6, 3.8))
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


def policy_bits(report: dict[str, Any], path: str) -> None:
  """Weight and activation bits of every edge layer of the reported genome (Fig. 12).

  Layers are named ``<block>/<layer>`` like the splits; a layer left in float (e.g. the
  stem conv) gets a hatched bar marked "float" above the 2-8 bit range.
  """
  layers = report["edge_layers"]
  float_at = 10  # where float bars end, above 8 bits
  height = lambda bits: float_at if bits > 8 else bits
  x = np.arange(len(layers))
  fig, ax = plotting.subplots(figsize=(max(6, 0.35 * len(layers) + 2), 3.8))
  handles = []
  for offset, field, label, color in ((-0.2, "w_bits", "weight bits", "C0"),
                                      (0.2, "a_bits", "activation bits", "C1")):
    bits = [layer[field] for layer in layers]
    bars = ax.bar(x + offset, [height(b) for b in bits], 0.4, color=color)
    for bar, b in zip(bars, bits):
      if b > 8:
        bar.set_hatch("//")
    handles.append(Patch(color=color, label=label))
  handles.append(Patch(facecolor="white", edgecolor="k", hatch="//", label="float (not quantized)"))
  ax.set_xticks(x, [f"{layer['block']}/{layer['layer'].split('/')[-1]}" for layer in layers],
                rotation=90, fontsize=7)
  ax.set_yticks([2, 4, 6, 8, float_at], ["2", "4", "6", "8", "float"])
  ax.set_ylabel("bits")
  ax.set_title(f"{report['model']}: searched policy of the edge, split after {report['block']} "
               f"(Fig. 12); the cloud runs in float", fontsize=9)
  ax.legend(handles=handles, fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
