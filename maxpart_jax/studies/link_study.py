"""Re-scoring measured genomes under other links (run by ``experiments/link_study.py``):
privacy and accuracy do not depend on the link, energy and latency are analytic, so the most
private genome that fits each link of a grid is found without training."""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from maxpart_jax import plotting
from maxpart_jax.energy import population_energy, population_latency
from maxpart_jax.genome import Genome
from maxpart_jax.models.metadata import ModelInfo
from maxpart_jax.jobs import settings, storage
from maxpart_jax.search.fitness import FitnessConfig, violation_degree
from maxpart_jax.studies.baselines import raw_image_energy_mj, raw_image_latency_ms


def measured_pool(workdir: str) -> list[dict]:
  """Every genome the reproduction's search measured that did not fail, with its privacy,
  ε and genome."""
  return [e for e in storage.load_evaluations(os.path.join(workdir, "search"))
          if not (e.get("diverged") or e.get("failed") or e.get("collapsed"))]


def best_per_link(pool: list[dict], config: ml_collections.ConfigDict, info: ModelInfo,
                  tx_pj: float, bandwidth: float, latency_bound: float, loss: float) -> dict:
  """The most private genome of ``pool`` that meets E_b, ε_b and the latency bound on one
  link (transmission counted), with its energy and latency there."""
  device = dataclasses.replace(settings.device_from_config(config), tx_pj_per_bit=tx_pj,
                               bandwidth_mbps=bandwidth, latency_bound_ms=latency_bound,
                               loss_rate=loss)
  bounds = FitnessConfig(eps_bound=config.fitness.eps_bound, device=device)
  genomes = jax.tree.map(lambda *xs: jnp.stack(xs), *[Genome.from_json(e["genome"]) for e in pool])
  energy = np.asarray(population_energy(info, genomes, device, transmission=True).total_mj)
  latency = np.asarray(population_latency(info, genomes, device).total_ms)
  ok = _feasible(energy, np.array([e["eps"] for e in pool]), latency, bounds)
  raw = {"energy_mj": raw_image_energy_mj(info, device),
         "latency_ms": raw_image_latency_ms(info, device)}
  raw["feasible"] = bool(_feasible(np.array([raw["energy_mj"]]), np.zeros(1),
                                   np.array([raw["latency_ms"]]), bounds)[0])
  row = {"tx_pj_per_bit": tx_pj, "bandwidth_mbps": bandwidth, "latency_bound_ms": latency_bound,
         "loss_rate": loss, "feasible_genomes": int(ok.sum()), "raw_image": raw}
  if ok.any():
    i = int(np.flatnonzero(ok)[np.argmax(np.array([e["privacy"] for e in pool])[ok])])
    g = Genome.from_json(pool[i]["genome"])
    edge = np.asarray(info.layer_block) < int(g.p)
    row["best"] = {"p": int(g.p), "block": info.blocks[int(g.p) - 1].label,
                   "privacy": pool[i]["privacy"], "eps": pool[i]["eps"],
                   "energy_mj": float(energy[i]), "latency_ms": float(latency[i]),
                   "mean_edge_w_bits": float(np.mean(np.asarray(g.w_bits)[edge])),
                   "key": pool[i]["key"]}
  return row


def _feasible(energy: np.ndarray, eps: np.ndarray, latency: np.ndarray,
              bounds: FitnessConfig) -> np.ndarray:
  """Eq. 4 with the link's latency bound, as the search judges it (measured genomes did
  not fail: the pool holds none that did)."""
  zeros = np.zeros_like(energy)
  return violation_degree(dict(energy_mj=energy, eps=eps, latency_ms=latency, fitness=zeros,
                               diverged=zeros, failed=zeros, collapsed=zeros), bounds) == 0


def plot(energy_only: list[dict], bounded: list[dict], tx: list[float], bandwidths: list[float],
         max_split: int, path: str, latency_bound: float) -> None:
  """Left: the best split against the link's energy per bit (energy bound only). Right: the
  best split (colour) and its privacy over energy per bit and bandwidth, latency bounded."""

  fig, (left, right) = plotting.subplots(1, 2, figsize=(12, 4.4), layout="constrained",
                                    width_ratios=(1, 1.4))
  fits = [r for r in energy_only if r.get("best")]
  left.plot([r["tx_pj_per_bit"] for r in fits], [r["best"]["p"] for r in fits], "o-")
  for r in fits:
    left.annotate(f"P={r['best']['privacy']:.2f}", (r["tx_pj_per_bit"], r["best"]["p"]),
                  xytext=(0, 6), textcoords="offset points", ha="center", fontsize=8)
  for r in energy_only:
    if not r.get("best"):
      left.axvspan(r["tx_pj_per_bit"] / 1.3, r["tx_pj_per_bit"] * 1.3, color="red", alpha=0.1)
  left.set_xscale("log")
  left.set(xlabel="link energy (pJ per bit)", ylabel="best split p", ylim=(0, max_split + 1),
           title="energy bound only (red: no measured genome fits)")
  grid = np.full((len(bandwidths), len(tx)), np.nan)
  for r in bounded:
    i, j = bandwidths.index(r["bandwidth_mbps"]), tx.index(r["tx_pj_per_bit"])
    best = r.get("best")
    grid[i, j] = best["p"] if best else np.nan
    right.text(j, i, f"p={best['p']}\nP={best['privacy']:.2f}" if best else "none fits",
               ha="center", va="center", fontsize=8,
               bbox=dict(facecolor="white", alpha=0.7, lw=0))
  im = right.imshow(grid, cmap="YlGn", origin="lower", aspect="auto", vmin=1, vmax=max_split)
  fig.colorbar(im, ax=right, label="best split p (blocks on the edge)")
  right.set_xticks(range(len(tx)), [f"{t:g}" for t in tx])
  right.set_yticks(range(len(bandwidths)), [f"{b:g}" for b in bandwidths])
  right.set(xlabel="link energy (pJ per bit)", ylabel="bandwidth (Mbps)",
            title=f"energy bound and latency < {latency_bound:g} ms")
  fig.savefig(path, dpi=110)


def table(rows: list[dict]) -> str:
  """The grid as a markdown table, one row per link."""
  lines = ["| pJ/bit | Mbps | feasible genomes | best split | P | E (mJ) | latency (ms) | "
           "mean edge w bits | raw image E (mJ) / latency (ms) |", "|" + "---|" * 9]
  for r in rows:
    raw = r["raw_image"]
    raw_text = f"{raw['energy_mj']:.3f} / {raw['latency_ms']:.1f}"
    b = r.get("best")
    cells = ([f"{b['block']} (p={b['p']})", f"{b['privacy']:.3f}", f"{b['energy_mj']:.3f}",
              f"{b['latency_ms']:.1f}", f"{b['mean_edge_w_bits']:.1f}"] if b else
             ["none", "", "", "", ""])
    lines.append(f"| {r['tx_pj_per_bit']:g} | {r['bandwidth_mbps']:g} | {r['feasible_genomes']} | "
                 + " | ".join(cells) + f" | {raw_text} |")
  return "\n".join(lines)
