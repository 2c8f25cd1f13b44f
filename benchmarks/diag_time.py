"""Diagnostic: library LoRA step vs the hand-written perf_baseline form, 3-D vs 2-D input, timed side by side.

Variants (unrolled, r=8): full FT and the frozen floor (as train_step.py), the library's factored LoRA
step, and the hand-written ``x @ W0 + s*((x@A)@B)`` step (diag_memory.py) -- each with the input as
(8, tokens/8, 1024) ("3d") and as (tokens, 1024) ("2d"). Round-robin in one process, order rotated.

    python benchmarks/diag_time.py --rounds 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import diag_memory as dm  # noqa: E402
import train_step as tsb  # noqa: E402

MiB = 1024.0 ** 2


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    model = tsb.Net()
    cases = {}
    for flat in (False, True):
        tag = "2d" if flat else "3d"
        x = tsb.make_input(args.tokens, flat)
        variables = model.init(jax.random.key(42), x)
        params = variables["params"]
        layouts = tsb.lj.discover(model, variables, x)
        for v in ("full", "frozen", "lora8"):
            c = tsb.build_case("unrolled", v, model, params, layouts, x, 1e-4)
            cases[f"{v}_{tag}"] = (c.call, c.info["temp_bytes"])
        # hand-written LoRA (adapter dicts with random A, zero B)
        ad = {b: {n: {"a": jax.random.normal(jax.random.key(1), (v["kernel"].shape[0], 8)) * 0.01,
                      "b": jax.numpy.zeros((8, v["kernel"].shape[1]))} for n, v in mods.items()}
              for b, mods in params.items()}
        fn, a = dm.hw_case(dm.lora_proto, False, params, ad, x)
        comp = fn.lower(*a).compile()
        st = {"ad": a[0], "opt": a[1]}

        def call(comp=comp, st=st, W0=params, x=x):
            st["ad"], st["opt"], loss = comp(st["ad"], st["opt"], W0, x)
            return loss
        cases[f"hw_lora8_{tag}"] = (call, comp.memory_analysis().temp_size_in_bytes)
        print("built", tag, flush=True)
    names = list(cases)
    times = {n: [] for n in names}
    for r in range(args.rounds + 1):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            t0 = time.perf_counter()
            jax.block_until_ready(cases[n][0]())
            if r:
                times[n].append(time.perf_counter() - t0)
        print(f"round {r}: " + " ".join(f"{n}={times[n][-1] * 1e3:.0f}" for n in names if r), flush=True)
    print("\n| variant | temp MiB | median ms | ratio to full FT (same input shape, paired) |\n|---|---:|---:|---:|")
    for n in names:
        full = times["full_" + n[-2:]]
        ratio = statistics.median(t / f for t, f in zip(times[n], full))
        print(f"| {n} | {cases[n][1] / MiB:.1f} | {statistics.median(times[n]) * 1e3:.0f} | {ratio:.3f} |")


if __name__ == "__main__":
    main()
