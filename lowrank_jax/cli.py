"""``lowrank-jax`` command line."""

from __future__ import annotations

import argparse
import sys


def _example(args: argparse.Namespace) -> int:
    """Fine-tune a small scanned attention model with each method and print what happened."""
    import time

    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import optax

    import lowrank_jax as lj

    class Block(nn.Module):
        @nn.compact
        def __call__(self, x, _=None):
            h = nn.MultiHeadDotProductAttention(num_heads=4, qkv_features=64, name="attn")(nn.LayerNorm()(x))
            x = x + h
            x = x + nn.Dense(64, name="fc2")(nn.gelu(nn.Dense(256, name="fc1")(nn.LayerNorm()(x))))
            return x, None

    class Model(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Dense(64, name="embed")(x)
            x, _ = nn.scan(nn.remat(Block), variable_axes={"params": 0}, split_rngs={"params": True},
                           length=3)(name="blocks")(x, None)
            return nn.Dense(4, name="head")(x.mean(1))

    model = Model()
    kx, ky, kp = jax.random.split(jax.random.key(args.seed), 3)
    x = jax.random.normal(kx, (64, 16, 16))
    y = jax.random.randint(ky, (64,), 0, 4)
    variables = model.init(kp, x)
    layouts = lj.discover(model, variables, x)
    targets = r"blocks/.*kernel"
    total = sum(v.size for v in jax.tree_util.tree_leaves(variables["params"]))

    def loss_fn(run, batch):
        return optax.softmax_cross_entropy_with_integer_labels(run(batch[0]), batch[1]).mean()

    print(f"model: {total:,} params; task: 64 random sequences, 4 classes; {args.steps} Adam steps per method")
    for method in (lj.LoRA(rank=8, alpha=16.0, targets=targets), lj.DoRA(rank=8, alpha=16.0, targets=targets),
                   lj.VeRA(rank=64, targets=targets)):
        frozen, adapter = lj.init(method, variables["params"], jax.random.key(0), layouts=layouts)
        ts = lj.train.make_train_step(model, loss_fn, optax.adam(3e-2 if isinstance(method, lj.VeRA) else 3e-3))
        state = ts.init(adapter)
        t0 = time.perf_counter()
        for i in range(args.steps):
            adapter, state, loss = ts.step(adapter, state, frozen, (x, y))
            if i == 0:
                first = float(loss)
        n = lj.count_params(adapter)
        print(f"{type(method).__name__:5s} trainable {n:>8,} ({100 * n / total:5.2f}%)  "
              f"loss {first:.3f} -> {float(loss):.3f}  ({time.perf_counter() - t0:.1f} s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lowrank-jax", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("example", help="fine-tune a small model with LoRA, DoRA and VeRA")
    ex.add_argument("--steps", type=int, default=100)
    ex.add_argument("--seed", type=int, default=0)
    ex.set_defaults(func=_example)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
