"""Training configs for ``train.py`` (``--config configs/<name>.py``): ``ml_collections`` files.

Each recipe is a short delta on a shared base imported as a module (``from configs import
base``): ``base.py`` holds every field with the dataset-independent defaults,
``imagenet_base.py`` the fields the ImageNet recipes share. A config loaded by path (as
``config_flags`` does) imports these with the repository root on ``sys.path``, which it is for
``python train.py`` (the script's folder) and for ``python -m ...`` run from the root.
``sweeps/`` holds ``eval.py``'s sweep files, not training configs.
"""
