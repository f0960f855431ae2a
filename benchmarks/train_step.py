"""Training-step benchmark: jitted Flax vs transformers eager (and torch.compile), same weights,
same batch, A/B interleaved in one process; peak RSS from a fresh subprocess per variant.

The step: forward in train mode (dropout 0.1 on the classifier input, drop path 0.1), logits
(B, 150, 128, 128) upsampled bilinearly to the 512x512 labels, cross-entropy with ignore 255, mean
over valid pixels, backward, AdamW. torch: `model(pixel_values, labels=...).loss` (HF's own loss).

    .venv/bin/python benchmarks/train_step.py                       # b0, batch 2 and 8, everything
    .venv/bin/python benchmarks/train_step.py --batch 2 --quick     # fewer repeats
    .venv/bin/python benchmarks/train_step.py --no-compile --no-rss # skip torch.compile / subprocesses
    .venv/bin/python benchmarks/train_step.py --jax banded:rbg reference:threefry

Flax variants are LOSS:RNG, LOSS one of reference (jax.image.resize + log_softmax, plain autodiff),
fused (kernels.upsampled_cross_entropy), banded (kernels.upsampled_cross_entropy_banded); RNG one of
threefry, rbg, unsafe_rbg, philox4x32 (the PRNG implementation of the dropout key). Append ':remat' for
rematerialised encoder blocks (config remat_blocks: less memory, one more encoder forward) and/or ':scan'
for scanned blocks (config scan_blocks). The Flax step is compiled with the package's training-step
XLA options (`segformer_jax.xla_options.train_compiler_options`), as train.py does; 'compile' is trace +
lowering + XLA compilation, cold (no persistent cache).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import fmt_ms, fmt_ratio, fmt_rss, interleaved, make_models, med, peak_rss_mb, reset_peak_rss, run_isolated  # noqa: E402

LR, WD = 6e-5, 0.01


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def make_batch(batch: int, size: int, num_labels: int, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    x = rng.normal(size=(batch, size, size, 3)).astype(np.float32)
    y = rng.integers(0, num_labels, size=(batch, size, size)).astype(np.int32)
    y[:, : size // 8] = 255  # some ignored pixels
    return x, y


def jax_loss(name: str):
    from segformer_jax.models import kernels

    return {
        "reference": kernels.cross_entropy_reference,
        "fused": kernels.upsampled_cross_entropy,
        "banded": kernels.upsampled_cross_entropy_banded,
    }[name]


def make_jax_step(model, variables, spec: str):
    """-> (step() running one training step and blocking, compile seconds, memory_analysis dict)."""
    import jax
    import jax.numpy as jnp
    import optax

    from segformer_jax import SegformerForSemanticSegmentation
    from segformer_jax.xla_options import train_compiler_options

    parts = spec.split(":")
    loss_name, rng_impl = parts[0], parts[1] if len(parts) > 1 else "threefry"
    model = SegformerForSemanticSegmentation(
        model.config.replace(remat_blocks="remat" in parts[2:], scan_blocks="scan" in parts[2:])
    )
    loss_fn_ = jax_loss(loss_name)
    tx = optax.adamw(LR, weight_decay=WD)

    def forward(params, batch_stats, x, key):
        return model.apply(
            {"params": params, "batch_stats": batch_stats},
            x,
            train=True,
            rngs={"dropout": key},
            mutable=["batch_stats"],
        )

    def step(state, x, y, base_key):
        params, batch_stats, opt_state, i = state
        key = jax.random.fold_in(base_key, i)

        def loss_fn(p):
            logits, mut = forward(p, batch_stats, x, key)
            return loss_fn_(logits, y), mut["batch_stats"]

        (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return (params, new_stats, opt_state, i + 1), loss

    jstep = jax.jit(step, donate_argnums=0)
    params = jax.tree.map(jnp.copy, variables["params"])  # own copies: the step donates its state
    state = [(params, jax.tree.map(jnp.copy, variables["batch_stats"]), tx.init(params), jnp.zeros((), jnp.int32))]
    base_key = jax.random.key(0, impl={"threefry": "threefry2x32"}.get(rng_impl, rng_impl))

    def bind(x, y):
        x, y = jnp.asarray(x), jnp.asarray(y)
        t = time.perf_counter()
        compiled = jstep.lower(state[0], x, y, base_key).compile(compiler_options=train_compiler_options())
        compile_s = time.perf_counter() - t
        m = compiled.memory_analysis()
        mem = dict(
            temp_mb=m.temp_size_in_bytes / 2**20,
            argument_mb=m.argument_size_in_bytes / 2**20,
            output_mb=m.output_size_in_bytes / 2**20,
        )

        def run():
            state[0], loss = compiled(state[0], x, y, base_key)
            return float(loss)

        return run, compile_s, mem

    return bind


def make_torch_step(hf, compile_: bool):
    import torch

    model = hf.train()
    fwd = torch.compile(model) if compile_ else model
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WD)

    def bind(x, y):
        xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
        yt = torch.from_numpy(y).long()

        def run():
            loss = fwd(pixel_values=xt, labels=yt).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return loss.item()

        t = time.perf_counter()
        run()  # first call compiles (torch.compile) / warms up
        return run, time.perf_counter() - t, None

    return bind


def single(args) -> None:
    """Subprocess mode: one variant, report peak RSS."""
    import torch

    torch.set_num_threads(os.cpu_count())
    x, y = make_batch(args.batch[0], args.size, 150)
    hf, model, variables = make_models(args.variants[0])
    v = args.single
    if v.startswith("torch"):
        del model, variables
        bind = make_torch_step(hf, v == "torch.compile")
    else:
        del hf
        bind = make_jax_step(model, variables, v)
    gc.collect()
    base = current_rss_mb()
    reset_peak_rss()
    run, compile_s, mem = bind(x, y)
    for _ in range(args.steps):
        run()
    print(
        "RESULT "
        + json.dumps(
            dict(
                variant=v,
                peak_rss_mb=peak_rss_mb(),
                base_rss_mb=base,
                peak_delta_mb=peak_rss_mb() - base,
                compile_s=compile_s,
                xla=mem,
            )
        )
    )


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=["b0"])
    p.add_argument("--batch", nargs="+", type=int, default=[2, 8])
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--jax", nargs="+", default=["fused:rbg", "banded:rbg", "reference:threefry"])
    p.add_argument("--quick", action="store_true", help="3 timed steps instead of 7")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    p.add_argument("--no-rss", action="store_true", help="skip the peak-RSS subprocesses")
    p.add_argument("--single", help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, default=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.single:
        return single(args)

    import torch

    torch.set_num_threads(os.cpu_count())
    repeats = 3 if args.quick else 7
    rows = []
    for variant in args.variants:
        hf, model, variables = make_models(variant)
        for batch in args.batch:
            x, y = make_batch(batch, args.size, 150)
            runs, compile_s, mems = {}, {}, {}
            torch_names = ["torch eager"] + ([] if args.no_compile else ["torch.compile"])
            for name in torch_names:
                import copy

                runs[name], compile_s[name], _ = make_torch_step(copy.deepcopy(hf), name == "torch.compile")(x, y)
            for spec in args.jax:
                runs[f"flax {spec}"], compile_s[f"flax {spec}"], mems[f"flax {spec}"] = make_jax_step(
                    model, variables, spec
                )(x, y)
                runs[f"flax {spec}"]()  # warm-up
            print(
                f"\n{variant} batch {batch} {args.size}x{args.size}: compile/first step: "
                + ", ".join(f"{k} {v:.1f} s" for k, v in compile_s.items()),
                flush=True,
            )
            times = interleaved(runs, repeats)
            eager = med(times["torch eager"])
            for k, ts in times.items():
                rss = {}
                if not args.no_rss:
                    single_args = [
                        "--single",
                        k.replace("flax ", ""),
                        "--variants",
                        variant,
                        "--batch",
                        str(batch),
                        "--size",
                        str(args.size),
                    ]
                    rss = run_isolated(__file__, single_args)
                rows.append(
                    dict(
                        variant=variant,
                        batch=batch,
                        impl=k,
                        median=med(ts),
                        vs_eager=med(ts) / eager,
                        vs_compile=(med(ts) / med(times["torch.compile"]) if "torch.compile" in times else None),
                        compile_s=compile_s[k],
                        rss=rss,
                        xla=mems.get(k),
                    )
                )
                r = rows[-1]
                print(
                    f"  {k:28s} median {fmt_ms(r['median'])}  x{r['vs_eager']:.2f} eager"
                    + (f"  x{r['vs_compile']:.2f} compile" if r["vs_compile"] else "")
                    + (f"  peak RSS {rss['peak_rss_mb']:.0f} MB (+{rss['peak_delta_mb']:.0f} over idle)" if rss else "")
                    + (f"  XLA temp {r['xla']['temp_mb']:.0f} MB" if r["xla"] else ""),
                    flush=True,
                )

    print(
        "\n| model | batch | implementation | step (median) | vs eager | vs torch.compile | compile / 1st step "
        "| peak RSS (+ over idle) | XLA temp |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        vc, rss = fmt_ratio(r["vs_compile"]), fmt_rss(r["rss"])
        xla = f"{r['xla']['temp_mb']:.0f} MB" if r["xla"] else "-"
        print(
            f"| {r['variant']} | {r['batch']} | {r['impl']} | {fmt_ms(r['median'])} | {r['vs_eager']:.2f}x | {vc} | "
            f"{r['compile_s']:.1f} s | {rss} | {xla} |"
        )


if __name__ == "__main__":
    main()
