"""The reproduction job: report consistency, resume, configs, paper configs at tiny scale."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import conftest
from experiments.configs import reproduce as reproduce_configs
from maxpart_jax.energy import DeviceConfig, edge_energy
from maxpart_jax.genome import Genome
from maxpart_jax.models import get_model
from maxpart_jax.jobs import caching, settings
from maxpart_jax.search.fitness import check_same_layers
from maxpart_jax.studies import baselines, reproduce

REPO = str(conftest.REPO)


def report_device(report):
  return DeviceConfig(budget_mj=report["budget_mj"])


def _smoke_config(smoke):
  config = reproduce_configs.get_config("smoke")
  config.data_dir, config.model_dir = smoke.data_dir, smoke.model_dir
  return config


@pytest.fixture(scope="module")
def smoke_report(smoke, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("reproduce"))
  return workdir, reproduce.run_reproduction(_smoke_config(smoke), workdir)


@pytest.mark.slow
def test_report_is_consistent_with_the_search_and_the_energy_model(smoke_report):
  workdir, report = smoke_report
  with open(os.path.join(workdir, "search", "best.json")) as f:
    best = json.load(f)
  s = report["strategies"]
  info = get_model("resnet18", width=0.0625, stage_sizes=(1, 1, 1, 1)).info
  searched = s["searched"]
  assert (searched["p"], searched["privacy"], searched["test_accuracy"]) == (
      best["p"], best["privacy"], best["test_accuracy"])
  assert s["same_split8"]["p"] == best["p"] and s["conv_fc8"]["p"] == info.max_split
  # Every energy is the analytic edge energy of the strategy's genome.
  genome = Genome(p=np.int32(best["genome"]["p"]), w_bits=np.array(best["genome"]["w_bits"]),
                  a_bits=np.array(best["genome"]["a_bits"]))
  assert searched["energy_mj"] == pytest.approx(float(edge_energy(
      info, genome, report_device(report)).total_mj), rel=1e-6)
  for name in ("uniform8", "conv_fc8", "same_split8"):
    r = s[name]
    if r["p"]:
      energy = edge_energy(info, baselines.Baseline(name, r["p"], 8, 8, True).genome(info),
                           report_device(report))
      assert r["energy_mj"] == pytest.approx(float(energy.total_mj), rel=1e-6)
      # Both conventions: a row that mixed them up would fail one of these.
      assert r["compute_mj"] == pytest.approx(float(energy.compute_mj), rel=1e-6)
      assert r["with_transmission_mj"] == r["energy_mj"] > r["compute_mj"]
  # Eq. 4 per row, recomputed from its numbers (catches a flag that ignores ε or E).
  for name, r in s.items():
    broken = [r["energy_mj"] >= report["budget_mj"], r["eps"] >= report["eps_bound"]]
    assert [any("E =" in v for v in r["violations"]),
            any("ε =" in v for v in r["violations"])] == broken, name
  # Fig. 11: per-block energies plus transmission add up to the totals.
  for key, strategy in (("uniform8", "same_split8"), ("searched", "searched")):
    bars = report["fig11"][key]
    assert len(bars["blocks"]) == best["p"]
    assert sum(bars["blocks"]) + bars["transmission_mj"] == pytest.approx(
        s[strategy]["energy_mj"], rel=1e-5)
  # The paper-size table of the smoke config is the smoke model itself: the same energies.
  table = {r["strategy"]: r for r in report["paper_size_energy"]}
  for name in ("conv_fc8", "same_split8", "searched"):
    assert table[name]["energy_mj"] == pytest.approx(s[name]["energy_mj"], rel=1e-6)


def test_claim_verdicts_by_hand():
  """Hand-made rows with hand-decided verdicts: catches a flipped comparison, a ratio the
  wrong way round, or a threshold read as strict where it is not (and the reverse)."""
  row = lambda blocks, privacy, energy, test_eps=0.0: dict(
      num_blocks=blocks, privacy=privacy, energy_mj=energy, test_eps=test_eps)
  rows = {"searched": row(6, 0.70, 0.30, test_eps=0.05), "full_precision": row(1, 0.20, 0.21),
          "uniform8": row(6, 0.40, 0.28), "conv_fc8": row(9, 0.90, 0.60),
          "same_split8": row(6, 0.70, 0.36)}
  c = reproduce.claims(rows)
  assert not c["offloads_more_blocks_than_uniform8_and_full_precision"]["holds"]  # 6 vs 6
  assert c["more_private_than_uniform8_and_full_precision"]["holds"]
  assert c["accuracy_loss_a_few_percent"]["holds"]  # exactly 5 points: still "a few"
  assert c["less_energy_than_uniform8_at_the_same_split"]["ratio"] == pytest.approx(1.2)
  assert c["several_times_less_energy_than_conv_fc8"]["ratio"] == pytest.approx(2.0)
  assert c["several_times_less_energy_than_conv_fc8"]["holds"]  # 2x is "several times"
  assert c["slightly_less_private_than_conv_fc8"]["holds"]
  rows["searched"] = row(7, 0.95, 0.31, test_eps=0.051)
  c = reproduce.claims(rows)
  assert c["offloads_more_blocks_than_uniform8_and_full_precision"]["holds"]
  assert not c["accuracy_loss_a_few_percent"]["holds"]
  assert not c["several_times_less_energy_than_conv_fc8"]["holds"]  # 0.60 / 0.31 < 2
  assert not c["slightly_less_private_than_conv_fc8"]["holds"]


def test_report_files_and_markdown(smoke_report):
  workdir, report = smoke_report
  for name in ("report.md", "report.json", "fig10_fitness.png", "fig11_energy.png",
               "fig12_policy.png", "table4_strategies.png", "baselines.json"):
    assert os.path.getsize(os.path.join(workdir, name)) > 0, name
  with open(os.path.join(workdir, "report.md")) as f:
    text = f.read()
  s = report["strategies"]
  for heading in ("Table 4", "Table 5", "Table 2", "Fig. 11"):
    assert f"## {heading}" in text
  cf = s["conv_fc8"]
  assert (f"| {cf['energy_mj']:.4f} | {cf['compute_mj']:.4f} | {'; '.join(cf['violations']) or 'met'} "
          f"| {cf['privacy']:.4f} |") in text
  assert "### Computation only, the convention of the paper's Table 5" in text


def test_restart_reuses_the_search_and_the_baselines(smoke, smoke_report, monkeypatch):
  workdir, report = smoke_report
  monkeypatch.setattr(baselines, "evaluate_baselines",
                      lambda *a, **k: pytest.fail("baselines evaluated again"))
  monkeypatch.setattr(caching.CachedEvaluator, "__call__",
                      lambda *a, **k: pytest.fail("search evaluated again"))
  again = reproduce.run_reproduction(_smoke_config(smoke), workdir)
  drop = lambda r: {k: v for k, v in r.items() if k != "search"}
  as_json = lambda r: json.loads(json.dumps(drop(r)))
  assert as_json(again) == as_json(report)


@pytest.mark.parametrize("variant", ["cpu_resnet18", "cpu_resnet50", "cpu_mobilenet"])
def test_cpu_variants_are_charged_paper_size_energy(variant):
  config = reproduce_configs.get_config(variant)
  settings.validate_config(config)
  narrow = settings.info_from_spec(config.pretrain.model.to_dict())
  wide = settings.energy_info_from_config(config)
  check_same_layers(narrow, wide)
  assert np.sum(wide.layer_macs) > 10 * np.sum(narrow.layer_macs)
  assert config.fitness.budget_mj == 0.35
  if variant != "cpu_resnet50":  # same depth as the paper-size model
    check_same_layers(narrow, settings.info_from_spec(config.paper_model.to_dict()))


def test_paper_variants_keep_the_paper_settings():
  for arch in ("resnet18", "resnet50", "mobilenet"):
    c = reproduce_configs.get_config(f"paper_{arch}")
    s = c.search
    assert (s.pop_size, s.sample_size, s.iterations, s.prob_p, s.prob_gene) == (20, 10, 1000, 0.5, 0.3)
    assert tuple(s.w_bits) == (2, 4, 6, 8) and tuple(s.a_bits) == (8,)
    assert (c.fitness.budget_mj, c.fitness.finetune_steps, c.energy_model.name) == (0.35, None, "")
    assert c.pretrain.model.width == 1.0 and c.pretrain.num_epochs == 200
  with pytest.raises(ValueError, match="unknown reproduction config variant"):
    reproduce_configs.get_config("paper_vgg")


def test_mismatched_energy_model_is_rejected(smoke, tmp_path):
  config = _smoke_config(smoke)
  config.energy_model.name = "mobilenet_v1"
  with pytest.raises(ValueError, match="does not have the layers"):
    reproduce.run_reproduction(config, str(tmp_path))


@pytest.mark.slow
def test_paper_config_runs_the_same_code_path_at_tiny_scale(fake_data_dir, tmp_path):
  """paper_resnet18 with only its sizes shrunk, through the command line."""
  args = ["--config=experiments/configs/reproduce.py:paper_resnet18",
          f"--workdir={tmp_path / 'run'}", f"--config.data_dir={fake_data_dir}",
          f"--config.model_dir={tmp_path / 'pretrained' / 'model'}",
          "--config.pretrain.model.width=0.0625", "--config.pretrain.num_epochs=1",
          "--config.pretrain.batch_size=16", "--config.pretrain.eval_every_epochs=1",
          "--config.search.pop_size=3", "--config.search.sample_size=2",
          "--config.search.iterations=2", "--config.search.num_tournaments=2",
          "--config.fitness.finetune_steps=1", "--config.fitness.batch_size=16",
          "--config.val_images=32", "--config.privacy_images=4"]
  proc = subprocess.run([sys.executable, "-m", "experiments.reproduce", *args], cwd=REPO,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(tmp_path / "run" / "report.json") as f:
    report = json.load(f)
  # Energies are those of the tiny model; the paper-size table is full-width ResNet18,
  # computation only like the paper's Table 5 (with transmission, float fits only the stem).
  assert report["transmission"] is False
  table = {r["strategy"]: r for r in report["paper_size_energy"]}
  assert (table["full_precision"]["p"], table["uniform8"]["p"], table["conv_fc8"]["p"]) == (2, 5, 9)
  other = {r["strategy"]: r for r in report["paper_size_energy_other_convention"]}
  assert other["full_precision"]["p"] == 1
  assert report["search"]["tournaments_per_step"] == 2  # the override, the batched variant
  assert report["search_settings"]["w_bits"] == [2, 4, 6, 8]
  assert "report:" in proc.stdout


def test_summary_puts_reports_side_by_side(smoke_report, tmp_path):
  workdir, report = smoke_report
  proc = subprocess.run([sys.executable, "-m", "experiments.reproduction_summary",
                         f"--out={tmp_path / 'summary.md'}", workdir, workdir], cwd=REPO,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  text = (tmp_path / "summary.md").read_text()
  searched = report["strategies"]["searched"]
  row = (f"| resnet18 | Searched (mixed precision) | {searched['block']} | {searched['num_blocks']} "
         f"| {searched['num_layers']} | {searched['blocks_after_stem']} "
         f"| {searched['layers_after_stem']} | {searched['compute_mj']:.4f} "
         f"| {searched['with_transmission_mj']:.4f} | {'; '.join(searched['violations']) or 'met'} "
         f"| {searched['privacy']:.4f} |")
  assert text.count(row) == 2
  verdict = "yes" if report["claims"]["accuracy_loss_a_few_percent"]["holds"] else "no"
  assert f"| accuracy loss a few percent | {verdict} | {verdict} |" in text


@pytest.mark.slow
def test_baselines_cli_matches_the_reproduction(smoke, smoke_report, tmp_path):
  """Same config, same evaluator settings: the stand-alone baselines equal the report's."""
  _, report = smoke_report
  p = report["strategies"]["searched"]["p"]
  proc = subprocess.run([sys.executable, "-m", "experiments.baselines",
                         "--config=experiments/configs/reproduce.py:smoke",
                         f"--config.data_dir={smoke.data_dir}",
                         f"--config.model_dir={smoke.model_dir}", f"--searched_p={p}",
                         f"--json={tmp_path / 'rows.json'}"], cwd=REPO, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = {r["strategy"]: r for r in json.loads((tmp_path / "rows.json").read_text())}
  assert set(rows) == set(baselines.STRATEGIES)
  for name, row in rows.items():
    want = report["strategies"][name]
    for field in ("p", "num_blocks", "num_layers", "energy_mj", "privacy", "test_accuracy"):
      assert row[field] == pytest.approx(want[field], rel=1e-6), (name, field)
  assert "| 8-bit uniform, same split |" in proc.stdout


def test_baselines_cli_analytic_mode_needs_no_data():
  proc = subprocess.run([sys.executable, "-m", "experiments.baselines",
                         "--config=experiments/configs/reproduce.py:paper_resnet18", "--analytic",
                         "--searched_p=6"], cwd=REPO, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  info = get_model("resnet18").info
  # Computation only (the paper's convention): float fits the stem and layer1.0, which the
  # paper counts as "1 block (2 conv layers)"; 8-bit conv/fc is Table 5's 0.7269 mJ.
  for line in ("| Full precision | layer1.0 | 2 | 3 | 1 | 2 |",
               "| 8-bit uniform | layer2.1 | 5 | 10 | 4 | 9 |",
               "| 8-bit conv/fc | layer4.1 | 9 | 20 | 8 | 19 | 0.7269 | 0.7335 | no |"):
    assert line in proc.stdout
  energy = edge_energy(info, baselines.Baseline("same_split8", 6, 8, 8, True).genome(info),
                       DeviceConfig())
  assert (f"| 8-bit uniform, same split | layer3.0 | 6 | 13 | 5 | 12 | "
          f"{float(energy.compute_mj):.4f} | {float(energy.total_mj):.4f} | no |") in proc.stdout
  bad = subprocess.run([sys.executable, "-m", "experiments.baselines",
                        "--config=experiments/configs/reproduce.py:paper_resnet18", "--analytic",
                        "--searched_p=12"], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert bad.returncode != 0 and "partition point p=12 out of range" in bad.stderr


@pytest.mark.parametrize("variant, conv_fc8_mj, with_ir_mj", [("paper_resnet18", 0.7269, 0.7335),
                                                               ("paper_resnet50", 1.6776, 1.7039)])
def test_paper_variants_reproduce_table5_energies(variant, conv_fc8_mj, with_ir_mj):
  """The paper's Table 5 energies of 8-bit conv/fc are computation only.

  Catches a paper config that charges the IR's transmission (0.7335 / 1.7039 mJ) or a
  changed energy constant.
  """
  config = reproduce_configs.get_config(variant)
  assert config.fitness.transmission is False and config.search.num_tournaments == 1
  info = settings.info_from_spec(config.pretrain.model.to_dict())
  row = {r["strategy"]: r for r in reproduce.analytic_table(
      info, settings.fitness_from_config(config).device, config.fitness.transmission)}["conv_fc8"]
  assert round(row["energy_mj"], 4) == conv_fc8_mj
  assert round(row["with_transmission_mj"], 4) == with_ir_mj
