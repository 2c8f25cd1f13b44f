"""Diagnostic: count the large GEMMs in each compiled train step (optimized HLO).

Counts every dot, the dots that produce a full kernel shape (a weight gradient / merged weight) and
the token-sized ones (output [N,1024] or [N,4096]: base GEMMs, activation grads, adapter branch outputs). Tokens do not change the program
structure, so a small ``--tokens`` is enough (fast compile). For the scan structure the dots of the
loop bodies are counted once (each body runs 4 times).

    python benchmarks/diag_hlo.py --tokens 64 --structure scan --variants lora8,dora8,qlora8
"""

from __future__ import annotations

import argparse
import os
import re
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_step as tsb  # noqa: E402

BIG = re.compile(r"f32\[(1024,1024|1024,4096|4096,1024)\]")


def count(text: str, tokens: int) -> tuple[int, int, int]:
    """(all dots, dots producing a full kernel shape, dots producing a token-sized [N,1024]/[N,4096] tensor)."""
    outs = [m.group(1) for m in re.finditer(r"= (\S+) dot\(", text)]
    big = [o for o in outs if BIG.search(o)]
    tok = re.compile(rf"f32\[({tokens}|8,{tokens // 8}),(1024|4096)\]")
    return len(outs), len(big), sum(1 for o in outs if tok.search(o))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--structure", default="scan", choices=("unrolled", "scan"))
    ap.add_argument("--variants", default="full,frozen,lora8,dora8,vera256,qlora8")
    ap.add_argument("--remat-policy", default="lin_out", choices=tuple(tsb.POLICIES))
    args = ap.parse_args()
    model = tsb.Net(scan=args.structure == "scan", policy=args.remat_policy)
    x = jax.random.normal(jax.random.key(0), (8, args.tokens // 8, 1024), jnp.float32)
    variables = model.init(jax.random.key(42), x)
    layouts = tsb.lj.discover(model, variables, x)
    print(f"structure={args.structure} policy={args.remat_policy}\n| variant | dots | dots producing a full kernel shape | token-sized dots (x@W0, dx, branch out) |\n|---|---:|---:|---:|")
    for v in args.variants.split(","):
        case = tsb.build_case(args.structure, v, model, variables["params"], layouts, x, 1e-4)
        n, big, tok = count(case.compiled.as_text(), args.tokens)
        print(f"| {v} | {n} | {big} | {tok} |", flush=True)


if __name__ == "__main__":
    main()
