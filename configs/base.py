"""Every field of a training config, with the defaults that do not depend on the dataset.

Not a recipe by itself: ``model`` and ``dataset`` are empty and the sizes 0, for the recipe
(``mnist5k_kure.py``, ``cifar10_resnet20.py``, ``imagenet_base.py``) to set. A recipe imports
this module and changes a few fields::

    from configs import base

    def get_config(variant=None):
        config = base.get_config(variant)
        config.model = "resnet20"
        ...

The fields:

* ``model``: one of ``kure_jax.models.MODEL_NAMES``, with ``model_options`` passed to
  ``kure_jax.models.get_model`` (e.g. ``features``, ``hidden``); ``dataset``: one of
  ``kure_jax.data.DATASET_NAMES``, with ``dataset_options`` passed to
  ``kure_jax.data.get_dataset``; ``num_classes`` must match the dataset.
* ``batch_size``: global batch over all devices and hosts (divisible by the device
  count); ``eval_batch_size`` likewise (the last eval batch is padded and masked).
* ``num_epochs``, or ``num_train_steps`` (> 0 overrides epochs).
* ``optimizer``: ``name`` "sgd" (``momentum``, ``nesterov``), "adam" or "adamw"
  (``b1``, ``b2``, ``eps``); ``learning_rate``; ``weight_decay`` (optax, on params only).
* ``schedule``: ``name`` "constant", "cosine" or "step" (``milestones`` in epochs,
  multiplied by ``gamma``), after ``warmup_epochs`` of linear warmup.
* ``init_from``: a workdir or checkpoint directory whose best params and batch_stats start
  this run, with a fresh optimizer state and step 0: an earlier run (e.g. QAT fine-tuning
  of a float KURE model) or torchvision weights converted by ``python -m
  kure_jax.models.convert``. ``None`` (default) for a random init. Ignored when resuming from
  ``workdir``; a checkpoint of another model or class count fails at start-up.
* ``label_smoothing`` in [0, 1); ``dtype`` "float32" or "bfloat16" (compute dtype;
  parameters stay float32); ``seed`` (init, data order, dropout).
* ``kure``: ``lambda_`` (0 disables the penalty), ``target`` K_T, ``selection``
  "kernels" (every conv/dense kernel) or "paper" (all but the first conv and the
  classifier), ``reduction`` "mean" (paper), "sum" or "max", ``penalty_impl`` "auto",
  "jnp" or "pallas" (``kure_jax.training.StepConfig.penalty_impl``).
* ``qat``: ``enabled`` plus the fields of ``kure_jax.qat.QATConfig``, and multi-bit QAT:
  ``bits`` (``None``: the one width of ``weight_bits``/``act_bits``; a tuple, e.g. ``(8, 4,
  2)``: train every width, replacing ``weight_bits``/``act_bits`` that are not ``None``, so
  ``act_bits=None`` keeps activations float), ``multibit`` "sum" (one forward per width, the
  sum of their losses) or "sample" (one width per step), ``bn_per_bits`` (BatchNorm
  statistics per width); stateless quantizers only (``kure_jax.training.multibit``).
* ``parallel``: "jit" (mesh + NamedSharding, default) or "pmap".
* ``log_every_steps``; ``eval_every_steps`` and ``checkpoint_every_steps`` (0: once per
  epoch); ``keep_checkpoints`` latest and ``keep_best`` best-by-accuracy checkpoints.

The defaults are the paper's: SGD with momentum 0.9, weight decay 1e-4, lr divided by 10 at
epochs 30 and 60, KURE with lambda 1 and K_T = 1.8 on all convs but the first (no classifier).
"""

import ml_collections

VARIANTS = ("", "tiny")


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
    """All fields; ``variant="tiny"`` shortens the run to 6 steps (log every 2, evaluate and
    checkpoint every 3) for tests and smoke runs. A recipe may shrink its model and batch too.

    Raises:
      ValueError: for a ``variant`` other than ``None``, ``""`` or ``"tiny"``.
    """
    if variant is not None and variant not in VARIANTS:
        raise ValueError(f"variant must be '' or 'tiny'; got {variant!r}.")
    config = ml_collections.ConfigDict()
    config.model = ""
    config.model_options = ml_collections.ConfigDict()
    config.dataset = ""
    config.dataset_options = ml_collections.ConfigDict()
    config.num_classes = 0
    config.batch_size = 0
    config.eval_batch_size = 0
    config.num_epochs = 0.0
    config.num_train_steps = -1

    config.optimizer = ml_collections.ConfigDict()
    config.optimizer.name = "sgd"
    config.optimizer.momentum = 0.9
    config.optimizer.nesterov = False
    config.optimizer.b1 = 0.9
    config.optimizer.b2 = 0.999
    config.optimizer.eps = 1e-8
    config.learning_rate = 0.1
    config.weight_decay = 1e-4

    config.schedule = ml_collections.ConfigDict()
    config.schedule.name = "step"
    config.schedule.warmup_epochs = 0.0
    config.schedule.milestones = (30, 60)
    config.schedule.gamma = 0.1

    # A workdir/checkpoint to take params and batch_stats from (--config.init_from=DIR).
    config.init_from = ml_collections.config_dict.placeholder(str)
    config.label_smoothing = 0.0
    config.dtype = "float32"
    config.seed = 0

    config.kure = ml_collections.ConfigDict()
    config.kure.lambda_ = 1.0
    config.kure.target = 1.8
    config.kure.selection = "paper"
    config.kure.reduction = "mean"
    # "auto": the fused Pallas penalty kernel where kure_jax.kernels.AUTO_PALLAS_BACKENDS
    # allows it (GPU), else jnp; "jnp" / "pallas" force one (Pallas is interpreted on CPU).
    config.kure.penalty_impl = "auto"

    config.qat = ml_collections.ConfigDict()
    config.qat.enabled = False
    config.qat.weight_bits = 4
    config.qat.act_bits = 4
    config.qat.weight_quantizer = "lsq"
    config.qat.act_quantizer = "lsq"
    # The layers that quantise (kure_jax.selection.as_rule): "paper" keeps the first layer and
    # the classifier float, "kernels" quantises every conv/dense layer.
    config.qat.layers = "paper"
    config.qat.lsq_grad_scale = True
    # "jnp": XLA fuses the fake quantisation; "pallas" / "auto" use the fused kernels of
    # kure_jax.kernels (QATConfig.kernel_impl; not yet timed inside a training step).
    config.qat.kernel_impl = "jnp"
    # Multi-bit QAT (kure_jax.training.multibit): --config.qat.bits=(8,4,2) trains every width.
    config.qat.bits = ml_collections.config_dict.placeholder(tuple)
    config.qat.multibit = "sum"
    config.qat.bn_per_bits = False

    config.parallel = "jit"
    config.log_every_steps = 50
    config.eval_every_steps = 0
    config.checkpoint_every_steps = 0
    config.keep_checkpoints = 2
    config.keep_best = 1

    if variant == "tiny":
        config.num_train_steps = 6
        config.log_every_steps = 2
        config.eval_every_steps = 3
        config.checkpoint_every_steps = 3
    return config
