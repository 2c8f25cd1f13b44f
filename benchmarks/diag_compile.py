"""Compile time of each method's train step on the bench model, and the program sizes behind it.

For LoRA, DoRA, QLoRA (and a DoRA whose scale is its magnitude alone, to size the norm's share):
lowering (tracing) and XLA compile seconds, StableHLO ops before optimization, HLO instructions, fusions
and dots after::

    python benchmarks/diag_compile.py [--scan] [--json out.json]

Each case's step is lowered and compiled once in this process (a fresh step function: its program is never
a cache hit; the library's small jitted helpers are, and the first case also pays one-time tracing warm-up).
Dots are XLA:CPU ``dot`` instructions (a oneDNN/custom-call matmul would not be counted).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import re
import sys
import time

import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import lowrank_jax as lj  # noqa: E402
import train_step as ts  # noqa: E402  (the bench model)


# an HLO instruction line: `[ROOT ]%name = <shape> <opcode>(...)`; a tuple shape is `(s1, s2, ...)`
HLO_OP = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.-]+ = (?:\([^()]*\)|\S+) ([\w-]+)\(", re.M)


@dataclasses.dataclass(frozen=True)
class ScaleIsMagnitude(lj.DoRA):
    """Diagnostic only: DoRA with ``k = m`` (no column norm), to measure what the norm costs to compile."""

    def output_scale(self, w, params, cache=None):
        return params["m"] * 1.0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json")
    p.add_argument("--scan", action="store_true",
                   help="also the nn.scan + remat(save lin_out) steps: LoRA, DoRA, DoRA(output_name='lin_out')")
    args = p.parse_args(argv)
    x = jnp.ones((8, 256, 1024), jnp.float32)
    kw = dict(rank=8, alpha=16.0, targets=ts.TARGETS)
    # (model, method): unrolled, then nn.scan + remat saving "lin_out" as in peers.py's scan cases
    unrolled, scan = ts.Net(), ts.Net(scan=True, policy="lin_out")
    named = ts.Net(scan=True, policy="lin_out_named_by_method")
    cases = {"lora8": (unrolled, lj.LoRA(**kw)), "dora8": (unrolled, lj.DoRA(**kw)),
             "qlora8": (unrolled, lj.LoRA(**kw, quant=lj.NF4(block_size=64, double_quant=True))),
             "dora8_scale_is_m (diagnostic)": (unrolled, ScaleIsMagnitude(**kw))}
    if args.scan:
        cases.update({"scan_lora8": (scan, lj.LoRA(**kw)), "scan_dora8": (scan, lj.DoRA(**kw)),
                      "scan_dora8_named": (named, lj.DoRA(**kw, output_name="lin_out"))})
    built = {}
    rows = {}
    print("| case | lower s | compile s | StableHLO ops | HLO instructions | fusions | dots |\n|---|---:|---:|---:|---:|---:|---:|")
    for name, (model, method) in cases.items():
        if id(model) not in built:
            variables = jax.jit(model.init)(jax.random.key(0), x)
            built[id(model)] = (variables["params"], lj.discover(model, variables, x))
        params, layouts = built[id(model)]
        frozen, adapter = lj.init(method, params, jax.random.key(1), layouts=layouts)
        trs = lj.train.make_train_step(model, lambda run, b: jnp.mean(jnp.square(run(b["x"]))), optax.adam(1e-4))
        opt = trs.init(adapter)
        t0 = time.perf_counter()
        lowered = trs.step.lower(adapter, opt, frozen, {"x": x}, None)
        t1 = time.perf_counter()
        compiled = lowered.compile()
        t2 = time.perf_counter()
        pre = len(re.findall(r"^\s+%\S+ = ", lowered.as_text(), re.M))
        ops = collections.Counter(HLO_OP.findall(compiled.as_text()))
        rows[name] = {"lower_s": t1 - t0, "compile_s": t2 - t1, "stablehlo_ops": pre,
                      "hlo_instructions": sum(ops.values()), "fusions": ops["fusion"], "dots": ops["dot"]}
        r = rows[name]
        print(f"| {name} | {r['lower_s']:.2f} | {r['compile_s']:.2f} | {pre} | {r['hlo_instructions']} | "
              f"{r['fusions']} | {r['dots']} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
