"""Module paths of 0.1 that moved in the 0.2 layout: they keep working for one release, with a
DeprecationWarning naming the new path (README, "Layout"). Removed in 0.3.

One table; `install()` (called by segformer_jax/__init__.py) puts a finder for these names in front
of the import system, which hands out the new module itself: `segformer_jax.config is
segformer_jax.models.config`, so monkeypatching either path patches the same module.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

MOVED_MODULES = {
    "segformer_jax.config": "segformer_jax.models.config",
    "segformer_jax.layers": "segformer_jax.models.layers",
    "segformer_jax.encoder": "segformer_jax.models.encoder",
    "segformer_jax.decode_head": "segformer_jax.models.decode_head",
    "segformer_jax.model": "segformer_jax.models.model",
    "segformer_jax.kernels": "segformer_jax.models.kernels",
    "segformer_jax.preprocess": "segformer_jax.models.preprocess",
    "segformer_jax.optim": "segformer_jax.training.optim",
    "segformer_jax.losses": "segformer_jax.training.losses",
    "segformer_jax.recipes": "segformer_jax.training.recipes",
    "segformer_jax.metrics": "segformer_jax.evaluation.metrics",
    "segformer_jax.palettes": "segformer_jax.data.palettes",
    "segformer_jax.visualize": "segformer_jax.inference.visualize",
}


def _warn(old: str, new: str) -> None:
    # Point the warning at the importing code. warnings.warn's stacklevel does not count importlib's
    # frames (it skips them itself), so only this file's frames are counted here.
    level, frame = 1, sys._getframe(0)
    while frame is not None and (
        frame.f_code.co_filename.startswith("<frozen importlib") or frame.f_code.co_filename == __file__
    ):
        if frame.f_code.co_filename == __file__:
            level += 1
        frame = frame.f_back
    warnings.warn(
        f"{old} moved to {new}; the old path is removed in segformer-jax 0.3", DeprecationWarning, stacklevel=level
    )


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        if name not in MOVED_MODULES:
            return None
        return importlib.util.spec_from_loader(name, self)

    def create_module(self, spec):
        new = MOVED_MODULES[spec.name]
        _warn(spec.name, new)
        module = importlib.import_module(new)
        self._real_spec = module.__spec__
        return module

    def exec_module(self, module):
        module.__spec__ = self._real_spec  # the import system set the alias' spec; the module keeps its own


_FINDER = _Alias()


def install() -> None:
    if _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)


def forward_module_attributes(old: str, new: str):
    """A module `__getattr__` for a module that stays (a CLI) but whose API moved to `new`."""

    def __getattr__(name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        target = importlib.import_module(new)
        if not hasattr(target, name):
            raise AttributeError(f"module {old!r} has no attribute {name!r}")
        _warn(f"{old}.{name}", f"{new}.{name}")
        return getattr(target, name)

    return __getattr__
