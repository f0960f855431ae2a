"""Data for SegFormer training and evaluation: where images come from and the recipe they go through.

    config.py           the data config: ``default_data_config()`` documenting every field, the dataset
                        presets, ``pipeline_of`` (which pipeline runs a config); TensorFlow-free
    sources.py          the datasets: TFDS ``synthetic_shapes`` (built in, no download),
                        ``scene_parse150`` (ADE20K), ``cityscapes``, ``oxford_iiit_pet``, a user ``folder``
    input_pipeline.py   the tf.data train/eval pipelines (the mmseg/NVlabs SegFormer recipe: random
                        resize, crop, flip, photometric distortion, normalisation, padding),
                        ``get_dataset_info``, ``make_train_iterator``, ``make_eval_iterator``
    python_pipeline.py  the same recipe and interface for ``folder`` datasets in numpy + PIL threads,
                        without importing TensorFlow (``data.pipeline='python'``: ~0.5 GB less memory)
    pipelines.py        ``pipeline_module(cfg)``: the chosen pipeline's module (imports only that one)
    synthetic_shapes.py the procedurally generated TFDS dataset used by default
    folder.py           reader / validator for a folder of images + masks
    palettes.py         class colours (ADE20K, Cityscapes, VOC-style generated)

May import: numpy, PIL, TensorFlow / TFDS (only to feed data; never config.py, folder.py,
palettes.py or python_pipeline.py), and nothing of segformer_jax outside
this folder: data never imports jax or the model. Import the modules explicitly; this package
imports nothing heavy on its own. README.md here documents the batches.
"""
