"""The resumable state of a study made of rows: the rows (JSON, with the identity of the
settings they depend on) and their reconstructions (one .npz), each replaced atomically."""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from maxpart_jax import checkpoint, runs

ROWS_FILE = "rows.json"
RECON_FILE = "reconstructions.npz"


def load_rows(folder: str, identity: dict[str, Any], what: str) -> dict[str, Any]:
  """``{"identity", "rows", "recon"}`` stored in ``folder`` (empty for a new folder); a folder
  made with other settings is refused (:func:`maxpart_jax.runs.check_identity`)."""
  rows_path = os.path.join(folder, ROWS_FILE)
  if not os.path.exists(rows_path):
    return {"identity": identity, "rows": [], "recon": {}}
  with open(rows_path) as f:
    stored = json.load(f)
  runs.check_identity(stored.get("identity"), identity, folder, what)
  with np.load(os.path.join(folder, RECON_FILE)) as npz:
    recon = dict(npz)
  return {"identity": identity, "rows": stored["rows"], "recon": recon}


def save_rows(folder: str, state: dict[str, Any]) -> None:
  """Writes what :func:`load_rows` reads: reconstructions first, then the rows."""
  os.makedirs(folder, exist_ok=True)
  recon_path = os.path.join(folder, RECON_FILE)
  tmp = runs.unique_tmp(recon_path) + ".npz"
  np.savez(tmp, **state["recon"])
  os.replace(tmp, recon_path)
  checkpoint.write_json(os.path.join(folder, ROWS_FILE),
                        {"identity": state["identity"], "rows": state["rows"]})
