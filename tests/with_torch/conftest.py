"""tests/with_torch runs in .venv-torch (`make test-torch`); the main suite does not collect
this folder (``norecursedirs`` in pyproject.toml), so it needs no torch.

Not named ``tests/torch``: pytest puts ``tests/`` on ``sys.path`` (for ``_training_helpers``),
and a ``tests/torch`` folder is then importable as a namespace package ``torch`` wherever torch
is not installed, which breaks libraries that probe for it with ``import torch`` (tensorboardX).
"""
