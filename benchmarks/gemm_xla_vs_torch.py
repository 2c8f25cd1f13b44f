"""One fp32 GEMM in XLA:CPU (jax.jit) and in PyTorch (MKL) in the same process, interleaved.

The bound under "ours / PEFT" in benchmarks/RESULTS.md: the bench model's largest matmul
(2048×1024 @ 1024×4096), a rank-8 one (2048×1024 @ 1024×8), and MiniLM's attention scores — a batched
matmul of 16×12 heads, (128×32) @ (32×128).

    python benchmarks/gemm_xla_vs_torch.py --rounds 8
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch


def timed(fn, reps):
    t0 = time.perf_counter()
    for _ in range(reps):
        out = fn()
    if hasattr(out, "block_until_ready"):
        out.block_until_ready()
    return (time.perf_counter() - t0) / reps


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (XLA:CPU uses every core)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    f = jax.jit(lambda x, y: x @ y)
    for batch, m, k, n, reps in (((), 2048, 1024, 4096, 3), ((), 2048, 1024, 8, 10), ((16, 12), 128, 32, 128, 10)):
        a = rng.standard_normal((*batch, m, k), np.float32)
        b = rng.standard_normal((*batch, k, n), np.float32)
        ja, jb, ta, tb = jnp.asarray(a), jnp.asarray(b), torch.from_numpy(a), torch.from_numpy(b)
        f(ja, jb).block_until_ready()
        torch.matmul(ta, tb)
        tj, tt = [], []
        for _ in range(args.rounds):
            tj.append(timed(lambda: f(ja, jb), reps))
            tt.append(timed(lambda: torch.matmul(ta, tb), reps))
        gflop = 2 * m * k * n * int(np.prod(batch)) / 1e9
        mj, mt = statistics.median(tj), statistics.median(tt)
        lead = f"{'x'.join(map(str, batch))} batched " if batch else ""
        print(f"{lead}{m}x{k} @ {k}x{n}: XLA:CPU {1e3 * mj:.2f} ms ({gflop / mj:.0f} GFLOP/s), torch {1e3 * mt:.2f} ms "
              f"({gflop / mt:.0f} GFLOP/s); XLA / torch {statistics.median(a / b for a, b in zip(tj, tt)):.3f}")


if __name__ == "__main__":
    main()
