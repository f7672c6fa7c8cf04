r"""Search configs: ``--config=experiments/configs/search.py:<variant>``.

Variants:
  resnet18, resnet50, mobilenet   the paper's settings (Algorithm 1 with N=20, S=10, T=1000,
                                  prob_p=0.5, prob_Π=0.3, λ1=λ2=0.1, E_b=0.35 mJ computed
                                  as in the paper's Table 5 (computation only), R_w={2,4,6,8},
                                  R_a={8}, one epoch of fine-tuning) on paper-size models,
                                  for GPU/TPU
  quick                           a quarter-width ResNet18 on CIFAR-100 that searches in
                                  minutes on a 2-core CPU (pre-trained first if needed);
                                  batched (K=4), sending the IR counts
  quick_solver                    the quick search by the solver (search.algorithm="solver",
                                  K = 1): the README's main command
  quick_defended                  the quick search with a defense stack (a 32-channel
                                  bottleneck, adversarial training at 30) and its finalist
                                  fine-tuned with it and attacked adaptively (about 20 min)
  smoke                           a tiny model and a few steps, for tests

``search.num_tournaments`` (K) children are made and evaluated together per step. K = 1
(the default) is the paper's Algorithm 1; K > 1 is the batched variant, which spreads a
step's candidates over devices (results/search_k/ measures what it changes).
``fitness.transmission`` adds the energy of sending the IR to the edge energy; the
paper's energies count computation only. Override anything from the command line, e.g.
``--config.search.num_tournaments=8 --config.fitness.budget_mj=0.3``.
"""

import ml_collections

from experiments.configs import train as train_configs
from maxpart_jax.energy import DeviceConfig

DEVICE_FIELDS = ("tx_pj_per_bit", "mac_rate_bits", "mac_rate_gmacs", "bandwidth_mbps",
                 "packet_bits", "header_bits", "loss_rate", "retry_timeout_ms",
                 "latency_bound_ms")
"""The device settings a search config carries (``config.device``); the energy constants
and the budget (``fitness.budget_mj``) stay with :class:`~maxpart_jax.energy.DeviceConfig`."""

# The quick model, pre-trained with train.py:cpu_resnet18 and committed (2.7 MB).
SHIPPED_MODEL = "pretrained/cpu_resnet18/model"
# (pre-training variant, model dir)
PAPER = {
    "resnet18": ("resnet18", "workdirs/paper_resnet18/model"),
    "resnet50": ("resnet50", "workdirs/paper_resnet50/model"),
    "mobilenet": ("mobilenet", "workdirs/paper_mobilenet/model"),
}


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
  """The search config of ``variant`` (default ``quick``)."""
  variant = variant or "quick"
  c = ml_collections.ConfigDict()
  c.data_dir = ""  # a folder of .npz shards; empty: $MAXPART_DATA_DIR, else tfds
  c.privacy_images = 256  # validation images the privacy score averages over
  c.val_images = 0  # validation images for ε (0: the whole hold-out)
  c.log_every_steps = 1
  c.operator_modules = ""  # comma-separated modules that register extra operators
  # The architecture whose analytic energy counts. Empty name: the searched model itself.
  # A narrow CPU-size model can be charged the energy of its paper-size original (same
  # blocks and layers), so that E_b keeps the paper's meaning.
  c.energy_model = ml_collections.ConfigDict(dict(name="", width=1.0))

  # algorithm: "ga" (the paper's), "nsga2", "random" or "solver" (the solver's plan in order;
  # maxpart_jax/search/algorithms.py). init="solver" seeds the GA / NSGA-II with that plan.
  c.search = ml_collections.ConfigDict(dict(
      algorithm="ga", pop_size=20, sample_size=10, iterations=1000, num_tournaments=1, prob_p=0.5,
      prob_gene=0.3, w_bits=(2, 4, 6, 8), a_bits=(8,), seed=0, init="uniform",
      sample="uniform", select="best", mutate="resample", crossover="none", replace="worst"))
  # The solver (algorithm="solver", or init="solver" to seed the GA / NSGA-II with its plan):
  # per-layer accuracy costs predicted by a Hessian trace ("hessian", Hutchinson with
  # `hessian_probes` probes on `hessian_images` images; the weights' part, plus the measured
  # cost of quantizing the layer's inputs) or the measured loss increase with the layer alone
  # quantized ("loss", which fine-tuning repairs about half of: results/search_solver/), one
  # pair of knapsacks per split (maxpart_jax/search/solver.py; estimates cached beside the model,
  # measured on `val_images` hold-out images apart from those ε is judged on: val_images must
  # be at least 1 and at most half the hold-out), and per split one more most-private answer
  # for each fraction of ε_b in `margins` (answers to fall back on when the first lands on ε_b
  # or the estimate was optimistic).
  c.search.solver = ml_collections.ConfigDict(dict(
      estimator="hessian", hessian_probes=16, hessian_images=256, margins=(0.75, 0.5)))
  # The edge device beyond its energy constants, at maxpart_jax/energy.py's defaults: the
  # link's energy per bit (the paper's 100 pJ/bit), MAC rates per operand width
  # (illustrative: set yours), the link's rate, packets and loss, and an optional latency
  # bound (0: none).
  device = DeviceConfig()
  c.device = ml_collections.ConfigDict({name: getattr(device, name) for name in DEVICE_FIELDS})
  c.fitness = ml_collections.ConfigDict(dict(
      budget_mj=0.35, eps_bound=0.03, lambda_energy=0.1, lambda_accuracy=0.1,
      lambda_latency=0.1, transmission=True,
      finetune_steps=ml_collections.FieldReference(None, field_type=int), finetune_lr=1e-3,
      finetune_momentum=0.9, batch_size=128, metric="mse", normalization="zscore",
      per_channel=False, seed=0,
      # The step of non-negative activations: "paper" (Eq. 5 as written, c / (2^(b-1) - 1))
      # or "unsigned" (c / (2^b - 1), all 2^b codes; results/options/).
      activation_levels="paper",
      # How the K candidates of a device run: "vmap", "map" (one per call) or "auto".
      candidate_loop="auto",
      # Convolution / matmul numerics: "float32", "bfloat16" or "auto" (bfloat16 on GPU/TPU,
      # float32 on CPU); precision of float32 operands ("highest": true float32).
      compute_dtype="auto", matmul_precision="highest",
      # "fused": data on the accelerator, one program per fine-tuning; "device": the same
      # batches, one call per step; "host": numpy batches; "auto": fused on GPU/TPU,
      # device on CPU (where XLA compiles loops of convolutions badly).
      pipeline="auto"))
  # metric="attack_ssim": privacy is 1 - SSIM of a learned decoder's reconstructions from
  # the IR (one decoder per split and IR width, trained on `images` training images; the
  # expensive, honest option). maxpart_jax/privacy/attacks.py DecoderConfig for the rest.
  c.fitness.attack = ml_collections.ConfigDict(dict(
      images=2000, steps=300, batch_size=64, learning_rate=3e-3, width=32, ssim_weight=0.0))

  # A defended search (docs/method.md §14): with a stack (maxpart_jax.privacy.defenses, e.g.
  # "bottleneck:32,adversarial:40"), the search charges the stack's layers and message in
  # every candidate's energy; then the best feasible genome of each of the `finalists`
  # deepest splits is fine-tuned with the stack and attacked by an adaptive decoder trained from
  # scratch on the defended messages of `attack.images` validation images (at least 4x the
  # inner decoder's steps) and by the white-box attack; the answer is the most private
  # finalist by attack (on `victims` training images held out of the defended fine-tuning)
  # within the bounds. order: "depth" (the deepest splits first: depth is what the defended
  # study found to matter most) or "fitness". Empty stack: the undefended search.
  c.defense = ml_collections.ConfigDict(dict(
      stack="", finalists=1, order="depth", victims=256, whitebox_victims=32, init_images=512, grid_images=8))
  # results/defenses/'s recover recipe: cosine-decayed joint steps with distillation from the
  # float model, then the cloud alone on the frozen edge's messages
  c.defense.finetune = ml_collections.ConfigDict(dict(
      steps=600, batch_size=64, learning_rate=3e-4, grad_clip=1.0, decoder_learning_rate=2e-3,
      decoder_warmup=200, decoder_width=32, decoder_steps=1, schedule="cosine", distill=1.0,
      cloud_steps=600))
  c.defense.attack = ml_collections.ConfigDict(dict(
      images=5000, steps=2400, batch_size=64, learning_rate=3e-3, width=32, ssim_weight=0.0))
  c.defense.whitebox = ml_collections.ConfigDict(dict(
      steps=200, learning_rate=0.02, tv_weight=0.05, init_noise=0.01))

  if variant in PAPER:
    train_variant, c.model_dir = PAPER[variant]
    c.fitness.transmission = False  # Table 5's energies are computation only
  elif variant in ("quick", "quick_solver", "quick_defended"):
    # Shipped with the repository (pretrained/cpu_resnet18/README.md); point model_dir
    # elsewhere (run_quick.sh --retrain) to pre-train it again.
    train_variant, c.model_dir = "cpu_resnet18", SHIPPED_MODEL
    c.search.update(pop_size=8, sample_size=4, iterations=32, num_tournaments=4)
    # The quarter-width model needs about 1/14 of the paper-size energy: with E_b = 0.025 mJ,
    # float32 fits no split, 8-bit uniform reaches block 4 and 4-bit block 7 (energy_report).
    c.fitness.update(budget_mj=0.025, finetune_steps=20)
    c.val_images = 1000
    c.privacy_images = 128
    if variant == "quick_solver":
      # results/search_solver/: the solver's plan reaches a more private feasible answer
      # after 2 fine-tunings than the GA after 32-56. One candidate at a time: it stops as
      # soon as nothing left in its plan can win (on several devices, K = their number).
      c.search.update(algorithm="solver", num_tournaments=1)
    if variant == "quick_defended":
      # Split 8 with this stack and the recipe: results/defenses/ selects α = 30 on validation
      # top-1 and held-out training victims (α = 40 loses 3.08 points on validation: refused).
      # The bottleneck's smaller message makes split 8 fit the budget. 2-bit
      # weights cost more accuracy than 20 fine-tuning steps recover (a first search with
      # them: 28 of its 30 genomes with a 2-bit layer broke ε_b, none beyond split 4 met it).
      c.defense.stack = "bottleneck:32,adversarial:30"
      c.search.w_bits = (4, 6, 8)
  elif variant == "smoke":
    train_variant, c.model_dir = "smoke", "workdirs/smoke/model"
    c.search.update(pop_size=4, sample_size=2, iterations=4, num_tournaments=2)
    c.fitness.update(budget_mj=0.002, finetune_steps=2, batch_size=16)
    c.val_images = 32
    c.privacy_images = 8
    c.defense.update(victims=8, whitebox_victims=2, init_images=16, grid_images=2)
    c.defense.finetune.update(steps=4, batch_size=8, decoder_warmup=1, decoder_width=8,
                              cloud_steps=2)
    c.defense.attack.update(images=32, steps=16, batch_size=8, width=8)
    c.defense.whitebox.steps = 2
  else:
    raise ValueError(f"unknown search config variant {variant!r}; choose from "
                     f"{sorted([*PAPER, 'quick', 'quick_solver', 'quick_defended', 'smoke'])}")
  c.pretrain = train_configs.get_config(train_variant)
  c.pretrain.data_dir = c.get_ref("data_dir")
  return c
