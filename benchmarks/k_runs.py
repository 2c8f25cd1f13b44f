"""Many runs, one compile: K LoRA runs in one vmapped step (``lj.sweep``) vs the same K runs one after another.

Model: a small MLP classifier (``Dense(d)``, ``--layers`` residual blocks ``x + fc2(gelu(fc1(x)))`` with
``fc1: d→2d``, ``fc2: 2d→d``, mean-pool, ``Dense(4)``), batch ``--batch`` × seq ``--seq`` × 32 features,
fp32, softmax cross-entropy, Adam, LoRA (α=16) on every block kernel. The ``K`` runs differ in
(``--vary``) their init seed (r=8, lr 1e-3), learning rate (r=8, lr log-spaced 1e-4…1e-2) or rank
(2, 4, …, 2K; lr 1e-3; padded to 2K with exact zeros in the sweep).

* ``sweep``: ``lj.sweep.make_sweep_step`` — one jitted step updating all K adapters (vmapped over all
  K, or ``--runs-per-batch b`` at a time in a compiled loop; frozen base and batch shared);
  ``--steps`` calls per round.
* ``sequential``: ``lj.train.make_train_step`` — the K runs one after another, ``--steps`` calls each
  (K × steps calls per round). Runs that differ only in seed share one compiled step; runs that differ
  in learning rate (a different optax closure) or rank (a different adapter structure) need one compile
  each — the reported sequential compile time is the sum.

Both are compiled and run once before timing (compile times reported separately). Each round times
both, in alternating order; the reported ratio is the median over rounds of the per-round
``sweep / sequential`` (paired), next to each side's median. The final losses of both are compared as a
correctness check (they compute the same K runs).

Example::

    python benchmarks/k_runs.py --runs 8 --steps 10 --rounds 5 [--vary seed|lr|rank] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))
import lowrank_jax as lj  # noqa: E402
from lowrank_jax import sweep as lj_sweep  # noqa: E402


class Net(nn.Module):
    dim: int = 128
    layers: int = 2

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(self.dim, name="embed")(x)
        for i in range(self.layers):
            h = nn.Dense(2 * self.dim, name=f"block_{i}_fc1")(x)
            x = x + nn.Dense(self.dim, name=f"block_{i}_fc2")(nn.gelu(h))
        return nn.Dense(4, name="head")(x.mean(axis=1))


def xent(run, batch):
    return optax.softmax_cross_entropy_with_integer_labels(run(batch["x"]), batch["y"]).mean()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=8, help="K, the number of runs")
    ap.add_argument("--steps", type=int, default=10, help="train steps per run per round")
    ap.add_argument("--rounds", type=int, default=5, help="timed rounds (after one warm-up)")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--runs-per-batch", type=int, default=None,
                    help="make_sweep_step(runs_per_batch=...): vmap this many runs at a time (default: all K)")
    ap.add_argument("--vary", choices=("seed", "lr", "rank"), default="seed", help="what differs between runs")
    ap.add_argument("--json", default=None, help="write the raw numbers here")
    args = ap.parse_args()
    k_runs = args.runs

    model = Net(args.dim, args.layers)
    x = jax.random.normal(jax.random.key(0), (args.batch, args.seq, 32))
    batch = {"x": x, "y": jnp.arange(args.batch) % 4}
    params = jax.jit(model.init)(jax.random.key(1), x)["params"]
    if args.vary == "rank":
        methods = [lj.LoRA(rank=2 * (k + 1), alpha=16.0, targets=r"block_\d+_fc\d/kernel") for k in range(k_runs)]
    else:
        methods = [lj.LoRA(rank=8, alpha=16.0, targets=r"block_\d+_fc\d/kernel")] * k_runs
    lrs = list(np.geomspace(1e-4, 1e-2, k_runs)) if args.vary == "lr" else [1e-3] * k_runs
    inits = [lj.init(m, params, jax.random.key(100 + k)) for k, m in enumerate(methods)]
    frozen = inits[0][0]
    adapters = [a for _, a in inits]

    if args.vary == "lr":
        sweep = lj_sweep.make_sweep_step(model, xent, optax.adam, learning_rates=lrs,
                                         runs_per_batch=args.runs_per_batch)
        singles = [lj.train.make_train_step(model, xent, optax.adam(lr)) for lr in lrs]
    else:
        sweep = lj_sweep.make_sweep_step(model, xent, optax.adam(1e-3), runs_per_batch=args.runs_per_batch)
        one = lj.train.make_train_step(model, xent, optax.adam(1e-3))   # jit-cached per adapter structure
        singles = [one] * k_runs

    def fresh_sweep():
        runs = lj_sweep.stack_runs(adapters)
        return runs, sweep.init(runs)

    def fresh_single():
        copies = [jax.tree_util.tree_map(jnp.copy, a) for a in adapters]
        return [(a, ts.init(a)) for a, ts in zip(copies, singles)]

    def run_sweep(state):
        runs, opt = state
        for _ in range(args.steps):
            runs, opt, losses = sweep.step(runs, opt, frozen, batch)
        return jax.block_until_ready(losses)

    def run_sequential(states):
        out = []
        for (a, opt), ts in zip(states, singles):
            for _ in range(args.steps):
                a, opt, loss = ts.step(a, opt, frozen, batch)
            out.append(loss)
        return np.asarray(jax.block_until_ready(jnp.stack(out)))

    t0 = time.perf_counter()
    state = fresh_sweep()
    jax.block_until_ready(sweep.step(*state, frozen, batch))
    compile_sweep = time.perf_counter() - t0
    t0 = time.perf_counter()
    for (a, opt), ts in zip(fresh_single(), singles):          # first call of each: compiles where needed
        jax.block_until_ready(ts.step(a, opt, frozen, batch))
    compile_single = time.perf_counter() - t0

    loss_sweep = np.asarray(run_sweep(fresh_sweep()))          # warm-up round + correctness check
    loss_seq = run_sequential(fresh_single())
    max_diff = float(np.max(np.abs(loss_sweep - loss_seq)))

    t_sweep, t_seq, ratios = [], [], []
    for r in range(args.rounds):
        s_state, q_state = fresh_sweep(), fresh_single()
        jax.block_until_ready((s_state, q_state))
        order = ("sweep", "seq") if r % 2 == 0 else ("seq", "sweep")
        times = {}
        for name in order:
            t0 = time.perf_counter()
            run_sweep(s_state) if name == "sweep" else run_sequential(q_state)
            times[name] = time.perf_counter() - t0
        t_sweep.append(times["sweep"])
        t_seq.append(times["seq"])
        ratios.append(times["sweep"] / times["seq"])

    result = {
        "command": "python " + " ".join([os.path.relpath(__file__)] + sys.argv[1:]),
        "runs": k_runs, "steps": args.steps, "rounds": args.rounds,
        "vary": args.vary, "runs_per_batch": args.runs_per_batch,
        "model": f"MLP d={args.dim} layers={args.layers}, batch {args.batch}x{args.seq}x32, LoRA",
        "median_sweep_s": statistics.median(t_sweep), "median_sequential_s": statistics.median(t_seq),
        "median_ratio_sweep_over_sequential": statistics.median(ratios),
        "rounds_sweep_s": t_sweep, "rounds_sequential_s": t_seq, "rounds_ratio": ratios,
        "compile_sweep_s": compile_sweep, "compile_sequential_total_s": compile_single,
        "final_loss_max_abs_diff": max_diff,
        "platform": f"{platform.machine()} {jax.devices()[0].platform} x{os.cpu_count()} cpus, jax {jax.__version__}",
    }
    print(f"{k_runs} runs (varying {args.vary}) x {args.steps} steps, {args.rounds} rounds "
          f"({result['model']}; {result['platform']})")
    label = "all" if args.runs_per_batch is None else args.runs_per_batch
    print(f"  one sweep step (vmap {label:>3}) : median {result['median_sweep_s'] * 1e3:8.1f} ms per round  "
          f"(compile {compile_sweep:.2f} s)")
    print(f"  {k_runs} sequential runs        : median {result['median_sequential_s'] * 1e3:8.1f} ms per round  "
          f"(first calls incl. compiles {compile_single:.2f} s)")
    print(f"  paired ratio sweep/sequential: median {result['median_ratio_sweep_over_sequential']:.3f} "
          f"(rounds: {', '.join(f'{v:.3f}' for v in ratios)})")
    print(f"  final losses, sweep vs sequential: max |diff| = {max_diff:.2e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
