"""The Colab notebook's code cells run top to bottom on 8 emulated CPU devices."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import EIGHT_CPU_ENV

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, "experiments", "colab_tpu.ipynb")


@pytest.mark.slow
def test_colab_notebook_runs_on_eight_cpu_devices(smoke, tmp_path):
  with open(NOTEBOOK) as f:
    cells = [c for c in json.load(f)["cells"] if c["cell_type"] == "code"]
  source = "\n\n".join("".join(c["source"]) for c in cells)
  assert not any(line.lstrip().startswith(("!", "%")) for line in source.splitlines()), (
      "notebook code must be plain Python so that this test runs it")
  script = tmp_path / "notebook.py"
  script.write_text(source)
  # The session's smoke model where the smoke config looks for it: the notebook searches
  # without pre-training first (pre-training has its own tests).
  shutil.copytree(smoke.model_dir, tmp_path / "workdirs" / "smoke" / "model")
  env = dict(os.environ, **EIGHT_CPU_ENV, MPLBACKEND="Agg", MAXPART_NOTEBOOK_VARIANT="smoke",
             MAXPART_DATA_DIR=smoke.data_dir,
             PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))
  proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True,
                        text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "8 device(s) of platform cpu" in proc.stdout
  assert "K = 8 tournaments per step over 8 device(s)" in proc.stdout
  with open(tmp_path / "workdirs" / "colab_smoke" / "best.json") as f:
    best = json.load(f)
  assert best["devices"] == 8 and best["tournaments_per_step"] == 8
  assert "on 8 device(s)" in proc.stdout and f"p={best['p']}" in proc.stdout
