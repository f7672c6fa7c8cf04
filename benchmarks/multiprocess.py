r"""Candidates per second over the same devices in one process or spread over several.

  python -m benchmarks.multiprocess --json=results/benchmarks/multiprocess.json

Launches, one after the other, the same evaluation of K random genomes (fine-tuning,
accuracy, privacy: the search's fitness) in two layouts with the same total number of CPU
devices: one process with ``--devices`` devices, and ``--devices`` processes with one device
each, joined with ``jax.distributed`` over localhost (gloo collectives). Each layout compiles,
then times ``--repeats`` evaluations; the ratio of the two rates is measured in one run.

On one machine the processes share its cores, so this measures the cost of the multi-process
machinery (host round trips, gathering results, gloo), not a speed-up: several hosts add
devices, which this cannot emulate. Synthetic data: it runs anywhere.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

from absl import app, flags
import numpy as np

_DEVICES = flags.DEFINE_integer("devices", 2, "CPU devices in all, per layout")
_K = flags.DEFINE_integer("k", 4, "candidates per evaluation (a multiple of --devices)")
_REPEATS = flags.DEFINE_integer("repeats", 3, "timed evaluations per layout, after one to compile")
_STEPS = flags.DEFINE_integer("finetune_steps", 5, "fine-tuning steps per candidate")
_WIDTH = flags.DEFINE_float("width", 0.25, "ResNet18 channel multiplier")
_JSON = flags.DEFINE_string("json", None, "write the results here")
# set by the launcher in the workers
_WORKER = flags.DEFINE_bool("worker", False, "run one process of a layout (internal)")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "(worker) host:port of process 0")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 1, "(worker) processes in the layout")
_PROCESS_ID = flags.DEFINE_integer("process_id", 0, "(worker) this process's index")


def _worker() -> None:
  """Times the evaluations in this process of a layout; process 0 prints one JSON line."""
  from maxpart_jax import data, distributed
  if _NUM_PROCESSES.value > 1:
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  import jax
  from experiments.configs import search as search_configs
  from maxpart_jax.models import get_model
  from maxpart_jax.jobs import settings
  from maxpart_jax.search.fitness import Evaluator, FitnessConfig
  from maxpart_jax.search.operators import get_operator

  rng = np.random.default_rng(0)  # the same images in every process
  def split(n):
    return data.Split(rng.integers(0, 256, (n, 32, 32, 3), np.uint8),
                      rng.integers(0, 100, n).astype(np.int32), 100, "cifar100")
  train, val = split(512), split(256)
  model = get_model("resnet18", width=_WIDTH.value)
  variables = model.init(jax.random.key(0))
  config = FitnessConfig(finetune_steps=_STEPS.value, batch_size=32)
  evaluator = Evaluator(model, variables, train, val, val.float_images()[:32], config,
                        candidates_per_call=_K.value)
  space = settings.space_from_config(search_configs.get_config("quick"), model.info)
  init = get_operator("init", "uniform")
  genomes = jax.vmap(lambda key: init(key, space))(jax.random.split(jax.random.key(1), _K.value))
  evaluator.evaluate(genomes)  # compile
  start = time.perf_counter()
  for _ in range(_REPEATS.value):
    metrics = evaluator.evaluate(genomes)
  seconds = time.perf_counter() - start
  if distributed.is_leader():
    print(json.dumps({"processes": jax.process_count(), "devices": jax.device_count(),
                      "candidates_per_s": _K.value * _REPEATS.value / seconds,
                      "fitness": [float(f) for f in metrics["fitness"]]}), flush=True)


def _layout(processes: int, devices_each: int) -> dict:
  """Runs one layout's processes and returns process 0's JSON line."""
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices_each}"}
  common = [sys.executable, "-m", "benchmarks.multiprocess", "--worker",
            f"--num_processes={processes}", f"--coordinator_address=localhost:{port}",
            f"--k={_K.value}", f"--repeats={_REPEATS.value}", f"--finetune_steps={_STEPS.value}",
            f"--width={_WIDTH.value}"]
  procs = [subprocess.Popen(common + [f"--process_id={i}"], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
           for i in range(processes)]
  outputs = [p.communicate(timeout=1800)[0] for p in procs]
  if any(p.returncode for p in procs):
    raise RuntimeError(f"a process of the {processes}-process layout failed")
  return json.loads([line for line in outputs[0].splitlines() if line.startswith("{")][-1])


def main(argv: list[str]) -> None:
  del argv
  if _WORKER.value:
    _worker()
    return
  n = _DEVICES.value
  if _K.value % n:
    raise SystemExit(f"error: --k={_K.value} must be a multiple of --devices={n}")
  one = _layout(1, n)
  many = _layout(n, 1)
  result = {"one_process": one, "processes": many,
            "ratio_processes_over_one": many["candidates_per_s"] / one["candidates_per_s"],
            "same_fitness": bool(np.allclose(one["fitness"], many["fitness"], rtol=1e-5)),
            "k": _K.value, "repeats": _REPEATS.value, "finetune_steps": _STEPS.value,
            "width": _WIDTH.value,
            "note": "one machine: measures the multi-process overhead, not a speed-up"}
  print(f"1 process x {n} devices: {one['candidates_per_s']:.3f} candidates/s; {n} processes "
        f"x 1 device: {many['candidates_per_s']:.3f} candidates/s; ratio "
        f"{result['ratio_processes_over_one']:.2f} (same fitness: {result['same_fitness']})")
  if _JSON.value:
    from maxpart_jax import checkpoint, runs
    result["environment"] = runs.environment()
    checkpoint.write_json(_JSON.value, result)


if __name__ == "__main__":
  app.run(main)
