"""Re-export for modules not yet switched to :func:`kure_jax._deprecation.deprecated_getattr`.

``training/loop.py`` still imports it from here; once it imports ``kure_jax._deprecation``
directly this file can go.
"""

from kure_jax._deprecation import deprecated_getattr as deprecated_getattr

__all__ = ["deprecated_getattr"]
