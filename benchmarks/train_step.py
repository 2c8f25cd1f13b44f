"""Train-step benchmark: full fine-tuning vs. LoRA / DoRA / VeRA / QLoRA adapters (lowrank_jax).

Bench model of ``shared/reference/perf_baseline.md``: 4 blocks of linear layers only (no bias, fp32),
per block q,k,v,o 1024->1024, fc1 1024->4096, fc2 4096->1024::

    x = x + o(silu(q(x)) * k(x) + v(x));  x = x + fc2(relu(fc1(x)))

N tokens (batch 8 x seq N/8), loss = mean(out**2), Adam; adapters on all 24 linears.

Two structures: ``unrolled`` (Python loop over blocks) and ``scan`` (``nn.scan`` over ``nn.remat``-ed
blocks; remat policy ``--remat-policy``; the default ``lin_out`` saves only the linear outputs,
named with ``checkpoint_name`` in this model's own code -- around the adapted ``nn.Dense`` call, so
the name covers the base product plus the adapter branch).

Every variant's step is one jitted (fwd + bwd + Adam) function, compiled once with
``jit(...).lower(...).compile()``; that compiled executable is what is timed (so the compile is
measured once and not repeated by the jit cache) and what ``memory_analysis()`` reports on.
Timing: all variants (both structures with ``--structure both``) run interleaved round-robin in ONE
process, the order rotated by one each round, 1 warm-up round + ``--rounds`` timed rounds;
ratio = median over rounds of (variant time / full-FT time of the same structure in the same round).

Examples::

    python benchmarks/train_step.py --memory-only --structure both
    python benchmarks/train_step.py --structure both --rounds 5 --json out.json
    python benchmarks/train_step.py --variants full,lora8,qlora8 --structure unrolled --rounds 3
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.ad_checkpoint import checkpoint_name

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))
import lowrank_jax as lj  # noqa: E402

MiB = 1024.0 ** 2
TARGETS = r".*(q|k|v|o|fc1|fc2)/kernel"
LINEARS = (("q", "d"), ("k", "d"), ("v", "d"), ("o", "d"), ("fc1", "f"), ("fc2", "d"))


# --------------------------------------------------------------------------------------- model

class Block(nn.Module):
    d: int = 1024
    f: int = 4096
    name_outputs: bool = False

    @nn.compact
    def __call__(self, x, _=None):
        def lin(name, n, h):
            y = nn.Dense(n, use_bias=False, name=name)(h)
            return checkpoint_name(y, "lin_out") if self.name_outputs else y

        x = x + lin("o", self.d, nn.silu(lin("q", self.d, x)) * lin("k", self.d, x) + lin("v", self.d, x))
        x = x + lin("fc2", self.d, nn.relu(lin("fc1", self.f, x)))
        return x, None


POLICIES: dict[str, Any] = {
    "lin_out": lambda: jax.checkpoint_policies.save_only_these_names("lin_out"),
    # also keep DoRA's pre-scale output (its magnitude gradient needs it): no base-matmul recompute
    "lin_out_dora": lambda: jax.checkpoint_policies.save_only_these_names("lin_out", lj.DORA_PRE_SCALE),
    # save "lin_out", but the model does not name its linear outputs: DoRA(output_name="lin_out") names
    # its own (and its backward reads the pre-scale output back from them)
    "lin_out_named_by_method": lambda: jax.checkpoint_policies.save_only_these_names("lin_out"),
    "nothing": lambda: jax.checkpoint_policies.nothing_saveable,
    "dots": lambda: jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "none": lambda: None,  # nn.scan without nn.remat
}


class Net(nn.Module):
    layers: int = 4
    d: int = 1024
    f: int = 4096
    scan: bool = False
    policy: str = "lin_out"

    @nn.compact
    def __call__(self, x):
        if self.scan:
            body = Block
            if self.policy != "none":
                body = nn.remat(Block, policy=POLICIES[self.policy](), prevent_cse=False)
            blocks = nn.scan(body, variable_axes={"params": 0}, split_rngs={"params": True},
                             length=self.layers)
            x, _ = blocks(self.d, self.f, self.policy in ("lin_out", "lin_out_dora"), name="blocks")(x, None)
        else:
            for i in range(self.layers):
                x, _ = Block(self.d, self.f, False, name=f"block_{i}")(x)
        return x


def mse(out):
    return jnp.mean(jnp.square(out))


# ------------------------------------------------------------------------------------ variants

VARIANTS: dict[str, str] = {
    "full": "full fine-tuning (grad all params, Adam on all)",
    "frozen": "frozen fwd+bwd floor (grad w.r.t. a scalar multiplier on the input)",
    "lora8_merge": "LoRA r=8, merge path (factored=False)",
    "lora8": "LoRA r=8, factored",
    "lora64": "LoRA r=64, factored",
    "lora64_merge": "LoRA r=64, merge path",
    "dora8_merge": "DoRA r=8, merge path",
    "dora8": "DoRA r=8, factored",
    "vera256": "VeRA r=256, factored",
    "vera256_merge": "VeRA r=256, merge path",
    "qlora8": "QLoRA: LoRA r=8 factored over NF4 (block 64, double quant)",
    "qlora8_nodq": "QLoRA without double quant (NF4 block 64, fp32 absmax)",
}
DEFAULT_VARIANTS = ("full,frozen,lora8_merge,lora8,lora64,dora8_merge,dora8,vera256,vera256_merge,qlora8")


def method_for(name: str):
    if name.startswith("qlora"):
        rank, _, opt = name[5:].partition("_")
        return lj.LoRA(rank=int(rank), alpha=16.0, targets=TARGETS,
                       quant=lj.NF4(block_size=64, double_quant=(opt != "nodq"))), True
    base = name.replace("_merge", "")
    factored = not name.endswith("_merge")
    if base.startswith("lora"):
        return lj.LoRA(rank=int(base[4:]), alpha=16.0, targets=TARGETS), factored
    if base.startswith("dora"):
        return lj.DoRA(rank=int(base[4:]), alpha=16.0, targets=TARGETS), factored
    if base.startswith("vera"):
        return lj.VeRA(rank=int(base[4:]), targets=TARGETS), factored
    raise ValueError(f"unknown variant {name!r}; known: {', '.join(VARIANTS)}")


@dataclass
class Case:
    structure: str
    variant: str
    call: Callable[[], Any] | None = None   # runs one step, updates its own state, returns outputs
    info: dict = field(default_factory=dict)
    times: list = field(default_factory=list)
    error: str | None = None
    compiled: Any = None                    # the compiled step (for HLO inspection)


def tree_bytes(tree) -> int:
    return int(sum(np.dtype(x.dtype).itemsize * x.size for x in jax.tree_util.tree_leaves(tree)))


def mem_info(compiled) -> dict:
    m = compiled.memory_analysis()
    return {
        "arg_bytes": int(m.argument_size_in_bytes),
        "out_bytes": int(m.output_size_in_bytes),
        "alias_bytes": int(m.alias_size_in_bytes),
        "temp_bytes": int(m.temp_size_in_bytes),
    }


def timed_compile(fn, *args):
    t0 = time.perf_counter()
    lowered = fn.lower(*args)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    return compiled, {"lower_s": t1 - t0, "compile_s": t2 - t1, "lower_compile_s": t2 - t0}


def compile_reps(make, reps: int):
    """``make()`` -> (jitted fn, args), built afresh each time (new closures: no trace/compile cache hit).

    Returns the last compiled executable and its timings, with the min/median over ``reps`` compiles."""
    runs = []
    for _ in range(max(1, reps)):
        fn, args = make()
        compiled, ct = timed_compile(fn, *args)
        runs.append(ct)
    ct = dict(runs[-1])
    ct["lower_compile_s_all"] = [r["lower_compile_s"] for r in runs]
    ct["lower_compile_s_min"] = min(ct["lower_compile_s_all"])
    ct["lower_compile_s_median"] = statistics.median(ct["lower_compile_s_all"])
    return compiled, ct


def build_case(structure: str, variant: str, model: Net, params, layouts, x, lr: float,
               reps: int = 1) -> Case:
    case = Case(structure, variant)
    tx = optax.adam(lr)
    fp32_bytes = tree_bytes(params)
    batch = {"x": x}

    if variant == "full":
        def step(p, opt, xb):
            loss, g = jax.value_and_grad(lambda q: mse(model.apply({"params": q}, xb)))(p)
            u, opt = tx.update(g, opt, p)
            return optax.apply_updates(p, u), opt, loss

        p = jax.tree_util.tree_map(jnp.copy, params)   # own (donated) copy
        opt = tx.init(p)
        compiled, ct = compile_reps(lambda: (jax.jit(lambda *a: step(*a), donate_argnums=(0, 1)), (p, opt, x)), reps)
        state = {"p": p, "opt": opt}

        def call():
            state["p"], state["opt"], loss = compiled(state["p"], state["opt"], x)
            return loss

        case.info.update(trainable=tree_bytes(params) // 4, frozen_base_bytes=0,
                         trainable_bytes=fp32_bytes)
    elif variant == "frozen":
        def step(c, p, xb):
            return jax.value_and_grad(lambda cc: mse(model.apply({"params": p}, cc * xb)))(c)

        c = jnp.float32(1.0)
        compiled, ct = compile_reps(lambda: (jax.jit(lambda *a: step(*a)), (c, params, x)), reps)

        def call():
            return compiled(c, params, x)

        case.info.update(trainable=0, frozen_base_bytes=fp32_bytes, trainable_bytes=0)
    else:
        method, factored = method_for(variant)
        frozen, adapter = lj.init(method, params, jax.random.key(1), layouts=layouts)
        ts = lj.train.make_train_step(model, lambda run, b: mse(run(b["x"])), tx, factored=factored)
        opt = ts.init(adapter)
        compiled, ct = compile_reps(lambda: (lj.train.make_train_step(
            model, lambda run, b: mse(run(b["x"])), tx, factored=factored).step,
            (adapter, opt, frozen, batch, None)), reps)
        state = {"a": adapter, "opt": opt}

        def call():
            state["a"], state["opt"], loss = compiled(state["a"], state["opt"], frozen, batch, None)
            return loss

        base = lj.base_params(frozen)
        shared = {k: v for k, v in frozen.items() if k == lj.SHARED_KEY}
        # frozen base = what stands in for the 24 adapted W0 (fp32 arrays or NF4 stores)
        is_q = lambda t: type(t).__name__ == "NF4Array"  # noqa: E731
        fb = sum(int(v.nbytes) if is_q(v) else int(v.nbytes)
                 for v in jax.tree_util.tree_leaves(base, is_leaf=is_q))
        case.info.update(trainable=lj.count_params(adapter), frozen_base_bytes=fb,
                         shared_bytes=tree_bytes(shared), trainable_bytes=tree_bytes(adapter),
                         factored=factored)
    case.info.update(ct)
    case.info.update(mem_info(compiled))
    case.info["fp32_base_bytes"] = fp32_bytes
    case.call = call
    case.compiled = compiled
    return case


def make_input(tokens: int, flat: bool = False):
    shape = (tokens, 1024) if flat else (8, tokens // 8, 1024)
    return jax.random.normal(jax.random.key(0), shape, jnp.float32)


def build_structure(structure: str, variants: list[str], tokens: int, policy: str, lr: float,
                    reps: int = 1, flat: bool = False) -> list[Case]:
    model = Net(scan=(structure == "scan"), policy=policy)
    x = make_input(tokens, flat)
    variables = model.init(jax.random.key(42), x)
    params = variables["params"]
    layouts = lj.discover(model, variables, x)
    cases = []
    for v in variants:
        t0 = time.perf_counter()
        try:
            case = build_case(structure, v, model, params, layouts, x, lr, reps)
            # first call = correctness sanity (loss) + first-execution effects; not timed
            case.info["first_loss"] = float(jax.block_until_ready(case.call())
                                            if v != "frozen" else case.call()[0])
        except Exception as e:  # noqa: BLE001 -- report and skip the variant
            case = Case(structure, v, error=f"{type(e).__name__}: {e}")
            print(f"[skip] {structure}/{v}: {case.error}", flush=True)
            traceback.print_exc(limit=3)
        else:
            i = case.info
            print(f"[built] {structure:8s} {v:14s} compile {i['lower_compile_s_min']:.2f}s (min of "
                  f"{len(i['lower_compile_s_all'])})  "
                  f"args {i['arg_bytes'] / MiB:7.1f}  temp {i['temp_bytes'] / MiB:7.1f} MiB  "
                  f"loss0 {i['first_loss']:.4f}  ({time.perf_counter() - t0:.1f}s)", flush=True)
        cases.append(case)
    return cases


# ------------------------------------------------------------------------------------- timing

def run_rounds(cases: list[Case], rounds: int) -> None:
    live = [c for c in cases if c.error is None]
    n = len(live)
    for r in range(rounds + 1):
        order = live[r % n:] + live[:r % n]
        t_round = time.perf_counter()
        for c in order:
            t0 = time.perf_counter()
            jax.block_until_ready(c.call())
            dt = time.perf_counter() - t0
            if r > 0:
                c.times.append((r, dt))
        tag = "warm-up" if r == 0 else f"round {r}/{rounds}"
        print(f"[{tag}] {time.perf_counter() - t_round:.1f}s  " +
              " ".join(f"{c.structure[0]}:{c.variant}={c.times[-1][1] * 1e3:.0f}" if r > 0 else "" for c in live),
              flush=True)


def paired(a: Case, b: Case) -> float | None:
    tb = dict(b.times)
    rs = [t / tb[r] for r, t in a.times if r in tb]
    return statistics.median(rs) if rs else None


# ------------------------------------------------------------------------------------ reports

def summarize(cases: list[Case]) -> dict:
    out: dict = {"structures": {}}
    for s in sorted({c.structure for c in cases}, key=lambda s: s != "unrolled"):
        sc = {c.variant: c for c in cases if c.structure == s}
        full = sc.get("full")
        rows = {}
        for v, c in sc.items():
            row = {"variant": v, "description": VARIANTS[v]}
            if c.error:
                row["error"] = c.error
                rows[v] = row
                continue
            row.update(c.info)
            row["args_plus_temp"] = c.info["arg_bytes"] + c.info["temp_bytes"]
            if full and not full.error:
                row["mem_ratio_full"] = row["args_plus_temp"] / (full.info["arg_bytes"] + full.info["temp_bytes"])
            if c.times:
                row["times_s"] = [t for _, t in c.times]
                row["median_s"] = statistics.median(row["times_s"])
                if full and not full.error and full.times:
                    row["ratio_full"] = paired(c, full)
                    row["ratio_full_per_round"] = [t / dict(full.times)[r] for r, t in c.times]
            rows[v] = row
        derived = {}
        for num, den in (("dora8", "lora8"), ("vera256", "lora8"), ("qlora8", "lora8"), ("lora64", "lora8"),
                         ("lora8", "lora8_merge"), ("dora8", "dora8_merge"), ("vera256", "vera256_merge")):
            a, b = sc.get(num), sc.get(den)
            if a and b and not a.error and not b.error:
                d = {"temp_diff_bytes": a.info["temp_bytes"] - b.info["temp_bytes"],
                     "mem_ratio": (a.info["arg_bytes"] + a.info["temp_bytes"]) /
                                  (b.info["arg_bytes"] + b.info["temp_bytes"])}
                if a.times and b.times:
                    d["time_ratio"] = paired(a, b)
                derived[f"{num}/{den}"] = d
        out["structures"][s] = {"variants": rows, "derived": derived}
    return out


def fmt(v, spec=".3f", none="–"):
    return none if v is None else format(v, spec)


def print_tables(summary: dict, timed: bool) -> None:
    for s, data in summary["structures"].items():
        print(f"\n### structure: {s}\n")
        print("| variant | trainable | median ms | ratio to full FT | arg MiB | out MiB | alias MiB | temp MiB "
              "| (args+temp)/full | lower+compile s, min (last: lower+compile) | frozen base MiB (÷fp32) |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for v, r in data["variants"].items():
            if "error" in r:
                print(f"| {v} | skipped: {r['error'][:120]} |||||||||| ")
                continue
            fb = r["frozen_base_bytes"]
            fbs = f"{fb / MiB:.1f} ({fb / r['fp32_base_bytes']:.4f})" if fb else "–"
            print(f"| {v} | {r['trainable']:,} | {fmt(r.get('median_s') and r['median_s'] * 1e3, '.0f')} | "
                  f"{fmt(r.get('ratio_full'))} | {r['arg_bytes'] / MiB:.1f} | {r['out_bytes'] / MiB:.1f} | "
                  f"{r['alias_bytes'] / MiB:.1f} | {r['temp_bytes'] / MiB:.1f} | {fmt(r.get('mem_ratio_full'))} | "
                  f"{r['lower_compile_s_min']:.2f} ({r['lower_s']:.2f}+{r['compile_s']:.2f}) | {fbs} |")
        if data["derived"]:
            print("\n| pair | time ratio (paired median) | temp difference MiB | (args+temp) ratio |")
            print("|---|---:|---:|---:|")
            for k, d in data["derived"].items():
                print(f"| {k} | {fmt(d.get('time_ratio'))} | {d['temp_diff_bytes'] / MiB:+.1f} | {d['mem_ratio']:.3f} |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default=DEFAULT_VARIANTS,
                    help=f"comma list from: {', '.join(VARIANTS)} (default: {DEFAULT_VARIANTS})")
    ap.add_argument("--rounds", type=int, default=5, help="timed rounds after 1 warm-up round (default 5)")
    ap.add_argument("--structure", choices=("unrolled", "scan", "both"), default="unrolled")
    ap.add_argument("--remat-policy", choices=tuple(POLICIES), default="lin_out",
                    help="remat policy of the scanned blocks (default lin_out = save only linear outputs)")
    ap.add_argument("--tokens", type=int, default=2048, help="tokens per step, batch 8 x seq tokens/8 (default 2048)")
    ap.add_argument("--flat", action="store_true",
                    help="feed the input as (tokens, 1024) instead of (8, tokens/8, 1024) (as perf_baseline's prototype)")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--compile-reps", type=int, default=1,
                    help="lower+compile each step this many times (fresh closures) and report the min (default 1)")
    ap.add_argument("--json", help="write raw numbers (per-round times, memory, compile) to this file")
    ap.add_argument("--memory-only", action="store_true", help="compile + memory_analysis only, no timing")
    args = ap.parse_args(argv)
    if args.tokens % 8:
        ap.error("--tokens must be a multiple of 8")
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for v in variants:
        if v not in VARIANTS:
            ap.error(f"unknown variant {v!r}; known: {', '.join(VARIANTS)}")
    if "full" not in variants:
        variants.insert(0, "full")  # every ratio is to full FT of the same structure/round
    structures = ["unrolled", "scan"] if args.structure == "both" else [args.structure]

    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "argv": sys.argv, "jax": jax.__version__, "jaxlib": getattr(jax.lib, "__version__", None) or
        __import__("jaxlib").__version__, "flax": flax.__version__, "optax": optax.__version__,
        "python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
        "devices": [str(d) for d in jax.devices()], "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
        "tokens": args.tokens, "remat_policy": args.remat_policy, "rounds": args.rounds,
        "compile_reps": args.compile_reps, "flat_input": args.flat, "memory_only": args.memory_only,
    }
    try:
        meta["cpu"] = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except Exception:  # noqa: BLE001
        pass
    print(json.dumps(meta), flush=True)

    jax.block_until_ready(jax.jit(lambda a: a @ a)(jnp.ones((64, 64))))  # backend init outside compile timings
    cases: list[Case] = []
    for s in structures:
        cases += build_structure(s, variants, args.tokens, args.remat_policy, args.lr, args.compile_reps, args.flat)
    if not args.memory_only:
        run_rounds(cases, args.rounds)
    summary = summarize(cases)
    print_tables(summary, not args.memory_only)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, **summary}, f, indent=1, default=str)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
