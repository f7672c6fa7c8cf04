r"""Pre-training configs: ``--config=experiments/configs/train.py:<variant>``.

Variants:
  resnet18, resnet50, mobilenet, vgg11   paper-size CIFAR-100 models (GPU/TPU; 200 epochs)
  cpu (= cpu_resnet18), cpu_vgg11, cpu_mobilenet, cpu_resnet50
                                         narrow models that train on a 2-core CPU in minutes
  smoke                                  a tiny model, two epochs of 3 steps each on any
                                         data (a smoke run, and the tests' model)

Any field can be overridden: ``--config.num_epochs=5 --config.model.width=0.5``.
"""

import ml_collections

PAPER = {
    "resnet18": dict(name="resnet18", width=1.0),
    "resnet50": dict(name="resnet50", width=1.0),
    "mobilenet": dict(name="mobilenet_v1", width=1.0),
    "vgg11": dict(name="vgg11", width=1.0),
}
# Quarter-width models: ResNet18 at 16/32/64/128 channels trains ~430 images/s on 2 CPU cores.
CPU = {
    "cpu_resnet18": (dict(name="resnet18", width=0.25), 12),
    "cpu_vgg11": (dict(name="vgg11", width=0.25), 12),
    "cpu_mobilenet": (dict(name="mobilenet_v1", width=0.25), 10),
    "cpu_resnet50": (dict(name="resnet50", width=0.125, stage_sizes=(1, 1, 1, 1)), 10),
}


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
  """The config of ``variant`` (default ``cpu``)."""
  variant = {None: "cpu_resnet18", "": "cpu_resnet18", "cpu": "cpu_resnet18"}.get(variant, variant)
  c = ml_collections.ConfigDict()
  c.dataset = "cifar100"
  c.data_dir = ""  # a folder of .npz shards; empty: $MAXPART_DATA_DIR, else tfds
  c.val_fraction = 0.1
  c.data_seed = 0
  c.seed = 0
  c.batch_size = 128
  c.learning_rate = 0.1
  c.momentum = 0.9
  c.nesterov = True
  c.weight_decay = 5e-4
  c.label_smoothing = 0.0
  c.warmup_steps = 200
  c.steps_per_epoch = 0  # 0: one pass over the training split; > 0: at most that many steps
  c.log_every_steps = 50
  c.checkpoint_every_steps = 200
  c.eval_every_epochs = 1
  # Numerics of convolutions and matmuls: "float32", "bfloat16" or "auto" (bfloat16 on
  # GPU/TPU, float32 on CPU); the precision of float32 operands ("highest": true float32).
  c.compute_dtype = "auto"
  c.matmul_precision = "highest"
  # "fused": data on the accelerator, chunks of steps as compiled loops; "device": the
  # same batches, one call per step; "host": numpy batches; "auto": fused on GPU/TPU,
  # device on CPU (where XLA compiles loops of convolutions badly).
  c.pipeline = "auto"
  # Data parallelism: "all" splits every batch over every device of every process, "one"
  # trains on the first device, "auto" is "all" when the job has several processes
  # (experiments.train --distributed, README "Several hosts") and "one" otherwise. The
  # batches are the same; their sums round differently.
  c.devices = "auto"
  if variant in PAPER:
    c.model = PAPER[variant]
    c.num_epochs = 200
    c.warmup_steps = 0
    c.eval_every_epochs = 10
  elif variant in CPU:
    c.model, c.num_epochs = CPU[variant]
  elif variant == "smoke":
    c.model = dict(name="resnet18", width=0.0625, stage_sizes=(1, 1, 1, 1))
    c.num_epochs = 2
    c.steps_per_epoch = 3
    c.batch_size = 16
    c.warmup_steps = 2
    c.log_every_steps = 1
    c.checkpoint_every_steps = 3
  else:
    raise ValueError(f"unknown train config variant {variant!r}; choose from "
                     f"{sorted([*PAPER, *CPU, 'cpu', 'smoke'])}")
  c.model = ml_collections.ConfigDict(c.model)
  return c
