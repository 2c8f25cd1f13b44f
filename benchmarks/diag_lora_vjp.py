"""Can a different LoRA program beat autodiff's on XLA:CPU? (issue 14: "one GEMM for x@[W0|A]", "a custom
VJP forming dy@Bᵀ once"). Measured on bench-model shapes without the library, side by side in one process.

A stack of ``--blocks`` blocks, each q/k/v/o (1024×1024) summed + MLP (1024→4096→1024, gelu), residual;
input ``(2048, 1024)`` fp32; loss ``mean(out²)``. Variants (every linear adapted, r=8, s=2):

* ``floor``    frozen forward + backward (gradient w.r.t. the input only; no weight gradients)
* ``autodiff`` ``y = x@W + s·(x@A)@B``, ``jax.grad`` w.r.t. every A, B (and the input, as the floor)
* ``vjp``      the same forward with a hand-written backward: ``g = s·dy@Bᵀ`` once; ``dA = xᵀg``,
               ``dB = (s·x@A)ᵀdy``, ``dx = dy@Wᵀ + g@Aᵀ``; residuals ``x`` and ``s·x@A``
* ``merged``   forward ``y = x@(W + s·A@B)`` and ``dx = dy@(W + s·A@B)ᵀ`` (the ``(in, out)`` sum formed in the
               forward and again in the backward, never its gradient); ``dA = xᵀ(s·dy@Bᵀ)``, ``dB = (s·x@A)ᵀdy``
* ``concat``   forward ``z = x@[W | A]`` (one GEMM, the ``(in, out + r)`` concatenation built per step),
               ``y = z[:, :out] + s·z[:, out:]@B``; backward ``dx = [dy | g] @ [W | A]ᵀ`` (one GEMM)

Prints the median step time per variant over interleaved rounds, the paired ratios to ``floor`` and to
``autodiff``, and XLA's FLOPs / bytes accessed / temporaries; checks that every variant's gradients equal
``autodiff``'s (rel. 1e-5).

    python benchmarks/diag_lora_vjp.py --rounds 7 --reps 3
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

D, F, R, S = 1024, 4096, 8, 2.0


def shapes():
    return [("q", D, D), ("k", D, D), ("v", D, D), ("o", D, D), ("up", D, F), ("down", F, D)]


def make_params(blocks, key):
    ws, ads = [], []
    for b in range(blocks):
        w, a = {}, {}
        for name, i, o in shapes():
            key, k1, k2, k3 = jax.random.split(key, 4)
            w[name] = jax.random.normal(k1, (i, o)) / np.sqrt(i)
            a[name] = {"a": jax.random.normal(k2, (i, R)) / np.sqrt(i), "b": 0.01 * jax.random.normal(k3, (R, o))}
        ws.append(w)
        ads.append(a)
    return ws, ads


def lin_autodiff(x, w, ab):
    return x @ w + ((x @ ab["a"]) * S) @ ab["b"]


@jax.custom_vjp
def lin_vjp(x, w, a, b):
    return x @ w + ((x @ a) * S) @ b


def _vjp_fwd(x, w, a, b):
    xa = (x @ a) * S
    return x @ w + xa @ b, (x, w, a, b, xa)


def _vjp_bwd(res, dy):
    x, w, a, b, xa = res
    g = (dy @ b.T) * S
    return dy @ w.T + g @ a.T, jnp.zeros_like(w), x.T @ g, xa.T @ dy


lin_vjp.defvjp(_vjp_fwd, _vjp_bwd)


@jax.custom_vjp
def lin_concat(x, w, a, b):
    return _concat_fwd(x, w, a, b)[0]


def _concat_fwd(x, w, a, b):
    out = w.shape[1]
    wa = jnp.concatenate([w, a], axis=1)
    z = x @ wa
    xa = z[:, out:] * S
    return z[:, :out] + xa @ b, (x, wa, b, xa)


def _concat_bwd(res, dy):
    x, wa, b, xa = res
    out = b.shape[1]
    g = (dy @ b.T) * S
    dx = jnp.concatenate([dy, g], axis=1) @ wa.T
    return dx, jnp.zeros((wa.shape[0], out), wa.dtype), x.T @ g, xa.T @ dy


lin_concat.defvjp(_concat_fwd, _concat_bwd)


@jax.custom_vjp
def lin_merged(x, w, a, b):
    return x @ (w + (a * S) @ b)


def _merged_fwd(x, w, a, b):
    return x @ (w + (a * S) @ b), (x, w, a, b)


def _merged_bwd(res, dy):
    x, w, a, b = res
    g = (dy @ b.T) * S
    return dy @ (w + (a * S) @ b).T, jnp.zeros_like(w), x.T @ g, ((x @ a) * S).T @ dy


lin_merged.defvjp(_merged_fwd, _merged_bwd)


def forward(x, ws, ads, lin):
    for w, ad in zip(ws, ads):
        h = sum(lin(x, w[n], ad[n]) for n in ("q", "k", "v", "o"))
        x = x + h
        x = x + lin(jax.nn.gelu(lin(x, w["up"], ad["up"])), w["down"], ad["down"])
    return jnp.mean(x * x)


def variant(name):
    if name == "autodiff":
        return lin_autodiff
    f = {"vjp": lin_vjp, "concat": lin_concat, "merged": lin_merged}[name]
    return lambda x, w, ab: f(x, w, ab["a"], ab["b"])


def build(name, ws, ads, x):
    """Every variant differentiates w.r.t. the input ``x`` too, so that all of them (and the floor) run
    every layer's input gradient; the floor differentiates w.r.t. ``x`` only."""
    if name == "floor":
        fn = jax.jit(jax.value_and_grad(lambda x, ws: forward(x, ws, [
            {n: {"a": None, "b": None} for n, _, _ in shapes()} for _ in ws], lambda x, w, ab: x @ w)))
        args = (x, ws)
    else:
        lin = variant(name)
        fn = jax.jit(jax.value_and_grad(lambda x, ads, ws: forward(x, ws, ads, lin), argnums=(0, 1)))
        args = (x, ads, ws)
    compiled = fn.lower(*args).compile()
    return compiled, args


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--blocks", type=int, default=4)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--variants", default="floor,autodiff,vjp,concat,merged")
    args = p.parse_args(argv)
    names = args.variants.split(",")
    ws, ads = make_params(args.blocks, jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (args.tokens, D))
    built = {n: build(n, ws, ads, x) for n in names}
    ref = None
    for n in names:
        if n == "floor":
            continue
        _, grads = built[n][0](*built[n][1])
        if ref is None:
            ref = grads
        else:
            for g, r in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(ref)):
                err = float(jnp.linalg.norm(g - r) / jnp.linalg.norm(r))
                assert err < 1e-5, (n, err)
    for n in names:
        c = built[n][0]
        ca = c.cost_analysis()
        ca = ca[0] if isinstance(ca, (list, tuple)) else ca
        ma = c.memory_analysis()
        print(f"{n:9s} GFLOP {ca.get('flops', 0) / 1e9:7.1f}  GB accessed {ca.get('bytes accessed', 0) / 1e9:6.2f}  "
              f"temp {ma.temp_size_in_bytes / 2**20:7.1f} MiB")
        jax.block_until_ready(c(*built[n][1]))
    times = {n: [] for n in names}
    for r in range(args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            c, a = built[n]
            t0 = time.perf_counter()
            for _ in range(args.reps):
                out = c(*a)
            jax.block_until_ready(out)
            times[n].append((time.perf_counter() - t0) / args.reps)
    for n in names:
        line = f"{n:9s} median {1e3 * statistics.median(times[n]):8.1f} ms"
        for base in ("floor", "autodiff"):
            if base in times and base != n:
                ratio = statistics.median(a / b for a, b in zip(times[n], times[base]))
                line += f"   / {base} {ratio:.3f}"
        print(line)


if __name__ == "__main__":
    main()
