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


def _parse_lr(text: str | None) -> dict[str, float]:
    """``--lr``: one number for every method, or ``method=value`` pairs (``lora=1e-3,vera=1e-2``)."""
    from lowrank_jax.compare import DEFAULT_LR

    if not text:
        return {}
    if "=" not in text:
        v = float(text)
        return {m: v for m in DEFAULT_LR}
    out = {}
    for part in text.split(","):
        name, _, value = part.partition("=")
        out[name.strip()] = float(value)
    return out


def _compare(args: argparse.Namespace) -> int:
    """Fine-tune a pretrained model on Rotten Tomatoes with every method; table, results.json, figure."""
    from lowrank_jax.models.assets import AssetNotInstalledError

    try:
        from lowrank_jax.compare import CompareConfig, run_compare

        methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
        defaults = _COMPARE_DEFAULTS[args.model]
        seeds = None
        if args.seeds is not None:
            from lowrank_jax.seeds import parse_seeds

            if args.seed is not None:
                raise ValueError("give --seed S or --seeds S1,S2,..., not both")
            seeds = parse_seeds(args.seeds)
        elif args.sweep:
            raise ValueError("--sweep trains the runs of --seeds in one step: give --seeds (e.g. --seeds 0-7)")
        cfg = CompareConfig(
            model=args.model,
            methods=tuple(methods) if methods else defaults["methods"],
            rank=args.rank, alpha=args.alpha, vera_rank=args.vera_rank, targets=args.targets,
            steps=args.steps if args.steps is not None else defaults["steps"],
            batch_size=args.batch_size if args.batch_size is not None else defaults["batch_size"],
            seq_len=args.seq_len if args.seq_len is not None else defaults["seq_len"],
            buckets=tuple(int(b) for b in args.buckets.split(",")) if args.buckets else None,
            seed=(seeds[0] if seeds else args.seed or 0), lr=_parse_lr(args.lr),
            eval_examples=args.eval_examples if args.eval_examples is not None else defaults["eval_examples"],
            out=args.out, progress=not args.no_progress,
        )
    except ValueError as e:
        print(f"lowrank-jax compare: error: {e}", file=sys.stderr)
        return 2
    try:
        if seeds is None:
            run_compare(cfg)
        else:
            from lowrank_jax.seeds import run_seeds

            run_seeds(cfg, seeds, sweep=args.sweep)
    except AssetNotInstalledError as e:
        print(f"lowrank-jax compare: {e}", file=sys.stderr)
        return 2
    return 0


def _train_args(p: argparse.ArgumentParser, out: str, methods_help: str) -> None:
    """The ``compare`` training flags shared by ``analyze`` and ``ablate`` (MiniLM defaults)."""
    p.add_argument("--methods", default=None, help=methods_help)
    p.add_argument("--rank", type=int, default=8, help="LoRA/DoRA rank")
    p.add_argument("--alpha", type=float, default=None, help="LoRA/DoRA alpha (default 2*rank)")
    p.add_argument("--vera-rank", type=int, default=256)
    p.add_argument("--targets", choices=("attention", "all"), default="attention",
                   help="adapt (and analyze) the attention query/value kernels or every linear layer")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=48, help="max tokens per example")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", default=None, help="learning rate for every method, or per method: lora=1e-3,dora=1e-3")
    p.add_argument("--eval-examples", type=int, default=0, help="fixed test subset size, 0 = whole test split")
    p.add_argument("--out", default=out, help="output folder")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")


def _train_config(args: argparse.Namespace, methods: tuple[str, ...]) -> object:
    from lowrank_jax.compare import CompareConfig

    return CompareConfig(
        model="minilm", methods=methods, rank=args.rank, alpha=args.alpha, vera_rank=args.vera_rank,
        targets=args.targets, steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, seed=args.seed,
        lr=_parse_lr(args.lr), eval_examples=args.eval_examples, out=args.out, progress=not args.no_progress)


def _split(text: str) -> tuple[str, ...]:
    return tuple(m.strip() for m in text.split(",") if m.strip())


def _run_app(command: str, fn) -> int:
    """Run ``fn()``; a bad setting or a missing asset package is one line on stderr and exit status 2."""
    from lowrank_jax.models.assets import AssetNotInstalledError

    try:
        fn()
    except ValueError as e:
        print(f"lowrank-jax {command}: error: {e}", file=sys.stderr)
        return 2
    except AssetNotInstalledError as e:
        print(f"lowrank-jax {command}: {e}", file=sys.stderr)
        return 2
    return 0


def _analyze(args: argparse.Namespace) -> int:
    """Train full FT / LoRA / DoRA on MiniLM + Rotten Tomatoes; (ΔD, ΔM) per layer over checkpoints."""
    def go():
        from lowrank_jax.analyze import run_analyze

        cfg = _train_config(args, _split(args.methods or "full,lora,dora"))
        run_analyze(cfg, checkpoints=args.checkpoints)
    return _run_app("analyze", go)


def _ablate(args: argparse.Namespace) -> int:
    """Rank sweep of LoRA/DoRA and DoRA's norm detached vs differentiated, with plots."""
    def go():
        from lowrank_jax.ablate import run_ablate

        try:
            ranks = tuple(int(r) for r in _split(args.ranks))
        except ValueError:
            raise ValueError(f"--ranks: expected a comma list of integers, got {args.ranks!r}") from None
        cfg = _train_config(args, ("dora",))
        run_ablate(cfg, studies=_split(args.study), ranks=ranks, rank_methods=_split(args.methods or "lora,dora"),
                   time_rounds=args.time_rounds, time_steps=args.time_steps)
    return _run_app("ablate", go)


_SUFFIX = {"k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}


def _parse_count(text: str) -> float:
    """``--params``: a number (``1e9``, ``1100048384``) or one with a K/M/B/T suffix (``8B``, ``1.1b``)."""
    t = text.strip().lower().replace("_", "").replace(",", "")
    scale = 1.0
    if t and t[-1] in _SUFFIX:
        scale, t = _SUFFIX[t[-1]], t[:-1]
    try:
        value = float(t) * scale
    except ValueError:
        raise ValueError(f"--params: expected a parameter count such as 1e9 or 8B, got {text!r}") from None
    if not value >= 1:
        raise ValueError(f"--params: expected a parameter count >= 1, got {text!r}")
    return value


def _plan(args: argparse.Namespace) -> int:
    """Per-device memory of a training step for full fine-tuning and each adapter method."""
    import json

    from lowrank_jax import plan as lp

    try:
        if (args.params is None) == (args.config is None):
            raise ValueError("give exactly one of --params N or --config NAME")
        if args.params is not None:
            spec = lp.params_spec(_parse_count(args.params), hidden=args.hidden, layers=args.layers)
        else:
            if args.hidden is not None or args.layers is not None:
                raise ValueError("--hidden/--layers only shape a --params model; --config has its own shape")
            spec = lp.model_spec(args.config)
        methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
        fits = tuple(float(g) for g in args.fits.split(",") if g.strip()) if args.fits else ()
        plans = lp.plan(spec, methods, dtype=args.dtype, optimizer=args.optimizer, rank=args.rank,
                        vera_rank=args.vera_rank, batch=args.batch, seq=args.seq, remat=args.remat,
                        devices=args.devices, backend=args.backend, scanned=args.scanned,
                        keep_grads=args.keep_grads, nf4_head=args.nf4_head, moments_dtype=args.moments_dtype)
    except ValueError as e:
        print(f"lowrank-jax plan: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        out = {"model": {"name": spec.name, "source": spec.source, "n_params": spec.n_params,
                         "layers": spec.n_layers, "hidden": spec.hidden, "intermediate": spec.intermediate,
                         "heads": spec.n_heads, "kv_heads": spec.n_kv_heads, "vocab": spec.vocab},
               "settings": {"dtype": args.dtype, "optimizer": args.optimizer, "moments_dtype": args.moments_dtype,
                            "rank": args.rank,
                            "vera_rank": args.vera_rank, "batch": args.batch, "seq": args.seq,
                            "remat": args.remat, "devices": args.devices, "backend": args.backend,
                            "scanned": args.scanned, "keep_grads": args.keep_grads, "nf4_head": args.nf4_head},
               "units": "bytes per device",
               "plans": [p.as_dict() for p in plans]}
        print(json.dumps(out, indent=1))
        return 0
    print(f"{spec.name}: {spec.n_params:,} parameters ({spec.source}); {args.dtype}, {args.optimizer}, "
          f"rank {args.rank}, {args.batch} x {args.seq} tokens per device, remat {args.remat}, "
          f"{args.devices} device(s), backend {args.backend}")
    print("per device, GB = 1e9 bytes (fits: device sizes in GiB); total is not the column sum: gradients and "
          "saved activations are not alive together (see lowrank_jax.plan)\n")
    print(lp.format_table(plans, fits))
    notes = sorted({n for p in plans for n in p.notes})
    for n in notes:
        print(f"* {n}")
    return 0


_COMPARE_DEFAULTS = {
    "minilm": {"methods": ("full", "probe", "lora", "dora", "vera", "qlora", "qdora"),
               "steps": 150, "batch_size": 16, "seq_len": 48, "eval_examples": 0},
    "smollm2": {"methods": ("zeroshot", "lora", "qlora"),
                "steps": 30, "batch_size": 8, "seq_len": 40, "eval_examples": 200},
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lowrank-jax", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("example", help="fine-tune a small model with LoRA, DoRA and VeRA")
    ex.add_argument("--steps", type=int, default=100)
    ex.add_argument("--seed", type=int, default=0)
    ex.set_defaults(func=_example)

    cmp = sub.add_parser(
        "compare", help="fine-tune MiniLM (or SmolLM2) on Rotten Tomatoes with every method and compare",
        description="Fine-tune a pretrained model on Rotten Tomatoes (split by movie) with full fine-tuning, "
                    "a linear probe, LoRA, DoRA, VeRA, QLoRA and QDoRA under the same budget, data order and "
                    "seed; print a table and write results.json and compare.png to --out.")
    cmp.add_argument("--model", choices=("minilm", "smollm2"), default="minilm")
    cmp.add_argument("--methods", default=None,
                     help="comma list of full,probe,lora,dora,vera,qlora,qdora,dvora (smollm2 also: zeroshot); "
                          "default all but dvora for minilm, zeroshot,lora,qlora for smollm2")
    cmp.add_argument("--rank", type=int, default=8, help="LoRA/DoRA/QLoRA/QDoRA rank")
    cmp.add_argument("--alpha", type=float, default=None, help="LoRA/DoRA alpha (default 2*rank)")
    cmp.add_argument("--vera-rank", type=int, default=256)
    cmp.add_argument("--targets", choices=("attention", "all"), default="attention",
                     help="adapt the attention query/value kernels or every linear layer")
    cmp.add_argument("--steps", type=int, default=None, help="steps per method (default 150; smollm2 30)")
    cmp.add_argument("--batch-size", type=int, default=None, help="default 16 (smollm2 8)")
    cmp.add_argument("--seq-len", type=int, default=None, help="max tokens per example (default 48; smollm2 40)")
    cmp.add_argument("--buckets", default=None,
                     help="comma list of batch widths (one compile each); default 32,SEQ_LEN")
    cmp.add_argument("--seed", type=int, default=None, help="seed of the split, data order and inits (default 0)")
    cmp.add_argument("--seeds", default=None,
                     help="several seeds (0,1,2 or 0-7): one run per seed, then accuracy mean ± std per method")
    cmp.add_argument("--sweep", action="store_true",
                     help="with --seeds: train each method's K seeds in one vmapped, jitted step (one compile)")
    cmp.add_argument("--lr", default=None,
                     help="learning rate for every method, or per method: lora=1e-3,vera=1e-2 "
                          "(defaults: full 1e-4, probe 3e-2, lora/dora/qlora/qdora 5e-3, vera/dvora 3e-2)")
    cmp.add_argument("--eval-examples", type=int, default=None,
                     help="size of the fixed test subset, 0 = whole test split (default 0; smollm2 200)")
    cmp.add_argument("--out", default="compare_out", help="folder for results.json and compare.png")
    cmp.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    cmp.set_defaults(func=_compare)

    an = sub.add_parser(
        "analyze", help="magnitude vs direction change (ΔM, ΔD) per layer over training: FT, LoRA, DoRA",
        description="Train MiniLM on Rotten Tomatoes as `compare` does with each method; at --checkpoints "
                    "evenly spaced steps record DoRA's ΔM (mean change of output-unit norms) and ΔD (mean "
                    "1 - cos) of every adapted kernel against the pretrained weights; write analysis.json "
                    "(points, Pearson/Spearman correlations per method and kernel) and analysis.png (the "
                    "DoRA paper's Fig. 2).")
    _train_args(an, "analyze_out", "comma list of full,lora,dora,vera,dvora,qlora,qdora (default full,lora,dora)")
    an.add_argument("--checkpoints", type=int, default=6, help="evenly spaced steps at which to measure")
    an.set_defaults(func=_analyze)

    ab = sub.add_parser(
        "ablate", help="rank sweep (LoRA, DoRA) and DoRA norm detached vs differentiated, with plots",
        description="Train MiniLM on Rotten Tomatoes as `compare` does. rank: LoRA and DoRA at each of --ranks "
                    "(alpha = 2r): accuracy, trainable params, step time. detach: DoRA with the column norm "
                    "detached vs differentiated: accuracy, peak step memory, step time. Writes ablate.json, "
                    "ablate_rank.png, ablate_detach.png.")
    _train_args(ab, "ablate_out", "rank study: comma list of lora,dora,qlora,qdora (default lora,dora)")
    ab.add_argument("--study", default="rank,detach", help="comma list of rank,detach (default both)")
    ab.add_argument("--ranks", default="1,2,4,8,16,64", help="ranks of the rank study")
    ab.add_argument("--time-rounds", type=int, default=3,
                    help="after training, time every variant's step interleaved for this many rounds (0: skip)")
    ab.add_argument("--time-steps", type=int, default=10, help="steps per variant per timing round")
    ab.set_defaults(func=_ablate)

    from lowrank_jax.plan import BACKENDS, CONFIGS, DTYPES, METHODS, OPTIMIZERS, REMAT
    pl = sub.add_parser(
        "plan", help="per-device memory of a training step: full fine-tuning vs every adapter method",
        description="Print, per device, the weights, gradients, optimizer state, adapters, activations and "
                    "total of one training step for full fine-tuning and LoRA/DoRA/VeRA/QLoRA/QDoRA "
                    "(every layer kernel adapted), as a table or --json. Pure arithmetic; the formulas are "
                    "in lowrank_jax.plan, checked against XLA by benchmarks/plan_vs_xla.py.")
    pl.add_argument("--params", default=None, help="a parameter count (1e9, 8B): Llama-style shape assumed")
    pl.add_argument("--config", choices=CONFIGS, default=None,
                    help="1b TinyLlama-1.1B, 8b Llama-3-8B, 70b Llama-3-70B, smollm2 / minilm reference models")
    pl.add_argument("--hidden", type=int, default=None, help="with --params: hidden size")
    pl.add_argument("--layers", type=int, default=None, help="with --params: number of layers")
    pl.add_argument("--dtype", choices=tuple(DTYPES), default="bfloat16", help="weights and activations")
    pl.add_argument("--optimizer", choices=tuple(OPTIMIZERS), default="adam")
    pl.add_argument("--moments-dtype", choices=tuple(DTYPES), default=None,
                    help="optimizer moments (default: the trainable arrays' dtype, as optax)")
    pl.add_argument("--methods", "--method", dest="methods", default=",".join(METHODS),
                    help=f"comma list of {','.join(METHODS)} (default all)")
    pl.add_argument("--rank", type=int, default=16, help="LoRA/DoRA/QLoRA/QDoRA rank")
    pl.add_argument("--vera-rank", type=int, default=256)
    pl.add_argument("--batch", type=int, default=1, help="sequences per device")
    pl.add_argument("--seq", type=int, default=512, help="tokens per sequence")
    pl.add_argument("--remat", choices=REMAT, default="none", help="per-layer rematerialization policy")
    pl.add_argument("--scanned", action="store_true", help="layers under nn.scan (remat works on cpu then)")
    pl.add_argument("--devices", type=int, default=1, help="FSDP devices")
    pl.add_argument("--backend", choices=BACKENDS, default="cpu",
                    help="cpu: XLA:CPU as measured; gpu/tpu: no CPU-specific copies (not measured)")
    pl.add_argument("--keep-grads", action="store_true",
                    help="all gradients alive at once (global-norm clipping, accumulation)")
    pl.add_argument("--nf4-head", action="store_true", help="QLoRA/QDoRA: the LM head in NF4 too (lj.quantize)")
    pl.add_argument("--fits", default="16,24,80", help="device sizes (GiB) for the fits columns")
    pl.add_argument("--json", action="store_true", help="print JSON (bytes) instead of the table")
    pl.set_defaults(func=_plan)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
