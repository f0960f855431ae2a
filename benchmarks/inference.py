"""Inference benchmark: jitted Flax vs transformers eager and torch.compile, same weights, same
inputs, A/B interleaved in one process; compile times, medians, ratios, logits difference, and peak
RSS from a fresh subprocess per (implementation, case).

Cases: b0/b2 at 512x512 batch 1 and 8; b0 on a 1024x2048 image by sliding window (crop 1024,
stride 768: 3 windows, each run at batch 1; window logits averaged at logit resolution).

    .venv/bin/python benchmarks/inference.py                      # everything (long)
    .venv/bin/python benchmarks/inference.py --variants b0 --quick --no-rss
    .venv/bin/python benchmarks/inference.py --cases 512 --batch 1 --no-compile
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import fmt_ms, fmt_ratio, fmt_rss, interleaved, make_models, med, peak_rss_mb, reset_peak_rss, run_isolated  # noqa: E402

CROP, STRIDE = 1024, 768


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


def flax_runner(model, variables, x, slide: bool):
    """-> (run() returning numpy logits NCHW, compile seconds)."""
    import jax
    import jax.numpy as jnp

    apply = jax.jit(model.apply)
    if not slide:
        xj = jnp.asarray(x)
        t = time.perf_counter()
        compiled = apply.lower(variables, xj).compile()
        compile_s = time.perf_counter() - t
        return (lambda: np.asarray(compiled(variables, xj)).transpose(0, 3, 1, 2)), compile_s
    b, h, w, _ = x.shape
    crop = jnp.asarray(x[:, :CROP, :CROP])
    t = time.perf_counter()
    compiled = apply.lower(variables, crop).compile()
    compile_s = time.perf_counter() - t
    wins = windows(h, w)
    xj = jnp.asarray(x)

    def run():
        acc = np.zeros((b, h // 4, w // 4, model.config.num_labels), np.float32)
        cnt = np.zeros((1, h // 4, w // 4, 1), np.float32)
        for top, left in wins:
            logits = np.asarray(compiled(variables, jax.lax.dynamic_slice(xj, (0, top, left, 0), (b, CROP, CROP, 3))))
            acc[:, top // 4 : (top + CROP) // 4, left // 4 : (left + CROP) // 4] += logits
            cnt[:, top // 4 : (top + CROP) // 4, left // 4 : (left + CROP) // 4] += 1
        return (acc / cnt).transpose(0, 3, 1, 2)

    return run, compile_s


def torch_runner(hf, x, slide: bool, compile_: bool):
    import torch

    fwd = torch.compile(hf) if compile_ else hf
    xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
    b, _, h, w = xt.shape

    @torch.inference_mode()
    def run():
        if not slide:
            return fwd(pixel_values=xt).logits.numpy()
        acc = torch.zeros((b, hf.config.num_labels, h // 4, w // 4))
        cnt = torch.zeros((1, 1, h // 4, w // 4))
        for top, left in windows(h, w):
            logits = fwd(pixel_values=xt[:, :, top : top + CROP, left : left + CROP]).logits
            acc[:, :, top // 4 : (top + CROP) // 4, left // 4 : (left + CROP) // 4] += logits
            cnt[:, :, top // 4 : (top + CROP) // 4, left // 4 : (left + CROP) // 4] += 1
        return (acc / cnt).numpy()

    t = time.perf_counter()
    run()
    return run, time.perf_counter() - t


def case_input(case: str, batch: int):
    rng = np.random.default_rng(0)
    h, w = (512, 512) if case == "512" else (1024, 2048)
    return rng.normal(size=(batch, h, w, 3)).astype(np.float32), case == "slide"


def single(args):
    import torch

    torch.set_num_threads(os.cpu_count())
    impl, variant, case, batch = args.single.split(",")
    x, slide = case_input(case, int(batch))
    hf, model, variables = make_models(variant)
    if impl == "flax":
        del hf
    gc.collect()
    base = peak_rss_mb()
    reset_peak_rss()
    base = min(base, peak_rss_mb())
    if impl == "flax":
        run, _ = flax_runner(model, variables, x, slide)
    else:
        run, _ = torch_runner(hf, x, slide, impl == "torch.compile")
    for _ in range(2):
        run()
    print("RESULT " + json.dumps(dict(peak_rss_mb=peak_rss_mb(), base_mb=base, peak_delta_mb=peak_rss_mb() - base)))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=["b0", "b2"])
    p.add_argument("--cases", nargs="+", default=["512", "slide"], choices=["512", "slide"])
    p.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    p.add_argument("--quick", action="store_true", help="fewer repeats")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    p.add_argument("--no-rss", action="store_true", help="skip the peak-RSS subprocesses")
    p.add_argument("--single", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.single:
        return single(args)

    import torch

    torch.set_num_threads(os.cpu_count())
    rows = []
    for variant in args.variants:
        hf, model, variables = make_models(variant)
        todo = [
            (c, b)
            for c in args.cases
            for b in (args.batch if c == "512" else [1])
            if not (c == "slide" and variant != "b0")
        ]
        for case, batch in todo:
            x, slide = case_input(case, batch)
            runs, compile_s = {}, {}
            runs["flax (jit)"], compile_s["flax (jit)"] = flax_runner(model, variables, x, slide)
            runs["torch eager"], compile_s["torch eager"] = torch_runner(hf, x, slide, False)
            if not args.no_compile:
                torch._dynamo.reset()
                runs["torch.compile"], compile_s["torch.compile"] = torch_runner(hf, x, slide, True)
            diff = float(np.abs(runs["flax (jit)"]() - runs["torch eager"]()).max())
            per = max(1, int(round(3 / max(batch, 1)))) if args.quick else 5
            times = interleaved(runs, per if not slide else (2 if args.quick else 3))
            label = f"{variant} {'512x512' if case == '512' else '1024x2048 slide'} batch {batch}"
            print(
                f"\n{label}: max |logits diff| flax vs torch {diff:.1e}; compile / first call: "
                + ", ".join(f"{k} {v:.1f} s" for k, v in compile_s.items()),
                flush=True,
            )
            eager = med(times["torch eager"])
            for k, ts in times.items():
                rss = None
                if not args.no_rss:
                    impl = "flax" if k.startswith("flax") else k
                    rss = run_isolated(__file__, ["--single", f"{impl},{variant},{case},{batch}"])
                vc = med(ts) / med(times["torch.compile"]) if "torch.compile" in times else None
                rows.append(
                    dict(
                        label=label,
                        impl=k,
                        median=med(ts),
                        vs_eager=med(ts) / eager,
                        vs_compile=vc,
                        compile_s=compile_s[k],
                        rss=rss,
                        diff=diff,
                    )
                )
                print(
                    f"  {k:14s} median {fmt_ms(med(ts))}  x{med(ts) / eager:.2f} eager"
                    + (f"  x{vc:.2f} torch.compile" if vc else "")
                    + (
                        f"  peak RSS {rss['peak_rss_mb']:.0f} MB (+{rss['peak_delta_mb']:.0f} over idle)" if rss else ""
                    ),
                    flush=True,
                )
        del hf, model, variables
        gc.collect()

    print(
        "\n| case | implementation | median | vs eager | vs torch.compile | compile / 1st call "
        "| peak RSS (+ over idle) |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        vc, rss = fmt_ratio(r["vs_compile"]), fmt_rss(r["rss"])
        print(
            f"| {r['label']} | {r['impl']} | {fmt_ms(r['median'])} | {r['vs_eager']:.2f}x | {vc} | "
            f"{r['compile_s']:.1f} s | {rss} |"
        )


if __name__ == "__main__":
    main()
