"""Which input pipeline runs a data config: tf.data (`input_pipeline`) or numpy + PIL (`python_pipeline`).

Both modules give get_dataset_info, make_train_iterator and make_eval_iterator with the same batches'
shapes; `data.pipeline` chooses (config.pipeline_of). Only the chosen module is imported, so a folder
run never loads TensorFlow.
"""

from __future__ import annotations

from segformer_jax.data.config import pipeline_of


def pipeline_module(cfg):
    """The module running data config `cfg`'s input pipeline."""
    if pipeline_of(cfg) == "python":
        from segformer_jax.data import python_pipeline as module
    else:
        from segformer_jax.data import input_pipeline as module
    return module
