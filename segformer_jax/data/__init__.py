"""Data for SegFormer training and evaluation.

Modules (import them explicitly; this package imports nothing heavy on its own):

* :mod:`segformer_jax.data.input_pipeline` -- tf.data train/eval pipelines (the
  mmseg/NVlabs SegFormer recipe), ``default_data_config()`` documenting every field,
  ``get_dataset_info``, ``make_train_iterator``, ``make_eval_iterator``.
* :mod:`segformer_jax.data.sources` -- the datasets: TFDS ``synthetic_shapes``
  (built in, no download), ``scene_parse150`` (ADE20K), ``cityscapes``,
  ``oxford_iiit_pet``, and a user ``folder`` of images + masks.
* :mod:`segformer_jax.data.synthetic_shapes` -- the procedurally generated TFDS
  dataset used by default.
* :mod:`segformer_jax.data.folder` -- reader/validator for a folder dataset.
"""
