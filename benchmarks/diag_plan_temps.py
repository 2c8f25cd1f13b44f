"""Diagnostic: what the temporaries of the Llama train step are (XLA:CPU buffer assignment at the peak).

Compiles the train step of :mod:`benchmarks.plan_vs_xla` (abstract parameters, nothing allocated) for the
1.1B config's widths with ``--layers`` decoder layers (default 2 for speed; the composition per layer is the
same at 22) in several variants, has XLA dump the optimized HLO, buffer assignment and live ranges, and
prints for each variant ``memory_analysis`` and the buffers alive at the peak of the heap simulation,
grouped by (jax op name with the layer index removed, shape): what the temporaries *are*.

Variants (``--variants``, comma list; default all):

* ``lora`` / ``full`` / ``qlora``: float32, no remat, donation -- the issue's setting;
* ``lora_softmax_jvp``: the same with ``jax_softmax_custom_jvp=True`` (jax's softmax then saves only its
  output; the default differentiates ``exp(x-max)/sum`` and keeps ``exp``, ``1/sum`` and the output);
* ``lora_merge``: ``make_train_step(factored=False)`` (merged weights inside the step);
* ``lora_nodonate``, ``full_nodonate``: no buffer donation;
* ``lora_remat``: each decoder layer under ``nn.remat`` (nothing saveable);
* ``lora_bf16``, ``qlora_bf16``, ``full_bf16``, ``lora_bf16_remat``: bfloat16 weights and compute;
* ``lora_bf16_frozen_dot`` / ``lora_frozen_dot``: with the proposed execution-path fix, prototyped here by
  swapping the model's ``nn.Dense`` for one whose product is a ``custom_vjp`` that re-reads the weight in
  the backward pass behind a fake data dependency on the cotangent (``frozen_dot``): no float32 convert
  (bf16) and, under FSDP, no all-gathered weight survives from the forward to the backward pass.

Run it under ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` to see the FSDP programs (the
train step of ``plan_vs_xla.py`` then shards everything over the 8 host devices).

    python benchmarks/diag_plan_temps.py                     # all variants, 2 layers
    python benchmarks/diag_plan_temps.py --layers 4 --variants lora,lora_bf16,lora_bf16_frozen_dot
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import glob
import os
import re
import sys
import tempfile
from typing import Any, Iterator

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import plan_vs_xla as pvx  # noqa: E402

MiB = float(2 ** 20)

VARIANTS: dict[str, dict[str, Any]] = {
    "full": dict(method="full"),
    "lora": dict(method="lora"),
    "qlora": dict(method="qlora"),
    "lora_softmax_jvp": dict(method="lora", softmax_jvp=True),
    "full_softmax_jvp": dict(method="full", softmax_jvp=True),
    "lora_merge": dict(method="lora", factored=False),
    "lora_nodonate": dict(method="lora", donate=False),
    "full_nodonate": dict(method="full", donate=False),
    "lora_remat": dict(method="lora", remat="full"),
    "lora_bf16": dict(method="lora", dtype="bfloat16"),
    "qlora_bf16": dict(method="qlora", dtype="bfloat16"),
    "full_bf16": dict(method="full", dtype="bfloat16"),
    "lora_bf16_remat": dict(method="lora", dtype="bfloat16", remat="full"),
    "lora_bf16_frozen_dot": dict(method="lora", dtype="bfloat16", frozen_dot=True),
    "lora_frozen_dot": dict(method="lora", frozen_dot=True),
}


# ------------------------------------------------------------------------------- the prototype fix

def _dependent(w: Any, g: Any) -> Any:
    """``w + 0·g[0,…,0]`` (NaN/inf in ``g`` read as 0): a copy of ``w`` XLA cannot CSE with another one."""
    import jax.numpy as jnp

    t = g[(0,) * g.ndim].astype(jnp.float32)
    return w + (jnp.float32(0.0) * jnp.where(jnp.isfinite(t), t, 0.0)).astype(w.dtype)


def _make_frozen_dot():
    import jax

    @jax.custom_vjp
    def frozen_dot(x, w):
        """``x @ w`` over x's last axis for a frozen ``w``: no weight gradient. Each use reads a copy of ``w``
        that depends on that use's input (``x`` forward, the cotangent ``g`` backward), so XLA can neither
        CSE the two uses (and keep a float32 convert of a 16-bit ``w``, or an FSDP all-gather, alive from
        the forward to the backward pass) nor hoist every layer's convert to the start of the program."""
        return jax.lax.dot_general(x, _dependent(w, x), (((x.ndim - 1,), (0,)), ((), ())))

    def fwd(x, w):
        return frozen_dot(x, w), w            # residual: the argument itself (no copy)

    def bwd(w, g):
        wd = _dependent(w, g)
        dx = jax.lax.dot_general(g, wd, (((g.ndim - 1,), (1,)), ((), ())))
        return dx, None

    frozen_dot.defvjp(fwd, bwd)
    return frozen_dot


@contextlib.contextmanager
def frozen_dot_dense() -> Iterator[None]:
    """Swap the Llama reference model's ``nn.Dense`` for one computing its product with ``frozen_dot``."""
    import flax.linen as nn
    from flax.linen.dtypes import promote_dtype

    from lowrank_jax.models import llama

    frozen_dot = _make_frozen_dot()

    class FrozenDotDense(nn.Dense):
        @nn.compact
        def __call__(self, inputs):
            kernel = self.param("kernel", self.kernel_init, (inputs.shape[-1], self.features), self.param_dtype)
            inputs, kernel = promote_dtype(inputs, kernel, dtype=self.dtype)
            return frozen_dot(inputs, kernel)

    original = llama._dense

    def patched(cfg, features, name):
        return FrozenDotDense(features, use_bias=False, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                              kernel_init=nn.initializers.normal(cfg.initializer_range), name=name)

    llama._dense = patched
    try:
        yield
    finally:
        llama._dense = original


@contextlib.contextmanager
def softmax_custom_jvp(on: bool) -> Iterator[None]:
    import jax

    old = jax.config.jax_softmax_custom_jvp
    jax.config.update("jax_softmax_custom_jvp", on)
    try:
        yield
    finally:
        jax.config.update("jax_softmax_custom_jvp", old)


# ------------------------------------------------------------------------------- reading the dump

def peak_buffers(dump_dir: str) -> tuple[int, list[tuple[str, str, int]]]:
    """``(peak_bytes, [(op_name, shape, bytes), ...])`` of the non-parameter values live at the peak."""
    lr_path = glob.glob(os.path.join(dump_dir, "*jit_step*live-range.txt"))[0]
    hlo_path = glob.glob(os.path.join(dump_dir, "*jit_step*cpu_after_optimizations.txt"))[0]
    lr = open(lr_path).read()
    sec = lr.split("(peak):")[1].split("Stack trace")[0]
    peak = re.findall(r"^\s+(\S+)\{[^}]*\}: (\d+) bytes", sec, re.M)
    params: set[str] = set()
    meta: dict[str, tuple[str, str]] = {}
    for line in open(hlo_path):
        m = re.match(r"\s+(?:ROOT )?%(\S+) = (\w+\[[^\]]*\])", line)
        if not m:
            continue
        op = re.search(r'op_name="([^"]*)"', line)
        meta[m.group(1)] = (m.group(2), op.group(1) if op else "")
        if " parameter(" in line:
            params.add(m.group(1))
    out = []
    for name, size in peak:
        if name in params:
            continue
        shape, op = meta.get(name, ("?", ""))
        if not op and "copy(" in name:
            op = "copy"
        out.append((op, shape, int(size)))
    stack = re.search(r"Stack trace breakdown for peak usage: ([\d ]+) bytes", lr)
    return int(stack.group(1).replace(" ", "")) if stack else 0, out


def group(buffers: list[tuple[str, str, int]], instr_names: bool = False) -> list[tuple[str, str, int, int]]:
    g: dict[tuple[str, str], list[int]] = collections.defaultdict(lambda: [0, 0])
    for op, shape, size in buffers:
        op = re.sub(r"layers_\d+", "layers_*", op)
        op = re.sub(r"^jit\(step\)/", "", op) or "(no op name: XLA-inserted, e.g. convert / copy)"
        g[(op, shape)][0] += 1
        g[(op, shape)][1] += size
    return sorted(((op, sh, n, b) for (op, sh), (n, b) in g.items()), key=lambda r: -r[3])


def run_variant(name: str, layers: int, top: int, keep: str | None) -> dict[str, Any]:
    opts = dict(VARIANTS[name])
    jvp = opts.pop("softmax_jvp", False)
    fdot = opts.pop("frozen_dot", False)
    dump = keep and os.path.join(keep, name) or tempfile.mkdtemp(prefix=f"diag_{name}_")
    with softmax_custom_jvp(jvp), (frozen_dot_dense() if fdot else contextlib.nullcontext()):
        r = pvx.compile_case("1b", layers=layers, dump_dir=dump, **opts)
    peak, bufs = peak_buffers(dump)
    rows = group(bufs)
    print(f"\n## {name}: args {r['argument_bytes'] / MiB:.1f} MiB, temps {r['temp_bytes'] / MiB:.1f} MiB, "
          f"outputs not aliased {max(0, r['output_bytes'] - r['alias_bytes']) / MiB:.1f} MiB  "
          f"({layers} layers of 1b, {r['devices']} device(s))")
    print(f"non-parameter values live at the heap peak ({sum(b for *_, b in bufs) / MiB:.1f} MiB; values that "
          f"share a slot with a dead parameter buffer are counted here but not in temps):")
    for op, shape, n, b in rows[:top]:
        print(f"  {b / MiB:8.1f} MiB  {n:3d} x {shape:24s} {op}")
    r["peak_groups"] = [dict(op=op, shape=sh, count=n, bytes=b) for op, sh, n, b in rows[:top]]
    return r


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--top", type=int, default=14, help="groups to print per variant")
    ap.add_argument("--keep", default=None, help="keep the XLA dumps under this folder")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in names if v not in VARIANTS]
    if bad:
        ap.error(f"unknown --variants {bad}; choose from {', '.join(VARIANTS)}")
    results = {}
    for v in names:
        results[v] = run_variant(v, args.layers, args.top, args.keep)
    print("\n| variant | args MiB | temps MiB | outputs not aliased MiB | total MiB | temps − lora temps |")
    print("|---|---:|---:|---:|---:|---:|")
    base = results.get("lora", {}).get("temp_bytes")
    for v, r in results.items():
        d = f"{(r['temp_bytes'] - base) / MiB:+.1f}" if base is not None else "–"
        out = max(0, r["output_bytes"] - r["alias_bytes"])
        print(f"| {v} | {r['argument_bytes'] / MiB:.1f} | {r['temp_bytes'] / MiB:.1f} | {out / MiB:.1f} | "
              f"{pvx.xla_total(r) / MiB:.1f} | {d} |")
    if args.json:
        import json
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
