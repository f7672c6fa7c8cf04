"""The defended-split study: each row is a genome and a defense stack, fine-tuned, then
measured against an adaptive attacker (docs/method.md §13, ``results/defenses/``).

Per row: validation and test top-1 through the defended deployment, the edge energy with the
defense's layers and the message's transmission, the bits sent, the paper's P (mse) of the
message, the adaptive decoder's and the white-box attack's SSIM / PSNR on two victim sets,
and whether the row meets the budget and the accuracy bound. **Selection never sees test
data**: feasibility is judged on validation top-1 against the float model's, and
:func:`select` picks the most private feasible row on training images held out of the
fine-tuning (the selection victims); test top-1 and the test victims' attacks are reported
beside them, held out. Rows are stored as they finish; a rerun resumes and refuses a workdir
made with other settings.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from scipy import stats

from maxpart_jax import checkpoint, data, plotting, privacy, runs, train
from maxpart_jax.energy import DeviceConfig
from maxpart_jax.genome import Genome, uniform_genome, validate_genome
from maxpart_jax.privacy import attacks, defended, defenses
from maxpart_jax.privacy.plots import reconstruction_grid
from maxpart_jax.deploy import defended as deploy_defended
from maxpart_jax.jobs import settings
from maxpart_jax.jobs.rows import load_rows, save_rows



def parse_genome(model, source: str) -> Genome:
  """A best.json path, or ``uniform:p:w_bits:a_bits``."""
  if source.startswith("uniform:"):
    try:
      p, w, a = (int(v) for v in source.split(":")[1:])
    except ValueError:
      raise ValueError(f"genome {source!r}: write uniform:p:w_bits:a_bits") from None
    genome = uniform_genome(model.info, p, w, a)
  else:
    with open(source) as f:
      genome = Genome.from_json(json.load(f)["genome"])
  validate_genome(model.info, genome)
  return genome


def parse_rows(model, config: ml_collections.ConfigDict
               ) -> list[tuple[str, str, Genome, defenses.Stack, dict[str, Any]]]:
  """``(row name, genome name, genome, stack, fine-tuning settings)`` per config row
  (``<genome>/<defenses>[@<recipe>]``), all checked before any work."""
  recipes = config.get("recipes", ml_collections.ConfigDict()).to_dict()
  rows = []
  for row in config.rows:
    row, _, recipe = row.partition("@")
    name, sep, spec = row.partition("/")
    if not sep or name not in config.genomes:
      raise ValueError(f"row {row!r}: write <genome>/<defenses> with a genome of "
                       f"{sorted(config.genomes)}")
    if recipe and recipe not in recipes:
      raise ValueError(f"row {row!r}: unknown recipe {recipe!r}; the config has "
                       f"{sorted(recipes)}")
    genome = parse_genome(model, config.genomes[name])
    stack = defenses.parse_stack(spec)
    stack.check(model.info.blocks[int(genome.p) - 1].out_shape)
    finetune = {**config.finetune.to_dict(), **recipes.get(recipe, {})}
    if stack.adversarial_weight:
      defended.check_attacker(attacks.DecoderConfig(**config.decoder),
                              defended.FinetuneConfig(seed=config.seed, **finetune))
    rows.append((f"{name}/{stack.spec()}" + (f"@{recipe}" if recipe else ""), name, genome,
                 stack, finetune))
  if len({r[0] for r in rows}) != len(rows):
    raise ValueError("the config lists a row twice")
  return rows


def image_sets(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The study's images, pairwise disjoint in their roles: the fine-tuning split (``train``
  without the selection victims), the attacker's images and the validation split (``val``:
  top-1 for selection), the selection victims (training images held out of the fine-tuning),
  and the held-out test split and its victims, which nothing is chosen on."""
  kw = dict(dataset=config.dataset, data_dir=config.data_dir or None)
  train_split, val, test = (data.load_split(s, **kw) for s in ("train", "val", "test"))
  if (config.aux_images > len(val) or config.victim_images > len(test)
      or config.selection_victims > len(train_split) // 2):
    raise ValueError(f"at most {len(val)} attacker images (the val split), {len(test)} test "
                     f"victims and {len(train_split) // 2} selection victims, got "
                     f"{config.aux_images}, {config.victim_images} and {config.selection_victims}")
  rng = np.random.default_rng(config.seed)
  aux = val.float_images()[np.sort(rng.permutation(len(val))[:config.aux_images])]
  victims = test.float_images()[np.sort(rng.permutation(len(test))[:config.victim_images])]
  order = rng.permutation(len(train_split))
  held, kept = np.sort(order[:config.selection_victims]), order[config.selection_victims:]
  fine_tuning = dataclasses.replace(train_split, images=train_split.images[np.sort(kept)],
                                    labels=train_split.labels[np.sort(kept)])
  init = train_split.float_images()[kept[:config.init_images]]
  return {"train": fine_tuning, "val": val, "test": test, "aux": aux, "victims": victims,
          "selection_victims": train_split.float_images()[held], "init": init}


def study_identity(config: ml_collections.ConfigDict, sets: dict[str, Any]) -> dict[str, Any]:
  """What the rows depend on: every setting but the rows and their genomes, the model, the
  data and the images drawn. A new row, genome or recipe joins the study; a changed setting
  makes a new one; a stored row whose genome or recipe changed is refused by :func:`run`."""
  identity = runs.flatten({k: v for k, v in config.to_dict().items()
                           if k not in ("rows", "genomes", "recipes", "grid_images",
                                        "grid_rows", "other_budgets")})
  with open(os.path.join(config.model_dir, "model.json"), "rb") as f:
    identity["model_sha256"] = hashlib.sha256(f.read()).hexdigest()
  identity["data"] = data.content_hash(config.dataset, config.data_dir or None)
  for what in ("aux", "victims", "selection_victims", "init"):
    identity[f"{what}_sha256"] = hashlib.sha256(sets[what].tobytes()).hexdigest()
  return json.loads(json.dumps(identity))


def _row_key(config: ml_collections.ConfigDict, index: int) -> jax.Array:
  """The key of the study's ``index``-th row (in the order the rows were run)."""
  return jax.random.fold_in(jax.random.key(config.seed + 1), index)


def _fine_tuned(model, variables, genome: Genome, stack: defenses.Stack, sets: dict[str, Any],
                config: ml_collections.ConfigDict, init_key: jax.Array, finetune: dict[str, Any]
                ) -> tuple[defended.DefendedSplit, dict[str, Any], defended.FinetuneConfig]:
  """A row's deployment, fine-tuned with its settings: the same weights whenever it runs."""
  ft = defended.FinetuneConfig(seed=config.seed, **finetune)
  d = defended.defended_split(model, variables, genome, stack, sets["init"], init_key,
                              dataset=config.dataset)
  d, history = defended.finetune(d, sets["train"], ft)
  return d, history, ft


def measure_row(model, variables, genome: Genome, stack: defenses.Stack, sets: dict[str, Any],
                config: ml_collections.ConfigDict, key: jax.Array, float_accuracy: dict[str, float],
                finetune: dict[str, Any]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """Fine-tunes one defended deployment (``finetune``: its settings) and attacks it; the row
  and its reconstructions of the test victims.

  The numbers that choose (``selection``): validation top-1 and its loss against the float
  model's validation top-1 (``val_eps``), both attacks on the selection victims. The numbers
  that report (``test``, held out): test top-1 and both attacks on the test victims. One
  adaptive decoder decodes both victim sets; the white-box attack inverts the first
  ``whitebox_images`` of each."""
  init_key, eval_key, attack_key, wb_key = jax.random.split(key, 4)
  start = time.time()
  d, history, ft = _fine_tuned(model, variables, genome, stack, sets, config, init_key, finetune)
  finetune_s = time.time() - start
  val_accuracy = defended.accuracy(d, sets["val"], eval_key)
  accuracy = defended.accuracy(d, sets["test"], eval_key)
  victims = sets["victims"]
  msgs = defended.messages(d, victims, eval_key)
  p_mse = float(privacy.mean_privacy(victims, msgs, "mse"))
  attack = defended.attack_both_sets(
      d, sets["aux"], sets["selection_victims"], victims, config.whitebox_images,
      (attack_key, wb_key), attacks.DecoderConfig(**config.decoder),
      attacks.WhiteboxConfig(**config.whitebox), ft)
  device = DeviceConfig(budget_mj=config.budget_mj)
  energy = defenses.defended_energy(model.info, genome, stack, device, config.transmission)
  val_eps = float_accuracy["val"] - val_accuracy
  sel, test, seconds = attack["selection"], attack["test"], attack["seconds"]
  row = {
      "p": int(genome.p), "block": model.info.blocks[int(genome.p) - 1].label,
      "defenses": stack.spec(), "genome": genome.to_json(), "finetune": finetune,
      "val_accuracy": val_accuracy, "val_eps": val_eps,
      "test_accuracy": accuracy, "test_eps": float_accuracy["test"] - accuracy,
      "energy_mj": float(energy.total_mj), "compute_mj": float(energy.compute_mj),
      "transmission_mj": float(energy.transmission_mj),
      "message_shape": list(d.message_shape),
      "message_bits": float(defenses.message_bits(model.info, genome, stack)),
      "privacy_mse": p_mse,
      "selection": {**sel, "privacy": 1.0 - max(sel["decoder"]["ssim"], sel["whitebox"]["ssim"])},
      "decoder": {**test["decoder"], "final_loss": attack["decoder_final_loss"],
                  "seconds": round(seconds["decoder"], 1)},
      "whitebox": {**test["whitebox"], "seconds": round(seconds["whitebox"], 1)},
      "inner_decoder_mse": float(np.mean(history["decoder_mse"][-50:])),
      "finetune_final_ce": float(np.mean(history["ce"][-50:])),
      "finetune_seconds": round(finetune_s, 1),
      "feasible": feasible(float(energy.total_mj), val_eps, config),
  }
  n = config.grid_images
  return row, {k: v[:n] for k, v in attack["reconstructions"].items()}


def feasible(energy_mj: float, val_eps: float, config: ml_collections.ConfigDict) -> bool:
  """The search's bounds (docs/method.md): energy below the budget, the validation accuracy
  loss within ``eps_bound``."""
  return bool(energy_mj < config.budget_mj and val_eps <= config.eps_bound)


def select(rows: list[dict[str, Any]]) -> str | None:
  """The row a user of the study would deploy: the most private feasible row by the
  selection numbers (``1 − max`` of both attacks' SSIM on the selection victims; validation
  top-1 breaks a tie), never by a test number. None if no row is feasible."""
  ok = [r for r in rows if r["feasible"]]
  if not ok:
    return None
  return max(ok, key=lambda r: (r["selection"]["privacy"], r["val_accuracy"]))["row"]


def run(config: ml_collections.ConfigDict, workdir: str, out: str) -> dict[str, Any]:
  """Runs (or resumes) the study and writes ``study.json`` and the plots to ``out``."""
  attacks.DecoderConfig(**config.decoder)  # their checks, before any work
  attacks.WhiteboxConfig(**config.whitebox)
  defended.FinetuneConfig(**config.finetune)
  model, variables, meta = checkpoint.load_model(config.model_dir)
  rows_plan = parse_rows(model, config)
  sets = image_sets(config)
  identity = study_identity(config, sets)
  float_accuracy = {s: train.evaluate(model, variables, sets[s]) for s in ("val", "test")}
  with runs.workdir_lock(workdir):
    state = load_rows(workdir, identity, "defense study")
    stored = {row["row"]: row for row in state["rows"]}
    for name, _, genome, _, finetune in rows_plan:
      if name in stored and stored[name]["genome"] != genome.to_json():
        raise ValueError(f"row {name!r} in {workdir} was made with another genome "
                         f"({stored[name]['genome']}); use another workdir")
      if name in stored and stored[name].get("finetune", config.finetune.to_dict()) != finetune:
        raise ValueError(f"row {name!r} in {workdir} was fine-tuned with other settings "
                         f"({stored[name].get('finetune')}); use another workdir or recipe")
    todo = [r for r in rows_plan if r[0] not in stored]
    logging.info("defense study: %d rows to run, %d done", len(todo), len(state["rows"]))
    progress = train.Progress(len(todo), every=1, name="defended rows", unit="row")
    for i, (name, genome_name, genome, stack, finetune) in enumerate(todo):
      key = _row_key(config, len(state["rows"]))
      row, recon = measure_row(model, variables, genome, stack, sets, config, key, float_accuracy,
                               finetune)
      state["rows"].append({"row": name, "genome_name": genome_name, **row})
      state["recon"].update({f"{k}|{name}": v for k, v in recon.items()})
      save_rows(workdir, state)
      logging.info("%s: val top-1 %.2f %%, energy %.4f mJ, selection victims: decoder SSIM "
                   "%.3f, white-box SSIM %.3f", name, 100 * row["val_accuracy"],
                   row["energy_mj"], row["selection"]["decoder"]["ssim"],
                   row["selection"]["whitebox"]["ssim"])
      progress(i + 1)
    wanted = [r[0] for r in rows_plan]
    budgets = {name: (settings.info_from_spec(b.energy_model.to_dict()), b)
               for name, b in config.get("other_budgets", ml_collections.ConfigDict()).items()}
    rows = [{**r, "other_budgets": other_budgets(r, budgets, config.eps_bound)}
            for r in state["rows"] if r["row"] in wanted]
    rows.sort(key=lambda r: wanted.index(r["row"]))
    result = {"config": config.to_dict(), "float_val_accuracy": float_accuracy["val"],
              "float_test_accuracy": float_accuracy["test"], "rows": rows,
              "selected": select(rows), "proxies": proxy_correlations(rows),
              "environment": runs.environment()}
    os.makedirs(out, exist_ok=True)
    checkpoint.write_json(os.path.join(out, "study.json"), result)
    _plots(result, state["recon"], sets["victims"][:config.grid_images], config, out)
    return result


def other_budgets(row: dict[str, Any], budgets: dict[str, tuple[Any, Any]],
                  eps_bound: float) -> dict[str, Any]:
  """The row's energy and feasibility under each of ``budgets`` (``{name: (energy model's
  info, the config's budget entry)}``): its genome and stack charged on that energy model,
  the row's validation accuracy loss against the same bound (the model is the same)."""
  out = {}
  for name, (info, b) in budgets.items():
    energy = defenses.defended_energy(info, Genome.from_json(row["genome"]),
                                      defenses.parse_stack(row["defenses"]),
                                      DeviceConfig(budget_mj=b.budget_mj), b.transmission)
    out[name] = {"energy_mj": float(energy.total_mj), "budget_mj": b.budget_mj,
                 "feasible": bool(float(energy.total_mj) < b.budget_mj
                                  and row["val_eps"] <= eps_bound)}
  return out


def export_row(config: ml_collections.ConfigDict, workdir: str, row: str, out: str
               ) -> dict[str, Any]:
  """Fine-tunes a finished row's deployment again (the fine-tuning is a function of its
  settings and seed), exports it through the integer edge program to ``workdir/export``
  (weights: not for ``out``) and measures parity on the whole test split
  (``out/export_parity.json``): the integer split's top-1 against the fake-quantized
  deployment's and the row's stored one."""
  model, variables, meta = checkpoint.load_model(config.model_dir)
  plan = {r[0]: r for r in parse_rows(model, config)}
  if row not in plan:
    raise ValueError(f"row {row!r} is not in the config's rows {sorted(plan)}")
  sets = image_sets(config)
  with runs.workdir_lock(workdir):
    state = load_rows(workdir, study_identity(config, sets), "defense study")
  names = [r["row"] for r in state["rows"]]
  if row not in names:
    raise ValueError(f"row {row!r} has not been run in {workdir}: run the study first")
  index = names.index(row)
  stored = state["rows"][index]
  _, _, genome, stack, finetune = plan[row]
  init_key = jax.random.split(_row_key(config, index), 4)[0]  # as measure_row splits it
  d, _, _ = _fine_tuned(model, variables, genome, stack, sets, config, init_key, finetune)
  edge, cloud = deploy_defended.export(d, genome, meta["model"], os.path.join(workdir, "export"))
  test = sets["test"]
  result = {"row": row, "stored_test_accuracy": stored["test_accuracy"],
            **deploy_defended.export_parity(d, edge, cloud, test.images, jax.random.key(config.seed + 2),
                                     test.labels)}
  checkpoint.write_json(os.path.join(out, "export_parity.json"), result)
  return result


PROXIES = ("privacy_mse", "inner_decoder_mse")
"""Cheap privacy terms a defended search could use instead of an adaptive attack: the paper's
P of the message, and the inner decoder's reconstruction MSE at the end of the fine-tuning."""


def proxy_correlations(rows: list[dict[str, Any]]) -> dict[str, Any]:
  """Spearman's rho (and p) of each proxy against the adaptive decoder's SSIM on the selection
  victims over the rows; a proxy fit for a search needs rho <= -0.9 (higher proxy, worse
  reconstructions)."""
  if len(rows) < 3:
    return {}
  ssim = [r["selection"]["decoder"]["ssim"] for r in rows]
  out = {}
  for proxy in PROXIES:
    rho, p = stats.spearmanr([r[proxy] for r in rows], ssim)
    out[proxy] = {"rho": float(rho), "p": float(p), "n": len(rows)}
  return out


def _plots(result: dict[str, Any], recon: dict[str, np.ndarray], originals: np.ndarray,
           config: ml_collections.ConfigDict, out: str) -> None:
  """``privacy_accuracy.png``: what chose (validation top-1, selection victims) beside what is
  held out (test top-1, test victims); ``grid.png``: test victims and their reconstructions."""
  rows = result["rows"]
  fig, axes = plotting.subplots(1, 2, figsize=(12, 4.8), layout="constrained")
  panels = (("val", lambda r: r["selection"], "chosen on: val top-1, training victims"),
            ("test", lambda r: r, "held out: test top-1, test victims"))
  for ax, (split, scores, title) in zip(axes, panels):
    for r in rows:
      x = 100 * r[f"{split}_accuracy"]
      color = "C0" if r["defenses"] == "none" else "C3"
      ok = r["energy_mj"] < config.budget_mj
      ax.scatter(x, scores(r)["decoder"]["ssim"], marker="o" if ok else "x", color=color)
      ax.scatter(x, scores(r)["whitebox"]["ssim"], marker="v", facecolors="none",
                 edgecolors=color, s=18)
      label = r["row"] + (" (selected)" if r["row"] == result["selected"] else "")
      ax.annotate(label, (x, scores(r)["decoder"]["ssim"]), fontsize=6, xytext=(3, 3),
                  textcoords="offset points")
    floor = result[f"float_{split}_accuracy"] - config.eps_bound
    ax.axvline(100 * floor, color="gray", ls="--", lw=0.8, label="accuracy bound")
    ax.axhline(0.3, color="gray", ls=":", lw=0.8, label="SSIM 0.3")
    ax.set(xlabel=f"{split} top-1 (%)", ylabel="SSIM (dots: adaptive decoder, ▽: white-box)",
           title=f"{title} (x: over budget)")
    ax.title.set_fontsize(9)
    ax.legend(fontsize=7)
  fig.savefig(os.path.join(out, "privacy_accuracy.png"), dpi=110)
  lines = [("original", originals)]
  shown = list(config.get("grid_rows", ())) or [r["row"] for r in rows]
  for r in sorted((r for r in rows if r["row"] in shown), key=lambda r: shown.index(r["row"])):
    for attack in ("decoder", "whitebox"):
      images = recon.get(f"{attack}|{r['row']}")
      if images is not None:
        lines.append((f"{attack}\n{r['row']}\nSSIM {r[attack]['ssim']:.2f}", images))
  reconstruction_grid(lines, os.path.join(out, "grid.png"),
                      "test victims and their reconstructions by adaptive attackers",
                      label_size=5, label_width=2.2)
