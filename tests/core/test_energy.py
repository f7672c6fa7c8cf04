"""Analytic edge energy (docs/method.md §5) against hand computations; the energy report CLI."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.energy_report import energy_report
from maxpart_jax.energy import (DeviceConfig, edge_energy, edge_latency, link_bits,
                                population_energy, population_latency)
from maxpart_jax.genome import Genome, uniform_genome
from maxpart_jax.models import SplitModel, get_model
from maxpart_jax.models.layers import Chain, ConvBN, Head


def toy(quantize_ends=True):
  """4x4x3 input -> conv3x3 3->4 -> conv3x3/2 4->2 -> avg-pool -> dense 2->3."""
  chain = Chain((ConvBN(4, 0, quantizable=quantize_ends, signed_input=True), ConvBN(2, 1, strides=2),
                 Head(3, 2, quantizable=quantize_ends)), ("a", "b", "head"))
  return SplitModel("toy", chain, input_shape=(4, 4, 3))


def test_toy_metadata_by_hand():
  info = toy().info
  assert [(l.macs, l.in_elems, l.params) for l in info.layers] == [
      (9 * 3 * 4 * 16, 48, 108), (9 * 4 * 2 * 4, 64, 72), (2 * 3, 2, 9)]
  assert list(info.block_out_elems) == [64, 8, 3]


def test_two_layer_energy_by_hand():
  info = toy().info
  genome = Genome(p=jnp.int32(2), w_bits=jnp.array([4, 2, 8]), a_bits=jnp.array([8, 6, 8]))
  # conv a (4-bit weights, 8-bit inputs): MACs, input reads, weight reads (pJ).
  e_a = 1728 * (3.1 * 4 / 32 + 0.1) + 48 * 2.5 * 8 + 108 * 2.5 * 4  # 2882.4
  e_b = 288 * (3.1 * 2 / 32 + 0.1) + 64 * 2.5 * 6 + 72 * 2.5 * 2  # 1404.6
  tx = 8 * 6 * 100  # the 2x2x2 IR at layer b's 6 activation bits
  energy = edge_energy(info, genome)
  assert float(energy.compute_mj) == pytest.approx((e_a + e_b) * 1e-9, rel=1e-6)
  assert float(energy.transmission_mj) == pytest.approx(tx * 1e-9, rel=1e-6)
  assert float(energy.total_mj) == pytest.approx(9087.0e-9, rel=1e-6)
  energy = edge_energy(info, genome.replace(p=jnp.int32(1)))  # layer b moves to the cloud
  assert float(energy.total_mj) == pytest.approx((e_a + 64 * 8 * 100) * 1e-9, rel=1e-6)
  assert float(edge_energy(info, genome, transmission=False).transmission_mj) == 0.0


def test_unquantizable_first_layer_counts_at_32_bits():
  info = toy(quantize_ends=False).info
  energy = edge_energy(info, uniform_genome(info, 1, 4))
  assert float(energy.compute_mj) == pytest.approx(
      (1728 * 3.2 + 48 * 80 + 108 * 80) * 1e-9, rel=1e-6)
  assert float(energy.transmission_mj) == pytest.approx(64 * 32 * 100 * 1e-9, rel=1e-6)


def test_custom_device_constants():
  info = toy().info
  device = DeviceConfig(mac_pj_per_bit=1.0, mac_pj_offset=0.0, mem_pj_per_bit=0.0,
                        tx_pj_per_bit=0.0)
  energy = edge_energy(info, uniform_genome(info, 2, 8), device)
  assert float(energy.total_mj) == pytest.approx((1728 + 288) * 8 * 1e-9, rel=1e-6)


def test_population_matches_loop_and_jit():
  info = get_model("resnet18").info
  keys = jax.random.split(jax.random.key(0), 3)
  n = 16
  population = Genome(
      p=jax.random.randint(keys[0], (n,), 1, info.max_split + 1),
      w_bits=jnp.array([2, 4, 6, 8])[jax.random.randint(keys[1], (n, info.num_layers), 0, 4)],
      a_bits=jnp.full((n, info.num_layers), 8))
  batched = jax.jit(lambda g: population_energy(info, g))(population)
  for i in range(n):
    single = edge_energy(info, jax.tree.map(lambda x: x[i], population))
    assert float(batched.total_mj[i]) == pytest.approx(float(single.total_mj), rel=1e-6)
  # Independent numpy reference of Eq. 7-9 for the same population.
  for i in range(n):
    p, w = int(population.p[i]), np.asarray(population.w_bits[i], float)
    on = (info.layer_block < p) & info.quantizable
    wb, ab = np.where(on, w, 32), np.where(on, 8, 32)
    layer = (info.layer_macs * (3.1 * wb / 32 + 0.1) + info.layer_in_elems * 2.5 * ab
             + info.layer_params * 2.5 * wb)
    ir_bits = ab[info.block_last_layer[p - 1]]
    ref = layer[info.layer_block < p].sum() + info.block_out_elems[p - 1] * ir_bits * 100
    assert float(batched.total_mj[i]) == pytest.approx(ref * 1e-9, rel=1e-5)


def test_device_config_rejects_bad_values():
  with pytest.raises(ValueError, match="energy budget must be > 0"):
    DeviceConfig(budget_mj=0.0)
  with pytest.raises(ValueError, match="tx_pj_per_bit must be >= 0"):
    DeviceConfig(tx_pj_per_bit=-1.0)
  assert DeviceConfig.from_battery(10.0, 0.035).budget_mj == pytest.approx(0.35)
  with pytest.raises(ValueError, match="alpha must be in"):
    DeviceConfig.from_battery(10.0, 1.5)
  with pytest.raises(ValueError, match="loss_rate must be in"):
    DeviceConfig(loss_rate=1.0)
  with pytest.raises(ValueError, match="descending order from 32"):
    DeviceConfig(mac_rate_bits=(8, 32), mac_rate_gmacs=(4.0, 1.0))
  with pytest.raises(ValueError, match="one positive rate each"):
    DeviceConfig(mac_rate_bits=(32, 8), mac_rate_gmacs=(1.0,))


# A link with 1000-bit packets, 100-bit headers, a quarter of the packets lost, 2 Mbps and
# 5 ms from a lost packet to its resend.
LOSSY = DeviceConfig(packet_bits=1000, header_bits=100, loss_rate=0.25, bandwidth_mbps=2.0,
                     retry_timeout_ms=5.0, mac_rate_bits=(32, 16, 8),
                     mac_rate_gmacs=(1.0, 2.0, 4.0))


def test_lossy_link_by_hand():
  """2500 bits: 3 packets of 1100 bits on air, each sent 4/3 times on average (1 of the 4
  sends lost), so 4400 bits on air and 1 lost packet expected. Catches a loss counted
  per bit, headers left out, or a partial last packet rounded away."""
  on_air, lost = link_bits(jnp.float32(2500.0), LOSSY)
  assert float(on_air) == pytest.approx((2500 + 3 * 100) / 0.75, rel=1e-6)  # 3733.3
  assert float(lost) == pytest.approx(1.0, rel=1e-6)
  assert [float(x) for x in link_bits(jnp.float32(2500.0), DeviceConfig())] == [2500.0, 0.0]


def test_latency_and_lossy_energy_of_the_toy_by_hand():
  """The toy at p = 2 with 4-bit weights and 8-bit inputs in conv a (8-bit rate: 4 GMAC/s),
  2-bit weights and 6-bit inputs in conv b (also the 8-bit rate), 12-bit in the head (the
  16-bit rate, but the head is in the cloud). Catches the wrong operand width, a rate
  table read the wrong way round, or cloud layers timed on the edge."""
  info = toy().info
  genome = Genome(p=jnp.int32(2), w_bits=jnp.array([4, 2, 12]), a_bits=jnp.array([8, 6, 12]))
  latency = edge_latency(info, genome, LOSSY)
  assert float(latency.compute_ms) == pytest.approx((1728 + 288) / 4e9 * 1e3, rel=1e-6)
  # The 2x2x2 IR at 6 bits: 48 bits, one packet of 148 bits sent 4/3 times; 1/3 lost.
  assert float(latency.transmission_ms) == pytest.approx(148 / 0.75 / 2000 + 5 / 3, rel=1e-6)
  energy = edge_energy(info, genome, LOSSY)
  assert float(energy.transmission_mj) == pytest.approx(148 / 0.75 * 100 * 1e-9, rel=1e-6)
  # At p = 3 the head (12 bits: the 16-bit rate of 2 GMAC/s) joins the edge.
  deeper = edge_latency(info, genome.replace(p=jnp.int32(3)), LOSSY)
  assert float(deeper.compute_ms) == pytest.approx(
      ((1728 + 288) / 4e9 + 6 / 2e9) * 1e3, rel=1e-6)
  batched = population_latency(info, jax.tree.map(lambda *x: jnp.stack(x), genome, genome),
                               LOSSY)
  np.testing.assert_allclose(np.asarray(batched.total_ms), float(latency.total_ms), rtol=1e-6)


def test_latency_bound_punishes_and_breaks_feasibility():
  """With a latency bound, the fitness gets Eq. 12's punishment for latency too and the
  genome is infeasible; without one latency changes nothing. Catches a bound that is set
  but ignored, or one applied when it is off."""
  from maxpart_jax.search.fitness import FitnessConfig, combine, violation_degree, violations
  bounded = FitnessConfig(lambda_latency=0.5, device=DeviceConfig(latency_bound_ms=10.0))
  free = FitnessConfig()
  p, e, eps = jnp.float32(2.0), jnp.float32(0.1), jnp.float32(0.0)
  assert float(combine(p, e, eps, bounded, jnp.float32(15.0))) == pytest.approx(2 * 0.5 ** 0.5)
  assert float(combine(p, e, eps, bounded, jnp.float32(5.0))) == pytest.approx(2.0)
  assert float(combine(p, e, eps, free, jnp.float32(15.0))) == pytest.approx(2.0)
  with pytest.raises(ValueError, match="needs latency"):
    combine(p, e, eps, bounded)
  row = dict(energy_mj=0.1, eps=0.0, fitness=1.0, diverged=0.0, failed=0.0, collapsed=0.0,
             latency_ms=15.0)
  assert violations(row, bounded) == ["latency 15.000 ms >= bound 10.0 ms"]
  assert violations(row, free) == []
  arrays = {k: np.array([v]) for k, v in row.items()}
  assert violation_degree(arrays, bounded)[0] == pytest.approx(0.5 + 1e-6)
  assert violation_degree(arrays, free)[0] == 0.0


def test_energy_report_rows_and_budget():
  model = get_model("resnet18")
  report = energy_report(model, 8, 8, device=DeviceConfig(budget_mj=0.35))
  rows = report["splits"]
  assert [r["index"] for r in rows] == list(range(1, 10)) and rows[-1]["block"] == "layer4.1"
  assert [r["layers"] for r in rows] == [1, 3, 5, 8, 10, 13, 15, 18, 20]
  for r in rows:
    g = uniform_genome(model.info, r["index"], 8)
    assert r["total_mj"] == pytest.approx(float(edge_energy(model.info, g).total_mj), rel=1e-6)
    assert r["total_mj"] == pytest.approx(r["compute_mj"] + r["transmission_mj"])
  deepest = report["deepest_split_within_budget"]
  assert rows[deepest - 1]["total_mj"] < 0.35
  assert all(r["total_mj"] >= 0.35 for r in rows[deepest:])
  assert energy_report(model, 32, 32, device=DeviceConfig(budget_mj=1e-6))[
      "deepest_split_within_budget"] is None


def test_energy_report_cli(tmp_path):
  out = tmp_path / "r.json"
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.energy_report", "--model=mobilenet", "--weight_bits=32",
       "--transmission=false", "--budget_mj=0.35", f"--json={out}"],
      capture_output=True, text=True, check=True)
  report = json.loads(out.read_text())
  assert set(report) >= {"model", "weight_bits", "act_bits", "budget_mj", "splits",
                         "deepest_split_within_budget"}
  assert report["act_bits"] == 32 and all(r["transmission_mj"] == 0 for r in report["splits"])
  assert set(report["splits"][0]) == {"index", "block", "layers", "compute_mj",
                                      "transmission_mj", "total_mj"}
  assert "deepest split within budget: 13 (sep12)" in proc.stdout
  bad = subprocess.run([sys.executable, "-m", "experiments.energy_report", "--weight_bits=1"],
                       capture_output=True, text=True)
  assert bad.returncode != 0 and "out of range: [1]" in bad.stderr
