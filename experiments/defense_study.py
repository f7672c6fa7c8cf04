r"""Defended splits against adaptive attackers (docs/method.md §13).

  python -m experiments.defense_study --config=experiments/configs/defenses.py:quick \
      --workdir=workdirs/defenses --out=results/defenses

The study itself is :mod:`maxpart_jax.studies.defense_study`: one row per genome and defense
stack, resumable from ``--workdir``. Writes ``study.json``, ``privacy_accuracy.png`` and
``grid.png`` to ``--out``. ``--export_row=<row>`` instead exports a finished row through the
integer edge program and measures its parity (``export_parity.json``).
"""

from __future__ import annotations

from absl import app, flags

from experiments import common
from maxpart_jax.studies import defense_study

_CONFIG = common.define_config("experiments/configs/defenses.py:quick", "defense study config")
_WORKDIR = flags.DEFINE_string("workdir", "workdirs/defenses", "resumable state of the study")
_OUT = flags.DEFINE_string("out", "results/defenses", "where the JSON and the plots go")
_EXPORT = flags.DEFINE_string(
    "export_row", "", "instead of the study: fine-tune this finished row again, export it "
    "through the integer edge program to <workdir>/export and write <out>/export_parity.json")


def main(argv: list[str]) -> None:
  del argv
  common.quiet_logs()
  try:
    if _EXPORT.value:
      parity = defense_study.export_row(_CONFIG.value, _WORKDIR.value, _EXPORT.value, _OUT.value)
      print(f"{parity['row']}: integer split top-1 {100 * parity['accuracy_integer_split']:.2f} %, "
            f"fake-quantized {100 * parity['accuracy_fake_quant']:.2f} % (the study's row: "
            f"{100 * parity['stored_test_accuracy']:.2f} %), top-1 agreement "
            f"{100 * parity['top1_agreement']:.2f} %, codes that differ "
            f"{100 * parity['ir_share_of_values_that_differ']:.3f} %")
      return
    result = defense_study.run(_CONFIG.value, _WORKDIR.value, _OUT.value)
  except ValueError as e:
    raise SystemExit(f"error: {e}") from None
  print(f"float top-1: val {100 * result['float_val_accuracy']:.2f} %, test "
        f"{100 * result['float_test_accuracy']:.2f} % (held out)")
  for r in result["rows"]:
    sel = r["selection"]
    print(f"{r['row']:42s} val top-1 {100 * r['val_accuracy']:5.2f} %  energy "
          f"{r['energy_mj']:.4f} mJ  selection SSIM decoder {sel['decoder']['ssim']:.3f} "
          f"white-box {sel['whitebox']['ssim']:.3f}  {'feasible' if r['feasible'] else 'infeasible'}"
          f"  | held out: test top-1 {100 * r['test_accuracy']:5.2f} %, decoder "
          f"{r['decoder']['ssim']:.3f}, white-box {r['whitebox']['ssim']:.3f}")
  print(f"selected (on validation and training victims): {result['selected']}")

if __name__ == "__main__":
  app.run(main, flags_parser=common.parse_flags)
