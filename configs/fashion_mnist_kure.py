"""KURE on Fashion-MNIST with a ResNet-8: the paper's selection, lambda 1, K_T 1.8 (CPU recipe).

    python train.py --config configs/fashion_mnist_kure.py --workdir runs/fashion_mnist_kure

The model is ``resnet20``'s CIFAR layout with one basic block per stage (``stage_sizes`` (1, 1,
1), 16/32/64 channels: ResNet-8, 77,754 parameters): a 3x3 stem, three residual blocks (the
last two with 1x1 projection shortcuts) and the classifier. KURE regularises every conv but the
stem; the classifier is not regularised (``kure.selection = "paper"``). Data: the 60,000
Fashion-MNIST training images, padded by 2 pixels, randomly cropped and flipped; evaluation on
the 10,000 test images (``kure_jax.data.idx_datasets``; the files come from ``apt-get install
dataset-fashion-mnist``, Keras' cache or ``--config.dataset_options.data_dir=DIR``).

Cost, sized for about 10 minutes on 2 CPU cores (1.5 epochs = 702 steps of 128; a ResNet-20
costs 2.4x a ResNet-8 per step): the baseline (this run without KURE; KURE adds ~5%), seed 0,
measured end to end with ``scripts/fashion_mnist_study.py --recipes=baseline --seeds=0`` (which
times train.py): 658 CPU seconds (user + system), 3,871 s wall on a shared 2-core machine at load
average 10-17, i.e. about 6 minutes on 2 idle cores if XLA keeps both busy; 86.9% test accuracy.
Details and the per-step measurements: ``docs/datasets.md``.
``configs/fashion_mnist_kure.py:tiny`` is a seconds-long variant for tests and smoke runs.
``fashion_mnist_baseline.py`` is this run without KURE; the ``*_w4a4*.py`` recipes add QAT.
"""

import ml_collections

from configs import base


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
    """The recipe; ``variant="tiny"`` shrinks model, batch and run length for tests."""
    config = base.get_config(variant)
    config.model = "resnet20"
    config.model_options.stage_sizes = (1, 1, 1)  # ResNet-8: one basic block per stage
    config.dataset = "fashion_mnist"
    config.dataset_options.data_dir = ml_collections.config_dict.placeholder(str)
    config.dataset_options.max_shift = 2  # pad 2 + random 28x28 crop
    config.dataset_options.flip = True
    config.dataset_options.num_train = ml_collections.config_dict.placeholder(int)  # all
    config.num_classes = 10
    config.batch_size = 128
    config.eval_batch_size = 1000
    config.num_epochs = 1.5  # 702 steps of 128: sized for ~10 min on 2 cores (docs/datasets.md)
    config.optimizer.nesterov = True
    config.learning_rate = 0.1
    config.weight_decay = 5e-4
    config.schedule.name = "cosine"
    config.log_every_steps = 50
    if variant == "tiny":
        config.model_options.stage_widths = (4, 8, 8)
        config.batch_size = 32
        config.dataset_options.num_train = 1000
    return config
