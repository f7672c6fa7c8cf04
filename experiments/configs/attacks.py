r"""Inversion-attack study configs: ``--config=experiments/configs/attacks.py:<variant>``.

Variants:
  cpu     the study of results/attacks/: the CPU-size ResNet18 (shipped) and VGG11 on real
          CIFAR-100, every split, the IR in float and at 8/4/2 bits, and the searched genomes.
  smoke   two splits, two IR widths, a few steps: for tests.

The test split is permuted with ``seed``; the attacker's ``aux_images`` are drawn from the first
half of the permutation and the victim's ``victim_images`` from the second, so the two never
overlap and neither follows the class order of the local shards. P is measured on the victim
images, like the attacks.
"""

import ml_collections


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
  """The config of ``variant`` (default ``cpu``)."""
  variant = variant or "cpu"
  c = ml_collections.ConfigDict()
  c.dataset = "cifar100"
  c.data_dir = ""  # a folder of .npz shards; empty: $MAXPART_DATA_DIR, else tfds
  c.seed = 0
  c.aux_images = 2000
  c.victim_images = 128
  c.whitebox_images = 32  # the first victims; the white-box attack optimises each image
  c.ir_bits = (32, 8, 4, 2)  # 32: float IR
  c.splits = ()  # empty: every legal split
  c.metrics = ("mse", "ssim", "kl")
  c.activation_levels = "paper"
  c.decoder = ml_collections.ConfigDict(dict(steps=300, batch_size=64, learning_rate=3e-3,
                                             width=32, ssim_weight=0.0))
  c.whitebox = ml_collections.ConfigDict(dict(steps=200, learning_rate=0.02, tv_weight=0.05,
                                              init_noise=0.01))
  c.grid_images = 8  # victims shown in the reconstruction grids
  # model name -> its pre-trained model and the searched genomes (best.json files) to attack
  c.models = ml_collections.ConfigDict({
      "resnet18": dict(model_dir="pretrained/cpu_resnet18/model",
                       genomes="results/reproduction/cpu_resnet18/best.json,"
                               "results/search_quick/best.json"),
      "vgg11": dict(model_dir="workdirs/cpu_vgg11/model", genomes=""),
  })
  if variant == "smoke":
    c.aux_images, c.victim_images, c.whitebox_images, c.grid_images = 40, 8, 4, 4
    c.ir_bits = (32, 2)
    c.splits = (1, 3)
    c.metrics = ("mse",)
    c.decoder.update(steps=3, batch_size=8, width=8)
    c.whitebox.steps = 3
    c.models = ml_collections.ConfigDict({
        "resnet18": dict(model_dir="pretrained/cpu_resnet18/model",
                         genomes="results/search_quick/best.json")})
  elif variant != "cpu":
    raise ValueError(f"unknown attacks config variant {variant!r}; choose from ['cpu', 'smoke']")
  return c
