r"""Load on the cloud service: this version against the standard-library server it replaced,
in one run on the same artifact and the same machine.

  .venv/bin/python -m benchmarks.service_load --json=results/deploy/service_load.json

Exports a ResNet18 ×0.125 split (random weights; no data needed) and, for each server in
turn (each in its own process): 50 concurrent clients × 10 requests of 1-3 IR messages
(p50 / p99 latency, requests answered correctly, reset or failed), then batches of 8
messages from 8 clients (images/s), then one request of every batch size 1..200 (the
server's memory before and after). The former server is taken from git
(``--baseline_commit``), so this needs the repository's history. On a 2-core CPU the
clients share the cores with the server: the numbers measure the server's overhead and
fairness, not a deployment's throughput.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

from absl import app, flags
import numpy as np

from maxpart_jax import checkpoint, runs

_JSON = flags.DEFINE_string("json", None, "also write the results here")
_BASELINE = flags.DEFINE_string("baseline_commit", "28301ae",
                                "the commit whose maxpart_jax/deploy/service.py is the baseline")
_CLIENTS = flags.DEFINE_integer("clients", 50, "concurrent clients")
_ROUNDS = flags.DEFINE_integer("rounds", 10, "requests per client")
_SIZES = flags.DEFINE_integer("batch_sizes", 200, "distinct batch sizes for the memory test")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

BASELINE_SERVER = """
import sys, types
source, artifact = sys.argv[1:3]
module = types.ModuleType("baseline_service")
exec(compile(open(source).read(), source, "exec"), module.__dict__)
from maxpart_jax.deploy.artifact import CloudProgram
server = module.make_server(CloudProgram.load(artifact), "127.0.0.1", 0, 64 * 2 ** 20)
print(f"serving on http://127.0.0.1:{server.server_address[1]}", flush=True)
server.serve_forever()
"""


def _export(folder: str):
  """A ResNet18 ×0.125 split after block 4, mixed bits, random weights."""
  import jax
  import jax.numpy as jnp
  from maxpart_jax.deploy import artifact
  from maxpart_jax.genome import Genome
  from maxpart_jax.models import get_model
  model = get_model("resnet18", width=0.125)
  rng = np.random.default_rng(0)

  def draw(path, leaf):
    name = jax.tree_util.keystr(path)
    if name.endswith("['kernel']"):
      return rng.normal(0, np.sqrt(2 / np.prod(leaf.shape[:-1])), leaf.shape).astype(np.float32)
    lo, hi = (0.5, 1.5) if name.endswith(("['scale']", "['var']")) else (-0.2, 0.2)
    return rng.uniform(lo, hi, leaf.shape).astype(np.float32)

  variables = jax.tree_util.tree_map_with_path(draw, jax.eval_shape(model.init,
                                                                    jax.random.key(0)))
  genome = Genome(p=jnp.int32(4), w_bits=jnp.asarray(rng.choice([4, 8], model.info.num_layers)),
                  a_bits=jnp.full((model.info.num_layers,), 8, jnp.int32))
  edge, cloud = artifact.export_split(model, variables, genome,
                                      {"name": "resnet18", "width": 0.125}, folder)
  images = rng.integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
  return edge.messages(images), cloud.logits(*edge.ir(images)).argmax(-1)


def _start(command: list[str]) -> tuple[subprocess.Popen, str]:
  server = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  url = re.search(r"serving on (http://\S+)", server.stdout.readline()).group(1)
  return server, url


def _post(url: str, body: bytes) -> tuple[str, list[int] | None, float]:
  """``(outcome, predictions, seconds)``: ok, http <status>, or the connection error."""
  start = time.perf_counter()
  try:
    with urllib.request.urlopen(urllib.request.Request(url, data=body, method="POST"),
                                timeout=120) as response:
      predictions = json.loads(response.read())["predictions"]
      return "ok", predictions, time.perf_counter() - start
  except urllib.error.HTTPError as e:
    return f"http {e.code}", None, time.perf_counter() - start
  except OSError as e:
    return type(getattr(e, "reason", e)).__name__, None, time.perf_counter() - start


def _rss_mib(pid: int) -> float:
  with open(f"/proc/{pid}/status") as f:
    return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1)) / 1024


def measure(url: str, pid: int, messages: list[bytes], expected: np.ndarray) -> dict:
  """The three loads on one running server."""
  predict = f"{url}/v1/predict"
  rng = np.random.default_rng(0)
  picks = [[rng.choice(len(messages), rng.integers(1, 4), replace=False)
            for _ in range(_ROUNDS.value)] for _ in range(_CLIENTS.value)]
  _post(predict, b"".join(messages[:3]))  # compile the first sizes outside the timing

  def client(rounds):
    out = []
    for pick in rounds:
      outcome, predictions, seconds = _post(predict, b"".join(messages[i] for i in pick))
      correct = outcome == "ok" and predictions == expected[pick].tolist()
      out.append((outcome if outcome != "ok" or correct else "wrong", seconds))
    return out

  start = time.perf_counter()
  with concurrent.futures.ThreadPoolExecutor(_CLIENTS.value) as pool:
    done = [r for rounds in pool.map(client, picks) for r in rounds]
  wall = time.perf_counter() - start
  latency = np.array([s for outcome, s in done if outcome == "ok"])
  outcomes = {o: sum(1 for x, _ in done if x == o) for o in {x for x, _ in done}}
  row = {"requests": len(done), "outcomes": outcomes,
         "p50_ms": float(np.percentile(latency, 50) * 1e3) if len(latency) else None,
         "p99_ms": float(np.percentile(latency, 99) * 1e3) if len(latency) else None,
         "requests_per_second": len(done) / wall}
  batch = b"".join(messages[:8])
  _post(predict, batch)
  start = time.perf_counter()
  with concurrent.futures.ThreadPoolExecutor(8) as pool:
    answered = list(pool.map(lambda _: _post(predict, batch)[0], range(64)))
  row["images_per_second_batches_of_8"] = 8 * answered.count("ok") / (time.perf_counter() - start)
  before = _rss_mib(pid)
  start = time.perf_counter()
  sizes_ok = 0
  for n in range(1, _SIZES.value + 1):
    body = b"".join(messages[i % len(messages)] for i in range(n))
    outcome, predictions, _ = _post(predict, body)
    sizes_ok += outcome == "ok" and predictions == [int(expected[i % len(messages)])
                                                     for i in range(n)]
  row.update(rss_before_mib=before, rss_after_mib=_rss_mib(pid), distinct_sizes=_SIZES.value,
             distinct_sizes_answered_correctly=sizes_ok,
             distinct_sizes_seconds=time.perf_counter() - start)
  return row


def main(argv: list[str]) -> None:
  del argv
  with tempfile.TemporaryDirectory() as folder:
    messages, expected = _export(folder)
    baseline_source = os.path.join(folder, "baseline_service.py")
    with open(baseline_source, "w") as f:
      f.write(subprocess.run(["git", "show", f"{_BASELINE.value}:maxpart_jax/deploy/service.py"],
                             cwd=REPO, check=True, capture_output=True, text=True).stdout)
    servers = {
        "uvicorn (this version)": [sys.executable, "-m", "experiments.serve_cloud",
                                   f"--artifact={folder}/cloud", "--port=0"],
        f"http.server ({_BASELINE.value})": [sys.executable, "-c", BASELINE_SERVER,
                                             baseline_source, f"{folder}/cloud"]}
    results = {}
    for name, command in servers.items():
      server, url = _start(command)
      try:
        results[name] = measure(url, server.pid, messages, expected)
      finally:
        server.terminate()
        server.wait(timeout=30)
      print(f"{name}: {json.dumps(results[name])}", flush=True)
  new, old = results.values()
  ratios = {"p50": old["p50_ms"] / new["p50_ms"], "p99": old["p99_ms"] / new["p99_ms"],
            "images_per_second": new["images_per_second_batches_of_8"]
            / old["images_per_second_batches_of_8"]}
  print(f"baseline / this version: p50 latency {ratios['p50']:.2f}x, p99 {ratios['p99']:.2f}x; "
        f"images/s this / baseline {ratios['images_per_second']:.2f}x")
  if _JSON.value:
    checkpoint.write_json(_JSON.value, {
        "clients": _CLIENTS.value, "rounds": _ROUNDS.value, "servers": results,
        "ratios": ratios, "environment": runs.environment()})


if __name__ == "__main__":
  app.run(main)
