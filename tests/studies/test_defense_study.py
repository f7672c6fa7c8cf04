"""The defended-split study (maxpart_jax.studies.defense_study): its rows' bookkeeping, and
the rule that test data never chooses (disjoint image roles, selection on validation top-1 and
held-out training victims, test numbers reported only)."""

import dataclasses
import hashlib
import json

import jax
import numpy as np
import pytest

from experiments.configs import defenses as defense_configs
from maxpart_jax import data
from maxpart_jax.energy import DeviceConfig, edge_energy
from maxpart_jax.genome import uniform_genome
from maxpart_jax.models import get_model
from maxpart_jax.privacy import defended
from maxpart_jax.studies import defense_study


def _hashes(images: np.ndarray) -> set[str]:
  return {hashlib.sha256(np.ascontiguousarray(x).tobytes()).hexdigest() for x in images}


def _float(split: data.Split) -> np.ndarray:
  return split.float_images()


def _stub_row(genome, stack, finetune, *, val, sel_ssim, test, test_ssim):
  return {"p": int(genome.p), "defenses": stack.spec(), "genome": genome.to_json(),
          "finetune": finetune, "val_accuracy": val, "val_eps": 0.6 - val,
          "test_accuracy": test, "test_eps": 0.6 - test, "energy_mj": 0.01,
          "privacy_mse": 0.0, "inner_decoder_mse": 0.0,
          "selection": {"decoder": {"ssim": sel_ssim}, "whitebox": {"ssim": 0.1},
                        "privacy": 1 - max(sel_ssim, 0.1)},
          "decoder": {"ssim": test_ssim}, "whitebox": {"ssim": 0.1},
          "feasible": 0.6 - val <= 0.03}


def test_the_study_resumes_row_by_row_and_refuses_a_changed_genome(fake_data_dir, tmp_path,
                                                                   monkeypatch):
  """The study's bookkeeping, with the training and the attacks replaced by a stub that
  records its calls: rows are stored as they finish, a rerun runs only the new rows, a row
  whose genome changed is refused, the outputs list the config's rows in its order, and the
  selected row is the most private feasible one by the selection numbers even where the test
  numbers would pick another."""
  calls = []
  # per row: (val top-1, selection-victim SSIM, test top-1, test-victim SSIM)
  numbers = {"none": (0.59, 0.9, 0.59, 0.9),  # feasible, not private
             "noise:1": (0.58, 0.5, 0.50, 0.2),  # the most private feasible by selection
             "dcor:2": (0.50, 0.1, 0.59, 0.1)}  # private, infeasible on val, fine on test

  def stub(model, variables, genome, stack, sets, config, key, float_accuracy, finetune):
    calls.append(stack.spec() + ("@" if finetune != config.finetune.to_dict() else ""))
    val, sel, test, test_ssim = numbers[stack.spec()]
    n = config.grid_images
    row = _stub_row(genome, stack, finetune, val=val, sel_ssim=sel, test=test,
                    test_ssim=test_ssim)
    row["privacy_mse"], row["inner_decoder_mse"] = float(len(calls)), 0.1 * len(calls)
    row["selection"]["decoder"]["ssim"] = sel
    return row, {"decoder": sets["victims"][:n], "whitebox": sets["victims"][:n]}

  monkeypatch.setattr(defense_study, "measure_row", stub)
  config = defense_configs.get_config("smoke")
  config.data_dir, config.aux_images, config.victim_images = fake_data_dir, 16, 8
  config.genomes = {"quick": "uniform:4:8:8"}
  config.rows = ("quick/none", "quick/noise:1")
  workdir, out = str(tmp_path / "work"), str(tmp_path / "out")
  defense_study.run(config, workdir, out)
  assert calls == ["none", "noise:1"]
  config.rows = ("quick/dcor:2", "quick/none", "quick/noise:1")
  result = defense_study.run(config, workdir, out)
  assert calls == ["none", "noise:1", "dcor:2"]
  assert [r["row"] for r in result["rows"]] == ["quick/dcor:2", "quick/none", "quick/noise:1"]
  # by test numbers dcor:2 would win (private and 1 point under float); by validation it is
  # infeasible, and noise:1 is the most private feasible row on the selection victims
  assert result["selected"] == "quick/noise:1"
  # the proxies' Spearman rho against the selection victims' decoder SSIM
  assert result["proxies"]["privacy_mse"]["rho"] == pytest.approx(-1.0)
  with open(tmp_path / "out" / "study.json") as f:
    assert json.load(f)["rows"] == result["rows"]
  # every row is also charged against the reproduction's budget: the paper-size model,
  # computation only (the undefended row: Eq. 8 on that model), feasible by validation
  full = get_model("resnet18", width=1.0).info
  genome = uniform_genome(full, 4, 8, 8)
  other = result["rows"][1]["other_budgets"]["reproduction"]
  assert other["energy_mj"] == pytest.approx(
      float(edge_energy(full, genome, DeviceConfig(), transmission=False).total_mj), rel=1e-6)
  assert other["feasible"] == (other["energy_mj"] < 0.35)
  assert result["rows"][0]["other_budgets"]["reproduction"]["feasible"] is False  # val ε
  # a recipe's row joins the study; a stored recipe changed is refused like a changed genome
  config.recipes = {"cloud": {"cloud_steps": 3}}
  config.rows = ("quick/none", "quick/none@cloud")
  result = defense_study.run(config, workdir, out)
  assert calls[3:] == ["none@"] and result["rows"][1]["finetune"]["cloud_steps"] == 3
  config.recipes = {"cloud": {"cloud_steps": 4}}
  with pytest.raises(ValueError, match="row 'quick/none@cloud' in .* was fine-tuned with other"):
    defense_study.run(config, workdir, out)
  config.genomes = {"quick": "uniform:4:4:8"}
  with pytest.raises(ValueError, match="row 'quick/none' in .* was made with another genome"):
    defense_study.run(config, workdir, out)


def test_select_takes_the_most_private_feasible_row_by_its_selection_numbers():
  rows = [{"row": "a", "feasible": True, "val_accuracy": 0.5, "selection": {"privacy": 0.4}},
          {"row": "b", "feasible": False, "val_accuracy": 0.5, "selection": {"privacy": 0.9}},
          {"row": "c", "feasible": True, "val_accuracy": 0.6, "selection": {"privacy": 0.4}},
          {"row": "d", "feasible": True, "val_accuracy": 0.4, "selection": {"privacy": 0.3}}]
  assert defense_study.select(rows) == "c"  # b is infeasible; a and c tie, c is more accurate
  assert defense_study.select([rows[1]]) is None


@pytest.fixture(scope="module")
def tiny_study(smoke, tmp_path_factory):
  """The smoke study on the tests' tiny model and fake data, one defended row, with every
  fine-tuning and attack call's images recorded: (config, result, calls)."""
  config = defense_configs.get_config("smoke")
  config.data_dir, config.model_dir = smoke.data_dir, smoke.model_dir
  config.aux_images = 24
  config.other_budgets = {}  # the reproduction's energy model is the paper's ResNet18
  config.genomes = {"g": "uniform:2:8:8"}
  config.rows = ("g/bottleneck:2,adversarial:5",)
  config.decoder.steps = 16
  config.finetune.update(steps=3, decoder_warmup=1)
  return config, tmp_path_factory.mktemp("tiny_study")


def _run_recording(config, folder, monkeypatch):
  calls = {}
  finetune, attack, whitebox = (defended.finetune, defended.adaptive_decoder_attack,
                                defended.whitebox_attack)

  def spy_finetune(d, train_split, ft, *a, **k):
    calls["finetune"] = _float(train_split)
    return finetune(d, train_split, ft, *a, **k)

  def spy_attack(d, aux, victims, key, *a, **k):
    calls["aux"], calls["decoder_victims"], calls["decoder_key"] = aux, victims, key
    return attack(d, aux, victims, key, *a, **k)

  def spy_whitebox(d, victims, *a, **k):
    calls["whitebox_victims"] = victims
    return whitebox(d, victims, *a, **k)

  monkeypatch.setattr(defended, "finetune", spy_finetune)
  monkeypatch.setattr(defended, "adaptive_decoder_attack", spy_attack)
  monkeypatch.setattr(defended, "whitebox_attack", spy_whitebox)
  result = defense_study.run(config, str(folder / "work"), str(folder / "out"))
  return result, calls


def test_the_study_never_chooses_on_test_data(tiny_study, monkeypatch):
  """On the real code path: the fine-tuning images, the attacker's images, the selection
  victims and the test victims are pairwise disjoint, and the attacker's key is not the
  fine-tuning's; with the test split replaced by other images, every number that chooses
  (validation top-1, feasibility, the selection victims' attacks, the selected row) is
  unchanged, and only the held-out numbers move."""
  config, folder = tiny_study
  result, calls = _run_recording(config, folder / "a", monkeypatch)
  n_sel = config.selection_victims
  selection, test_victims = calls["decoder_victims"][:n_sel], calls["decoder_victims"][n_sel:]
  roles = {"fine-tuning": _hashes(calls["finetune"]), "attacker": _hashes(calls["aux"]),
           "selection victims": _hashes(selection), "test victims": _hashes(test_victims)}
  assert len(roles["selection victims"]) == n_sel and len(roles["test victims"]) == len(
      test_victims) == config.victim_images
  names = sorted(roles)
  for i, a in enumerate(names):
    for b in names[i + 1:]:
      assert not roles[a] & roles[b], f"{a} and {b} share images"
  test = data.load_split("test", dataset=config.dataset, data_dir=config.data_dir)
  assert roles["test victims"] <= _hashes(_float(test))
  n_wb = config.whitebox_images
  assert _hashes(calls["whitebox_victims"]) == _hashes(selection[:n_wb]) | _hashes(
      test_victims[:n_wb])
  assert not np.array_equal(jax.random.key_data(calls["decoder_key"]),
                            jax.random.key_data(jax.random.key(config.seed)))  # the inner's

  real_load = data.load_split

  def other_test(kind, **kw):
    split = real_load(kind, **kw)
    if kind == "test":  # other images, other labels: any test number that chose would move
      split = dataclasses.replace(split, images=255 - split.images,
                                  labels=(split.labels + 1) % split.num_classes)
    return split

  monkeypatch.setattr(data, "load_split", other_test)
  other, _ = _run_recording(config, folder / "b", monkeypatch)
  (row,), (again,) = result["rows"], other["rows"]
  for field in ("val_accuracy", "val_eps", "feasible", "selection", "energy_mj"):
    assert again[field] == row[field], field
  assert other["selected"] == result["selected"] and other["float_val_accuracy"] == result[
      "float_val_accuracy"]
  assert again["test_accuracy"] != row["test_accuracy"] or again["decoder"] != row["decoder"]
