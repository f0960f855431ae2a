"""Scoring segmentations.

    metrics.py      confusion matrices (on device and on the host), mIoU / mPA / aAcc, the per-class
                    table, whole-image and sliding-window logits for fixed-shape eval batches

May import: models, inference (the sliding-window grid). The evaluate CLI that runs a checkpoint over
a dataset is `segformer_jax.evaluate` (it sits on top of training's checkpoint reader).
"""
