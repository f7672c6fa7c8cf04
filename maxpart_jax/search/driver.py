"""The search job: config in, best genome and its report out, resumable at every step.

``run_search(config, workdir)`` validates the config before any work, loads (or
pre-trains) the model, runs the evolution with K tournaments per step, and after
every step writes ``<workdir>/search_state.npz`` atomically (population, cache,
history; the state before it stays as ``search_state.prev.npz`` to fall back to), so a
run killed at any point and restarted with the same command ends with the same result.
A resumed search must depend on the same things (:func:`search_identity`: settings, data
content, pre-trained weights, numerics) or it is refused. Genomes that differ only in
masked genes are the same candidate: results are cached by the *effective* genome and
reused.
"""

from __future__ import annotations

import csv
import hashlib
import importlib
import json
import math
import os
import time
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from maxpart_jax import checkpoint, data, pareto, runs
from maxpart_jax.attacks import DecoderConfig
from maxpart_jax.energy import DeviceConfig, population_latency
from maxpart_jax.genome import Genome, effective_bits, validate_genome
from maxpart_jax.metrics import MetricWriter
from maxpart_jax.models import available_models, get_model
from maxpart_jax.models.metadata import ModelInfo
from maxpart_jax.quant import check_bits
from maxpart_jax.search import algorithms, evolution
from maxpart_jax.search.fitness import Evaluator, FitnessConfig, violation_degree, violations
from maxpart_jax.search.operators import SearchSpace
from maxpart_jax.train import Progress, model_spec, split_spec, validate_train_config

STATE_FILE = "search_state.npz"
PREVIOUS_STATE_FILE = "search_state.prev.npz"
METRICS = ("fitness", "privacy", "energy_mj", "eps", "latency_ms", "accuracy", "diverged",
           "failed", "collapsed")

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
    "fitness.attack.ssim_weight": 0.0}


def effective_keys(info: ModelInfo, genomes: Genome) -> list[str]:
  """Strings naming what K genomes really run: ``p`` and the unmasked bits only.

  One vmapped computation and one device-to-host copy for the whole batch.
  """
  w, a, ir_bits = jax.device_get(jax.vmap(lambda g: effective_bits(info, g))(genomes))
  ps = np.asarray(jax.device_get(genomes.p))
  layer_block = np.asarray(info.layer_block)
  keys = []
  for p, wi, ai, ir in zip(ps, w, a, ir_bits):
    genes = ",".join(f"{x}/{y}" for x, y in zip(wi[layer_block < p], ai[layer_block < p]))
    keys.append(f"p{p}|ir{ir}|{genes}")
  return keys


def effective_key(info: ModelInfo, genome: Genome) -> str:
  """:func:`effective_keys` of one genome."""
  return effective_keys(info, jax.tree.map(lambda x: x[None], genome))[0]


def strategy_from_config(config: ml_collections.ConfigDict) -> evolution.Strategy:
  """The static evolution settings of ``config.search``."""
  s = config.search
  return evolution.Strategy(pop_size=s.pop_size, num_tournaments=s.num_tournaments, init=s.init,
                            sample=s.sample, select=s.select, mutate=s.mutate,
                            crossover=s.crossover, replace=s.replace)


def space_from_config(config: ml_collections.ConfigDict, info: ModelInfo) -> SearchSpace:
  """The search space of ``config.search`` for a model."""
  s = config.search
  return SearchSpace(w_choices=jnp.asarray(s.w_bits, jnp.int32),
                     a_choices=jnp.asarray(s.a_bits, jnp.int32), prob_p=jnp.float32(s.prob_p),
                     prob_gene=jnp.float32(s.prob_gene), max_split=info.max_split,
                     num_layers=info.num_layers, sample_size=s.sample_size)


def fitness_from_config(config: ml_collections.ConfigDict) -> FitnessConfig:
  """The fitness settings of ``config.fitness``."""
  f = config.fitness
  return FitnessConfig(
      eps_bound=f.eps_bound, lambda_energy=f.lambda_energy, lambda_accuracy=f.lambda_accuracy,
      lambda_latency=f.lambda_latency, device=device_from_config(config),
      transmission=f.transmission,
      finetune_steps=f.finetune_steps, finetune_lr=f.finetune_lr,
      finetune_momentum=f.finetune_momentum, batch_size=f.batch_size, metric=f.metric,
      normalization=f.normalization, per_channel=f.per_channel,
      activation_levels=f.activation_levels, seed=f.seed,
      candidate_loop=f.candidate_loop, compute_dtype=f.compute_dtype,
      matmul_precision=f.matmul_precision, pipeline=f.pipeline,
      attack=DecoderConfig(**{k: v for k, v in f.attack.to_dict().items() if k != "images"}),
      attack_images=f.attack.images)


def device_from_config(config: ml_collections.ConfigDict) -> DeviceConfig:
  """The edge device of ``config.device`` with the budget ``config.fitness.budget_mj``."""
  return DeviceConfig(budget_mj=config.fitness.budget_mj, **config.device.to_dict())


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises ``ValueError`` with the problem for a config that cannot run (no work done).

  First imports ``config.operator_modules`` (comma-separated), where user operators
  register themselves.
  """
  for module in filter(None, (m.strip() for m in config.operator_modules.split(","))):
    try:
      importlib.import_module(module)
    except ImportError as e:
      raise ValueError(f"config.operator_modules names {module!r}, which cannot be imported "
                       f"({e}). It must be importable from where the search runs: start it "
                       f"from the folder that holds {module.replace('.', '/')}.py, or add that "
                       "folder to PYTHONPATH") from None
  s = config.search
  if not s.w_bits or not s.a_bits:
    raise ValueError("search.w_bits and search.a_bits must not be empty")
  check_bits(list(s.w_bits), "search.w_bits")
  check_bits(list(s.a_bits), "search.a_bits")
  if not 1 <= s.sample_size <= s.pop_size:
    raise ValueError(f"search.sample_size S={s.sample_size} must be in 1..N "
                     f"(search.pop_size={s.pop_size})")
  if s.iterations < 0:
    raise ValueError(f"search.iterations must be >= 0, got {s.iterations}")
  for name in ("prob_p", "prob_gene"):
    if not 0.0 <= s[name] <= 1.0:
      raise ValueError(f"search.{name} must be in [0, 1], got {s[name]}")
  if config.fitness.budget_mj <= 0:
    raise ValueError(f"fitness.budget_mj (E_b) must be > 0, got {config.fitness.budget_mj}")
  for name, value, low in (("privacy_images", config.privacy_images, 1),
                           ("val_images", config.val_images, 0),
                           ("log_every_steps", config.log_every_steps, 1),
                           ("fitness.batch_size", config.fitness.batch_size, 1),
                           ("fitness.finetune_steps", config.fitness.finetune_steps, 0)):
    if value is not None and value < low:
      raise ValueError(f"{name} must be >= {low}, got {value}")
  validate_train_config(config.pretrain, "pretrain.")  # the model name among the rest
  strategy_from_config(config)  # unknown operators
  algorithms.get_algorithm(s.algorithm)
  fitness_from_config(config)  # λ, ε_b, metric
  energy_model = config.energy_model.get("name")
  if energy_model and energy_model not in available_models():
    raise ValueError(f"unknown model {energy_model!r} in energy_model; available: "
                     f"{available_models()}")


def energy_info_from_config(config: ml_collections.ConfigDict) -> ModelInfo | None:
  """Metadata of ``config.energy_model``, whose energy counts (None: the searched model's).

  A CPU-size search runs a narrow model but may charge the energy of the paper-size
  one: same blocks and layers, more channels.
  """
  spec = config.energy_model.to_dict()
  return info_from_spec(spec) if spec.get("name") else None


def info_from_spec(spec: dict[str, Any]) -> ModelInfo:
  """Metadata of the model ``{"name": ..., **builder kwargs}`` names (None values are dropped)."""
  kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in spec.items()
            if v is not None and k != "name"}
  return get_model(spec["name"], **kwargs).info


def check_data_sizes(config: ml_collections.ConfigDict, train: data.Split, val: data.Split) -> None:
  """Raises ``ValueError`` naming the field that asks for more images than the split holds."""
  for name, value, split, what in (
      ("privacy_images", config.privacy_images, val, "validation"),
      ("val_images", config.val_images, val, "validation"),
      ("fitness.batch_size", config.fitness.batch_size, train, "training")):
    if value > len(split):
      raise ValueError(f"{name}={value} is more than the {len(split)} {what} images of this "
                       f"split (pretrain.val_fraction={config.pretrain.val_fraction}); lower it")


def load_or_pretrain(config: ml_collections.ConfigDict):
  """The pre-trained model of ``config.model_dir``; pre-trains it first if there is none."""
  if not os.path.exists(os.path.join(config.model_dir, "model.json")):
    from maxpart_jax.train import train_and_evaluate
    if os.path.basename(os.path.normpath(config.model_dir)) != "model":
      raise ValueError(f"no pre-trained model at {config.model_dir}; pre-training writes "
                       "<workdir>/model, so point model_dir at a folder named model")
    workdir = os.path.dirname(os.path.abspath(config.model_dir))
    logging.info("no pre-trained model at %s: pre-training it first (%s)", config.model_dir,
                 workdir)
    train_and_evaluate(config.pretrain, workdir)
  model, variables, meta = checkpoint.load_model(config.model_dir)
  if meta["dataset"] != config.pretrain.dataset:
    raise ValueError(f"the model at {config.model_dir} was pre-trained on {meta['dataset']}, but "
                     f"config.pretrain.dataset is {config.pretrain.dataset}")
  stored, expected = meta["model"], model_spec(config.pretrain)
  if stored != expected:
    raise ValueError(f"the checkpoint at {config.model_dir} is {stored}, but the config asks for "
                     f"{expected}: point model_dir at a matching checkpoint")
  # The search validates on the hold-out of config.pretrain's split: it must be the one
  # the model did not train on.
  split = split_spec(config.pretrain)
  if "split" not in meta:
    raise ValueError(f"{config.model_dir}/model.json does not say which images the model held "
                     f"out; if it was pre-trained with {split}, add \"split\": "
                     f"{json.dumps(split)} to it, otherwise pre-train it again")
  if meta["split"] != split:
    raise ValueError(f"the model at {config.model_dir} was pre-trained holding out "
                     f"{meta['split']}, but config.pretrain asks for {split}: its validation "
                     "images would include training images. Use the stored settings "
                     "(--config.pretrain.val_fraction / data_seed) or another model_dir")
  return model, variables, meta


def _save(workdir: str, state: algorithms.State, meta: dict[str, Any]) -> None:
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
  after a kill between the two renames of :func:`_save`; a ``WorkdirError`` names the files
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
  ``evaluations.json`` when it has finished, else from its latest readable state."""
  path = os.path.join(workdir, "evaluations.json")
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  for name in (STATE_FILE, PREVIOUS_STATE_FILE):
    try:
      with np.load(os.path.join(workdir, name)) as f:
        cache = json.loads(str(f["meta"]))["cache"]
      return [{"key": key, **entry} for key, entry in cache.items()]
    except Exception as e:  # pylint: disable=broad-except  (missing, zip, npz, JSON errors)
      logging.warning("%s/%s does not load (%s: %s)", workdir, name, type(e).__name__, e)
  raise runs.WorkdirError(f"{workdir} holds no evaluations.json and no search state that "
                          "loads; give the workdir of a search (a reproduction's search is "
                          "in <workdir>/search)")


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
  identity = runs.flatten({
      k: config[k].to_dict() if hasattr(config[k], "to_dict") else config[k]
      for k in ("search", "fitness", "device", "privacy_images", "val_images", "energy_model")})
  del identity["search.iterations"]
  identity.update({f"pretrain.{k}": v for k, v in split_spec(config.pretrain).items()})
  identity.update({
      "pretrained_weights_sha256": checkpoint.variables_sha256(evaluator.variables),
      "data_content": data.content_hash(evaluator.train.dataset, config.data_dir or None),
      # The images ε and P are measured on, as the evaluator holds them (a caller may pass
      # an evaluator built for another search.seed).
      "evaluation_images_sha256": _images_sha256(evaluator),
      "resolved.compute_dtype": evaluator.numerics.dtype,
      "resolved.matmul_precision": evaluator.numerics.precision,
      "resolved.pipeline": evaluator.pipeline, "resolved.candidate_loop": evaluator.candidate_loop})
  identity = json.loads(json.dumps(identity, default=str))  # as stored: tuples become lists
  return {k: v for k, v in identity.items() if k not in LATER_DEFAULTS or v != LATER_DEFAULTS[k]}


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


class CachedEvaluator:
  """Evaluates genomes through a cache keyed by the effective genome.

  Each entry holds the :data:`METRICS` and, under ``"genome"``, the first genome
  evaluated with that key (what the final report re-evaluates).
  """

  def __init__(self, evaluator: Evaluator, cache: dict[str, dict[str, float]]):
    self.evaluator, self.cache = evaluator, cache
    self.lookups = self.hits = 0

  def __call__(self, genomes: Genome, progress: str = "") -> dict[str, np.ndarray]:
    info = self.evaluator.model.info
    k = int(genomes.p.shape[0])
    keys = effective_keys(info, genomes)
    todo = [keys.index(key) for key in dict.fromkeys(keys) if key not in self.cache]
    self.lookups += k
    self.hits += k - len(todo)
    if todo:
      fresh = self.evaluator.evaluate(jax.tree.map(lambda x: x[np.array(todo)], genomes),
                                      progress=progress)
      on_host = jax.device_get(genomes)  # one copy, not one per candidate
      for j, i in enumerate(todo):
        self.cache[keys[i]] = {**{m: float(fresh[m][j]) for m in METRICS},
                               "genome": jax.tree.map(lambda x: x[i], on_host).to_json()}
    return {m: np.array([self.cache[key][m] for key in keys]) for m in METRICS}


def build_evaluator(config: ml_collections.ConfigDict) -> Evaluator:
  """Validates ``config``, loads (or pre-trains) its model and builds its fitness evaluator."""
  validate_config(config)
  split_kwargs = dict(dataset=config.pretrain.dataset, data_dir=config.data_dir or None,
                      val_fraction=config.pretrain.val_fraction, seed=config.pretrain.data_seed)
  train = data.load_split("train", **split_kwargs)
  val = train_val = data.load_split("val", **split_kwargs)
  check_data_sizes(config, train, val)  # before the model loads (or pre-trains)
  model, variables, _ = load_or_pretrain(config)
  if config.val_images:
    val = val.take(config.val_images, seed=config.search.seed)
  privacy_images = data.load_split("val", **split_kwargs).take(
      config.privacy_images, seed=config.search.seed + 1).float_images()
  evaluator = Evaluator(model, variables, train, val, privacy_images, fitness_from_config(config),
                        candidates_per_call=config.search.num_tournaments,
                        energy_info=energy_info_from_config(config))
  # Pre-training reports accuracy on the whole hold-out; ε is measured on this subset.
  logging.info("float model: %.4f top-1 on the %d validation images ε is measured on (of %d "
               "held out); fine-tuning %d steps per candidate on %d device(s)",
               evaluator.float_accuracy, len(val), len(train_val), evaluator.steps,
               evaluator.num_devices)
  return evaluator


def load_test_split(config: ml_collections.ConfigDict, evaluator: Evaluator) -> data.Split:
  """The test split of the evaluator's dataset (final reports only)."""
  return data.load_split("test", dataset=evaluator.train.dataset, data_dir=config.data_dir or None)


def run_search(config: ml_collections.ConfigDict, workdir: str,
               evaluator: Evaluator | None = None) -> dict[str, Any]:
  """Runs (or resumes) the search of ``config`` in ``workdir``; returns the final report.

  ``evaluator``: one :func:`build_evaluator` made for ``config`` already (reused by
  callers that evaluate more genomes of the same setting, such as the baselines).
  """
  validate_config(config)  # before the workdir is created
  with runs.workdir_lock(workdir):
    evaluator = evaluator or build_evaluator(config)
    report = _run_search(config, workdir, evaluator)
  if report["failed_candidates"] == report["evaluations"]:
    raise SearchFailed(
        f"every one of the {report['evaluations']} evaluated candidates failed "
        f"({report['diverged_candidates']} diverged during fine-tuning, the others had a "
        f"non-finite privacy or fitness); {workdir}/best.json records the search. Lower "
        f"fitness.finetune_lr (now {config.fitness.finetune_lr}) or check the pre-trained model")
  return report


class SearchFailed(ValueError):
  """Every candidate of a search failed: its report means nothing."""


def _run_search(config: ml_collections.ConfigDict, workdir: str,
                evaluator: Evaluator) -> dict[str, Any]:
  """:func:`run_search` inside the workdir lock."""
  info = evaluator.model.info
  strategy, space = strategy_from_config(config), space_from_config(config, info)
  alg = algorithms.get_algorithm(config.search.algorithm)

  init_key, step_key = jax.random.split(jax.random.key(config.search.seed))
  ask = jax.jit(lambda k, st: alg.ask(k, st, space, strategy))
  tell = jax.jit(lambda st, c, r: alg.tell(st, c, r, strategy))
  state = alg.init(init_key, space, strategy)
  identity = search_identity(config, evaluator)
  meta_out: dict[str, Any] = {"identity": identity, "cache": {}, "history": [],
                              "seconds": 0.0, "lookups": 0, "hits": 0, "initialized": False}
  stored = load_state(workdir, state)
  if stored is not None:
    state, meta_out = stored
    runs.check_identity(meta_out.get("identity"), identity, workdir, "search",
                        hints={"resolved.": AUTO_HINT})
    logging.info("resuming the search at step %d", int(state.step))
  total_steps = math.ceil(config.search.iterations / strategy.num_tournaments)
  finished = meta_out.get("report")
  if finished and finished["steps"] == int(state.step) >= total_steps:
    logging.info("the search in %s had finished: its report is reused (a larger "
                 "search.iterations extends it)", workdir)
    return finished
  # Wall time and its fine-tune / accuracy / privacy split, summed over every process
  # that worked on this search.
  meta_out.setdefault("phase_seconds", {k: 0.0 for k in evaluator.seconds})
  _add_latency(meta_out["cache"], evaluator)
  cached = CachedEvaluator(evaluator, meta_out["cache"])
  cached.lookups, cached.hits = meta_out["lookups"], meta_out["hits"]
  segment, phases = time.time(), dict(evaluator.seconds)

  def checkpoint_now():
    nonlocal segment, phases
    meta_out.update(seconds=meta_out["seconds"] + time.time() - segment, lookups=cached.lookups,
                    hits=cached.hits)
    for k, v in evaluator.seconds.items():
      meta_out["phase_seconds"][k] += v - phases[k]
    segment, phases = time.time(), dict(evaluator.seconds)
    writer.flush()  # before the state: a resumed run rewrites the steps after its state's
    _save(workdir, state, meta_out)

  # A resumed search rewrites the steps after its state's; TensorBoard hides older copies.
  writer = MetricWriter(os.path.join(workdir, "tensorboard"),
                        resume_step=int(state.step) + 1 if meta_out["initialized"] else None)

  def record(step: int) -> None:
    row = _history_row(state, cached, step)
    meta_out["history"].append(row)
    writer.scalars(step, {f"search/{k}": v for k, v in row.items() if k != "step"})

  if not meta_out["initialized"]:
    validate_genome(info, state.population)
    results = cached(state.population, progress="initial population")
    state = alg.tell_initial(state, _told(results, evaluator.config))
    meta_out["initialized"] = True
    record(0)
    checkpoint_now()

  progress = Progress(total_steps, first=int(state.step), every=config.log_every_steps,
                      name="search step")
  while int(state.step) < total_steps:
    children, state = ask(jax.random.fold_in(step_key, int(state.step)), state)
    results = cached(children)
    state = tell(state, children, _told(results, evaluator.config))
    record(int(state.step))
    checkpoint_now()
    progress(int(state.step), f"best fitness {float(state.best_fitness):.4f} "
             f"cache hit rate {cached.hits / max(cached.lookups, 1):.2f}")

  writer.close()
  meta_out["report"] = _final_report(config, workdir, evaluator, cached, state, meta_out)
  _save(workdir, state, meta_out)
  return meta_out["report"]


def _add_latency(cache: dict[str, dict[str, Any]], evaluator: Evaluator) -> None:
  """Gives evaluations cached before ``latency_ms`` existed their (analytic) latency."""
  missing = [key for key, entry in cache.items() if "latency_ms" not in entry]
  if missing:
    genomes = jax.tree.map(lambda *xs: jnp.stack(xs),
                           *[Genome.from_json(cache[key]["genome"]) for key in missing])
    latency = np.asarray(population_latency(evaluator.energy_info, genomes,
                                            evaluator.config.device).total_ms)
    for key, value in zip(missing, latency):
      cache[key]["latency_ms"] = float(value)


def _told(results: dict[str, np.ndarray], config: FitnessConfig) -> dict[str, jax.Array]:
  """What an algorithm's ``tell`` receives: the metrics and the constraint violation."""
  told = {m: jnp.asarray(results[m], jnp.float32) for m in ("fitness", "privacy", "energy_mj",
                                                             "eps")}
  return {**told, "violation": jnp.asarray(violation_degree(results, config), jnp.float32)}


def best_feasible(cache: dict[str, dict[str, Any]],
                  config: FitnessConfig) -> tuple[str, dict[str, Any]] | None:
  """The cache entry ``(key, entry)`` of highest fitness that meets Eq. 4; None if none does.

  The first evaluated wins a tie, like the search's own best.
  """
  feasible = [(k, e) for k, e in cache.items() if "genome" in e and not violations(e, config)]
  return max(feasible, key=lambda ke: ke[1]["fitness"]) if feasible else None


def _history_row(state: algorithms.State, cached: CachedEvaluator, step: int) -> dict[str, Any]:
  best = cached.cache[effective_key(cached.evaluator.model.info, state.best)]
  feasible = best_feasible(cached.cache, cached.evaluator.config)
  return {"step": step, "evaluations": len(cached.cache), "lookups": cached.lookups,
          "best_fitness": float(state.best_fitness),
          "mean_fitness": float(jnp.mean(state.fitness)), "best_p": int(state.best.p),
          "best_privacy": best["privacy"], "best_energy_mj": best["energy_mj"],
          "best_eps": best["eps"],
          "best_feasible_fitness": feasible[1]["fitness"] if feasible else None}


def evaluations_list(cache: dict[str, dict[str, Any]], config: FitnessConfig
                     ) -> list[dict[str, Any]]:
  """Every evaluated genome with its metrics and the constraints it breaks, in the order
  evaluated (what ``evaluations.json`` holds and :func:`maxpart_jax.pareto.front` reads)."""
  return [{"key": key, **entry, "violations": violations(entry, config)}
          for key, entry in cache.items()]


def _failure_counts(cache: dict[str, dict[str, Any]]) -> dict[str, int]:
  """How many evaluated candidates failed (fitness set to 0), diverged, or collapsed."""
  return {f"{m}_candidates": sum(bool(e[m]) for e in cache.values())
          for m in ("failed", "diverged", "collapsed")}


def _final_report(config, workdir, evaluator, cached, state, meta_out) -> dict[str, Any]:
  """Test-set numbers of the reported genome, history files and plots.

  The reported genome is the best *feasible* one (Eq. 4). The best by fitness is named
  beside it when it differs; if no genome was feasible, it is reported with its
  violations, and ``feasible`` is false.
  """
  from maxpart_jax.search import plots
  info = evaluator.model.info
  by_fitness_key = effective_key(info, state.best)
  feasible = best_feasible(cached.cache, evaluator.config)
  key = feasible[0] if feasible else by_fitness_key
  best = state.best if key == by_fitness_key else Genome.from_json(cached.cache[key]["genome"])
  metrics = cached.cache[key]
  broken = violations(metrics, evaluator.config)
  if broken:
    logging.warning("no evaluated genome meets the constraints; reporting the best by fitness, "
                    "which breaks: %s", "; ".join(broken))
  test = load_test_split(config, evaluator)
  test_accuracy = float(evaluator.evaluate(jax.tree.map(lambda x: x[None], best),
                                           test=test)["test_accuracy"][0])
  float_test = evaluator.float_accuracy_on(test)
  w, a, ir_bits = effective_bits(info, best)
  by_fitness = cached.cache[by_fitness_key]
  report = {
      "model": evaluator.model.name, "dataset": evaluator.train.dataset, "p": int(best.p),
      "block": info.blocks[int(best.p) - 1].label,
      "ir_bits": int(ir_bits),
      # The bits that run: edge layers only (32: left in float, e.g. the stem conv).
      "edge_layers": [{"layer": layer.name, "block": info.blocks[layer.block].label,
                       "w_bits": int(w[layer.id]), "a_bits": int(a[layer.id])}
                      for layer in info.layers if layer.block < int(best.p)],
      # The genome with every gene that does not run (cloud layers, unquantized layers)
      # set to 32: evaluates exactly like the one the search found.
      "genome": Genome(p=best.p, w_bits=w, a_bits=a).to_json(),
      "fitness": metrics["fitness"], **{f"val_{m}": metrics[m] for m in METRICS},
      "feasible": not broken, "violations": broken,
      "best_by_fitness": {
          "same_genome": key == by_fitness_key, "p": int(state.best.p),
          "block": info.blocks[int(state.best.p) - 1].label,
          **{m: by_fitness[m] for m in ("fitness", "privacy", "energy_mj", "eps")},
          "violations": violations(by_fitness, evaluator.config)},
      "test_accuracy": test_accuracy, "float_test_accuracy": float_test,
      "test_eps": float_test - test_accuracy, "energy_mj": metrics["energy_mj"],
      "latency_ms": metrics["latency_ms"], "latency_bound_ms": config.device.latency_bound_ms,
      "privacy": metrics["privacy"], "privacy_metric": config.fitness.metric,
      "budget_mj": config.fitness.budget_mj, "eps_bound": config.fitness.eps_bound,
      "float_val_accuracy": evaluator.float_accuracy,
      "evaluations": len(cached.cache), "lookups": cached.lookups,
      "cache_hit_rate": cached.hits / max(cached.lookups, 1), "search_seconds": meta_out["seconds"],
      **_failure_counts(cached.cache), "collapsed": bool(metrics["collapsed"]),
      "phase_seconds": meta_out["phase_seconds"], "steps": int(state.step),
      "tournaments_per_step": config.search.num_tournaments, "devices": evaluator.num_devices,
  }
  checkpoint.write_json(os.path.join(workdir, "best.json"), report)
  checkpoint.write_json(os.path.join(workdir, "history.json"), meta_out["history"])
  with open(os.path.join(workdir, "history.csv"), "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(meta_out["history"][0]))
    writer.writeheader()
    writer.writerows(meta_out["history"])
  evaluations = evaluations_list(cached.cache, evaluator.config)
  checkpoint.write_json(os.path.join(workdir, "evaluations.json"), evaluations)
  front = pareto.front(evaluations, config.fitness.budget_mj, config.fitness.eps_bound)
  checkpoint.write_json(os.path.join(workdir, "pareto.json"), front)
  pareto.plot_front(front, evaluations, os.path.join(workdir, "pareto.png"),
                    title=f"{evaluator.model.name}: Pareto front of the evaluated genomes")
  plots.fitness_curve(meta_out["history"], os.path.join(workdir, "fitness.png"),
                      title=f"{evaluator.model.name}: best fitness (Fig. 10)")
  plots.policy_bits(report, os.path.join(workdir, "policy.png"))
  logging.info("best genome: p=%d (%s), P=%.4f, E=%.4f mJ, latency %.3f ms, test accuracy "
               "%.4f (float %.4f)", report["p"], report["block"], report["privacy"],
               report["energy_mj"], report["latency_ms"], test_accuracy, float_test)
  return report
