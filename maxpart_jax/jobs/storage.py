"""What a search stores in its workdir, and what it must match to resume.

After every step the search writes ``<workdir>/search_state.npz`` atomically (the
algorithm's state, the cache of evaluations, the history); the state before it stays as
``search_state.prev.npz`` to fall back to. :func:`search_identity` names everything the
results depend on; a resumed search must depend on the same.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from maxpart_jax import checkpoint, data, runs
from maxpart_jax.jobs import planning
from maxpart_jax.jobs.pretrain import split_spec
from maxpart_jax.jobs.settings import stack_from_config
from maxpart_jax.search import algorithms
from maxpart_jax.search.fitness import Evaluator

STATE_FILE = "search_state.npz"
PREVIOUS_STATE_FILE = "search_state.prev.npz"


# Settings added after searches were first stored, at the value that reproduces what ran
# before they existed: left out of a search's identity at that value, so those searches
# still resume. (Their cached evaluations get the analytic latency_ms on load.)
LATER_DEFAULTS = {
    "search.algorithm": "ga", "fitness.lambda_latency": 0.1, "device.tx_pj_per_bit": 100.0,
    "device.mac_rate_bits": [32, 16, 8], "device.mac_rate_gmacs": [1.0, 2.0, 4.0],
    "device.bandwidth_mbps": 1.0, "device.packet_bits": 12000, "device.header_bits": 0,
    "device.loss_rate": 0.0, "device.retry_timeout_ms": 0.0, "device.latency_bound_ms": 0.0,
    "fitness.attack.images": 2000, "fitness.attack.steps": 300, "fitness.attack.batch_size": 64,
    "fitness.attack.learning_rate": 3e-3, "fitness.attack.width": 32,
    "fitness.attack.ssim_weight": 0.0, "defense.stack": "none", "search.solver.margins": []}


def save_state(workdir: str, state: algorithms.State, meta: dict[str, Any]) -> None:
  """Writes the state leaves and the JSON metadata in one file, atomically; the file it
  replaces stays as :data:`PREVIOUS_STATE_FILE`."""
  path = os.path.join(workdir, STATE_FILE)
  tmp = runs.unique_tmp(path)
  with open(tmp, "wb") as f:
    np.savez(f, meta=np.array(json.dumps(meta)),
             **{f"leaf{i}": np.asarray(x) for i, x in enumerate(jax.tree.leaves(state))})
  if os.path.exists(path):
    os.replace(path, os.path.join(workdir, PREVIOUS_STATE_FILE))
  os.replace(tmp, path)


def _load(path: str, like: algorithms.State) -> tuple[algorithms.State, dict[str, Any]]:
  """One state file; raises if it is unreadable or does not fit ``like``."""
  with np.load(path) as f:
    meta = json.loads(str(f["meta"]))
    treedef = jax.tree.structure(like)
    leaves = [np.asarray(f[f"leaf{i}"]) for i in range(treedef.num_leaves)]
  for got, want in zip(leaves, jax.tree.leaves(like)):
    if got.shape != want.shape or got.dtype != want.dtype:
      raise ValueError(f"an array is {got.dtype}{list(got.shape)}, the search needs "
                       f"{want.dtype}{list(want.shape)}")
  return jax.tree.unflatten(treedef, [jnp.asarray(x) for x in leaves]), meta


def load_state(workdir: str, like: algorithms.State
               ) -> tuple[algorithms.State, dict[str, Any]] | None:
  """The latest search state of ``workdir`` that loads, or None if it holds none.

  Falls back (logged) to the state before it when the latest is damaged or missing, e.g.
  after a kill between the two renames of :func:`save_state`; a ``WorkdirError`` names the files
  if neither loads.
  """
  paths = [os.path.join(workdir, f) for f in (STATE_FILE, PREVIOUS_STATE_FILE)]
  errors = []
  for path in filter(os.path.exists, paths):
    try:
      state, meta = _load(path, like)
    except Exception as e:  # pylint: disable=broad-except  (zip, npz, JSON and shape errors)
      errors.append(f"{os.path.basename(path)}: {type(e).__name__}: {e}")
      logging.warning("the search state %s does not load (%s)", path, errors[-1])
      continue
    if path != paths[0]:
      logging.warning("resuming from the previous search state %s (step %d)", path,
                      int(state.step))
    return state, meta
  if errors:
    raise runs.WorkdirError(f"no search state in {workdir} loads ({'; '.join(errors)}); delete "
                            f"{STATE_FILE} and {PREVIOUS_STATE_FILE} there to start the search "
                            "again")
  return None


def load_evaluations(workdir: str) -> list[dict[str, Any]]:
  """The genomes a search in ``workdir`` has evaluated so far, with their metrics: from
  ``evaluations.json`` when it has finished, else from its latest readable state (with
  what a killed first call had evaluated of the initial population)."""
  path = os.path.join(workdir, "evaluations.json")
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  for name in (STATE_FILE, PREVIOUS_STATE_FILE):
    try:
      with np.load(os.path.join(workdir, name)) as f:
        meta = json.loads(str(f["meta"]))
      cache = {**meta.get("initial_evaluations", {}), **meta["cache"]}
      return [{"key": key, **entry} for key, entry in cache.items()]
    except Exception as e:  # pylint: disable=broad-except  (missing, zip, npz, JSON errors)
      logging.warning("%s/%s does not load (%s: %s)", workdir, name, type(e).__name__, e)
  raise runs.WorkdirError(f"{workdir} holds no evaluations.json and no search state that "
                          "loads; give the workdir of a search (a reproduction's search is "
                          "in <workdir>/search)")


def stored_identity(workdir: str) -> tuple[dict[str, Any], bool]:
  """The identity (:func:`search_identity`) a search in ``workdir`` recorded, and whether it
  is complete.

  It is read from the search state, else from ``best.json`` (which carries it, so a result
  committed without its state keeps it). A result written before ``best.json`` carried it
  has only its settings, from ``config.json`` (:func:`settings_identity`, read through
  :func:`with_later_defaults`; incomplete: the hashes of its data and weights are unknown).
  A ``WorkdirError`` if there is none of these.
  """
  for name in (STATE_FILE, PREVIOUS_STATE_FILE):
    try:
      with np.load(os.path.join(workdir, name)) as f:
        return json.loads(str(f["meta"]))["identity"], True
    except Exception:  # pylint: disable=broad-except  (missing, zip, npz, JSON errors)
      continue
  best = _read_json(os.path.join(workdir, "best.json"))
  if isinstance(best, dict) and isinstance(best.get("identity"), dict):
    return best["identity"], True
  config = _read_json(os.path.join(workdir, "config.json"))
  if isinstance(config, dict):
    return settings_identity(with_later_defaults(config)), False
  raise runs.WorkdirError(f"{workdir} holds no search state ({STATE_FILE}), no best.json with "
                          "its identity and no config.json: nothing records its settings")


def with_later_defaults(stored: dict[str, Any]) -> ml_collections.ConfigDict:
  """A config as a search stored it (``config.json``), with every setting of
  :data:`LATER_DEFAULTS` that it predates at its later default: what it ran with.

  Identities are computed from stored configs through this; a ``ValueError`` names a later
  setting whose section the stored config holds as something other than a section.
  """
  config = copy.deepcopy(stored)
  for name, value in LATER_DEFAULTS.items():
    *sections, field = name.split(".")
    node = config
    for i, section in enumerate(sections):
      node = node.setdefault(section, {})
      if not isinstance(node, dict):
        raise ValueError(f"the stored config's {'.'.join(sections[:i + 1])} is {node!r}, not a "
                         f"section: it cannot hold the later setting {name}")
    node.setdefault(field, copy.deepcopy(value))
  return ml_collections.ConfigDict(config)


def _read_json(path: str) -> Any:
  """The JSON in ``path``, or None if it is missing or unreadable."""
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def settings_identity(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The part of :func:`search_identity` that the config alone determines."""
  identity = runs.flatten({
      k: config[k].to_dict() if hasattr(config[k], "to_dict") else config[k]
      for k in ("search", "fitness", "device", "privacy_images", "val_images", "energy_model")
      if k in config})  # a config stored before a section existed lacks it
  identity.pop("search.iterations", None)
  if not planning.needs_plan(config):  # the solver's settings count only where it runs
    identity = {k: v for k, v in identity.items() if not k.startswith("search.solver.")}
  # Stage 1 of a defended search charges the stack's costs; stage 2's settings are its own.
  identity["defense.stack"] = stack_from_config(config).spec()
  identity.update({f"pretrain.{k}": v for k, v in split_spec(config.pretrain).items()})
  return _as_stored(identity)


def _as_stored(identity: dict[str, Any]) -> dict[str, Any]:
  identity = json.loads(json.dumps(identity, default=str))  # as stored: tuples become lists
  return {k: v for k, v in identity.items() if k not in LATER_DEFAULTS or v != LATER_DEFAULTS[k]}


def search_identity(config: ml_collections.ConfigDict, evaluator: Evaluator) -> dict[str, Any]:
  """Everything a search's results depend on, as ``{name: value}``; a resumed search must match.

  Settings of ``config`` (``search.iterations`` is left out: it only says when to stop,
  and step ``t`` draws the same randomness whatever the total, so a finished search can
  be extended with a larger T and ends exactly where a run with that T from the start
  would), the hold-out split, the content of the data and of the pre-trained weights
  (not where they live: moving them is harmless), the images ε and P are measured on, and
  what the ``auto`` settings resolved to on this machine (``compute_dtype="auto"`` is
  float32 on a CPU and bfloat16 on a GPU).
  """
  identity = settings_identity(config)
  identity.update({
      "pretrained_weights_sha256": checkpoint.variables_sha256(evaluator.variables),
      "data_content": data.content_hash(evaluator.train.dataset, config.data_dir or None),
      # The images ε and P are measured on, as the evaluator holds them (a caller may pass
      # an evaluator built for another search.seed).
      "evaluation_images_sha256": _images_sha256(evaluator),
      "resolved.compute_dtype": evaluator.numerics.dtype,
      "resolved.matmul_precision": evaluator.numerics.precision,
      "resolved.pipeline": evaluator.pipeline, "resolved.candidate_loop": evaluator.candidate_loop})
  return _as_stored(identity)


def _images_sha256(evaluator: Evaluator) -> str:
  digest = hashlib.sha256()
  for array in (evaluator.val.images, evaluator.val.labels, evaluator.privacy_images):
    digest.update(np.ascontiguousarray(array).tobytes())
  return digest.hexdigest()


def identity_hash(identity: dict[str, Any]) -> str:
  """A short hash of :func:`search_identity` (keys of results derived from a search)."""
  return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


AUTO_HINT = ("(resolved.*: the config's `auto` settings resolve differently on this machine; "
             "set them explicitly to the stored values to resume)")
