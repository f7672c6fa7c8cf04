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
  to all, so every process takes the same decisions, and :func:`agree` stops every process
  when one of them could not do its part (read the leader's checkpoint, say).
* A lost process stops the others the same way whichever it was (:func:`initialize` with
  ``supervise=True``, as the scripts join): each survivor prints :data:`LOST_PEER_MESSAGE`
  and exits with :data:`LOST_PEER_EXIT_CODE`.

With one process every function here is the identity or a no-op: nothing changes.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, NoReturn

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

LOST_PEER_EXIT_CODE = 75
"""The exit code of a process whose job lost another process (``EX_TEMPFAIL``: run the same
command again on every process to resume)."""

LOST_PEER_MESSAGE = ("error: another process of this job stopped; run the same command on every "
                     "process again to resume from the last checkpoint")
"""The last line such a process prints (to stderr)."""

SHARED_FOLDER = ("every process of a job must see the leader's files: give all of them the same "
                 "--workdir (and model_dir) on one file system they share (NFS, a bucket; one "
                 "machine)")
"""What a process that cannot read the leader's files is told."""

# The line the coordination service's agent (jaxlib) logs before it aborts a process whose
# job lost a process; the Python callback that could replace the abort cannot be given from
# Python (jaxlib cannot pass its status to a Python function), so a supervisor watches for it.
_SERVICE_ABORT = b"the JAX distributed service detected fatal errors"


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, auto: bool = False,
               heartbeat_timeout_s: int = 100, supervise: bool = False) -> bool:
  """Joins the processes of one job, before anything else touches JAX; returns whether the
  job has several processes.

  ``auto``: let ``jax.distributed.initialize`` find the job (TPU pod slices, SLURM, Open
  MPI). Otherwise name the coordinator (``host:port`` of process 0), the number of
  processes and this one's index. Nothing given: one process, nothing done. A process that
  stops sending heartbeats for ``heartbeat_timeout_s`` makes every other one stop.
  ``supervise``: this process forks first and stays the supervisor of the child that runs
  the job (:func:`_supervise`), so that a lost process always ends the survivors with
  :data:`LOST_PEER_MESSAGE` and :data:`LOST_PEER_EXIT_CODE` (the scripts' setting).
  """
  explicit = [v is not None for v in (coordinator_address, num_processes, process_id)]
  if not auto and not any(explicit):
    return False
  if not auto and not all(explicit):
    raise ValueError("to join a job without auto-detection give all of --coordinator_address, "
                     "--num_processes and --process_id (or --distributed to detect TPU pods, "
                     "SLURM and Open MPI)")
  if supervise:
    _supervise()
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


def from_leader(read: Callable[[], Any], what: str) -> Any:
  """``read()`` run by the leader alone, its JSON-able value sent to every process: what the
  leader finds decides for all (another process's folder may lag or not be the leader's). If
  ``read`` raises, every process raises (:func:`agree`; ``what``: what ``read`` does)."""
  value, error = None, None
  if is_leader():
    try:
      value = read()
    except Exception as e:  # pylint: disable=broad-except  (raised again, in every process)
      error = e
  agree(error, what)
  return broadcast(value)


def everyone(flag: bool) -> list[bool]:
  """Every process's ``flag``, in every process (in process order)."""
  if jax.process_count() == 1:
    return [bool(flag)]
  return [bool(f) for f in np.asarray(multihost_utils.process_allgather(np.int32(flag))).ravel()]


def agree(error: Exception | None, what: str) -> None:
  """Raises in every process if any process met an error doing ``what`` (its share of a
  step that all take together): ``error`` where it happened, elsewhere a ``ValueError``
  naming the processes that failed. With one process: raises ``error`` if there is one.

  Every process calls it at the same point, so that none goes on alone to a collective
  that the others never reach (a hang), or on with another state than theirs.
  """
  failed = [i for i, ok in enumerate(everyone(error is None)) if not ok]
  if error is not None:
    raise error
  if failed:
    raise ValueError(f"process(es) {failed} of this job could not {what} (their log says why); "
                     "every process stops")


def lost_peer(error: BaseException) -> bool:
  """Whether ``error`` says that another process of the job stopped (a collective lost its
  peer, a heartbeat was missed)."""
  text = str(error)
  return jax.process_count() > 1 and any(k in text for k in ("Gloo", "heartbeat", "peer"))


def exit_lost_peer(error: BaseException) -> NoReturn:
  """Ends this process as every survivor of a lost process ends: ``error`` logged, then
  :data:`LOST_PEER_MESSAGE` and exit code :data:`LOST_PEER_EXIT_CODE`, without the
  shutdown handshake that would wait for (or be aborted by) the lost process."""
  logging.error("lost another process of the job: %s", str(error).splitlines()[0][:300])
  logging.flush()
  sys.stdout.flush()
  sys.stderr.write(LOST_PEER_MESSAGE + "\n")
  sys.stderr.flush()
  os._exit(LOST_PEER_EXIT_CODE)  # pylint: disable=protected-access


def _supervise() -> None:
  """Forks. The child returns and runs the job, its stderr piped through this process, which
  stays its supervisor: it passes the child's stderr on and exits with the child's code (128 +
  N after signal N) once the child ends, but when the coordination service aborted the
  child because the job lost a process, with :data:`LOST_PEER_MESSAGE` and
  :data:`LOST_PEER_EXIT_CODE`. A child whose supervisor dies kills itself (whoever kills
  a process of the job kills its supervisor)."""
  sys.stdout.flush()
  sys.stderr.flush()
  read_end, write_end = os.pipe()
  supervisor = os.getpid()
  child = os.fork()
  if child == 0:
    os.close(read_end)
    os.dup2(write_end, 2)
    os.close(write_end)
    threading.Thread(target=_die_with, args=(supervisor,), name="die_with_supervisor",
                     daemon=True).start()
    return
  os.close(write_end)
  signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the child, which ends the job
  aborted = threading.Event()

  def copy() -> None:
    tail = b""
    while chunk := os.read(read_end, 1 << 16):
      with contextlib.suppress(OSError):  # keep draining the pipe whatever happens to stderr
        sys.stderr.buffer.write(chunk)
        sys.stderr.buffer.flush()
      text = tail + chunk
      if _SERVICE_ABORT in text:
        aborted.set()
      tail = text[-len(_SERVICE_ABORT):]

  reader = threading.Thread(target=copy, name="child_stderr", daemon=True)
  reader.start()
  _, status = os.waitpid(child, 0)
  reader.join(timeout=5)  # a grandchild may hold the pipe open: do not wait for it
  code = os.waitstatus_to_exitcode(status)
  if code == -signal.SIGABRT and aborted.is_set():
    sys.stderr.write(LOST_PEER_MESSAGE + "\n")
    sys.stderr.flush()
    code = LOST_PEER_EXIT_CODE
  os._exit(code if code >= 0 else 128 - code)  # pylint: disable=protected-access


def _die_with(supervisor: int) -> None:
  """Kills this process once its supervisor is gone (it was killed: so is this process)."""
  while os.getppid() == supervisor:
    time.sleep(0.2)
  os.kill(os.getpid(), signal.SIGKILL)
