"""Shared fixtures: small learnable fake CIFAR-100 shards."""

import os
import pathlib
import tempfile

# Resume tests compare runs bit for bit; XLA's GPU kernels are deterministic only on request
# (set before JAX starts; CPUs ignore the flag).
os.environ["XLA_FLAGS"] = " ".join(
    filter(None, [os.environ.get("XLA_FLAGS"), "--xla_gpu_deterministic_ops=true"]))

# The suite runs in two worker processes (pytest-xdist, docs/testing.md): on a GPU each would otherwise
# reserve 75 % of its memory at start.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

# One persistent compilation cache for the session and its subprocesses (the command-line
# tests, the served clouds): a program compiled once is loaded, not compiled again, by the
# next process that needs it. A fresh folder per session, so every run compiles its own.
_CACHE = tempfile.TemporaryDirectory(prefix="maxpart_jax_cache_")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE.name)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # pylint: disable=wrong-import-position
import jax.numpy as jnp
import numpy as np
import pytest

pytest_plugins = ("tolerance_report",)  # --tolerance-report=PATH (tests/tolerance_report.py)


# XLA_FLAGS of the subprocesses that emulate 8 devices. The 8 device threads share this
# machine's cores; under load one can take longer than XLA's default 40 s to reach a
# collective, which then aborts the process, so the timeout is raised. (A real deadlock of
# two multi-device programs in flight at once is prevented in the evaluator itself.)
EIGHT_CPU_DEVICES = ("--xla_force_host_platform_device_count=8 "
                     "--xla_cpu_collective_call_terminate_timeout_seconds=600")
EIGHT_CPU_ENV = {"XLA_FLAGS": EIGHT_CPU_DEVICES, "JAX_PLATFORMS": "cpu"}


REPO = pathlib.Path(__file__).resolve().parents[1]
SHIPPED_MODEL = str(REPO / "pretrained" / "cpu_resnet18" / "model")


def _real_cifar100_dir() -> pathlib.Path:
  """$MAXPART_DATA_DIR (read when the tests start), else ../shared/data/cifar100."""
  folder = pathlib.Path(
      os.environ.get("MAXPART_DATA_DIR") or REPO.parent / "shared" / "data" / "cifar100")
  return folder / "cifar100" if (folder / "cifar100").is_dir() else folder


REAL_DIR = _real_cifar100_dir()
needs_real = pytest.mark.skipif(
    not (REAL_DIR / "train-00.npz").is_file(),
    reason=f"real CIFAR-100 shards not found in {REAL_DIR} (set MAXPART_DATA_DIR to the folder)")


def relative_distance(a, b) -> float:
  """‖a − b‖ / ‖b‖ over all leaves of two pytrees (leaves of any shape, stacked or not)."""
  flat = lambda t: np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(t)])
  return float(np.linalg.norm(flat(a) - flat(b)) / np.linalg.norm(flat(b)))


def write_fake_cifar(folder: pathlib.Path, n_train: int = 320, n_test: int = 100,
                     num_classes: int = 100, seed: int = 0) -> pathlib.Path:
  """Shards whose label is encoded in the mean colour, so a tiny model can learn them."""
  rng = np.random.default_rng(seed)
  palette = rng.integers(30, 225, (num_classes, 3))
  folder.mkdir(parents=True, exist_ok=True)
  for kind, n in (("train", n_train), ("test", n_test)):
    labels = np.arange(n) % num_classes
    noise = rng.integers(-30, 30, (n, 32, 32, 3))
    images = np.clip(palette[labels][:, None, None, :] + noise, 0, 255).astype(np.uint8)
    np.savez(folder / f"{kind}-00.npz", image=images, label=labels)
  return folder


@pytest.fixture(scope="session")
def fake_data_dir(tmp_path_factory) -> str:
  return str(write_fake_cifar(tmp_path_factory.mktemp("fake_cifar100")))


@pytest.fixture(scope="session")
def smoke(fake_data_dir, tmp_path_factory):
  """The smoke search config on fake data, with its model pre-trained once per session."""
  from experiments.configs import search as search_configs
  from maxpart_jax.jobs import build
  config = search_configs.get_config("smoke")
  config.data_dir = fake_data_dir
  config.pretrain.steps_per_epoch = 0  # the whole fake split: a model that has learned a bit
  config.model_dir = str(tmp_path_factory.mktemp("pretrained") / "model")
  # The tests compare with float32 references; `auto` would evaluate in bfloat16 on a GPU
  # (bfloat16 has its own tests: test_models and the bf16 ranking benchmark).
  config.fitness.compute_dtype = "float32"
  build.load_or_pretrain(config)
  return config


@pytest.fixture(scope="session")
def smoke_search(smoke, tmp_path_factory):
  """The finished smoke search, run once per session: (its report, its workdir). Copy the
  workdir before changing anything in it."""
  from maxpart_jax.jobs import driver
  workdir = tmp_path_factory.mktemp("smoke_search")
  return driver.run_search(smoke, str(workdir)), workdir


# --- exported splits (test_deploy, test_service) ---------------------------------------


def jittered(model, seed=0):
  """Random variables in numpy (no compiled init): He-scaled kernels, and batch norm
  statistics and affines away from 0 / 1, so that folding them wrongly shows."""
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = jax.tree_util.keystr(path)
    if name.endswith("['kernel']"):
      fan_in = int(np.prod(leaf.shape[:-1]))
      return rng.normal(0.0, np.sqrt(2.0 / fan_in), leaf.shape).astype(np.float32)
    lo, hi = ((0.5, 1.5) if name.endswith("['scale']") else (0.5, 2.0) if name.endswith("['var']")
              else (-0.2, 0.2))
    return rng.uniform(lo, hi, leaf.shape).astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, jax.eval_shape(model.init, jax.random.key(0)))


def mixed_genome(info, p, seed=0):
  """A genome with 2-8-bit weights and 4-8-bit inputs drawn per layer."""
  from maxpart_jax.genome import Genome
  rng = np.random.default_rng(seed)
  return Genome(p=jnp.int32(p),
                w_bits=jnp.asarray(rng.choice([2, 4, 6, 8], info.num_layers), jnp.int32),
                a_bits=jnp.asarray(rng.choice([4, 8], info.num_layers), jnp.int32))


def gratings(n: int, seed: int = 0, frequencies: tuple[float, float] = (0.5, 2.5)) -> np.ndarray:
  """(n, 32, 32, 3) float32 images in [0, 1]: coloured sinusoidal gratings of random
  frequency (cycles per image, drawn from ``frequencies``), orientation and phase. Unlike the
  fake shards' flat colour plus pixel noise, their luma has structure that a conv net's
  channels follow: their privacy is far from the value 2 of an uncorrelated IR and moves with
  the edge's weights, and a small decoder learns to reconstruct them in a few dozen steps."""
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[0:32, 0:32] / 31.0
  out = []
  for _ in range(n):
    fx, fy = rng.uniform(*frequencies, 2)
    luma = 0.5 + 0.5 * np.sin(2 * np.pi * (fx * x + fy * y) + rng.uniform(0, 2 * np.pi))
    out.append(luma[..., None] * rng.uniform(0.2, 1.0, 3))
  return np.stack(out).astype(np.float32)


def images(n, seed=0):
  """n random uint8 images (n, 32, 32, 3)."""
  return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  """A ResNet18 ×0.125 split after block 4 (a projection shortcut on the edge), mixed bits."""
  from maxpart_jax.deploy import artifact
  from maxpart_jax.models import get_model
  model = get_model("resnet18", width=0.125)
  variables = jittered(model)
  genome = mixed_genome(model.info, 4)
  out = tmp_path_factory.mktemp("deploy")
  edge, cloud = artifact.export_split(model, variables, genome,
                                     {"name": "resnet18", "width": 0.125}, str(out))
  return model, variables, genome, edge, cloud, out


# Tests that need the session's pre-trained smoke model or its reproduction are slow (the
# fixture alone pre-trains for about 25 s); `pytest -m "not slow"` leaves them out.
SLOW_FIXTURES = {"smoke", "smoke_report", "smoke_search"}


def pytest_collection_modifyitems(items):
  for item in items:
    if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
      item.add_marker(pytest.mark.slow)
