"""Inference benchmark: segformer-jax (float32, bf16, int8 weight-only) against OpenVINO (f32, bf16)
and ONNX Runtime (f32) running transformers' model exported to ONNX, transformers eager and
torch.compile; same weights, same inputs. Each runtime is timed in a fresh process of its own (no
other runtime's worker threads alive beside it), `--rounds` times with the order reversed every other
round; `--same-process` interleaves them all in one process instead (the earlier method, which read
segformer-jax ~35% slower beside OpenVINO and ONNX Runtime). Compile / first-call times, medians,
ratios, each row's logits against segformer-jax float32 (max-abs difference, argmax agreement), and
each worker's peak RSS over its idle state.

Cases: b0/b2 at 512x512 batch 1 and 8; b0 on a 1024x2048 image by sliding window (crop 1024,
stride 768: 3 windows, each run at batch 1; window logits averaged at logit resolution).

Runtimes (--runtimes, default all):
  jax-f32    segformer-jax float32 (jit)
  jax-bf16   SegformerForSemanticSegmentation(config, dtype=jnp.bfloat16): bf16 matmuls / convs, f32 accumulation
  jax-int8   int8 weight-only checkpoint (deploy.quantize.quantized_apply: dequantized inside the jit)
  ov-f32     OpenVINO on the ONNX export, INFERENCE_PRECISION_HINT=f32
  ov-bf16    OpenVINO on the ONNX export, INFERENCE_PRECISION_HINT=bf16 (its default on AMX / AVX-512-BF16 CPUs)
  ort-f32    ONNX Runtime (CPUExecutionProvider) on the ONNX export
  eager      transformers eager (torch)
  compile    torch.compile of the transformers model (also dropped by --no-compile)
The ONNX file is transformers' model through torch.onnx.export (opset 17, static shape of the case),
written to a temporary folder. OpenVINO / ONNX Runtime rows are skipped, with a message, when the
package is missing (pip install openvino onnxruntime).

    .venv/bin/python benchmarks/inference.py                      # everything (long)
    .venv/bin/python benchmarks/inference.py --cases 512 --batch 1 --no-compile
    .venv/bin/python benchmarks/inference.py --runtimes jax-f32 jax-bf16 ov-bf16 --variants b0 b2 --cases 512 --batch 1
    .venv/bin/python benchmarks/inference.py --smoke   # b0, 128x128, batch 1, 3 repeats, one round, no torch.compile
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import sys
import tempfile
import time
import types
from typing import Any, NamedTuple

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    export_hf_onnx,
    fmt_ms,
    fmt_ratio,
    fmt_rss,
    interleaved,
    logits_agreement,
    make_models,
    med,
    peak_rss_mb,
    reset_peak_rss,
    run_isolated,
)

CROP, STRIDE = 1024, 768

RUNTIMES = {
    "jax-f32": "segformer-jax f32",
    "jax-bf16": "segformer-jax bf16",
    "jax-int8": "segformer-jax int8 (weights)",
    "ov-f32": "OpenVINO f32",
    "ov-bf16": "OpenVINO bf16",
    "ort-f32": "ONNX Runtime f32",
    "eager": "transformers eager",
    "compile": "torch.compile",
}
REFERENCE = "jax-f32"  # every row's logits are compared with these
BASELINES = [("ov-bf16", "vs OV bf16"), ("ov-f32", "vs OV f32"), ("ort-f32", "vs ORT f32"), ("eager", "vs eager")]
BASELINES.append(("compile", "vs torch.compile"))
PACKAGES = {"ov-f32": "openvino", "ov-bf16": "openvino", "ort-f32": "onnxruntime"}


def windows(h: int, w: int, crop: int = CROP, stride: int = STRIDE):
    """mmseg 'slide' windows: (top, left) of each crop x crop window covering the image."""
    hg = max(h - crop + stride - 1, 0) // stride + 1
    wg = max(w - crop + stride - 1, 0) // stride + 1
    out = []
    for i in range(hg):
        for j in range(wg):
            top, left = min(i * stride, max(h - crop, 0)), min(j * stride, max(w - crop, 0))
            out.append((top, left))
    return out


class Runtime(NamedTuple):
    """prepare(x NHWC float32 numpy) -> the runtime's own input (made once, outside the timing);
    call(prepared) -> NCHW logits (a numpy array, possibly a view the next call overwrites);
    setup_s: compile / session-creation seconds; info: a note for the case header."""

    prepare: Any
    call: Any
    setup_s: float
    info: str = ""


class Context:
    """One variant's models, and its ONNX exports (one per input shape) in `onnx_dir` (default: a
    temporary folder of its own). An export already in the folder is reused: the worker processes of
    one variant share theirs."""

    def __init__(self, hf, model, variables, onnx_dir: str | None = None):
        self.hf, self.model, self.variables = hf, model, variables
        self.num_labels = (model.config if model is not None else hf.config).num_labels
        self.tmp = None if onnx_dir else tempfile.TemporaryDirectory(prefix="segformer-bench-")
        self.onnx_dir = onnx_dir or self.tmp.name
        self.export_s = {}

    def onnx_path(self, shape) -> str:
        shape = tuple(int(s) for s in shape)
        path = os.path.join(self.onnx_dir, "x".join(map(str, shape)) + ".onnx")
        if not os.path.exists(path):
            self.export_s[shape] = export_hf_onnx(self.hf, shape, path, opset=17)
        return path

    def close(self):
        if self.tmp is not None:
            self.tmp.cleanup()


def nchw(x):
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def jax_runtime(kind: str, ctx: Context, example) -> Runtime:
    import jax
    import jax.numpy as jnp

    import segformer_jax
    from segformer_jax.deploy import quantize
    from segformer_jax.models import kernels

    model, variables = ctx.model, ctx.variables
    if kind == "jax-bf16":
        model = segformer_jax.SegformerForSemanticSegmentation(model.config, dtype=jnp.bfloat16)
        variables = kernels.weights_for_compute(variables, jnp.bfloat16)  # as from_pretrained(dtype=...)
    if kind == "jax-int8":
        variables = jax.tree_util.tree_map(jnp.asarray, quantize.quantize_variables(variables))
        apply = jax.jit(quantize.quantized_apply(model))
    else:
        apply = jax.jit(model.apply)
    t = time.perf_counter()
    compiled = apply.lower(variables, jnp.asarray(example)).compile()
    setup_s = time.perf_counter() - t
    return Runtime(jnp.asarray, lambda xj: np.asarray(compiled(variables, xj)).transpose(0, 3, 1, 2), setup_s)


def torch_runtime(kind: str, ctx: Context, example) -> Runtime:
    import torch

    if kind == "compile":
        torch._dynamo.reset()
    fwd = torch.compile(ctx.hf) if kind == "compile" else ctx.hf

    @torch.inference_mode()
    def call(xt):
        return fwd(pixel_values=xt).logits.numpy()

    return Runtime(lambda x: torch.from_numpy(nchw(x)), call, 0.0)


def _type_name(t) -> str:
    return t.to_string() if hasattr(t, "to_string") else str(t)


def openvino_runtime(kind: str, ctx: Context, example) -> Runtime:
    import openvino as ov

    path = ctx.onnx_path(nchw(example).shape)
    precision = "f32" if kind == "ov-f32" else "bf16"
    t = time.perf_counter()
    compiled = ov.Core().compile_model(
        path,
        "CPU",
        {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": os.cpu_count()},
    )
    request = compiled.create_infer_request()
    setup_s = time.perf_counter() - t
    info = f"{RUNTIMES[kind]}: INFERENCE_PRECISION_HINT={_type_name(compiled.get_property('INFERENCE_PRECISION_HINT'))}"

    def call(x):
        request.infer({0: x}, share_inputs=True, share_outputs=True)
        return request.get_output_tensor(0).data

    return Runtime(nchw, call, setup_s, info)


def onnxruntime_runtime(kind: str, ctx: Context, example) -> Runtime:
    import onnxruntime as ort

    path = ctx.onnx_path(nchw(example).shape)
    options = ort.SessionOptions()
    options.intra_op_num_threads = os.cpu_count()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    t = time.perf_counter()
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    setup_s = time.perf_counter() - t
    info = f"{RUNTIMES[kind]}: onnxruntime {ort.__version__}"
    return Runtime(nchw, lambda x: session.run(None, {"pixel_values": x})[0], setup_s, info)


BUILDERS = {
    "jax-f32": jax_runtime,
    "jax-bf16": jax_runtime,
    "jax-int8": jax_runtime,
    "ov-f32": openvino_runtime,
    "ov-bf16": openvino_runtime,
    "ort-f32": onnxruntime_runtime,
    "eager": torch_runtime,
    "compile": torch_runtime,
}


def runner(kind: str, ctx: Context, x, slide: bool):
    """-> (run() returning NCHW logits of the whole input, compile / setup + first-call seconds, info)."""
    example = x[:, :CROP, :CROP] if slide else x
    rt = BUILDERS[kind](kind, ctx, np.ascontiguousarray(example))
    if not slide:
        prepared = rt.prepare(x)
        run = lambda: rt.call(prepared)  # noqa: E731
    else:
        b, h, w, _ = x.shape
        wins = windows(h, w)
        prepared = [rt.prepare(np.ascontiguousarray(x[:, t : t + CROP, left : left + CROP])) for t, left in wins]
        labels = ctx.num_labels

        def run():
            acc = np.zeros((b, labels, h // 4, w // 4), np.float32)
            cnt = np.zeros((1, 1, h // 4, w // 4), np.float32)
            for (top, left), p in zip(wins, prepared):
                acc[:, :, top // 4 : (top + CROP) // 4, left // 4 : (left + CROP) // 4] += rt.call(p)
                cnt[:, :, top // 4 : (top + CROP) // 4, left // 4 : (left + CROP) // 4] += 1
            return acc / cnt

    t = time.perf_counter()
    run()
    return run, rt.setup_s + time.perf_counter() - t, rt.info


def case_input(case: str, batch: int, size: int = 512):
    rng = np.random.default_rng(0)
    h, w = (size, size) if case == "512" else (1024, 2048)
    return rng.normal(size=(batch, h, w, 3)).astype(np.float32), case == "slide"


def case_label(variant, case, batch, size):
    return f"{variant} {f'{size}x{size}' if case == '512' else '1024x2048 slide'} batch {batch}"


def available(kinds):
    """The runtimes whose packages are installed; a line for each one skipped."""
    out = []
    for k in kinds:
        package = PACKAGES.get(k)
        if package and importlib.util.find_spec(package) is None:
            print(
                f"skipping {k} ({RUNTIMES[k]}): the Python package {package!r} is not installed "
                f"(pip install {package}; the benchmark rows need openvino and onnxruntime)",
                flush=True,
            )
            continue
        out.append(k)
    return out


HF_DIR = "hf"  # the variant's transformers checkpoint, under the work folder


def save_variant(ctx: Context) -> None:
    """Write the variant's transformers checkpoint into the work folder for the worker processes."""
    ctx.hf.save_pretrained(os.path.join(ctx.onnx_dir, HF_DIR))


def worker_context(kind: str, work_dir: str) -> Context:
    """The models `kind` needs, from the checkpoint `save_variant` wrote: a jax worker never imports
    torch, an OpenVINO / ONNX Runtime worker loads only the ONNX file (exported by the parent)."""
    path = os.path.join(work_dir, HF_DIR)
    hf = model = variables = None
    if kind.startswith("jax-"):
        import segformer_jax

        model, variables = segformer_jax.from_pretrained(path)
    elif kind in ("eager", "compile"):
        import transformers

        hf = transformers.SegformerForSemanticSegmentation.from_pretrained(path).eval()
    else:  # the ONNX export is on disk already; importing transformers would import torch
        with open(os.path.join(path, "config.json")) as f:
            num_labels = len(json.load(f)["id2label"])
        hf = types.SimpleNamespace(config=types.SimpleNamespace(num_labels=num_labels))
    return Context(hf, model, variables, onnx_dir=work_dir)


def worker(args):
    """One runtime on one case in this fresh process: set-up + first call, `--repeats` timed calls, peak
    RSS over idle (after loading the weights), logits saved for the parent's agreement columns."""
    kind, variant, case, batch, size = args.worker.split(",")
    if kind in ("eager", "compile"):
        import torch

        torch.set_num_threads(os.cpu_count())
    x, slide = case_input(case, int(batch), int(size))
    ctx = worker_context(kind, args.work_dir)
    gc.collect()
    base = peak_rss_mb()
    reset_peak_rss()
    base = min(base, peak_rss_mb())
    run, first_s, info = runner(kind, ctx, x, slide)
    times = interleaved({kind: run}, args.repeats)[kind]
    logits = None
    if args.save_logits:
        logits = os.path.join(args.work_dir, f"{kind}.npy")
        np.save(logits, np.asarray(run()))
    peak = peak_rss_mb()
    result = dict(
        times=times,
        first_s=first_s,
        info=info,
        logits=logits,
        peak_rss_mb=peak,
        base_mb=base,
        peak_delta_mb=peak - base,
    )
    print("RESULT " + json.dumps(result))
    ctx.close()


def repeats_for(args, batch: int, slide: bool) -> int:
    if args.smoke:
        return 3
    if slide:
        return 2 if args.quick else 3
    return max(1, int(round(3 / max(batch, 1)))) if args.quick else 5


def measure_same_process(args, kinds, ctx, variant, case, batch):
    """-> (per runtime: times, first_s, agreement, rss; the runtimes' notes); all runtimes
    interleaved in this process."""
    import torch

    torch.set_num_threads(os.cpu_count())
    x, slide = case_input(case, batch, args.size)
    runs, first_s, infos = {}, {}, []
    # The reference is built even when its row is not asked for (then it is not timed).
    for k in [REFERENCE] + [k for k in kinds if k != REFERENCE]:
        runs[k], first_s[k], info = runner(k, ctx, x, slide)
        if info:
            infos.append(info)
    reference = np.array(runs[REFERENCE]())
    agree = {k: logits_agreement(np.array(runs[k]()), reference) for k in kinds}
    if REFERENCE not in kinds:
        del runs[REFERENCE]
    times = interleaved(runs, repeats_for(args, batch, slide))
    out = {}
    for k in kinds:
        rss = None
        if not args.no_rss:
            spec = f"{k},{variant},{case},{batch},{args.size}"
            rss = run_isolated(__file__, ["--worker", spec, "--repeats", "2", "--work-dir", ctx.onnx_dir])
        out[k] = dict(times=times[k], first_s=first_s[k], rss=rss, round_medians=[], **agree[k])
    return out, infos


def measure_isolated(args, kinds, ctx, variant, case, batch):
    """-> (per runtime: times, first_s, agreement, rss; the runtimes' notes); each runtime timed in
    a fresh process of its own, `--rounds` times, the order reversed every other round (so that no
    other runtime's threads are alive while one is timed)."""
    x, slide = case_input(case, batch, args.size)
    if any(k in PACKAGES for k in kinds):
        ctx.onnx_path(nchw(x[:, :CROP, :CROP] if slide else x).shape)  # exported here, once, for the workers
    spec = f"{variant},{case},{batch},{args.size}"
    order = [REFERENCE] + [k for k in kinds if k != REFERENCE]
    env = None
    if args.hugepages:
        from segformer_jax import hugepages

        env = hugepages.environment(dict(os.environ), enabled=True)
    results = {k: [] for k in order}
    for r in range(args.rounds):
        for k in order if r % 2 == 0 else order[::-1]:
            if r > 0 and k not in kinds:
                continue  # the reference's logits are all it is run for
            extra = ["--save-logits"] if r == 0 else []
            results[k].append(
                run_isolated(
                    __file__,
                    [
                        "--worker",
                        f"{k},{spec}",
                        "--repeats",
                        str(repeats_for(args, batch, case == "slide")),
                        "--work-dir",
                        ctx.onnx_dir,
                        *extra,
                    ],
                    env=env,
                )
            )
    reference = np.load(results[REFERENCE][0]["logits"])
    out, infos = {}, []
    for k in kinds:
        first = results[k][0]
        agree = logits_agreement(np.load(first["logits"]), reference)
        times = [t for res in results[k] for t in res["times"]]
        rss = max(results[k], key=lambda res: res["peak_rss_mb"])
        out[k] = dict(
            times=times,
            first_s=first["first_s"],
            rss=rss,
            round_medians=[med(res["times"]) for res in results[k]],
            **agree,
        )
        if first["info"]:
            infos.append(first["info"])
    return out, infos


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=["b0", "b2"])
    p.add_argument("--cases", nargs="+", default=["512", "slide"], choices=["512", "slide"])
    p.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    p.add_argument("--runtimes", nargs="+", default=list(RUNTIMES), choices=list(RUNTIMES), metavar="RUNTIME")
    p.add_argument("--size", type=int, default=512, help="side of the square images of the '512' case")
    p.add_argument("--quick", action="store_true", help="fewer repeats")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    p.add_argument(
        "--same-process",
        action="store_true",
        help="time all runtimes interleaved in this one process (the earlier method: another runtime's "
        "idle worker threads slow the next one down) instead of a fresh process per runtime",
    )
    p.add_argument("--rounds", type=int, default=2, help="fresh processes per runtime and case (not --same-process)")
    p.add_argument("--hugepages", action="store_true", help="run every worker process with glibc.malloc.hugetlb=1")
    p.add_argument("--no-rss", action="store_true", help="--same-process: skip the peak-RSS subprocesses")
    p.add_argument(
        "--smoke",
        action="store_true",
        help="a check that the rows run: b0, 128x128, batch 1, 3 repeats, one round, no torch.compile, no RSS",
    )
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--repeats", type=int, default=5, help=argparse.SUPPRESS)
    p.add_argument("--work-dir", help=argparse.SUPPRESS)
    p.add_argument("--save-logits", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    if args.smoke:
        args.variants, args.cases, args.batch, args.size = ["b0"], ["512"], [1], 128
        args.no_rss = args.no_compile = True
        args.rounds = 1
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    kinds = available([k for k in args.runtimes if not (k == "compile" and args.no_compile)])
    print(
        "timing: "
        + (
            "all runtimes interleaved in one process"
            if args.same_process
            else f"a fresh process per runtime, {args.rounds} round(s)"
        )
        + (", glibc.malloc.hugetlb=1" if args.hugepages else ""),
        flush=True,
    )

    rows = []
    for variant in args.variants:
        work = tempfile.TemporaryDirectory(prefix="segformer-bench-")
        ctx = Context(*make_models(variant), onnx_dir=work.name)
        save_variant(ctx)
        todo = [
            (c, b)
            for c in args.cases
            for b in (args.batch if c == "512" else [1])
            if not (c == "slide" and variant != "b0")
        ]
        for case, batch in todo:
            label = case_label(variant, case, batch, args.size)
            if args.same_process:
                measured, infos = measure_same_process(args, kinds, ctx, variant, case, batch)
            else:
                measured, infos = measure_isolated(args, kinds, ctx, variant, case, batch)
            exports = [f"{'x'.join(map(str, s))} {v:.1f} s" for s, v in ctx.export_s.items()]
            print(
                f"\n{label}: compile / first call: "
                + ", ".join(f"{k} {v['first_s']:.1f} s" for k, v in measured.items())
                + (f"; torch.onnx.export {', '.join(exports)}" if exports else "")
                + "".join(f"\n  {i}" for i in infos),
                flush=True,
            )
            base = {k: med(measured[k]["times"]) for k, _ in BASELINES if k in measured}
            for k in kinds:
                r = measured[k]
                m = med(r["times"])
                ratios = {b: m / t for b, t in base.items()}
                rows.append(dict(label=label, kind=k, median=m, ratios=ratios, **r))
                rounds = ", ".join(fmt_ms(t) for t in r["round_medians"])
                print(
                    f"  {RUNTIMES[k]:29s} median {fmt_ms(m)}"
                    + (f" (rounds {rounds})" if len(r["round_medians"]) > 1 else "")
                    + "  "
                    + "  ".join(f"x{q:.2f} {b}" for b, q in ratios.items())
                    + f"  max|d| vs jax f32 {r['max_abs']:.1e}, argmax {100 * r['argmax_agreement']:.2f}%"
                    + (f"  peak RSS {fmt_rss(r['rss'])}" if r["rss"] else ""),
                    flush=True,
                )
        ctx.close()
        work.cleanup()
        del ctx
        gc.collect()

    present = [(k, name) for k, name in BASELINES if any(k in r["ratios"] for r in rows)]
    print(
        "\n| case | runtime | median | "
        + " | ".join(name for _, name in present)
        + " | max-abs logit diff vs jax f32 | argmax agreement | compile / 1st call | peak RSS (+ over idle) |"
    )
    print("|---" * (len(present) + 7) + "|")
    for r in rows:
        cells = [fmt_ratio(r["ratios"].get(k)) for k, _ in present]
        diff = "(reference)" if r["kind"] == REFERENCE else f"{r['max_abs']:.1e}"
        agree = "-" if r["kind"] == REFERENCE else f"{100 * r['argmax_agreement']:.2f}%"
        print(
            f"| {r['label']} | {RUNTIMES[r['kind']]} | {fmt_ms(r['median'])} | "
            + "".join(c + " | " for c in cells)
            + f"{diff} | {agree} | {r['first_s']:.1f} s | {fmt_rss(r['rss'])} |"
        )


if __name__ == "__main__":
    main()
