"""Per-fusion profile of the jitted forward or training step on XLA:CPU: where the time goes, kernel by
kernel (the compiled program's fusions, their shapes and the model code that made them).

Runs the program a few times under `jax.profiler.trace`, reads the XSpace it writes (TensorFlow's
xplane proto, installed with the test extra) and sums each kernel's time per call over XLA's worker
threads; each row names the kernel, its output shape and operands from the optimised HLO and the
source op (`op_name` metadata: the Flax module path).

    .venv/bin/python benchmarks/profile_fusions.py                                   # b0 512x512 bf16 forward
    .venv/bin/python benchmarks/profile_fusions.py --dtype float32 --variant b2 --top 30
    .venv/bin/python benchmarks/profile_fusions.py --mode train --dtype float32      # b0, 11 classes, 8 x 256^2

The forward uses random weights of the variant; the training step is `training.build_training` on
configs/folder.py (the issue-17 recipe's shapes: 11 classes, batch 8, 256x256 crops), random batch.
Times are per call and include the profiler's overhead (a few %); compare rows within one run.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def forward_program(variant: str, dtype: str, size: int, batch: int):
    import jax
    import jax.numpy as jnp

    import segformer_jax
    from segformer_jax.models import kernels

    cfg = segformer_jax.SegformerConfig.preset(variant, num_labels=150)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((batch, size, size, 3), dtype=np.float32))
    variables = segformer_jax.SegformerForSemanticSegmentation(cfg).init(jax.random.key(0), x[:1, :64, :64])
    model = segformer_jax.SegformerForSemanticSegmentation(cfg, dtype=kernels.compute_dtype(dtype))
    variables = kernels.weights_for_compute(variables, model.dtype)  # as from_pretrained(dtype=...)
    fn = jax.jit(model.apply)
    compiled = fn.lower(variables, x).compile()
    return (lambda: jax.block_until_ready(compiled(variables, x))), compiled.as_text()


def train_program(variant: str, dtype: str, size: int, batch: int):
    import jax
    import jax.numpy as jnp

    from configs import folder
    from segformer_jax import SegformerConfig, SegformerForSemanticSegmentation
    from segformer_jax.training import steps

    config = folder.get_config()
    config.model.dtype = dtype
    model = SegformerForSemanticSegmentation(SegformerConfig.preset(variant, num_labels=11), dtype=getattr(jnp, dtype))
    setup = steps.build_training(config, model, num_classes=11)
    state = [setup.init_state()]
    rng = np.random.default_rng(0)
    data = {
        "image": jnp.asarray(rng.standard_normal((batch, size, size, 3), dtype=np.float32)),
        "label": jnp.asarray(rng.integers(0, 11, (batch, size, size), dtype=np.int32)),
    }
    text = setup.train_step.lower(state[0], data, setup.train_rng).compile().as_text()

    def run():
        state[0], metrics = setup.train_step(state[0], data, setup.train_rng)
        jax.block_until_ready(metrics)

    return run, text


def kernel_times(trace_dir: str, calls: int) -> collections.Counter:
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    (path,) = glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True)
    space = xplane_pb2.XSpace()
    with open(path, "rb") as f:
        space.ParseFromString(f.read())
    times = collections.Counter()
    for plane in space.planes:
        names = {k: v.name for k, v in plane.event_metadata.items()}
        for line in plane.lines:
            if "XLAEigen" not in line.name:  # XLA:CPU's worker threads
                continue
            for event in line.events:
                name = names.get(event.metadata_id, "?")
                if not name.startswith(("ThunkExecutor", "SlinkyThreadPool")):
                    times[name] += event.duration_ps / 1e9 / calls
    return times


def describe(name: str, hlo: str) -> tuple[str, str]:
    m = re.search(r"^\s*%?" + re.escape(name) + r" = (.*)$", hlo, re.M)
    if not m:
        return "", ""
    text = m.group(1)
    source = re.search(r'op_name="([^"]*)"', text)
    return re.sub(r", metadata=\{.*", "", text)[:80], source.group(1) if source else ""


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=("forward", "train"), default="forward")
    p.add_argument("--variant", default="b0")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16")
    p.add_argument("--size", type=int, help="image side (forward: 512, train: 256)")
    p.add_argument("--batch", type=int, help="batch (forward: 1, train: 8)")
    p.add_argument("--calls", type=int, default=5, help="profiled calls")
    p.add_argument("--top", type=int, default=40)
    args = p.parse_args()
    train = args.mode == "train"
    size = args.size or (256 if train else 512)
    batch = args.batch or (8 if train else 1)
    import jax

    run, hlo = (train_program if train else forward_program)(args.variant, args.dtype, size, batch)
    run()
    walls = []
    for _ in range(10):
        t = time.perf_counter()
        run()
        walls.append(time.perf_counter() - t)
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir):
            for _ in range(args.calls):
                run()
        times = kernel_times(trace_dir, args.calls)
    total = sum(times.values())
    print(
        f"{args.mode} {args.variant} {args.dtype} batch {batch} {size}x{size}: wall median "
        f"{1e3 * np.median(walls):.1f} ms; kernels {total:.1f} ms per call in {len(times)} kernels"
    )
    print(f"{'ms':>7} {'share':>6}  {'kernel':28s} {'output / operands':80s}  source")
    for name, ms in times.most_common(args.top):
        shape, source = describe(name, hlo)
        print(f"{ms:7.2f} {ms / total:6.1%}  {name:28s} {shape:80s}  {source[-90:]}")


if __name__ == "__main__":
    main()
