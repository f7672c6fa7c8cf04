"""Export the genome a search reported: :func:`export_searched` fine-tunes it exactly as
the search evaluated it and writes the integer edge and float cloud artifacts
(:func:`maxpart_jax.deploy.parity.parity` then measures them against the model)."""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections
from absl import logging

from maxpart_jax import runs
from maxpart_jax.deploy import artifact
from maxpart_jax.genome import Genome
from maxpart_jax.jobs import build, storage
from maxpart_jax.jobs.pretrain import model_spec
from maxpart_jax.models.layers import Numerics


def reported_genome(workdir: str) -> tuple[Genome, dict[str, Any]]:
  """The genome in ``workdir/best.json`` and the report; a clear error if there is none."""
  path = os.path.join(workdir, "best.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"no finished search in {workdir} (missing best.json); run "
                            "`python -m experiments.search` there first")
  with open(path) as f:
    report = json.load(f)
  return Genome.from_json(report["genome"]), report


def export_searched(config: ml_collections.ConfigDict, workdir: str, out: str
                    ) -> tuple[artifact.EdgeProgram, artifact.CloudProgram, dict[str, Any]]:
  """Exports the genome a search in ``workdir`` (made with ``config``) reported to ``out``.

  Returns the two programs and ``{"genome", "report", "model", "variables",
  "test"}``: what :func:`parity` needs.
  """
  genome, report = reported_genome(workdir)
  evaluator = build.build_evaluator(config)
  stored, complete = storage.stored_identity(workdir)
  if complete:
    current = storage.search_identity(config, evaluator)
  else:
    logging.warning("%s records the search's settings but not the hashes of its data and "
                    "weights (a result from before best.json carried them): only the settings "
                    "are checked", workdir)
    current = storage.settings_identity(config)
  changed = runs.changed_keys(stored, current)
  if changed:
    raise ValueError(f"the config differs from the one the search in {workdir} ran with, so "
                     "the export would fine-tune and quantize another way than the search "
                     "evaluated: " + "; ".join(f"{k}: searched with {stored.get(k)!r}, now "
                                               f"{current.get(k)!r}" for k in changed)
                     + f" (the search's settings are in {workdir}/config.json)")
  variables, diverged = evaluator.finetune(evaluator.pad(jax.tree.map(lambda x: x[None], genome)))
  if diverged[0]:
    raise ValueError(f"fine-tuning the genome of {workdir}/best.json diverged")
  variables = jax.device_get(jax.tree.map(lambda x: x[0], variables))
  model = evaluator.model.with_numerics(Numerics())  # the reference computes in float32
  edge, cloud = artifact.export_split(
      model, variables, genome, model_spec(config.pretrain), out,
      dataset=evaluator.train.dataset, per_channel=config.fitness.per_channel,
      activation_levels=config.fitness.activation_levels)
  return edge, cloud, {"genome": genome, "report": report, "model": model,
                       "variables": variables, "test": build.load_test_split(config, evaluator)}
