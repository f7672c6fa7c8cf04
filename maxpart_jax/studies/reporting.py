"""The reproduction report as markdown and figures (paper Tables 2/4/5, Fig. 11).

Everything here reads the ``report.json`` dictionary that
:func:`maxpart_jax.studies.reproduce.run_reproduction` writes, so a report can be redrawn
without rerunning anything.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from maxpart_jax import plotting

NAMES = {"full_precision": "Full precision", "uniform8": "8-bit uniform",
         "conv_fc8": "8-bit conv/fc", "same_split8": "8-bit uniform, same split",
         "searched": "Searched (mixed precision)"}


def _table(header: list[str], rows: list[list[Any]]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return "\n".join(lines)


def _pct(x: float) -> str:
  return f"{100 * x:.2f} %"


def markdown(report: dict[str, Any]) -> str:
  """The whole report: settings, Tables 4, 5 and 2, the claims, paper-size energies."""
  s, search = report["strategies"], report["search"]
  budget = report["budget_mj"]
  out = [
      f"# {report['model']} on {report['dataset']}: searched partition vs baselines",
      "",
      f"Energy budget E_b = {budget} mJ (energy of the `{_spec(report['energy_model'])}` "
      f"architecture, {convention(report['transmission'])}), accuracy-loss bound "
      f"ε_b = {report['eps_bound']}, {report['finetune_steps']} fine-tuning steps per quantized "
      f"deployment. Float model: {_pct(report['float_test_accuracy'])} test top-1. "
      "#B: blocks on the edge; #L: weight layers on the edge; #B'/#L': the same without the "
      "stem, as the paper counts. Energy: the convention of this run; the other column is the "
      "same deployment in the other convention. Eq. 4: the constraints E < E_b and "
      "ε < ε_b (validation), or what the row breaks. Privacy: mean P of the IR sent (higher "
      "is more private). Accuracy: test top-1 after fine-tuning.",
      "",
      "## Table 4: strategies under E_b",
      "",
      strategy_table([s[k] for k in ("full_precision", "uniform8", "searched")],
                     report["transmission"]),
      "",
      "## Fig. 11: energy at the searched split",
      "",
      _table(["strategy", "split", "energy (mJ)", "privacy", "top-1"],
             [[NAMES[k], s[k]["block"], f"{s[k]['energy_mj']:.4f}", f"{s[k]['privacy']:.4f}",
               _pct(s[k]["test_accuracy"])] for k in ("same_split8", "searched")]),
      "",
      "![energy at the same split](fig11_energy.png)",
      "",
      "## Table 5: searched vs 8-bit conv/fc",
      "",
      strategy_table([s[k] for k in ("conv_fc8", "searched")], report["transmission"]),
      "",
      "## Table 2: search cost",
      "",
      _table(["wall time", "evaluations", "lookups", "cache hit rate", "steps × K", "devices",
              "s / evaluation"],
             [[f"{search['search_seconds'] / 60:.1f} min", search["evaluations"], search["lookups"],
               f"{search['cache_hit_rate']:.2f}",
               f"{search['steps']} × {search['tournaments_per_step']}", search["devices"],
               f"{search['seconds_per_evaluation']:.1f}"]]),
      "",
      f"Searched policy: split after {search['block']} (p = {search['p']}), IR at "
      f"{search['ir_bits']} bits; per-layer bits in `fig12_policy.png`, best fitness over the "
      "search in `fig10_fitness.png`.",
      "",
      "## The paper's claims, measured",
      "",
      _table(["claim", "measured", "holds"],
             [[name.replace("_", " "), ", ".join(f"{k} {_fmt(v)}" for k, v in c.items()
                                                  if k != "holds"), "yes" if c["holds"] else "no"]
              for name, c in report["claims"].items()]),
      "",
      f"## Analytic energy on the paper-size model ({_spec(report['paper_model'])}, E_b = {budget} mJ)",
      "",
      "The baselines are the deepest splits that fit E_b, so they depend on whether sending "
      "the IR counts; both conventions are shown.",
      "",
  ]
  for transmission, key in ((report["transmission"], "paper_size_energy"),
                            (not report["transmission"], "paper_size_energy_other_convention")):
    words = convention(transmission)
    out += [f"### {words[0].upper()}{words[1:]}", "",
            strategy_table(report[key], transmission, budget), ""]
  return "\n".join(out)


def convention(transmission: bool) -> str:
  """The energy convention in words."""
  return ("sending the IR included" if transmission else
          "computation only, the convention of the paper's Table 5")


def _energies(row: dict[str, Any], transmission: bool) -> tuple[float, float]:
  """(this convention, the other) energy of a row in mJ."""
  mine, other = "with_transmission_mj", "compute_mj"
  if not transmission:
    mine, other = other, mine
  return row[mine], row[other]


def strategy_table(rows: list[dict[str, Any]], transmission: bool,
                   budget_mj: float | None = None) -> str:
  """Strategy rows as a table (Tables 4, 5): counts both ways, energy in both conventions.

  Measured rows (with privacy) show what they break of Eq. 4; analytic rows only whether
  they fit ``budget_mj``.
  """
  measured = "privacy" in rows[0]
  other = "compute only" if transmission else "with transmission"
  header = ["strategy", "split", "#B", "#L", "#B'", "#L'", "energy (mJ)", f"{other} (mJ)"]
  header += ["Eq. 4", "privacy", "top-1", "loss"] if measured else ["within E_b"]
  body = []
  for r in rows:
    energy, energy_other = _energies(r, transmission)
    row = [NAMES[r["strategy"]], r["block"], r["num_blocks"], r["num_layers"],
           r["blocks_after_stem"], r["layers_after_stem"], f"{energy:.4f}", f"{energy_other:.4f}"]
    if measured:
      row += ["; ".join(r["violations"]) or "met", f"{r['privacy']:.4f}",
              _pct(r["test_accuracy"]), _pct(r["test_eps"])]
    else:
      row += ["yes" if energy < budget_mj else "no"]
    body.append(row)
  return _table(header, body)


def _fmt(v: Any) -> str:
  return f"{v:.4f}" if isinstance(v, float) else str(v)


def _spec(spec: dict[str, Any]) -> str:
  return spec["name"] + "".join(f", {k}={v}" for k, v in spec.items() if k != "name")


def energy_at_split(report: dict[str, Any], path: str) -> None:
  """Fig. 11: edge energy per block of 8-bit uniform vs the searched policy, same split."""
  fig11 = report["fig11"]
  p = len(fig11["searched"]["blocks"])
  labels = report["blocks"][:p] + ["transmit"]
  x = np.arange(p + 1)
  fig, ax = plotting.subplots(figsize=(max(6, 0.55 * (p + 1)), 3.8))
  for offset, (key, name) in zip((-0.2, 0.2), (("uniform8", "8-bit uniform"),
                                               ("searched", "searched"))):
    values = fig11[key]["blocks"] + [fig11[key]["transmission_mj"]]
    ax.bar(x + offset, values, 0.4, label=f"{name}: {sum(values):.4f} mJ")
  ax.set_xticks(x, labels, rotation=60, fontsize=8)
  ax.set_ylabel("energy (mJ)")
  ax.set_title(f"{report['model']}: edge energy at the searched split (Fig. 11)")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def strategies(report: dict[str, Any], path: str) -> None:
  """Table 4 at a glance: blocks offloaded, privacy and accuracy of every strategy."""
  keys = ["full_precision", "uniform8", "conv_fc8", "searched"]
  s = report["strategies"]
  fig, axes = plotting.subplots(1, 3, figsize=(11, 3.4))
  for ax, (field, title) in zip(axes, (("num_blocks", "#B (blocks on edge)"),
                                       ("privacy", "privacy P"), ("test_accuracy", "test top-1"))):
    ax.bar(range(len(keys)), [s[k][field] for k in keys],
           color=["C0", "C1", "C2", "C3"])
    ax.set_xticks(range(len(keys)), [NAMES[k].split(" (")[0] for k in keys], rotation=30,
                  fontsize=8, ha="right")
    ax.set_title(title, fontsize=10)
  energy_ok = ", ".join(f"{NAMES[k].split(' (')[0]} {s[k]['energy_mj']:.3f}" for k in keys)
  fig.suptitle(f"{report['model']}, E_b = {report['budget_mj']} mJ; energy (mJ): {energy_ok}",
               fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def summary_markdown(reports: list[dict[str, Any]]) -> str:
  """Several models' reports side by side: Table 4/5 rows and the claim verdicts."""
  rows = []
  for r in reports:
    for key in ("full_precision", "uniform8", "conv_fc8", "same_split8", "searched"):
      s = r["strategies"][key]
      rows.append([r["model"], NAMES[key], s["block"], s["num_blocks"], s["num_layers"],
                   s["blocks_after_stem"], s["layers_after_stem"], f"{s['compute_mj']:.4f}",
                   f"{s['with_transmission_mj']:.4f}", "; ".join(s["violations"]) or "met",
                   f"{s['privacy']:.4f}", _pct(s["test_accuracy"]), _pct(s["test_eps"])])
  conventions = sorted({convention(r["transmission"]) for r in reports})
  claims = list(reports[0]["claims"]) if reports else []
  verdicts = [[name.replace("_", " ")] + ["yes" if r["claims"][name]["holds"] else "no"
                                          for r in reports] for name in claims]
  cost = [[r["model"], f"{r['search']['search_seconds'] / 60:.1f} min", r["search"]["evaluations"],
           f"{r['search']['cache_hit_rate']:.2f}", r["finetune_steps"],
           f"{r['search']['seconds_per_evaluation']:.1f}"] for r in reports]
  return "\n".join([
      "## All strategies", "",
      f"Searched and baselines chosen with the energy convention: {', '.join(conventions)}. "
      "Energy in mJ, computation only (the paper's Table 5) and with sending the IR. "
      "#B'/#L': blocks and weight layers on the edge after the stem, as the paper counts. "
      "Eq. 4: E < E_b and ε < ε_b, or what the row breaks. Top-1 on the test set after "
      "fine-tuning.", "",
      _table(["model", "strategy", "split", "#B", "#L", "#B'", "#L'", "compute", "with IR",
              "Eq. 4", "privacy", "top-1", "loss"], rows), "",
      "## The paper's claims", "",
      _table(["claim"] + [r["model"] for r in reports], verdicts), "",
      "## Search cost (Table 2)", "",
      _table(["model", "wall time", "evaluations", "cache hit rate", "fine-tuning steps",
              "s / evaluation"], cost), ""])
