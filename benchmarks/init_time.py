"""Where the time of ``lj.init`` with NF4 goes on the bench model: first call (fresh process) vs warm.

The issue-14 figure "``init`` with NF4 on the bench model ≤ 1 s". Builds the bench model's params
(4 blocks, q/k/v/o 1024², MLP 1024→4096→1024: 24 kernels, 50.3 M weights), then times
``lj.init(LoRA(rank=8, alpha=16, quant=NF4(64, double_quant=True)), params, key)`` on its first call
in this process and again warm, and splits the first call's XLA compile time by program
(``jax.monitoring`` backend-compile events: a public API, no private hooks)::

    python benchmarks/init_time.py [--method lora|dora] [--quant nf4|none] [--scan] [--json out.json]

Run it in a fresh process: the first call is what a user pays once per process.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
from jax import monitoring

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import lowrank_jax as lj  # noqa: E402
import train_step as ts  # noqa: E402  (the bench model)

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--method", choices=("lora", "dora"), default="lora")
    p.add_argument("--quant", choices=("nf4", "none"), default="nf4",
                   help="nf4: the method's quant=NF4(64, double_quant=True) shorthand (default); none: float kernels")
    p.add_argument("--scan", action="store_true",
                   help="the bench model under nn.scan (stacked (4, in, out) kernels, layouts from lj.discover)")
    p.add_argument("--warm-reps", type=int, default=3)
    p.add_argument("--json")
    args = p.parse_args(argv)
    if args.warm_reps < 1:
        p.error(f"--warm-reps must be >= 1, got {args.warm_reps}")

    x = jnp.ones((8, 256, 1024), jnp.float32)
    model = ts.Net(scan=args.scan)
    variables = jax.block_until_ready(jax.jit(model.init)(jax.random.key(0), x))
    params = variables["params"]
    layouts = lj.discover(model, variables, x) if args.scan else None
    cls = lj.LoRA if args.method == "lora" else lj.DoRA
    quant = lj.NF4(block_size=64, double_quant=True) if args.quant == "nf4" else None
    method = cls(rank=8, alpha=16.0, targets=ts.TARGETS, quant=quant)

    events: list[tuple[str, float]] = []
    recording = [True]

    def listener(name, secs, **kw):
        if recording[0] and name == COMPILE_EVENT:
            events.append((kw.get("fun_name", "?"), secs))

    monitoring.register_event_duration_secs_listener(listener)
    t0 = time.perf_counter()
    jax.block_until_ready(lj.init(method, params, jax.random.key(1), layouts=layouts))
    first = time.perf_counter() - t0
    recording[0] = False
    warm = []
    for _ in range(args.warm_reps):
        t0 = time.perf_counter()
        jax.block_until_ready(lj.init(method, params, jax.random.key(1), layouts=layouts))
        warm.append(time.perf_counter() - t0)
    by_program: dict[str, list[float]] = collections.defaultdict(list)
    for name, secs in events:
        by_program[name].append(secs)
    compile_total = sum(s for _, s in events)
    what = "quant=NF4(64, dq)" if quant is not None else "float kernels"
    print(f"lj.init({cls.__name__}(r=8), {what}) on the bench model{' (nn.scan)' if args.scan else ''} (24 kernels, "
          f"{sum(v.size for v in jax.tree_util.tree_leaves(params)) / 1e6:.1f} M params)")
    print(f"first call {first:.3f} s, of which XLA compiles {compile_total:.3f} s ({len(events)} programs); "
          f"warm median {sorted(warm)[len(warm) // 2]:.3f} s")
    print("| program | compiles | seconds |\n|---|---:|---:|")
    for name, secs in sorted(by_program.items(), key=lambda kv: -sum(kv[1])):
        print(f"| {name} | {len(secs)} | {sum(secs):.3f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"method": args.method, "quant": args.quant, "scan": args.scan, "first_s": first, "warm_s": warm, "compile_s": compile_total,
                       "compiles": {k: v for k, v in by_program.items()}}, f, indent=1)


if __name__ == "__main__":
    main()
