"""NF4 quantize / dequantize speed on one kernel: XLA compile seconds and warm milliseconds.

The quantizer is what ``lj.quantize`` and ``init(..., quant=NF4(...))`` run once per kernel; dequantization is
what ``lj.merge`` and the QLoRA step run. Times ``nf4.quantize`` of a ``(rows, cols)`` fp32 matrix (with and
without double quantization) and ``nf4.dequantize`` of the result::

    python benchmarks/quantize_time.py [--shape 4096,1024] [--block 64] [--reps 21] [--json out.json]

Compile: ``jax.clear_caches()`` then the first call minus a warm call (the compile of that program alone).
Warm: median of ``--reps`` calls after ``block_until_ready``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp

from lowrank_jax.quant import nf4


def timed(fn, reps):
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        out.append(time.perf_counter() - t0)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="4096,1024", help="rows,cols of the matrix (torch (out, in) layout)")
    p.add_argument("--block", type=int, default=64)
    p.add_argument("--reps", type=int, default=21)
    p.add_argument("--json")
    args = p.parse_args(argv)
    shape = tuple(int(v) for v in args.shape.split(","))
    if len(shape) != 2 or min(shape) < 1 or args.reps < 1:
        p.error(f"--shape must be two positive ints and --reps >= 1, got {args.shape!r}, {args.reps}")
    x = jax.block_until_ready(jax.random.normal(jax.random.key(0), shape, jnp.float32))
    rows = {}
    print(f"NF4 block {args.block}, matrix {shape} fp32 ({x.size / 1e6:.2f} M weights)")
    print("| op | compile s | warm ms (median) |\n|---|---:|---:|")
    for dq in (False, True):
        q = nf4.quantize(x, args.block, dq)       # warm up the process (not this program's compile)
        jax.clear_caches()
        first = timed(lambda: nf4.quantize(x, args.block, dq), 1)[0]
        warm = timed(lambda: nf4.quantize(x, args.block, dq), args.reps)
        rows[f"quantize dq={dq}"] = (first - min(warm), statistics.median(warm))
        jax.clear_caches()
        first = timed(lambda: nf4.dequantize(q), 1)[0]
        warm = timed(lambda: nf4.dequantize(q), args.reps)
        rows[f"dequantize dq={dq}"] = (first - min(warm), statistics.median(warm))
    for k, (c, w) in rows.items():
        print(f"| {k} | {c:.3f} | {w * 1e3:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"shape": shape, "block": args.block, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
