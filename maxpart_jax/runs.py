"""Workdirs that never mix, clash or hide: one writer at a time, and run identities.

A workdir belongs to one run. :func:`workdir_lock` keeps a second process out while the
first works (the operating system drops the lock when its holder dies, even by SIGKILL,
so a killed run never leaves a stale lock behind). :func:`check_identity` compares what
a resumed run depends on (config, data content, pre-trained weights, numerics) with what
the workdir recorded and refuses any difference, naming it. :func:`environment` records
what a result was computed with.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.metadata
import os
import platform
import socket
import time
from typing import Any, Iterator

import jax

LOCK_FILE = ".lock"
_held: dict[str, int] = {}  # workdirs this process holds: how many nested holds


VERSIONED = ("jax", "jaxlib", "flax", "optax", "numpy")
"""The packages whose versions decide a result's last digits."""


def environment() -> dict[str, Any]:
  """What a result was computed with, for its JSON: the versions of :data:`VERSIONED`,
  Python, the CPU (model and widest vector extension), JAX's devices, and ``XLA_FLAGS``.
  The same machine and versions repeat a result bit for bit; another CPU or another version
  can change its last digits (docs/scaling.md, "Results on other machines")."""
  import jax  # pylint: disable=import-outside-toplevel  (this module loads before jax)
  model, flags = None, set()
  if os.path.exists("/proc/cpuinfo"):
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name") and model is None:
          model = line.split(":", 1)[1].strip()
        elif line.startswith("flags") and not flags:
          flags = set(line.split(":", 1)[1].split())
  cpu = model or platform.processor() or platform.machine()
  vector = next((v for v in ("avx512f", "avx2", "avx", "sse4_2") if v in flags), None)
  devices: dict[str, int] = {}
  for d in jax.devices():
    name = f"{d.platform}: {d.device_kind}"
    devices[name] = devices.get(name, 0) + 1
  return {"versions": {name: importlib.metadata.version(name) for name in VERSIONED},
          "python": platform.python_version(), "cpu": cpu, "cpu_vector_extension": vector,
          "devices": devices, "xla_flags": os.environ.get("XLA_FLAGS", "")}


class WorkdirError(ValueError):
  """A workdir cannot be used: held by another run, not writable, or holding another run."""


@contextlib.contextmanager
def workdir_lock(workdir: str) -> Iterator[None]:
  """Holds ``workdir`` for this process; raises :class:`WorkdirError` if another holds it.

  Re-entrant within one process (a search that pre-trains into the same folder). Also
  checks, before any work, that ``workdir`` can be created and written.
  """
  if jax.process_index() != 0:  # several processes: the leader holds it and writes there
    yield
    return
  workdir = os.path.realpath(workdir)
  if workdir in _held:
    _held[workdir] += 1
    try:
      yield
    finally:
      _held[workdir] -= 1
    return
  try:
    os.makedirs(workdir, exist_ok=True)
    f = open(os.path.join(workdir, LOCK_FILE), "a+")
  except OSError as e:
    raise WorkdirError(f"cannot write to the workdir {workdir}: {e.strerror}; choose a "
                       "writable --workdir") from None
  try:
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    f.seek(0)
    owner = f.read().strip() or "another process"
    f.close()
    raise WorkdirError(f"{workdir} is in use by another run ({owner}); wait for it to end "
                       "or use another --workdir") from None
  f.seek(0)
  f.truncate()
  f.write(f"pid {os.getpid()} on {socket.gethostname()}, since "
          f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n")
  f.flush()
  _held[workdir] = 1
  try:
    yield
  finally:
    del _held[workdir]
    fcntl.flock(f, fcntl.LOCK_UN)
    f.close()


def check_identity(stored: dict[str, Any] | None, current: dict[str, Any], workdir: str,
                   what: str, hints: dict[str, str] | None = None) -> None:
  """Raises :class:`WorkdirError` unless ``stored`` (what ``workdir`` recorded) equals
  ``current`` (what this run would do); the message names every difference.

  ``None`` for ``stored``: the workdir was written by a version that recorded no identity.
  ``hints``: ``{key prefix: advice}`` added to the message when a key with that prefix differs.
  """
  if stored is None:
    raise WorkdirError(f"{workdir} holds a {what} from an earlier version of maxpart_jax that "
                       "did not record what it depends on, so it cannot be resumed safely; "
                       "use a new --workdir (or delete this one)")
  changed = changed_keys(stored, current)
  if changed:
    lines = "; ".join(f"{k}: was {_short(stored.get(k))}, now {_short(current.get(k))}"
                      for k in changed)
    advice = [text for prefix, text in (hints or {}).items()
              if any(k.startswith(prefix) for k in changed)]
    raise WorkdirError(f"{workdir} holds a {what} that ran with other settings, so resuming "
                       f"would mix two runs. Changed: {lines}. Start fresh with a new "
                       "--workdir (or delete this one), or restore the earlier settings"
                       + "".join(f" {a}" for a in advice))


def changed_keys(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
  """The keys, sorted, whose values differ between two identities (or that one lacks)."""
  return [k for k in sorted(set(stored) | set(current)) if stored.get(k) != current.get(k)]


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
  """``{"a": {"b": 1}}`` as ``{"a.b": 1}``: identities name the exact field that changed."""
  out: dict[str, Any] = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def _short(value: Any, limit: int = 200) -> str:
  text = repr(value)
  return text if len(text) <= limit else text[:limit] + "…"


def unique_tmp(path: str) -> str:
  """A temporary name beside ``path`` that no other writer uses (for atomic replaces)."""
  return f"{path}.{os.getpid()}.{time.time_ns()}.tmp"
