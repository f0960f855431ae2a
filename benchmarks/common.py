"""Shared helpers of the benchmark scripts: the same weights in transformers (torch) and Flax,
A/B-interleaved timing, peak RSS of a fresh subprocess."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

HF_VARIANTS = {
    "b0": dict(hidden_sizes=[32, 64, 160, 256], depths=[2, 2, 2, 2], decoder_hidden_size=256),
    "b1": dict(hidden_sizes=[64, 128, 320, 512], depths=[2, 2, 2, 2], decoder_hidden_size=256),
    "b2": dict(hidden_sizes=[64, 128, 320, 512], depths=[3, 4, 6, 3], decoder_hidden_size=768),
}


def make_models(variant: str, num_labels: int = 150, seed: int = 0):
    """A randomly initialised transformers SegformerForSemanticSegmentation and the Flax model with
    the same weights (through save_pretrained / from_pretrained)."""
    import torch
    import transformers

    import segformer_jax

    torch.manual_seed(seed)
    cfg = transformers.SegformerConfig(num_labels=num_labels, layer_norm_eps=1e-5, **HF_VARIANTS[variant])
    hf = transformers.SegformerForSemanticSegmentation(cfg).eval()
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        model, variables = segformer_jax.from_pretrained(d)
    return hf, model, variables


def peak_rss_mb() -> float:
    """Peak resident set size of this process (VmHWM; resettable with reset_peak_rss)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def reset_peak_rss() -> None:
    """Reset the peak RSS to the current RSS (Linux: `echo 5 > /proc/self/clear_refs`), so that the
    set-up (building both models, converting weights) does not count towards the measured peak."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def interleaved(fns: dict, repeats: int, min_time: float = 0.0) -> dict:
    """Run each callable `repeats` times, round-robin (A B C A B C ...), so machine load affects all
    alike. Returns name -> list of seconds. Callables must block until their result is ready."""
    times = {k: [] for k in fns}
    start = time.perf_counter()
    i = 0
    while i < repeats or (time.perf_counter() - start < min_time and i < 4 * repeats):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
        i += 1
    return times


def med(ts) -> float:
    return float(np.median(ts))


def run_isolated(script: str, args: list[str], timeout: float = 1800, env: dict | None = None) -> dict:
    """Run `script args` in a fresh Python (with `env`, default: ours); it prints one JSON line prefixed
    with 'RESULT '."""
    out = subprocess.run(
        [sys.executable, script, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env
    )
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    raise RuntimeError(f"{script} {' '.join(args)} failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")


def fmt_ms(s: float) -> str:
    return f"{s * 1e3:.0f} ms" if s < 10 else f"{s:.1f} s"


def fmt_ratio(x) -> str:
    """A table cell for an optional ratio ('-' when not measured)."""
    return f"{x:.2f}x" if x else "-"


def fmt_rss(rss) -> str:
    """A table cell for an optional peak-RSS measurement from run_isolated."""
    return f"{rss['peak_rss_mb']:.0f} MB (+{rss['peak_delta_mb']:.0f})" if rss else "-"


def logits_agreement(logits, reference) -> dict:
    """Max-abs difference and argmax agreement (fraction of pixels whose top class is the same) of
    two NCHW logit arrays of the same shape."""
    logits, reference = np.asarray(logits, np.float32), np.asarray(reference, np.float32)
    if logits.shape != reference.shape:
        raise ValueError(f"logits of shape {logits.shape} against a reference of {reference.shape}")
    return dict(
        max_abs=float(np.abs(logits - reference).max()),
        argmax_agreement=float(np.mean(logits.argmax(axis=1) == reference.argmax(axis=1))),
    )


def export_hf_onnx(hf, shape, path: str, opset: int = 17) -> float:
    """transformers' model -> ONNX file at `path` (torch.onnx.export, TorchScript exporter, static NCHW
    input `pixel_values` of `shape`, output `logits`). Returns the seconds it took."""
    import torch

    class Logits(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, pixel_values):
            return self.model(pixel_values=pixel_values).logits

    import warnings

    t = time.perf_counter()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings about shape-dependent Python branches (static here)
        torch.onnx.export(
            Logits(hf).eval(),
            (torch.zeros(shape, dtype=torch.float32),),
            path,
            opset_version=opset,
            input_names=["pixel_values"],
            output_names=["logits"],
            dynamo=False,  # the dynamo exporter needs onnxscript, which the bench extra does not list
        )
    return time.perf_counter() - t
