"""Several processes (hosts) as one JAX program: joining them, the leader, and host values.

JAX's multi-controller model runs the same program in every process; after
:func:`initialize`, ``jax.devices()`` lists every process's devices and a program jitted over a
mesh of them runs on all at once. What this project adds on top:

* :func:`initialize` joins a job (TPU pod slices, SLURM and Open MPI are detected by
  ``jax.distributed.initialize``; a plain set of machines names a coordinator), with CPU
  collectives over gloo, so that several processes on one machine can stand in for hosts.
* The *leader* (process 0) alone writes files: search states, reports, plots, TensorBoard
  (:func:`is_leader`); the others compute the same things and keep them in memory.
* :func:`to_host` turns a result sharded over every process's devices into the same numpy
  value in every process; :func:`broadcast` sends the leader's value (a resumed state, say)
  to all, so every process takes the same decisions.

With one process every function here is the identity or a no-op: nothing changes.
"""

from __future__ import annotations

import json
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, auto: bool = False,
               heartbeat_timeout_s: int = 100) -> bool:
  """Joins the processes of one job, before anything else touches JAX; returns whether the
  job has several processes.

  ``auto``: let ``jax.distributed.initialize`` find the job (TPU pod slices, SLURM, Open
  MPI). Otherwise name the coordinator (``host:port`` of process 0), the number of
  processes and this one's index. Nothing given: one process, nothing done. A process that
  stops sending heartbeats for ``heartbeat_timeout_s`` makes every other one stop.
  """
  explicit = [v is not None for v in (coordinator_address, num_processes, process_id)]
  if not auto and not any(explicit):
    return False
  if not auto and not all(explicit):
    raise ValueError("to join a job without auto-detection give all of --coordinator_address, "
                     "--num_processes and --process_id (or --distributed to detect TPU pods, "
                     "SLURM and Open MPI)")
  # CPU processes exchange through gloo (the default has no cross-process collectives);
  # the setting only concerns the CPU backend.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id,
                             heartbeat_timeout_seconds=heartbeat_timeout_s)
  logging.info("process %d of %d: %d local and %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  return jax.process_count() > 1


def is_leader() -> bool:
  """Whether this process writes the job's files (process 0; always, with one process)."""
  return jax.process_index() == 0


def to_host(x: Any) -> np.ndarray:
  """``x`` as numpy, the whole value in every process (gathered from every process's
  devices when it is sharded over several processes)."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    if x.is_fully_replicated:  # every process holds all of it
      return np.asarray(x.addressable_data(0))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def for_global_put(tree: Any) -> Any:
  """``tree`` ready for ``jax.device_put`` onto devices of every process: host arrays
  (the same in every process), as multi-process placement wants them."""
  return jax.device_get(tree) if jax.process_count() > 1 else tree


def broadcast(value: Any, like: Any = None) -> Any:
  """The leader's ``value`` in every process: a JSON-able value (``like=None``) or a pytree
  of arrays shaped like ``like``."""
  if jax.process_count() == 1:
    return value
  if like is not None:
    return jax.tree.map(np.asarray, multihost_utils.broadcast_one_to_all(
        value if is_leader() else like))
  data = json.dumps(value).encode() if is_leader() else b""
  size = int(multihost_utils.broadcast_one_to_all(np.int64(len(data))))
  buffer = np.frombuffer(data, np.uint8) if is_leader() else np.zeros(size, np.uint8)
  return json.loads(bytes(np.asarray(multihost_utils.broadcast_one_to_all(buffer))))


def lost_peer(error: BaseException) -> str | None:
  """A one-line explanation when ``error`` says that another process of the job stopped (a
  collective lost its peer), else None."""
  text = str(error)
  if jax.process_count() > 1 and any(k in text for k in ("Gloo", "heartbeat", "peer")):
    return (f"another process of this job stopped ({text.splitlines()[0][:200]}); run the same "
            "command on every process again to resume from the last checkpoint")
  return None
