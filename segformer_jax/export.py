"""`python -m segformer_jax.export --format {stablehlo,savedmodel,tflite,onnx,openvino} MODEL OUT`.

The export functions themselves (and their Python API) are `segformer_jax.deploy.export`.
"""

from __future__ import annotations

from segformer_jax._moved import forward_module_attributes
from segformer_jax.deploy.export import main

# `segformer_jax.export.save_stablehlo` and the rest of the old module keep working for one release.
__getattr__ = forward_module_attributes(__name__, "segformer_jax.deploy.export")

__all__ = ["main"]

if __name__ == "__main__":
    raise SystemExit(main())
