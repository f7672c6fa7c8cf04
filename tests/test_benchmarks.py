"""The accelerator benchmark's command line (its measurements run on accelerators, not here)."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_accelerator_benchmark_refuses_unknown_measurements_before_measuring():
  """A typo in --only must stop the run with the names on offer, not measure nothing."""
  proc = subprocess.run(
      [sys.executable, "-m", "benchmarks.accelerator", "--synthetic", "--width=0.0625",
       "--only=matmul_bf16,eval_new_bf16_vmap_k3"],
      cwd=REPO, capture_output=True, text=True, timeout=600,
      env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode != 0
  assert "unknown measurements ['eval_new_bf16_vmap_k3']" in proc.stderr
  assert "'eval_new_bf16_vmap_k1'" in proc.stderr and "'pretrain_old'" in proc.stderr
  assert "matmul_bf16:" not in proc.stdout  # nothing was measured
