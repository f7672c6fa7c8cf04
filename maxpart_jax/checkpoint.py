"""Checkpoints: resumable training state and the pre-trained model the search loads.

Training state goes through an orbax ``CheckpointManager`` (atomic: a step is
written to a temporary folder and renamed when complete, so a killed run never
leaves a half-written checkpoint behind). A finished model is saved as
``<dir>/model.json`` (architecture name and builder arguments, dataset, hold-out
split, a SHA-256 of the variables) next to ``<dir>/variables`` (orbax), and
:func:`load_model` rebuilds both and checks that they match.
"""

from __future__ import annotations

import hashlib
import json
import logging as py_logging
import math
import os
from collections.abc import Sequence
from typing import Any

from absl import logging

import jax
import numpy as np
import orbax.checkpoint as ocp

from maxpart_jax import distributed
from maxpart_jax.models import SplitModel, Variables, model_from_spec
from maxpart_jax.runs import unique_tmp


class _DropOrbaxInfo(py_logging.Filter):
  """Drops orbax's INFO chatter (a dozen lines per save) from the absl log."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    return record.levelno >= py_logging.WARNING or "orbax" not in record.pathname


py_logging.getLogger("absl").addFilter(_DropOrbaxInfo())


def manager(directory: str, max_to_keep: int = 2) -> ocp.CheckpointManager:
  """A synchronous checkpoint manager for ``directory`` (created if missing)."""
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                         enable_async_checkpointing=False)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def restore_latest(mngr: ocp.CheckpointManager, like: Any,
                   steps: Sequence[int] | None = None) -> tuple[int | None, Any]:
  """``(step, state)`` of the newest of ``steps`` (default: the manager's) that loads, or
  ``(None, like)`` if there are none.

  A step that does not load (corrupt or incomplete files) is logged and the one before it
  is tried; if none loads, a ``ValueError`` names the folder. In a job of several processes
  ``steps`` must be the leader's, the same in every process; each process reads each step
  itself and they agree on the outcome: a step the leader cannot load is passed over by
  all, and one that it loads but another process cannot (a folder that is not the leader's)
  stops every process with a ``ValueError`` that names the requirement of one shared folder.
  """
  steps = sorted(mngr.all_steps() if steps is None else steps, reverse=True)
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
  reader = _local_reader(mngr.directory) if jax.process_count() > 1 else mngr
  errors = []
  for step in steps:
    try:
      state, error = reader.restore(step, args=ocp.args.StandardRestore(abstract)), None
    except Exception as e:  # pylint: disable=broad-except  (orbax raises many kinds)
      state, error = None, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    loaded = distributed.everyone(error is None)
    if all(loaded):
      return step, state
    if loaded[0]:  # the leader's checkpoint, missing or unreadable in another process
      failed = [i for i, ok in enumerate(loaded) if not ok]
      raise ValueError(f"process(es) {failed} of this job cannot load checkpoint step {step} "
                       f"in {mngr.directory}, which process 0 resumes from"
                       f"{f' ({error})' if error else ''}: {distributed.SHARED_FOLDER}")
    errors.append(f"step {step}: {error or 'loads in this process but not in process 0'}")
    logging.warning("checkpoint step %d in %s does not load (%s); trying an earlier one",
                    step, mngr.directory, errors[-1])
  if steps:
    raise ValueError(f"no checkpoint in {mngr.directory} loads ({'; '.join(errors)}); delete "
                     "that folder to start the run again from the beginning")
  return None, like


def _this_process_alone() -> ocp.options.MultiprocessingOptions:
  """Orbax options to read in this process alone, with no barrier with the others: a
  process whose read fails still meets them at the next collective (an agreement)."""
  this = jax.process_index()
  return ocp.options.MultiprocessingOptions(primary_host=this, active_processes={this})


def _local_reader(directory: Any) -> ocp.CheckpointManager:
  """A manager that reads ``directory`` in this process alone (and never writes there)."""
  return ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(
      create=False, enable_async_checkpointing=False,
      multiprocessing_options=_this_process_alone()))


def write_json(path: str, obj: Any) -> None:
  """Writes JSON atomically (temporary file + rename), so readers never see half a file.

  Non-finite floats become ``null``: the file stays valid JSON for every reader.
  """
  tmp = unique_tmp(path)
  with open(tmp, "w") as f:
    json.dump(finite_or_none(obj), f, indent=2, allow_nan=False)
  os.replace(tmp, path)


def finite_or_none(obj: Any) -> Any:
  """``obj`` with every NaN or infinite float (at any depth) replaced by ``None``."""
  if isinstance(obj, float):
    return obj if math.isfinite(obj) else None
  if isinstance(obj, dict):
    return {k: finite_or_none(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [finite_or_none(v) for v in obj]
  return obj


def file_digest(path: str, algorithm: str = "sha256") -> str:
  """The hex digest of a file's bytes (``algorithm``: a ``hashlib`` name), read in chunks."""
  digest = hashlib.new(algorithm)
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()


def variables_sha256(variables: Variables) -> str:
  """SHA-256 of every array's path, dtype, shape and bytes: the weights' identity.

  Independent of how orbax lays the files out, so it identifies the weights themselves.
  """
  digest = hashlib.sha256()
  for path, leaf in sorted(jax.tree_util.tree_flatten_with_path(jax.device_get(variables))[0],
                           key=lambda kv: jax.tree_util.keystr(kv[0])):
    array = np.ascontiguousarray(leaf)
    digest.update(f"{jax.tree_util.keystr(path)}|{array.dtype}|{array.shape}|".encode())
    digest.update(array.tobytes())
  return digest.hexdigest()


def save_model(directory: str, model_spec: dict[str, Any], variables: Variables,
               dataset: str, split: dict[str, Any]) -> None:
  """Saves a trained model: variables and ``model.json``.

  ``model.json`` holds the architecture (``{"name": ..., **builder kwargs}``), the
  dataset and ``split`` (``{"val_fraction", "data_seed"}``): which training images were
  held out, so that a search can refuse to validate on images the model trained on.
  In a job of several processes every process calls it (orbax synchronizes them) and
  process 0 writes ``model.json``.
  """
  directory = os.path.abspath(directory)
  check_finite(variables, "the variables to save")
  os.makedirs(directory, exist_ok=True)
  with ocp.StandardCheckpointer() as ckpt:  # every process of a job calls it (orbax syncs)
    ckpt.save(os.path.join(directory, "variables"), jax.device_get(variables), force=True)
  if jax.process_index() == 0:
    write_json(os.path.join(directory, "model.json"),
               {"model": model_spec, "dataset": dataset, "split": split,
                "variables_sha256": variables_sha256(variables)})


def load_model(directory: str) -> tuple[SplitModel, Variables, dict[str, Any]]:
  """Loads what :func:`save_model` wrote: ``(model, variables, meta)``.

  Raises ``FileNotFoundError`` if nothing is there and ``ValueError`` if the
  stored variables do not fit the stored architecture or their recorded checksum.
  """
  directory = os.path.abspath(directory)
  spec_path = os.path.join(directory, "model.json")
  if not os.path.exists(spec_path):
    raise FileNotFoundError(f"no pre-trained model at {directory} (missing model.json); "
                            "train one with `python -m experiments.train`")
  with open(spec_path) as f:
    meta = json.load(f)
  model = model_from_spec(meta["model"])
  expected = jax.eval_shape(model.init, jax.random.key(0))
  # Each process reads alone (a job's processes agree on the outcome afterwards).
  with ocp.StandardCheckpointer(multiprocessing_options=_this_process_alone()) as ckpt:
    stored = ckpt.metadata(os.path.join(directory, "variables"))
    stored = getattr(stored, "item_metadata", stored)
    check_variables_match(model, expected, stored, directory)
    variables = ckpt.restore(os.path.join(directory, "variables"), expected)
  if "variables_sha256" in meta and variables_sha256(variables) != meta["variables_sha256"]:
    raise ValueError(f"the variables in {directory} do not match the SHA-256 in its model.json: "
                     "the checkpoint is corrupt or was changed. Restore it (for the shipped "
                     "model: git checkout pretrained/) or pre-train it again")
  check_finite(variables, f"the variables in {directory}")
  return model, variables, meta


def check_finite(variables: Variables, what: str) -> None:
  """Raises ``ValueError`` if any array of ``variables`` holds a NaN or an infinity."""
  bad = [jax.tree_util.keystr(k)
         for k, v in jax.tree_util.tree_leaves_with_path(jax.device_get(variables))
         if not np.all(np.isfinite(v))]
  if bad:
    raise ValueError(f"{what} hold NaN or infinite values ({len(bad)} arrays, first {bad[0]}): "
                     "the model diverged; pre-train it again with a lower learning rate")


def check_variables_match(model: SplitModel, expected: Any, stored: Any, where: str) -> None:
  """Raises ``ValueError`` naming the first variable whose path or shape differs."""
  exp = {jax.tree_util.keystr(k): tuple(v.shape)
         for k, v in jax.tree_util.tree_leaves_with_path(expected)}
  got = {jax.tree_util.keystr(k): tuple(np.shape(v) if not hasattr(v, "shape") else v.shape)
         for k, v in jax.tree_util.tree_leaves_with_path(stored)}
  if exp != got:
    missing = sorted(set(exp) - set(got))[:3]
    extra = sorted(set(got) - set(exp))[:3]
    shape = [k for k in exp if k in got and exp[k] != got[k]][:3]
    raise ValueError(
        f"checkpoint at {where} does not match model {model.name}: missing {missing}, "
        f"unexpected {extra}, shape mismatch {[(k, got[k], exp[k]) for k in shape]}")
