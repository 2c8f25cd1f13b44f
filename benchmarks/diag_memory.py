"""Diagnostic: XLA temp bytes of the library's factored LoRA/DoRA step vs hand-written equivalents.

Same bench model, same loss, same Adam step and donation as ``train_step.py`` (unrolled, 4 blocks),
but the hand-written variants call plain ``jnp`` code on dicts of arrays (no Flax, no interception),
so a difference in ``memory_analysis().temp_size_in_bytes`` isolates what the library's code adds.
Memory only (compile + ``memory_analysis``); nothing is executed.

    python benchmarks/diag_memory.py [--tokens 2048] [--only name,name]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_step as tsb  # noqa: E402

MiB = 1024.0 ** 2
S = 2.0  # alpha / r = 16 / 8
sg = jax.lax.stop_gradient


def hw_model(lin, flat2d: bool):
    def f(W0, ad, x):
        shp = x.shape
        if flat2d:
            x = x.reshape(-1, shp[-1])
        for i in range(4):
            L = lambda n, h: lin(W0[f"block_{i}"][n]["kernel"], ad[f"block_{i}"][n], h)  # noqa: E731,B023
            x = x + L("o", jax.nn.silu(L("q", x)) * L("k", x) + L("v", x))
            x = x + L("fc2", jax.nn.relu(L("fc1", x)))
        return x.reshape(shp)
    return f


def lora_proto(W, p, x):       # perf_baseline.md lin_fact
    return x @ W + S * ((x @ p["a"]) @ p["b"])


def lora_libform(W, p, x):     # library's branch: ((x@A)*s)@B added to the layer output
    return x @ W + ((x @ p["a"]) * S) @ p["b"]


def dora_proto(W, p, x):       # perf_baseline.md 5c: (k,) norm of the merged weight, stop_gradient
    nrm = sg(jnp.sqrt(jnp.sum(jnp.square(W + S * (p["a"] @ p["b"])), axis=0)))
    return (x @ W + S * ((x @ p["a"]) @ p["b"])) * (p["m"] / nrm)


def dora_analytic(W, p, x):    # library's output_scale math, inline
    a, b = p["a"], p["b"]
    w_sq = jnp.sum(W * W, axis=0)
    cross = jnp.sum((W.T @ a) * b.T, axis=1)
    quad = jnp.sum(b * ((a.T @ a) @ b), axis=0)
    nrm = sg(jnp.sqrt(jnp.maximum(w_sq + 2 * S * cross + S * S * quad, 0.0)))
    return (x @ W + ((x @ a) * S) @ b) * (p["m"] / nrm)


def dora_scale_first(W, p, x):  # same math, scale folded into each term: no (N,out) pre-scale tensor
    a, b = p["a"], p["b"]
    w_sq = jnp.sum(W * W, axis=0)
    cross = jnp.sum((W.T @ a) * b.T, axis=1)
    quad = jnp.sum(b * ((a.T @ a) @ b), axis=0)
    k = p["m"] / sg(jnp.sqrt(jnp.maximum(w_sq + 2 * S * cross + S * S * quad, 0.0)))
    return (x @ W) * k + ((x @ a) * S) @ (b * k)


def hw_case(lin, flat2d, params, ad, x):
    f = hw_model(lin, flat2d)
    tx = optax.adam(1e-4)

    def step(ad, opt, W0, x):
        loss, g = jax.value_and_grad(lambda a: tsb.mse(f(W0, a, x)))(ad)
        u, opt = tx.update(g, opt, ad)
        return optax.apply_updates(ad, u), opt, loss

    return jax.jit(step, donate_argnums=(0, 1)), (ad, tx.init(ad), params, x)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--only", default="")
    args = ap.parse_args()
    model = tsb.Net()
    x = jax.random.normal(jax.random.key(0), (8, args.tokens // 8, 1024), jnp.float32)
    variables = model.init(jax.random.key(42), x)
    params = variables["params"]
    layouts = tsb.lj.discover(model, variables, x)
    k = jax.random.key(1)

    def mk_ad(dora):
        ad = {}
        for blk, mods in params.items():
            ad[blk] = {}
            for n, v in mods.items():
                w = v["kernel"]
                ad[blk][n] = {"a": jax.random.normal(k, (w.shape[0], 8)) * 0.01, "b": jnp.zeros((8, w.shape[1]))}
                if dora:
                    ad[blk][n]["m"] = jnp.sqrt(jnp.sum(w * w, axis=0))
        return ad

    cases = {
        "hw_lora_proto_2d": (lora_proto, True, False),
        "hw_lora_proto_3d": (lora_proto, False, False),
        "hw_lora_libform_3d": (lora_libform, False, False),
        "hw_dora_proto_3d": (dora_proto, False, True),
        "hw_dora_analytic_3d": (dora_analytic, False, True),
        "hw_dora_scale_first_3d": (dora_scale_first, False, True),
    }
    only = [s for s in args.only.split(",") if s]
    print("| variant | arg MiB | temp MiB | lower+compile s |\n|---|---:|---:|---:|")
    for name in ("lib:lora8", "lib:dora8", *cases):
        if only and name not in only:
            continue
        t0 = time.perf_counter()
        if name.startswith("lib:"):
            c = tsb.build_case("unrolled", name[4:], model, params, layouts, x, 1e-4)
            info = c.info
            arg, temp = info["arg_bytes"], info["temp_bytes"]
        else:
            lin, flat, dora = cases[name]
            fn, a = hw_case(lin, flat, params, mk_ad(dora), x)
            m = fn.lower(*a).compile().memory_analysis()
            arg, temp = m.argument_size_in_bytes, m.temp_size_in_bytes
        print(f"| {name} | {arg / MiB:.1f} | {temp / MiB:.1f} | {time.perf_counter() - t0:.1f} |", flush=True)


if __name__ == "__main__":
    main()
