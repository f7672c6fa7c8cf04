"""The inversion-attack study: does the paper's privacy score predict the attacks?

For every model of a config (``experiments/configs/attacks.py``), every split and IR width
(the edge in float, only the IR quantized, as in the paper's Fig. 8) and every searched
genome (the edge quantized as the genome says; the pre-trained weights, without the
search's fine-tuning): the paper's score P (each metric of the config) of the victim
images' IRs, and the SSIM / PSNR of both attacks of :mod:`maxpart_jax.privacy.attacks` on them
(docs/method.md §10).

Each finished split is saved to ``<workdir>/<model>/rows.json``; a rerun resumes after the
last one and refuses a model folder that holds another config, model or data. :func:`run`
writes ``study.json`` (rows, Spearman correlations, timings), ``scatter.png`` (P against
attack SSIM), ``splits_<model>.png`` (attack SSIM and P per split) and ``grid_<model>.png``
(original / decoder / white-box reconstructions).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time
from typing import Any

from absl import logging
import jax

import ml_collections
import numpy as np
from scipy import stats

from maxpart_jax import plotting
from maxpart_jax import checkpoint, data, privacy, runs, train
from maxpart_jax.genome import Genome, to_policy, validate_genome
from maxpart_jax.privacy import attacks, profile
from maxpart_jax.privacy.plots import reconstruction_grid
from maxpart_jax.quant import FLOAT_BITS, QuantPolicy, check_bits
from maxpart_jax.jobs.rows import load_rows, save_rows



def settings(model, config: ml_collections.ConfigDict, genomes: list[tuple[str, Genome]]
             ) -> list[tuple[int, list[tuple[str, int, QuantPolicy]]]]:
  """``[(split, [(source, ir_bits, policy), ...]), ...]``: what is attacked, split by split."""
  info = model.info
  splits = list(config.splits) or list(range(1, info.max_split + 1))
  groups: dict[int, list] = {}
  for q in splits:
    info.check_split(q)
    groups[q] = [("ir_only", b, QuantPolicy.ir_only(info.num_layers, q, b, config.activation_levels))
                 for b in config.ir_bits]
  for name, genome in genomes:
    policy = to_policy(info, genome, activation_levels=config.activation_levels)
    groups.setdefault(int(genome.p), []).append((name, int(policy.ir_bits), policy))
  return sorted(groups.items())


def load_genomes(model, paths: str) -> list[tuple[str, Genome]]:
  """The genomes of comma-separated ``best.json`` files, named by their folder."""
  out = []
  for path in filter(None, (p.strip() for p in paths.split(","))):
    with open(path) as f:
      genome = Genome.from_json(json.load(f)["genome"])
    validate_genome(model.info, genome)
    out.append((os.path.basename(os.path.dirname(path)), genome))
  return out


def privacy_scores(model, variables, images: np.ndarray, irs: jax.Array,
                   config: ml_collections.ConfigDict) -> dict[str, float]:
  """Mean P of the victims' IRs for each metric of the config."""
  return {metric: float(np.mean(profile.batched(
      lambda s, m=metric: _privacy(model, m, config.dataset, variables, images[s], irs[s]),
      len(images), 32))) for metric in config.metrics}


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _privacy(model, metric, dataset, variables, images, irs):
  classify_fn = profile.classifier(model, variables, dataset) if metric == "kl" else None
  return privacy.privacy_score(images, irs, metric, classify_fn=classify_fn)


def attack_split(model, variables, split: int, group: list, aux: np.ndarray,
                 victims: np.ndarray, config: ml_collections.ConfigDict, key: jax.Array
                 ) -> tuple[list[dict[str, Any]], dict[str, np.ndarray]]:
  """Rows and grid reconstructions of every deployment cut at ``split``."""
  decoder_config = attacks.DecoderConfig(**config.decoder)
  white_config = attacks.WhiteboxConfig(**config.whitebox)
  policies = [policy for _, _, policy in group]
  start = time.time()
  decoded = attacks.decoder_attacks(model, variables, split, policies, aux, victims, key,
                                    decoder_config, dataset=config.dataset)
  decoder_seconds = (time.time() - start) / len(group)
  rows, recon = [], {}
  for (source, bits, policy), dec in zip(group, decoded):
    start = time.time()
    white = attacks.whitebox_attack(model, variables, split, policy,
                                    victims[:config.whitebox_images], key, white_config,
                                    dataset=config.dataset)
    white_seconds = time.time() - start
    irs = attacks.edge_irs(model, variables, split, policy, victims, dataset=config.dataset)
    tag = f"{split}_{source}_{bits}"
    recon[f"decoder_{tag}"] = dec["reconstructions"][:config.grid_images]
    recon[f"whitebox_{tag}"] = white["reconstructions"][:config.grid_images]
    rows.append({
        "split": split, "block": model.info.blocks[split - 1].label, "source": source,
        "ir_bits": bits, "ir_shape": list(model.info.blocks[split - 1].out_shape),
        "privacy": privacy_scores(model, variables, victims, irs, config),
        "decoder": {"ssim": dec["ssim"], "psnr": dec["psnr"],
                    "final_loss": float(dec["losses"][-10:].mean()),
                    "seconds": round(decoder_seconds, 1)},
        "whitebox": {"ssim": white["ssim"], "psnr": white["psnr"],
                     "final_loss": float(white["losses"][-1]), "seconds": round(white_seconds, 1)},
    })
  return rows, recon


def image_sets(test: data.Split, config: ml_collections.ConfigDict
               ) -> tuple[np.ndarray, np.ndarray]:
  """``(auxiliary, victim)`` images in [0, 1]: disjoint random draws (``config.seed``) from
  the two halves of a permutation of the test split, so that neither set follows the order
  of the source (the local shards are sorted by class)."""
  half = len(test) // 2
  if config.aux_images > half or config.victim_images > len(test) - half:
    raise ValueError(f"the test split has {len(test)} images: at most {half} auxiliary "
                     f"and {len(test) - half} victim images, got {config.aux_images} "
                     f"and {config.victim_images}")
  order = np.random.default_rng(config.seed).permutation(len(test))
  images = test.float_images()
  return (images[np.sort(order[:config.aux_images])],
          images[np.sort(order[half:half + config.victim_images])])


def study_identity(config: ml_collections.ConfigDict, name: str, aux: np.ndarray,
                   victims: np.ndarray) -> dict[str, Any]:
  """What the rows of model ``name`` depend on: the config's attack settings, the model's
  weights (SHA-256 of model.json, which holds the weights' own SHA-256), its genomes, the
  data and the images drawn from it."""
  shared = {k: v for k, v in config.to_dict().items() if k not in ("grid_images", "models")}
  identity = runs.flatten(shared)
  m = config.models[name]
  if not os.path.exists(os.path.join(m.model_dir, "model.json")):
    raise ValueError(f"no pre-trained {name} at {m.model_dir}; pre-train it with "
                     f"`python -m experiments.train` or set --config.models.{name}.model_dir")
  with open(os.path.join(m.model_dir, "model.json"), "rb") as f:
    identity["model_sha256"] = hashlib.sha256(f.read()).hexdigest()
  for path in filter(None, (p.strip() for p in m.genomes.split(","))):
    with open(path) as f:
      identity[f"genome.{path}"] = json.load(f)["genome"]
  identity["data"] = data.content_hash(config.dataset, config.data_dir or None)
  for what, images in (("aux", aux), ("victim", victims)):
    identity[f"{what}_images_sha256"] = hashlib.sha256(images.tobytes()).hexdigest()
  return json.loads(json.dumps(identity))  # tuples as lists, as stored


DUPLICATE_SSIM = 0.01
"""An 8-bit IR whose decoder SSIM is within this of the float IR's at the same split repeats
that setting (8 bits keep the IR's information), so it is not a second observation."""


def deduplicated(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """``rows`` without the 8-bit-IR settings that repeat the float IR of the same model and
  split (decoder SSIM within :data:`DUPLICATE_SSIM`): the rows the correlations count, so
  that near-copies do not pass for independent observations and shrink the p-values."""
  floats = {(r["model"], r["split"]): r["decoder"]["ssim"] for r in rows
            if r["source"] == "ir_only" and r["ir_bits"] == FLOAT_BITS}
  return [r for r in rows
          if not (r["source"] == "ir_only" and r["ir_bits"] == 8
                  and abs(r["decoder"]["ssim"] - floats.get((r["model"], r["split"]), np.inf))
                  <= DUPLICATE_SSIM)]


def study_correlations(rows: list[dict[str, Any]], models: list[str],
                       metrics: tuple[str, ...]) -> dict[str, Any]:
  """Correlations over all models and per model, on :func:`deduplicated` rows
  (``"correlations"``) and, for comparison, on every row (``"correlations_all_settings"``)."""
  out = {}
  for key, kept in (("correlations", deduplicated(rows)), ("correlations_all_settings", rows)):
    out[key] = {"all": correlations(kept, metrics)}
    for name in models:
      out[key][name] = correlations([r for r in kept if r["model"] == name], metrics)
  return out


def restate_correlations(path: str) -> dict[str, Any]:
  """Recomputes the correlations of a written ``study.json`` from its rows (no attack is
  run) and writes it back; returns it."""
  with open(path) as f:
    result = json.load(f)
  result.update(study_correlations(result["rows"], result["models"],
                                   tuple(result["config"]["metrics"])))
  checkpoint.write_json(path, result)
  return result


def correlations(rows: list[dict[str, Any]], metrics: tuple[str, ...]) -> dict[str, Any]:
  """Spearman's rho (and its p-value) between each metric's P and each attack measure."""
  out = {}
  for metric in metrics:
    p = [r["privacy"][metric] for r in rows]
    for attack in ("decoder", "whitebox"):
      for measure in ("ssim", "psnr"):
        rho, pvalue = stats.spearmanr(p, [r[attack][measure] for r in rows])
        out[f"{metric}~{attack}_{measure}"] = {"rho": float(rho), "p": float(pvalue),
                                               "n": len(rows)}
  return out


def run(config: ml_collections.ConfigDict, workdir: str, out: str,
        models: list[str] | None = None) -> dict[str, Any]:
  """The study of ``models`` (default: all of the config's); resumes from ``workdir``.

  Returns what ``study.json`` holds.
  """
  check_bits(list(config.ir_bits), "ir_bits")
  attacks.DecoderConfig(**config.decoder)  # their checks, before any work
  attacks.WhiteboxConfig(**config.whitebox)
  models = list(models or config.models)
  unknown = sorted(set(models) - set(config.models))
  if unknown:
    raise ValueError(f"models {unknown} are not in the config; it has {sorted(config.models)}")
  test = data.load_split("test", dataset=config.dataset, data_dir=config.data_dir or None)
  aux, victims = image_sets(test, config)
  identities = {name: study_identity(config, name, aux, victims) for name in models}
  with runs.workdir_lock(workdir):
    states, plan = {}, []
    for name in models:
      states[name] = load_rows(os.path.join(workdir, name), identities[name],
                               "study of inversion attacks")
      model, variables, _ = checkpoint.load_model(config.models[name].model_dir)
      done = {r["split"] for r in states[name]["rows"]}
      for split, group in settings(model, config, load_genomes(model, config.models[name].genomes)):
        if split not in done:
          plan.append((name, model, variables, split, group))
    logging.info("%d splits to attack (%d settings); %d settings already done", len(plan),
                 sum(len(p[4]) for p in plan), sum(len(s["rows"]) for s in states.values()))
    progress = train.Progress(len(plan), every=1, name="attacked splits", unit="split")
    for i, (name, model, variables, split, group) in enumerate(plan):
      key = jax.random.fold_in(jax.random.key(config.seed), split)
      rows, recon = attack_split(model, variables, split, group, aux, victims, config, key)
      states[name]["rows"] += [{"model": name, **r} for r in rows]
      states[name]["recon"].update(recon)
      save_rows(os.path.join(workdir, name), states[name])
      for r in rows:
        logging.info("%s split %d (%s) %s %d-bit IR: P(mse) %.3f, decoder SSIM %.3f, white-box "
                     "SSIM %.3f", name, split, r["block"], r["source"], r["ir_bits"],
                     r["privacy"].get("mse", float("nan")), r["decoder"]["ssim"],
                     r["whitebox"]["ssim"])
      progress(i + 1)
    all_rows = [r for name in models for r in sorted(states[name]["rows"],
                                                     key=lambda r: (r["split"], r["source"] != "ir_only"))]
    result = {"config": config.to_dict(), "models": models, "rows": all_rows,
              **study_correlations(all_rows, models, tuple(config.metrics)),
              "seconds": round(sum(r["decoder"]["seconds"] + r["whitebox"]["seconds"]
                                   for r in all_rows), 1), "environment": runs.environment()}
    os.makedirs(out, exist_ok=True)
    checkpoint.write_json(os.path.join(out, "study.json"), result)
    _plots(result, {name: states[name]["recon"] for name in models},
           victims[:config.grid_images], config, out)
    return result


def _plots(result: dict[str, Any], recon: dict[str, dict[str, np.ndarray]],
           originals: np.ndarray, config: ml_collections.ConfigDict, out: str) -> None:
  rows = result["rows"]
  models = result["models"]
  metrics = list(config.metrics)
  # P against the attacks' SSIM, one panel per metric
  fig, axes = plotting.subplots(2, len(metrics), figsize=(4.2 * len(metrics) + 1, 7.5), squeeze=False,
                           layout="constrained")
  markers = dict(zip(models, "os^v"))
  for j, metric in enumerate(metrics):
    for i, attack in enumerate(("decoder", "whitebox")):
      ax = axes[i, j]
      for name in models:
        mine = [r for r in rows if r["model"] == name]
        sc = ax.scatter([r["privacy"][metric] for r in mine], [r[attack]["ssim"] for r in mine],
                        c=[r["split"] for r in mine], cmap="viridis", marker=markers[name],
                        s=[60 if r["source"] != "ir_only" else 25 for r in mine],
                        edgecolors=["red" if r["source"] != "ir_only" else "none" for r in mine],
                        label=name)
      rho = result["correlations"]["all"][f"{metric}~{attack}_ssim"]["rho"]
      ax.set(xlabel=f"P ({metric})", ylabel=f"{attack} attack SSIM",
             title=f"Spearman rho = {rho:.2f}")
      ax.legend(fontsize=7)
  fig.colorbar(sc, ax=axes, label="split (edge blocks)", shrink=0.5)
  fig.suptitle("Privacy score vs. inversion attacks (red edge: searched genomes)")
  fig.savefig(os.path.join(out, "scatter.png"), dpi=110)
  for name in models:
    mine = [r for r in rows if r["model"] == name and r["source"] == "ir_only"]
    if not mine:
      continue
    fig, (ax1, ax2) = plotting.subplots(1, 2, figsize=(11, 4))
    for bits in config.ir_bits:
      sel = sorted((r for r in mine if r["ir_bits"] == bits), key=lambda r: r["split"])
      label = "float IR" if bits == FLOAT_BITS else f"{bits}-bit IR"
      ax1.plot([r["split"] for r in sel], [r["decoder"]["ssim"] for r in sel], "o-", label=label)
      ax1.plot([r["split"] for r in sel], [r["whitebox"]["ssim"] for r in sel], "x--", alpha=0.6,
               color=ax1.lines[-1].get_color())
      ax2.plot([r["split"] for r in sel], [r["privacy"][metrics[0]] for r in sel], "o-",
               label=label)
    blocks = sorted({(r["split"], r["block"]) for r in mine})
    for ax in (ax1, ax2):
      ax.set_xticks([b[0] for b in blocks], [b[1] for b in blocks], rotation=45, fontsize=7)
      ax.legend(fontsize=7)
    ax1.set(ylabel="attack SSIM (o decoder, x white-box)", title=f"{name}: inversion attacks")
    ax2.set(ylabel=f"P ({metrics[0]})", title=f"{name}: the paper's score")
    fig.tight_layout()
    fig.savefig(os.path.join(out, f"splits_{name}.png"), dpi=110)
    _grid(name, [r for r in rows if r["model"] == name], recon[name], originals, out)


def _grid(name: str, rows: list[dict[str, Any]], recon: dict[str, np.ndarray],
          originals: np.ndarray, out: str) -> None:
  """Originals, then decoder and white-box reconstructions at a shallow, a middle and the
  deepest split (float IR) and for each searched genome."""
  floats = sorted({r["split"] for r in rows if r["source"] == "ir_only"
                   and r["ir_bits"] == FLOAT_BITS})
  picks = [(s, "ir_only", FLOAT_BITS) for s in dict.fromkeys(
      [floats[0], floats[len(floats) // 2], floats[-1]])] if floats else []
  picks += [(r["split"], r["source"], r["ir_bits"]) for r in rows if r["source"] != "ir_only"]
  lines = [("original", originals)]
  for split, source, bits in picks:
    tag = f"{split}_{source}_{bits}"
    what = "float IR" if source == "ir_only" else f"{source}, {bits}-bit IR"
    for attack in ("decoder", "whitebox"):
      if f"{attack}_{tag}" in recon:
        lines.append((f"{attack}\nsplit {split}\n{what}", recon[f"{attack}_{tag}"]))
  reconstruction_grid(lines, os.path.join(out, f"grid_{name}.png"),
                      f"{name}: victim images and their reconstructions", label_width=1.4)
