"""What a run writes besides checkpoints: metrics.jsonl and TensorBoard scalars / images (process 0)."""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Mapping

import numpy as np

logger = logging.getLogger("segformer_jax.training")


def _summary_writer_class():
    """tensorboardX's SummaryWriter, imported without torch: tensorboardX imports torch when it is
    installed (~180 MB resident in a training run) only to accept torch tensors, which we never pass."""
    hide_torch = "torch" not in sys.modules
    if hide_torch:
        sys.modules["torch"] = None  # makes `import torch` raise ImportError, which tensorboardX handles
    try:
        from tensorboardX import SummaryWriter
    finally:
        if hide_torch:
            del sys.modules["torch"]
    return SummaryWriter


class MetricWriter:
    """metrics.jsonl + TensorBoard scalars/images; writes only on process 0."""

    def __init__(self, workdir: str, enabled: bool):
        self.enabled = enabled
        self._tb = None
        if enabled:
            self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
            try:
                SummaryWriter = _summary_writer_class()
                self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
            except ImportError:  # tensorboardX is optional
                logger.warning("tensorboardX is not installed: no TensorBoard logs")

    def scalars(self, step: int, split: str, values: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in values.items()}
        self._jsonl.write(json.dumps({"step": step, "split": split, **clean}, allow_nan=True) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for k, v in clean.items():
                self._tb.add_scalar(f"{split}/{k}", v, step)

    def image(self, step: int, tag: str, image: np.ndarray) -> None:
        if self.enabled and self._tb is not None:
            self._tb.add_image(tag, image, step, dataformats="HWC")

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            if self._tb is not None:
                self._tb.close()
