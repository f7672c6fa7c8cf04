"""A defended search: the search with a defense stack, then an attack on its finalists.

With ``config.defense.stack`` set (``"bottleneck:32,adversarial:40"``), a search runs in two
stages (docs/method.md §14):

1. **The search** (:func:`maxpart_jax.jobs.driver.run_search`) with the stack's device
   layers and message in every candidate's energy and latency
   (:func:`maxpart_jax.privacy.defenses.population_costs`): a bottleneck that sends fewer
   channels makes deeper splits affordable. Candidates are fine-tuned and scored as in an
   undefended search (ε, P); the stack's strengths are config choices, not genes: fine-tuning
   a defense costs minutes, a search candidate seconds. A split whose best genomes only
   break the energy budget gets its best one :func:`repair`-ed (weight bits lowered) and
   evaluated like a candidate.
2. **The finalists**: the best feasible genome of each of the ``defense.finalists``
   deepest splits (or best by fitness: ``defense.order``; :func:`finalists`) is fine-tuned with the stack (:func:`maxpart_jax.privacy.defended.finetune`) and
   attacked by an adaptive decoder trained from scratch on the defended messages of
   ``defense.attack.images`` validation images, and by the white-box attack through the
   defended edge. No cheap proxy predicted the adaptive attack well enough
   (``results/defenses/``: Spearman ρ −0.83 at best, the bar is −0.9), so the privacy
   that picks the answer is the attack's: ``1 − max(decoder SSIM, white-box SSIM)`` on
   ``defense.victims`` training images held out of the defended fine-tuning. The answer is
   the most private finalist whose validation accuracy loss (the search's ε, same images)
   and defended energy meet the bounds. Its test numbers (top-1 on the test split, both
   attacks on test victims) are reported, never used to choose.

Finalists are stored as they finish (``<workdir>/defended/``): a rerun resumes, and refuses
a workdir whose search or defense settings changed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import serialization

from maxpart_jax import checkpoint, data, runs, train
from maxpart_jax.genome import Genome
from maxpart_jax.jobs.build import build_evaluator, load_test_split
from maxpart_jax.jobs.caching import METRICS, effective_key
from maxpart_jax.jobs.driver import run_search
from maxpart_jax.jobs.rows import load_rows, save_rows
from maxpart_jax.jobs.settings import (
  attacker_from_config,
  finetune_from_config,
  stack_from_config,
  validate_config,
)
from maxpart_jax.jobs.storage import load_evaluations, search_identity
from maxpart_jax.models.metadata import ModelInfo
from maxpart_jax.privacy import attacks, defended, defenses
from maxpart_jax.privacy.plots import reconstruction_grid
from maxpart_jax.search.fitness import Evaluator, FitnessConfig, violations

STAGE_DIR = "defended"
REPORT_FILE = "defended.json"
GRID_FILE = "defended_grid.png"


def run_defended_search(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs (or resumes) both stages; returns the stage-2 report (also ``defended.json``)."""
  validate_config(config)
  if not stack_from_config(config).items:
    raise ValueError("config.defense.stack is empty: run_search is the undefended search")
  if jax.process_count() > 1:
    raise ValueError("a defended search runs in one process: its finalists are fine-tuned "
                     "on one process's devices")
  evaluator = build_evaluator(config)
  search_report = run_search(config, workdir, evaluator)
  with runs.workdir_lock(workdir):
    return _finalists_stage(config, workdir, evaluator, search_report)


FINALIST_ORDERS = ("depth", "fitness")


def finalists(evaluations: list[dict[str, Any]], config: FitnessConfig, n: int,
              order: str = "depth") -> list[dict[str, Any]]:
  """The best feasible evaluation (by fitness, the first evaluated on a tie) of each of
  ``n`` splits: the deepest splits (``order="depth"``) or those whose best genome has the
  highest fitness (``"fitness"``), in that order.

  **Decision**: depth by default. In ``results/defenses/`` every defense measured at two
  or three splits was decoded worse by the adaptive decoder at the deeper split, while the
  search's privacy term P ranks some deeper splits lower (split 7 over split 8 at the quick
  model's 4-bit genomes) and predicts the attack poorly (ρ −0.65).
  """
  if order not in FINALIST_ORDERS:
    raise ValueError(f"unknown finalist order {order!r}; choose from {FINALIST_ORDERS}")
  feasible = [e for e in evaluations if _feasible(e, config)]
  best: dict[int, dict[str, Any]] = {}
  for entry in sorted(feasible, key=lambda e: -e["fitness"]):  # stable: first evaluated wins
    best.setdefault(int(entry["genome"]["p"]), entry)
  ranked = list(best.values())
  if order == "depth":
    ranked.sort(key=lambda e: -int(e["genome"]["p"]))
  return ranked[:n]


def _feasible(entry: dict[str, Any], config: FitnessConfig) -> bool:
  """Whether a stored evaluation meets the bounds (an energy stored as null is infinite: the
  stack cannot run at that split)."""
  return entry["energy_mj"] is not None and not violations(entry, config)


def repair(info: ModelInfo, genome: Genome, w_choices: list[int],
           energy: Callable[[Genome], np.ndarray], budget_mj: float) -> Genome | None:
  """``genome`` with weight bits lowered until its energy is below ``budget_mj``, or None
  if even the lowest bits do not fit.

  Greedy: each step lowers one edge layer's weights to the next smaller choice, the one
  that saves the most energy (the first such layer on a tie). ``energy`` maps stacked
  genomes (K, ...) to (K,) energies in mJ.
  """
  choices = sorted(int(c) for c in w_choices)
  layers = [l.id for l in info.layers if l.quantizable and l.block < int(genome.p)]
  current = float(energy(jax.tree.map(lambda x: x[None], genome))[0])
  while current >= budget_mj:
    moves = []
    for layer in layers:
      lower = [c for c in choices if c < int(genome.w_bits[layer])]
      if lower:
        moves.append(genome.replace(w_bits=genome.w_bits.at[layer].set(lower[-1])))
    if not moves:
      return None
    costs = energy(jax.tree.map(lambda *x: jnp.stack(x), *moves))
    best = int(np.argmin(costs))
    genome, current = moves[best], float(costs[best])
  return genome


REPAIRED_FILE = "repaired.json"


def _repaired(evaluations: list[dict[str, Any]], evaluator: Evaluator,
              config: ml_collections.ConfigDict, folder: str) -> list[dict[str, Any]]:
  """For every split where the search found no feasible genome but some that only break
  the energy budget: the best of those by fitness, :func:`repair`-ed and evaluated as a
  search candidate (stored in ``folder``: a rerun does not evaluate it again).

  **Decision**: the fitness punishes energy mildly (λ₁^(E/E_b − 1): 7 % at 3 % over the
  budget), so a short search ends with its deepest splits' best genomes just over the
  budget; lowering their most expensive layers' bits is the cheapest way onto the feasible
  set, and ε then says whether accuracy survived.
  """
  path = os.path.join(folder, REPAIRED_FILE)
  stored = {}
  if os.path.exists(path):
    with open(path) as f:
      stored = {e["key"]: e for e in json.load(f)}
  f_config = evaluator.config
  feasible_splits = {int(e["genome"]["p"]) for e in evaluations if _feasible(e, f_config)}
  over: dict[int, dict[str, Any]] = {}
  for e in sorted(evaluations, key=lambda e: -e["fitness"]):
    p = int(e["genome"]["p"])
    only_energy = e["energy_mj"] is not None and not violations({**e, "energy_mj": 0.0}, f_config)
    if p not in feasible_splits and only_energy:
      over.setdefault(p, e)
  info, known = evaluator.model.info, {e["key"] for e in evaluations}
  energy = lambda g: evaluator.costs(g)[0]
  out, todo = [], []
  for p, e in sorted(over.items()):
    genome = repair(info, Genome.from_json(e["genome"]), list(config.search.w_bits), energy,
                    config.fitness.budget_mj)
    if genome is None:
      continue
    key = effective_key(info, genome)
    if key in stored:
      out.append(stored[key])
    elif key not in known:
      todo.append((key, genome, e["key"]))
  if todo:
    logging.info("repairing %d split(s) whose best genomes break only the energy budget: %s",
                 len(todo), [int(g.p) for _, g, _ in todo])
    metrics = evaluator.evaluate(jax.tree.map(lambda *x: jnp.stack(x), *[g for _, g, _ in todo]))
    for i, (key, genome, origin) in enumerate(todo):
      entry = {"key": key, **{m: float(metrics[m][i]) for m in METRICS},
               "genome": jax.device_get(genome).to_json(), "repaired_from": origin}
      entry["violations"] = violations(entry, f_config)
      stored[key] = entry
      out.append(entry)
    os.makedirs(folder, exist_ok=True)
    checkpoint.write_json(path, list(stored.values()))
  return out


def _image_sets(config: ml_collections.ConfigDict, evaluator: Evaluator) -> dict[str, Any]:
  """Stage 2's images: the fine-tuning split without the selection victims, the attacker's
  validation images, the selection victims (training images), the test split and its
  victims, and the sample the defenses start from."""
  kw = dict(dataset=evaluator.train.dataset, data_dir=config.data_dir or None,
            val_fraction=config.pretrain.val_fraction, seed=config.pretrain.data_seed)
  val = data.load_split("val", **kw)
  test = load_test_split(config, evaluator)
  c = config.defense
  train_split = evaluator.train
  if c.attack.images > len(val) or c.victims > min(len(test), len(train_split) // 2):
    raise ValueError(f"defense.attack.images={c.attack.images} (at most the {len(val)} "
                     f"validation images) or defense.victims={c.victims} is too large")
  rng = np.random.default_rng(config.search.seed + 2)
  order = rng.permutation(len(train_split))
  held, kept = np.sort(order[:c.victims]), np.sort(order[c.victims:])
  subset = lambda idx: dataclasses.replace(train_split, images=train_split.images[idx],
                                           labels=train_split.labels[idx])
  return {
      "train": subset(kept),
      "victims": subset(held).float_images(),
      "aux": val.take(c.attack.images, seed=config.search.seed + 3).float_images(),
      "test": test,
      "test_victims": test.take(c.victims, seed=config.search.seed + 4).float_images(),
      "init": subset(kept[:c.init_images]).float_images(),
  }


def _identity(config: ml_collections.ConfigDict, evaluator: Evaluator, sets: dict[str, Any]
              ) -> dict[str, Any]:
  """What the finalists depend on: the search's identity, the defense settings, the images."""
  identity = dict(search_identity(config, evaluator))
  identity.update(runs.flatten({"defense": {k: v for k, v in config.defense.to_dict().items()
                                            if k not in ("finalists", "order", "grid_images")}}))
  for what in ("victims", "aux", "test_victims", "init"):
    identity[f"stage2.{what}_sha256"] = hashlib.sha256(sets[what].tobytes()).hexdigest()
  return identity


def _finalists_stage(config: ml_collections.ConfigDict, workdir: str, evaluator: Evaluator,
                     search_report: dict[str, Any]) -> dict[str, Any]:
  stack = stack_from_config(config)
  ft = finetune_from_config(config)
  decoder_config, whitebox_config = attacker_from_config(config)
  sets = _image_sets(config, evaluator)
  folder = os.path.join(workdir, STAGE_DIR)
  state = load_rows(folder, _identity(config, evaluator, sets), "defended search")
  evaluations = load_evaluations(workdir)
  evaluations += _repaired(evaluations, evaluator, config, folder)
  chosen = finalists(evaluations, evaluator.config, config.defense.finalists,
                     config.defense.order)
  if not chosen:
    raise ValueError(f"no feasible genome among the search's {len(evaluations)} evaluations: "
                     "nothing to defend (raise search.iterations or fitness.budget_mj)")
  float_test = evaluator.float_accuracy_on(sets["test"])
  # the model as stored (the evaluator's may compute in bfloat16 on an accelerator)
  model, _, _ = checkpoint.load_model(config.model_dir)
  done = {r["key"] for r in state["rows"]}
  progress = train.Progress(len(chosen), every=1, name="defended finalist", unit="finalist")
  for i, entry in enumerate(chosen):
    key = entry["key"]
    if key not in done:
      row, recon = _measure(config, evaluator, model, stack, ft, decoder_config,
                            whitebox_config, sets, entry, float_test, folder)
      state["rows"].append({"key": key, **row})
      state["recon"].update({f"{k}|{key}": v for k, v in recon.items()})
      save_rows(folder, state)
      logging.info("finalist p=%d: val ε %.4f, energy %.4f mJ, decoder SSIM %.3f, white-box "
                   "SSIM %.3f (selection victims)", row["p"], row["val_eps"], row["energy_mj"],
                   row["selection"]["decoder_ssim"], row["selection"]["whitebox_ssim"])
    progress(i + 1)
  wanted = [e["key"] for e in chosen]
  rows = sorted((r for r in state["rows"] if r["key"] in wanted),
                key=lambda r: wanted.index(r["key"]))
  answer = choose_answer(rows)
  report = {
      "stack": stack.spec(), "feasible": answer is not None,
      "answer": answer, "finalists": rows,
      "budget_mj": config.fitness.budget_mj, "eps_bound": config.fitness.eps_bound,
      "float_val_accuracy": evaluator.float_accuracy, "float_test_accuracy": float_test,
      "undefended_answer": {k: search_report[k] for k in ("p", "block", "genome", "privacy",
                                                          "energy_mj", "test_accuracy")
                            if k in search_report},
      "search_seconds": search_report["search_seconds"],
      "stage2_seconds": sum(r["seconds"]["total"] for r in rows),
      "environment": runs.environment(),
  }
  if answer is None:
    logging.warning("no defended finalist meets the bounds: %s",
                    "; ".join(f"p={r['p']}: {', '.join(r['violations'])}" for r in rows))
  checkpoint.write_json(os.path.join(workdir, REPORT_FILE), report)
  _grid(rows, state["recon"], sets["test_victims"][:config.defense.grid_images],
        os.path.join(workdir, GRID_FILE))
  return report


def choose_answer(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
  """The most private feasible finalist by its selection numbers (``1 − max`` of both
  attacks' SSIM on the held-out training victims; feasibility from the validation ε and the
  defended energy), the first on a tie; None if none is feasible. It reads no test number."""
  feasible = [r for r in rows if r["feasible"]]
  return max(feasible, key=lambda r: r["selection"]["privacy"]) if feasible else None


def _finalist_keys(config: ml_collections.ConfigDict, split: int) -> list[jax.Array]:
  """The defenses' initialization, evaluation, decoder and white-box keys of a finalist."""
  return list(jax.random.split(jax.random.fold_in(jax.random.key(config.search.seed + 5),
                                                  split), 4))


def _undefended_deployment(config: ml_collections.ConfigDict, evaluator: Evaluator, model,
                           genome: Genome, stack: defenses.Stack, sets: dict[str, Any]
                           ) -> defended.DefendedSplit:
  """A finalist's deployment before its fine-tuning (the defenses from their sample)."""
  f = evaluator.config
  return defended.defended_split(
      model, evaluator.variables, genome, stack, sets["init"],
      _finalist_keys(config, int(genome.p))[0], dataset=evaluator.train.dataset,
      per_channel=f.per_channel, activation_levels=f.activation_levels)


def _weights_path(folder: str, split: int) -> str:
  return os.path.join(folder, f"finalist_p{split}.msgpack")


def _measure(config: ml_collections.ConfigDict, evaluator: Evaluator, model,
             stack: defenses.Stack, ft: defended.FinetuneConfig,
             decoder_config: attacks.DecoderConfig, whitebox_config: attacks.WhiteboxConfig,
             sets: dict[str, Any], entry: dict[str, Any], float_test: float, folder: str
             ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """Fine-tunes one finalist with the stack (its weights saved to ``folder``) and attacks
  it; its row and reconstructions."""
  genome = Genome.from_json(entry["genome"])
  f = evaluator.config
  _, eval_key, attack_key, wb_key = _finalist_keys(config, int(genome.p))
  t0 = time.time()
  d = _undefended_deployment(config, evaluator, model, genome, stack, sets)
  d, history = defended.finetune(d, sets["train"], ft)
  _save_weights(_weights_path(folder, int(genome.p)), d)
  t1 = time.time()
  val_accuracy = defended.accuracy(d, evaluator.val, eval_key)
  test_accuracy = defended.accuracy(d, sets["test"], eval_key)
  t2 = time.time()
  attack = defended.attack_both_sets(d, sets["aux"], sets["victims"], sets["test_victims"],
                                     config.defense.whitebox_victims, (attack_key, wb_key),
                                     decoder_config, whitebox_config, ft)
  seconds = attack["seconds"]
  energy, latency = jax.tree.map(lambda x: float(x[0]), defenses.population_costs(
      evaluator.energy_info, jax.tree.map(lambda x: x[None], genome), stack, f.device,
      f.transmission))
  metrics = {"energy_mj": energy.total_mj, "eps": evaluator.float_accuracy - val_accuracy,
             "diverged": False, "fitness": entry["fitness"], "latency_ms": latency.total_ms}

  def both(scores: dict[str, dict[str, float]]) -> dict[str, float]:
    d_s, w_s = scores["decoder"], scores["whitebox"]
    return {"decoder_ssim": d_s["ssim"], "decoder_psnr": d_s["psnr"],
            "whitebox_ssim": w_s["ssim"], "whitebox_psnr": w_s["psnr"],
            "privacy": 1.0 - max(d_s["ssim"], w_s["ssim"])}

  broken = violations(metrics, f)
  row = {
      "p": int(genome.p), "block": model.info.blocks[int(genome.p) - 1].label,
      "genome": genome.to_json(), "defenses": stack.spec(),
      "repaired_from": entry.get("repaired_from"),
      "stage1": {m: entry[m] for m in ("fitness", "privacy", "energy_mj", "eps", "accuracy")},
      "energy_mj": metrics["energy_mj"], "compute_mj": energy.compute_mj,
      "transmission_mj": energy.transmission_mj, "latency_ms": metrics["latency_ms"],
      "message_shape": list(d.message_shape),
      "message_bits": float(defenses.message_bits(evaluator.energy_info, genome, stack)),
      "val_accuracy": val_accuracy, "val_eps": metrics["eps"],
      "test_accuracy": test_accuracy, "test_eps": float_test - test_accuracy,
      "selection": both(attack["selection"]),
      "test": both(attack["test"]),
      "inner_decoder_mse": float(np.mean(history["decoder_mse"][-50:])),
      "feasible": not broken, "violations": broken,
      "seconds": {"finetune": round(t1 - t0, 1), "accuracy": round(t2 - t1, 1),
                  "decoder": round(seconds["decoder"], 1),
                  "whitebox": round(seconds["whitebox"], 1),
                  "total": round(t2 - t0 + seconds["decoder"] + seconds["whitebox"], 1)},
  }
  n = config.defense.grid_images
  return row, {k: v[:n] for k, v in attack["reconstructions"].items()}


def _save_weights(path: str, d: defended.DefendedSplit) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = runs.unique_tmp(path)
  with open(tmp, "wb") as f:
    f.write(serialization.to_bytes({"variables": d.variables, "defenses": d.defense_params}))
  os.replace(tmp, path)


def load_answer(config: ml_collections.ConfigDict, workdir: str
                ) -> tuple[defended.DefendedSplit, Genome, dict[str, Any]]:
  """The answer of a finished defended search in ``workdir``, fine-tuned as stage 2 left it
  (for :func:`maxpart_jax.deploy.defended.export`): the deployment, its genome, and
  ``{"report", "model_spec", "test"}``."""
  validate_config(config)
  with open(os.path.join(workdir, REPORT_FILE)) as f:
    report = json.load(f)
  if report["answer"] is None:
    raise ValueError(f"the defended search in {workdir} has no feasible answer to export")
  evaluator = build_evaluator(config)
  sets = _image_sets(config, evaluator)
  with runs.workdir_lock(workdir):
    load_rows(os.path.join(workdir, STAGE_DIR), _identity(config, evaluator, sets),
              "defended search")  # refuses another config's workdir
  model, _, meta = checkpoint.load_model(config.model_dir)
  genome = Genome.from_json(report["answer"]["genome"])
  d = _undefended_deployment(config, evaluator, model, genome, stack_from_config(config), sets)
  path = _weights_path(os.path.join(workdir, STAGE_DIR), int(genome.p))
  if os.path.exists(path):
    with open(path, "rb") as f:
      stored = serialization.from_bytes({"variables": d.variables, "defenses": d.defense_params},
                                        f.read())
    d = d.replace(variables=stored["variables"], defense_params=stored["defenses"])
  else:  # the fine-tuning is a function of its settings and keys: made again, and kept
    logging.warning("%s is missing: fine-tuning the answer again", path)
    d, _ = defended.finetune(d, sets["train"], finetune_from_config(config))
    _save_weights(path, d)
  return d, genome, {"report": report, "model_spec": meta["model"], "test": sets["test"]}


def _grid(rows: list[dict[str, Any]], recon: dict[str, np.ndarray], originals: np.ndarray,
          path: str) -> None:
  """Test victims and each finalist's reconstructions by both adaptive attacks."""
  lines = [("original", originals)]
  for r in rows:
    for attack in ("decoder", "whitebox"):
      images = recon.get(f"{attack}|{r['key']}")
      if images is not None:
        lines.append((f"{attack}, p={r['p']}\nSSIM {r['test'][attack + '_ssim']:.2f}", images))
  reconstruction_grid(lines, path, "test victims and their reconstructions by adaptive attackers")


def defended_summary(report: dict[str, Any]) -> str:
  """One line per finalist and the answer, for the command line."""
  lines = []
  for r in report["finalists"]:
    sel, test = r["selection"], r["test"]
    lines.append(
        f"finalist p={r['p']} ({r['block']}) with {r['defenses']}: energy {r['energy_mj']:.4f} "
        f"mJ (budget {report['budget_mj']}), val ε {r['val_eps']:.4f}; selection victims: "
        f"decoder SSIM {sel['decoder_ssim']:.3f}, white-box {sel['whitebox_ssim']:.3f}; test: "
        f"top-1 {100 * r['test_accuracy']:.2f} % (float {100 * report['float_test_accuracy']:.2f} "
        f"%), decoder SSIM {test['decoder_ssim']:.3f}, white-box {test['whitebox_ssim']:.3f}"
        + ("" if r["feasible"] else f"  INFEASIBLE: {'; '.join(r['violations'])}"))
  answer = report["answer"]
  lines.append(f"answer: p={answer['p']} ({answer['block']}), test decoder SSIM "
               f"{answer['test']['decoder_ssim']:.3f}" if answer else
               "answer: none (no finalist meets the bounds)")
  lines.append(f"search {report['search_seconds']:.0f} s, finalists {report['stage2_seconds']:.0f} s")
  return "\n".join(lines)
