"""The defended search: the stack's costs in every candidate's energy and latency, the
finalists it fine-tunes and attacks, the answer it picks, and its resume."""

import copy
import hashlib
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.configs import search as search_configs
from maxpart_jax import runs
from maxpart_jax.energy import (DeviceConfig, edge_energy, edge_latency, link_cost,
                                mac_seconds)
from maxpart_jax.genome import Genome, effective_bits
from maxpart_jax.models import get_model
from maxpart_jax.privacy import defended, defenses
from maxpart_jax.jobs import defense_stage, driver
from maxpart_jax.search.fitness import FitnessConfig
from maxpart_jax.jobs.settings import validate_config


def _population(info, n: int, seed: int) -> Genome:
  rng = np.random.default_rng(seed)
  return Genome(p=jnp.asarray(rng.integers(1, info.max_split + 1, n), jnp.int32),
                w_bits=jnp.asarray(rng.choice([2, 4, 8], (n, info.num_layers)), jnp.int32),
                a_bits=jnp.asarray(rng.choice([4, 8], (n, info.num_layers)), jnp.int32))


def test_population_costs_are_each_genomes_hand_computed_costs():
  """Per genome, by hand from the undefended energy and latency: a 20-channel bottleneck
  adds h w c 20 MACs (energy at the IR's bits, time at its MAC rate), c 20 + 20 weights
  and h w c inputs, and sends h w 20 values; at a split whose IR has fewer than 20
  channels the stack cannot run and the genome costs infinite energy and time."""
  info = get_model("resnet18", width=0.25, stage_sizes=(1, 1, 1, 1)).info
  stack = defenses.parse_stack("bottleneck:20,adversarial:5")
  device = DeviceConfig(loss_rate=0.1, retry_timeout_ms=2.0)
  genomes = _population(info, 24, seed=0)
  energy, latency = defenses.population_costs(info, genomes, stack, device, transmission=True)
  seen_illegal = seen_legal = False
  for i in range(24):
    g = jax.tree.map(lambda x: x[i], genomes)
    p = int(g.p)
    h, w, c = info.blocks[p - 1].out_shape
    if c < 20:
      seen_illegal = True
      assert np.isinf(float(energy.total_mj[i])) and np.isinf(float(latency.total_ms[i]))
      continue
    seen_legal = True
    ir_bits = float(effective_bits(info, g)[2])
    macs = h * w * c * 20
    extra_pj = (macs * (device.mac_pj_per_bit * ir_bits + device.mac_pj_offset)
                + (c * 20 + 20 + h * w * c) * device.mem_pj_per_bit * ir_bits)
    tx_mj, tx_ms = link_cost(h * w * 20 * ir_bits, device)
    base = edge_energy(info, g, device, transmission=False).compute_mj
    assert float(energy.compute_mj[i]) == pytest.approx(float(base) + extra_pj / 1e9, rel=1e-5)
    assert float(energy.transmission_mj[i]) == pytest.approx(float(tx_mj), rel=1e-6)
    base_ms = edge_latency(info, g, device).compute_ms
    assert float(latency.compute_ms[i]) == pytest.approx(
        float(base_ms) + macs * float(mac_seconds(ir_bits, device).squeeze()) * 1e3, rel=1e-5)
    assert float(latency.transmission_ms[i]) == pytest.approx(float(tx_ms), rel=1e-6)
    one = defenses.defended_energy(info, g, stack, device)
    assert float(one.total_mj) == pytest.approx(float(energy.total_mj[i]), rel=1e-6)
  assert seen_illegal and seen_legal
  no_tx, _ = defenses.population_costs(info, genomes, stack, device, transmission=False)
  assert np.all(np.asarray(no_tx.transmission_mj) == 0)


def test_a_split_the_stack_cannot_run_at_on_the_searched_model_costs_infinite_energy():
  """The energy stand-in (×0.5) has 32 channels at splits 1-2 where the searched model (×0.125)
  has 8: a 16-channel bottleneck runs on the stand-in there but not on the searched model, so
  those splits cost infinite energy and time (stage 2 could not defend them); the legal splits
  cost what the stand-in's defended costs are, computed directly."""
  from conftest import jittered
  from maxpart_jax.data import Split
  from maxpart_jax.genome import uniform_genome
  from maxpart_jax.search.fitness import Evaluator
  model = get_model("resnet18", width=0.125, stage_sizes=(1, 1, 1, 1))
  stand_in = get_model("resnet18", width=0.5, stage_sizes=(1, 1, 1, 1)).info
  stack = defenses.parse_stack("bottleneck:16")
  device = DeviceConfig(budget_mj=0.01)
  rng = np.random.default_rng(0)
  split = Split(rng.integers(0, 256, (8, 32, 32, 3), np.uint8),
                rng.integers(0, 100, 8).astype(np.int32), 100, "cifar100")
  evaluator = Evaluator(model, jittered(model), split, split, split.float_images(),
                        FitnessConfig(device=device, compute_dtype="float32", finetune_steps=1,
                                      batch_size=4),
                        energy_info=stand_in, stack=stack)
  splits = range(1, model.info.max_split + 1)
  genomes = jax.tree.map(lambda *x: jnp.stack(x), *[uniform_genome(model.info, p, 6, 8)
                                                    for p in splits])
  energy, latency = evaluator.costs(genomes)

  def runs_on(info, p):
    try:
      stack.check(info.blocks[p - 1].out_shape)
      return True
    except ValueError:
      return False

  on_searched = [runs_on(model.info, p) for p in splits]
  assert all(runs_on(stand_in, p) for p in splits)
  assert on_searched == [False, False, True, True, True]  # the premise: 8, 8, 16, 32, 64 channels
  direct_energy, direct_latency = defenses.population_costs(stand_in, genomes, stack, device)
  for i, legal in enumerate(on_searched):
    if legal:
      assert energy[i] == pytest.approx(float(direct_energy.total_mj[i]), rel=1e-6)
      assert latency[i] == pytest.approx(float(direct_latency.total_ms[i]), rel=1e-6)
      assert np.isfinite(energy[i])
    else:
      assert np.isinf(energy[i]) and np.isinf(latency[i])


def test_repair_lowers_the_weights_that_save_most_energy_until_the_genome_fits():
  """By hand, on a split with two quantized layers and energy 1 * w_A + 3 * w_B: from 8/8
  (32), lowering B saves 6 per step and A 2, so B goes 8 -> 6 -> 4 -> 2 (26, 20, 14), then
  A 8 -> 6 (12); nothing fits below 8 (2/2); cloud layers are never touched."""
  info = get_model("resnet18", width=0.125, stage_sizes=(1, 1, 1, 1)).info
  a, b = [l.id for l in info.layers if l.quantizable and l.block < 2]
  cost = np.zeros(info.num_layers)
  cost[a], cost[b] = 1.0, 3.0
  energy = lambda g: np.asarray(g.w_bits, np.float64) @ cost
  genome = Genome(p=jnp.int32(2), w_bits=jnp.full((info.num_layers,), 8, jnp.int32),
                  a_bits=jnp.full((info.num_layers,), 8, jnp.int32))
  for budget, want in ((33, (8, 8)), (15, (8, 2)), (13, (6, 2)), (8.5, (2, 2))):
    got = defense_stage.repair(info, genome, [2, 4, 6, 8], energy, budget)
    assert (int(got.w_bits[a]), int(got.w_bits[b])) == want
    others = np.delete(np.asarray(got.w_bits), [a, b])
    assert np.all(others == 8) and int(got.p) == 2
  assert defense_stage.repair(info, genome, [2, 4, 6, 8], energy, 8) is None


def _entry(key, p, fitness, eps=0.01, energy=0.001):
  return {"key": key, "genome": {"p": p}, "fitness": fitness, "privacy": fitness,
          "energy_mj": energy, "eps": eps, "latency_ms": 1.0, "accuracy": 0.5,
          "diverged": False, "failed": False, "collapsed": False}


def test_finalists_are_the_best_feasible_genome_of_the_best_splits():
  config = FitnessConfig(device=DeviceConfig(budget_mj=0.002), eps_bound=0.03)
  evaluations = [_entry("a", 4, 0.5), _entry("b", 5, 0.9, eps=0.05),  # b breaks ε
                 _entry("c", 5, 0.6), _entry("d", 4, 0.7), _entry("e", 6, 0.8, energy=0.003),
                 _entry("f", 3, 0.7), _entry("g", 2, 0.2)]
  # feasible: a(4, .5) c(5, .6) d(4, .7) f(3, .7) g(2, .2); best per split: d, f (tie: first
  # evaluated wins the order), c, g
  by_fitness = defense_stage.finalists(evaluations, config, 3, "fitness")
  assert [e["key"] for e in by_fitness] == ["d", "f", "c"]
  assert [e["key"] for e in defense_stage.finalists(evaluations, config, 3)] == ["c", "d", "f"]
  assert [e["key"] for e in defense_stage.finalists(evaluations, config, 9)] == ["c", "d", "f", "g"]
  with pytest.raises(ValueError, match="finalist order"):
    defense_stage.finalists(evaluations, config, 3, "privacy")


@pytest.mark.parametrize("override, message", [
    (dict(stack="bottleneck:2,adversarial:5", attack=dict(steps=8)), "at least 4x"),
    (dict(stack="bottleneck:2,adversarial:5", attack=dict(width=4)), "no smaller width"),
    (dict(stack="bottle:2"), "unknown defense"),
    (dict(stack="noise:1", finalists=0), "defense.finalists"),
    (dict(stack="noise:1", whitebox_victims=99), "whitebox_victims"),
])
def test_a_bad_defense_config_is_refused_before_any_work(override, message):
  config = search_configs.get_config("smoke")
  for k, v in override.items():
    if isinstance(v, dict):
      config.defense[k].update(v)
    else:
      config.defense[k] = v
  with pytest.raises(ValueError, match=message):
    validate_config(config)


def _hashes(images) -> set[str]:
  return {hashlib.sha256(np.ascontiguousarray(x).tobytes()).hexdigest() for x in images}


def _record_stage2_images(monkeypatch) -> dict:
  """Spies on stage 2's fine-tuning and attacks: the images and keys each one is given."""
  seen = {}
  finetune, attack, whitebox = (defended.finetune, defended.adaptive_decoder_attack,
                                defended.whitebox_attack)

  def spy_finetune(d, train_split, ft, *a, **k):
    seen.setdefault("finetune", []).append((train_split.float_images(), ft))
    return finetune(d, train_split, ft, *a, **k)

  def spy_attack(d, aux, victims, key, *a, **k):
    seen.setdefault("decoder", []).append((aux, victims, key))
    return attack(d, aux, victims, key, *a, **k)

  def spy_whitebox(d, victims, *a, **k):
    seen.setdefault("whitebox", []).append(victims)
    return whitebox(d, victims, *a, **k)

  monkeypatch.setattr(defended, "finetune", spy_finetune)
  monkeypatch.setattr(defended, "adaptive_decoder_attack", spy_attack)
  monkeypatch.setattr(defended, "whitebox_attack", spy_whitebox)
  return seen


def _check_disjoint_roles(config, seen) -> None:
  """Fine-tuning images, the attacker's images, the selection victims and the test victims
  pairwise disjoint for every finalist; test victims drawn from the test split, the
  attacker's images from the validation split; the attacker's key none of the fine-tuning's."""
  from maxpart_jax import data
  kw = dict(dataset="cifar100", data_dir=config.data_dir,
            val_fraction=config.pretrain.val_fraction, seed=config.pretrain.data_seed)
  val, test = (_hashes(data.load_split(s, **kw).float_images()) for s in ("val", "test"))
  n = config.defense.victims
  assert len(seen["finetune"]) == len(seen["decoder"]) == config.defense.finalists
  for (train_images, ft), (aux, victims, key) in zip(seen["finetune"], seen["decoder"]):
    roles = {"fine-tuning": _hashes(train_images), "attacker": _hashes(aux),
             "selection victims": _hashes(victims[:n]), "test victims": _hashes(victims[n:])}
    assert len(roles["selection victims"]) == len(roles["test victims"]) == n
    names = sorted(roles)
    for i, a in enumerate(names):
      for b in names[i + 1:]:
        assert not roles[a] & roles[b], f"{a} and {b} share images"
    assert roles["test victims"] <= test and roles["attacker"] <= val
    fine_tuning_keys = [jax.random.key(ft.seed), defended.inner_decoder_key(ft)]
    for k in fine_tuning_keys:
      assert not np.array_equal(jax.random.key_data(key), jax.random.key_data(k))
  wb = config.defense.whitebox_victims
  for (_, victims, _), wb_victims in zip(seen["decoder"], seen["whitebox"]):
    assert _hashes(wb_victims) == _hashes(victims[:wb]) | _hashes(victims[n:n + wb])


def test_the_answer_is_the_most_private_feasible_finalist_by_its_selection_numbers():
  """Feasibility (validation ε, energy) first, then privacy on the selection victims; the
  test numbers, which would choose otherwise here, are never read."""
  def row(key, feasible, privacy, test_privacy):
    return {"key": key, "feasible": feasible, "selection": {"privacy": privacy},
            "test": {"privacy": test_privacy}}
  rows = [row("a", True, 0.6, 0.9), row("b", False, 0.9, 0.9), row("c", True, 0.7, 0.1)]
  assert defense_stage.choose_answer(rows)["key"] == "c"
  assert defense_stage.choose_answer([rows[1]]) is None


def test_the_defended_search_charges_the_stack_picks_by_attack_and_resumes(smoke, tmp_path,
                                                                             monkeypatch):
  config = copy.deepcopy(smoke)
  config.defense.stack = "bottleneck:2,adversarial:5"
  config.defense.finalists = 2
  config.fitness.eps_bound = 0.5  # fake data: let the finalists be feasible
  workdir = str(tmp_path / "search")
  seen = _record_stage2_images(monkeypatch)
  report = defense_stage.run_defended_search(config, workdir)
  _check_disjoint_roles(config, seen)

  # Stage 1 charged every candidate the stack's layers and message, on the energy model (every
  # IR of the smoke model has at least 2 channels: the stack runs at every split).
  from maxpart_jax import checkpoint
  model, _, _ = checkpoint.load_model(config.model_dir)
  stack = defense_stage.stack_from_config(config)
  device = DeviceConfig(budget_mj=config.fitness.budget_mj, **config.device.to_dict())
  with open(f"{workdir}/evaluations.json") as f:
    evaluations = json.load(f)
  for e in evaluations:
    g = Genome.from_json(e["genome"])
    assert e["energy_mj"] == pytest.approx(float(defenses.defended_energy(
        model.info, g, stack, device, config.fitness.transmission).total_mj), rel=1e-6)

  # Stage 2: the best feasible genome of each of the two deepest splits, by hand.
  feasible = [e for e in evaluations if not e["violations"]]
  best_by_split = {}
  for e in feasible:
    p = e["genome"]["p"]
    if p not in best_by_split or e["fitness"] > best_by_split[p]["fitness"]:
      best_by_split[p] = e
  expected = sorted(best_by_split.values(), key=lambda e: -e["genome"]["p"])[:2]
  rows = report["finalists"]
  assert [r["key"] for r in rows] == [e["key"] for e in expected]
  for r in rows:
    sel = r["selection"]
    assert sel["privacy"] == pytest.approx(1 - max(sel["decoder_ssim"], sel["whitebox_ssim"]))
    assert r["feasible"] == (r["energy_mj"] < config.fitness.budget_mj
                             and r["val_eps"] < config.fitness.eps_bound)
    assert r["message_shape"][-1] == 2
  ok = [r for r in rows if r["feasible"]]
  assert ok, "the test needs a feasible finalist"
  assert report["answer"]["key"] == max(ok, key=lambda r: r["selection"]["privacy"])["key"]
  # the answer is chosen without a test number: rows stripped of them choose the same
  blind = [{k: v for k, v in r.items() if not k.startswith("test")} for r in rows]
  assert defense_stage.choose_answer(blind)["key"] == report["answer"]["key"]

  # The answer's weights are kept: loaded, they give the reported test top-1; lost, the
  # deterministic fine-tuning makes them again.
  answer = report["answer"]
  eval_key = defense_stage._finalist_keys(config, answer["p"])[1]
  d, genome, made = defense_stage.load_answer(config, workdir)
  assert int(genome.p) == answer["p"] and d.stack.spec() == "bottleneck:2,adversarial:5"
  assert defended.accuracy(d, made["test"], eval_key) == answer["test_accuracy"]
  (tmp_path / "search" / "defended" / f"finalist_p{answer['p']}.msgpack").unlink()
  d, _, _ = defense_stage.load_answer(config, workdir)
  assert defended.accuracy(d, made["test"], eval_key) == answer["test_accuracy"]

  # A rerun resumes both stages: nothing is fine-tuned again.
  def refuse(*args, **kwargs):
    raise AssertionError("a finished finalist was fine-tuned again")
  monkeypatch.setattr(defended, "finetune", refuse)
  again = defense_stage.run_defended_search(config, workdir)
  assert again["finalists"] == report["finalists"] and again["answer"] == report["answer"]

  # Other stage-2 settings, or another stack, in the same workdir are refused.
  other = copy.deepcopy(config)
  other.defense.attack.steps = 20
  with pytest.raises(runs.WorkdirError, match="defense.attack.steps"):
    defense_stage.run_defended_search(other, workdir)
  other = copy.deepcopy(config)
  other.defense.stack = "bottleneck:3,adversarial:5"
  with pytest.raises(runs.WorkdirError, match="defense.stack"):
    driver.run_search(other, workdir)
