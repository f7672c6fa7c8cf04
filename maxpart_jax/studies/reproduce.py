"""The paper's comparison for one model: baselines, search, Tables 2/4/5, Figs. 10-12.

docs/method.md §8 describes the experiments.

``run_reproduction(config, workdir)`` builds one evaluator (data, fine-tuning,
privacy images, energy model), runs the search in ``<workdir>/search`` (resumable),
evaluates the baselines of :mod:`maxpart_jax.studies.baselines` with the very same
evaluator, and writes ``<workdir>/report.md``, ``report.json`` and the figures.
Every stage is saved as it finishes, so a restarted run redoes nothing.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

from absl import logging
import ml_collections
import numpy as np

from maxpart_jax import checkpoint, distributed, runs
from maxpart_jax.energy import PJ_PER_MJ, DeviceConfig, edge_energy, layer_energy_pj
from maxpart_jax.genome import Genome, effective_bits, uniform_genome
from maxpart_jax.models.metadata import ModelInfo
from maxpart_jax.jobs import build, driver, settings, storage
from maxpart_jax.search.fitness import check_same_layers
from maxpart_jax.studies import baselines as baselines_lib, reporting
from maxpart_jax.jobs.pretrain import model_spec

def block_energy_mj(info: ModelInfo, genome: Genome, device: DeviceConfig) -> np.ndarray:
  """(p,) compute energy of every edge block of ``genome`` in mJ (transmission excluded)."""
  w, a, _ = effective_bits(info, genome)
  per_layer = np.asarray(layer_energy_pj(info, w, a, device)) / PJ_PER_MJ
  blocks = np.asarray(info.layer_block)
  return np.bincount(blocks, weights=per_layer, minlength=info.num_blocks)[:int(genome.p)]


def analytic_table(info: ModelInfo, device: DeviceConfig, transmission: bool,
                   searched: Genome | None = None,
                   searched_p: int | None = None) -> list[dict[str, Any]]:
  """#B, #L and energy of the baselines (and of ``searched``, if given) on ``info``.

  Needs no data: this is how the CPU-size results are restated for the paper-size
  models. The 8-bit same-split row is at ``searched_p`` (default: ``searched.p``).
  """
  if searched is not None and searched_p is None:
    searched_p = int(searched.p)
  strategies = [(b.name, b.genome(info) if b.p else None, b.p)
                for b in baselines_lib.make_baselines(info, device, transmission, searched_p)]
  if searched is not None:
    strategies.append(("searched", searched, int(searched.p)))
  rows = []
  for name, genome, p in strategies:
    both = baselines_lib.energy_both_ways(info, genome if p else None, device)
    energy = both["with_transmission_mj" if transmission else "compute_mj"]
    rows.append(dict(**baselines_lib.deployment_row(info, name, p), energy_mj=energy, **both))
  return rows


def _baselines(config, workdir, evaluator, search_report) -> list[dict[str, Any]]:
  """Baseline rows, computed once and kept in ``baselines.json``."""
  path = os.path.join(workdir, "baselines.json")
  # "rows": the version of the row format (v3: failed / collapsed candidates).
  key = {"search": storage.identity_hash(storage.search_identity(config, evaluator)),
         "searched_p": search_report["p"], "rows": 3}
  saved = None
  if distributed.is_leader() and os.path.exists(path):  # read by the leader, sent to all
    with open(path) as f:
      saved = json.load(f)
  saved = distributed.broadcast(saved)
  if saved is not None and saved["key"] == key:
    return saved["rows"]
  device = evaluator.config.device
  todo = baselines_lib.make_baselines(evaluator.energy_info, device, evaluator.config.transmission,
                                      search_report["p"])
  logging.info("evaluating the baselines: %s",
               ", ".join(f"{b.name} (p={b.p}, {b.w_bits} bit)" for b in todo))
  rows = baselines_lib.evaluate_baselines(evaluator, todo, build.load_test_split(config, evaluator))
  if distributed.is_leader():
    checkpoint.write_json(path, {"key": key, "rows": rows})
  return rows


def _searched_row(info: ModelInfo, report: dict[str, Any]) -> dict[str, Any]:
  return dict(**baselines_lib.deployment_row(info, "searched", report["p"]),
              energy_mj=report["energy_mj"], privacy=report["privacy"],
              fitness=report["fitness"], accuracy=report["val_accuracy"], eps=report["val_eps"],
              diverged=report["val_diverged"], failed=report["val_failed"],
              collapsed=report["val_collapsed"], test_accuracy=report["test_accuracy"],
              test_eps=report["test_eps"], finetuned=True)


# How the paper's qualitative words are read: "a few percent" of top-1, "several times".
FEW_PERCENT = 0.05
SEVERAL_TIMES = 2.0


def claims(rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
  """The paper's claims (Tables 4-5, Fig. 11), each as measured numbers and a verdict.

  "A few percent" is a test accuracy loss of at most ``FEW_PERCENT``; "several times
  less energy" is a ratio of at least ``SEVERAL_TIMES``.
  """
  s, fp, u8, cf, same = (rows[k] for k in ("searched", "full_precision", "uniform8", "conv_fc8",
                                           "same_split8"))
  return {
      "offloads_more_blocks_than_uniform8_and_full_precision": dict(
          searched=s["num_blocks"], uniform8=u8["num_blocks"], full_precision=fp["num_blocks"],
          holds=s["num_blocks"] > u8["num_blocks"] and s["num_blocks"] > fp["num_blocks"]),
      "more_private_than_uniform8_and_full_precision": dict(
          searched=s["privacy"], uniform8=u8["privacy"], full_precision=fp["privacy"],
          holds=s["privacy"] > u8["privacy"] and s["privacy"] > fp["privacy"]),
      "accuracy_loss_a_few_percent": dict(
          test_eps=s["test_eps"], holds=s["test_eps"] <= FEW_PERCENT),
      "less_energy_than_uniform8_at_the_same_split": dict(
          searched_mj=s["energy_mj"], uniform8_mj=same["energy_mj"],
          ratio=same["energy_mj"] / s["energy_mj"], holds=s["energy_mj"] < same["energy_mj"]),
      "several_times_less_energy_than_conv_fc8": dict(
          searched_mj=s["energy_mj"], conv_fc8_mj=cf["energy_mj"],
          ratio=cf["energy_mj"] / s["energy_mj"],
          holds=cf["energy_mj"] >= SEVERAL_TIMES * s["energy_mj"]),
      "slightly_less_private_than_conv_fc8": dict(
          searched=s["privacy"], conv_fc8=cf["privacy"],
          holds=s["privacy"] <= cf["privacy"]),
  }


def run_reproduction(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs (or resumes) the search and the baselines of ``config``; writes the report."""
  with runs.workdir_lock(workdir):
    evaluator = build.build_evaluator(config)
    search_dir = os.path.join(workdir, "search")
    search_report = driver.run_search(config, search_dir, evaluator)
    info, device = evaluator.model.info, evaluator.config.device
    rows = {r["strategy"]: r for r in _baselines(config, workdir, evaluator, search_report)}
    rows["searched"] = _searched_row(info, search_report)
    searched = Genome.from_json(search_report["genome"])
    energy_info = evaluator.energy_info
    rows["searched"].update(baselines_lib.energy_both_ways(energy_info, searched, device),
                            violations=search_report["violations"])

    same = uniform_genome(energy_info, int(searched.p), 8, 8)
    fig11 = {name: dict(blocks=block_energy_mj(energy_info, g, device).tolist(),
                        transmission_mj=float(edge_energy(energy_info, g, device,
                                                          evaluator.config.transmission)
                                              .transmission_mj))
             for name, g in (("uniform8", same), ("searched", searched))}
    paper_info = settings.info_from_spec(config.paper_model.to_dict())
    try:
      check_same_layers(info, paper_info)
      paper_searched = searched
    except ValueError:  # e.g. a shallower CPU-size ResNet50: only the baselines transfer
      paper_searched = None
    report = {
        "model": search_report["model"],
        "energy_model": (config.energy_model.to_dict() if config.energy_model.get("name")
                         else model_spec(config.pretrain)),
        "dataset": search_report["dataset"],
        "budget_mj": device.budget_mj, "eps_bound": config.fitness.eps_bound,
        "transmission": evaluator.config.transmission,
        "float_test_accuracy": search_report["float_test_accuracy"],
        "float_val_accuracy": search_report["float_val_accuracy"],
        "finetune_steps": evaluator.steps,
        "strategies": rows, "claims": claims(rows), "fig11": fig11,
        "blocks": [b.label for b in energy_info.blocks],
        "paper_model": config.paper_model.to_dict(),
        # The baselines move with the convention (what fits E_b), so both are tabulated.
        "paper_size_energy": analytic_table(paper_info, device, evaluator.config.transmission,
                                            paper_searched),
        "paper_size_energy_other_convention": analytic_table(
            paper_info, device, not evaluator.config.transmission, paper_searched),
        "search": {k: search_report[k] for k in (
            "search_seconds", "evaluations", "lookups", "cache_hit_rate", "steps",
            "tournaments_per_step", "devices", "phase_seconds", "p", "block", "edge_layers",
            "ir_bits", "genome")},
        "search_settings": config.search.to_dict(), "environment": runs.environment(),
    }
    report["search"]["seconds_per_evaluation"] = (
        report["search"]["search_seconds"] / max(report["search"]["evaluations"], 1))
    if distributed.is_leader():  # the others computed the same report
      _write_report(report, workdir, search_dir)
    return report


def _write_report(report: dict[str, Any], workdir: str, search_dir: str) -> None:
  """``report.json``, ``report.md`` and the figures."""
  checkpoint.write_json(os.path.join(workdir, "report.json"), report)
  with open(os.path.join(workdir, "report.md"), "w") as f:
    f.write(reporting.markdown(report))
  for src, dst in (("fitness.png", "fig10_fitness.png"), ("policy.png", "fig12_policy.png")):
    shutil.copyfile(os.path.join(search_dir, src), os.path.join(workdir, dst))
  reporting.energy_at_split(report, os.path.join(workdir, "fig11_energy.png"))
  reporting.strategies(report, os.path.join(workdir, "table4_strategies.png"))
  logging.info("report written to %s", os.path.join(workdir, "report.md"))
