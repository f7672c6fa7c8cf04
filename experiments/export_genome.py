r"""Exports a genome with a pre-trained model's weights as they are (no fine-tuning), under the
quantizer settings you choose, and checks parity on the test set (docs/deploy.md).

  python -m experiments.export_genome --genome=results/search_quick/best.json \
      --per_channel --activation_levels=unsigned --out=workdirs/deploy_per_channel

Where ``experiments.export_split`` deploys what a search evaluated (its fine-tuning, its
settings), this deploys any genome under any quantizer settings, e.g. to check the integer
program for settings no search used. ``--out``/parity.json holds the agreement with the
fake-quantized model of the same settings.
"""

import json
import os

from absl import app, flags

from maxpart_jax import checkpoint, data, runs
from maxpart_jax.deploy import artifact, parity
from maxpart_jax.genome import Genome
from maxpart_jax.quant import ACTIVATION_LEVELS

_MODEL = flags.DEFINE_string("model_dir", "pretrained/cpu_resnet18/model", "pre-trained model")
_GENOME = flags.DEFINE_string("genome", None, "a best.json (or any JSON with a 'genome')",
                              required=True)
_PER_CHANNEL = flags.DEFINE_bool("per_channel", False, "one weight clipping value per channel")
_LEVELS = flags.DEFINE_enum("activation_levels", "paper", list(ACTIVATION_LEVELS),
                            "the step of non-negative activations")
_OUT = flags.DEFINE_string("out", None, "where edge/, cloud/ and parity.json go", required=True)
_PARITY = flags.DEFINE_integer("parity_images", 10000, "test images to check parity on (0: none)")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "dataset folder (default: $MAXPART_DATA_DIR)")


def main(argv: list[str]) -> None:
  del argv
  model, variables, meta = checkpoint.load_model(_MODEL.value)
  with open(_GENOME.value) as f:
    genome = Genome.from_json(json.load(f)["genome"])
  edge, cloud = artifact.export_split(model, variables, genome, meta["model"], _OUT.value,
                                      dataset=meta["dataset"], per_channel=_PER_CHANNEL.value,
                                      activation_levels=_LEVELS.value)
  print(f"exported p={edge.spec.split} ({edge.spec.block_label}), {edge.spec.ir.bits}-bit IR, "
        f"{edge.spec.quantizer_settings()}: {_OUT.value}/edge, {_OUT.value}/cloud")
  if _PARITY.value:
    test = data.load_split("test", dataset=meta["dataset"], data_dir=_DATA_DIR.value)
    n = min(_PARITY.value, len(test))
    result = parity.parity(model, variables, genome, edge, cloud, test.images[:n],
                           test.labels[:n])
    result.update(genome_file=_GENOME.value, model_dir=_MODEL.value,
                  **edge.spec.quantizer_settings(), environment=runs.environment())
    checkpoint.write_json(os.path.join(_OUT.value, "parity.json"), result)
    print(json.dumps({k: v for k, v in result.items() if k != "environment"}, indent=1))


if __name__ == "__main__":
  app.run(main)
