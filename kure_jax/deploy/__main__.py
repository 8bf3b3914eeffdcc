"""``python -m kure_jax.deploy``: the integer-export command (see :mod:`kure_jax.deploy.export`)."""

import sys

from kure_jax.deploy.export import main

sys.exit(main())
