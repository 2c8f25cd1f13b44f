"""``lowrank-jax compare --seeds 0,1,2 [--sweep]``: every method over several seeds, mean ± std.

A seed fixes everything random in a ``compare`` run: the split by movie, the data order, the head and the
adapter initialisation (and VeRA/DVoRA's projections). With ``--seeds`` each seed is one complete run;
the summary reports, per method, the test accuracy's mean ± standard deviation over the seeds (sample
standard deviation, ``ddof=1``; 0 for one seed) next to each seed's value.

Two ways to run the ``K`` seeds:

* **sequential** (default): ``run_compare`` once per seed, each writing its own ``seed_<s>/`` folder.
* **sweep** (``--sweep``, "many runs, one compile"): for each method the ``K`` runs are stacked along a
  leading axis and trained by **one** ``jax.jit(jax.vmap(step))``: one compile per batch width instead of
  ``K``. Run ``k`` sees exactly seed ``k``'s batches (its own split and order; at each step the ``K``
  batches are padded with masked positions to the widest, which the masked attention and pooling ignore)
  and starts from seed ``k``'s head and adapter. Frozen leaves equal in every run (the pretrained
  encoder, an NF4 base) are shared, unbatched; those that differ (VeRA/DVoRA projections) are stacked.
  ``lj.sweep.make_sweep_step`` does the same for adapters alone; ``compare`` also trains the
  classification head (and ``full`` the whole model), so it vmaps its own step over
  ``{"adapter", "params"}``. The per-run step time is the sweep step over ``K``.

Programmatic use::

    from lowrank_jax.compare import CompareConfig
    from lowrank_jax.seeds import run_seeds
    summary = run_seeds(CompareConfig(methods=("lora",), steps=20, out="runs/s"), seeds=(0, 1, 2), sweep=True)
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["run_seeds", "summarize", "format_summary", "plot_summary", "parse_seeds"]


def parse_seeds(text: str) -> tuple[int, ...]:
    """``"0,1,2"`` or a range ``"0-7"`` → ``(0, 1, 2)`` / ``(0, …, 7)``.

    Raises:
      ValueError: not integers, empty, or a seed listed twice.
    """
    seeds: list[int] = []
    try:
        for part in text.split(","):
            part = part.strip()
            if not part:
                continue
            lo, sep, hi = part.partition("-")
            if sep and lo:
                seeds.extend(range(int(lo), int(hi) + 1))
            else:
                seeds.append(int(part))
    except ValueError:
        raise ValueError(f"--seeds: expected a comma list of integers or a range such as 0-7, got {text!r}") from None
    if not seeds:
        raise ValueError(f"--seeds: no seed in {text!r}")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds: a seed is listed twice in {text!r}")
    return tuple(seeds)


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    vals = [float(v) for v in values]
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def summarize(per_seed: Mapping[int, Sequence[Mapping[str, Any]]], methods: Sequence[str]) -> list[dict[str, Any]]:
    """Per method: accuracy mean/std/per-seed, trainable params, median step time, mean loss curve.

    ``per_seed`` maps each seed to its ``MethodResult`` dicts (a method missing for a seed — it failed — is
    left out of that method's statistics; ``n_seeds`` says how many went in).
    """
    out = []
    for name in methods:
        rows = [(s, r) for s, rs in per_seed.items() for r in rs if r["method"] == name]
        if not rows:
            continue
        accs = [r["test_accuracy"] for _, r in rows]
        mean, std = _mean_std(accs)
        curves = [r["train_loss"] for _, r in rows if r["train_loss"]]
        n = min((len(c) for c in curves), default=0)
        out.append({
            "method": name,
            "n_seeds": len(rows),
            "seeds": [s for s, _ in rows],
            "test_accuracy_mean": mean,
            "test_accuracy_std": std,
            "test_accuracies": accs,
            "trainable_params": rows[0][1]["trainable_params"],
            "trainable_percent": rows[0][1]["trainable_percent"],
            "optimizer_state_bytes": rows[0][1]["optimizer_state_bytes"],
            "frozen_bytes": rows[0][1]["frozen_bytes"],
            "peak_memory_bytes": rows[0][1]["peak_memory_bytes"],
            "step_time_s": float(statistics.median(r["step_time_s"] for _, r in rows)),
            "compile_time_s": float(sum(r["compile_time_s"] for _, r in rows)),
            "train_time_s": float(sum(r["train_time_s"] for _, r in rows)),
            "train_loss_mean": [float(np.mean([c[i] for c in curves])) for i in range(n)],
        })
    return out


def format_summary(summary: Sequence[Mapping[str, Any]], sweep: Mapping[str, Any] | None = None) -> str:
    """The summary as a fixed-width table: accuracy ``mean ± std`` over seeds and each seed's value."""
    head = ("method", "trainable", "step (median)", "compile (sum)", "train (sum)", "test acc (mean ± std)",
            "per seed")
    rows = [head]
    for r in summary:
        rows.append((
            r["method"], f"{r['trainable_params']:,}", f"{r['step_time_s']:.3f} s", f"{r['compile_time_s']:.1f} s",
            f"{r['train_time_s']:.1f} s",
            f"{100 * r['test_accuracy_mean']:.1f} ± {100 * r['test_accuracy_std']:.1f}% (n={r['n_seeds']})",
            " ".join(f"{100 * a:.1f}" for a in r["test_accuracies"]),
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = []
    for j, row in enumerate(rows):
        lines.append("  ".join(c.ljust(w) if i in (0, len(head) - 1) else c.rjust(w)
                               for i, (c, w) in enumerate(zip(row, widths))))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    if sweep:
        lines.append("sweep (all K runs in one vmapped step): " + "; ".join(
            f"{m} K={v['k']} step {v['step_time_s']:.3f} s, compile {v['compile_time_s']:.1f} s, "
            f"train {v['train_time_s']:.1f} s" for m, v in sweep.items()))
    return "\n".join(lines)


def plot_summary(results: Mapping[str, Any], path: str | Path) -> None:
    """Two panels: test accuracy (mean ± std over seeds) vs trainable parameters; mean training loss."""
    from lowrank_jax.compare import pyplot, save_figure

    plt = pyplot()

    summary = results["summary"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, r in enumerate(summary):
        n = max(r["trainable_params"], 1)
        ax1.errorbar([n], [100 * r["test_accuracy_mean"]], yerr=[100 * r["test_accuracy_std"]], fmt="o",
                     capsize=4, label=r["method"])
        ax1.annotate(r["method"], (n, 100 * r["test_accuracy_mean"]), textcoords="offset points",
                     xytext=(6, 4 if i % 2 == 0 else -12))   # alternate, so that neighbours' labels do not collide
        y = np.asarray(r["train_loss_mean"], float)
        if y.size:
            k = max(1, min(25, y.size // 10))
            ax2.plot(np.arange(k, y.size + 1), np.convolve(y, np.ones(k) / k, mode="valid"), label=r["method"])
    ax1.set_xscale("log")
    ax1.set_xlabel("trainable parameters (log scale)")
    ax1.set_ylabel("test accuracy (%), mean ± std over seeds")
    ax1.grid(True, which="both", alpha=0.3)
    ax2.set_xlabel("step")
    ax2.set_ylabel("training loss, mean over seeds (moving average)")
    ax2.grid(True, alpha=0.3)
    if summary:
        ax2.legend()
    cfg = results.get("config", {})
    save_figure(fig, path, f"{cfg.get('model', '')} on Rotten Tomatoes, seeds {cfg.get('seeds')}"
                f"{' (one vmapped sweep per method)' if cfg.get('sweep') else ''}: {cfg.get('steps', '?')} steps "
                f"× batch {cfg.get('batch_size', '?')}")


# ------------------------------------------------------------------------------------------- sweep

def _pad_stack(batches: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Stack ``K`` batches along a new leading axis, padding ``(B, W)`` arrays with zeros to the widest ``W``."""
    width = max(b["input_ids"].shape[1] for b in batches)
    out = {}
    for key in batches[0]:
        arrs = []
        for b in batches:
            a = b[key]
            if a.ndim == 2:
                a = np.pad(a, [(0, 0), (0, width - a.shape[1])])
            arrs.append(a)
        out[key] = np.stack(arrs)
    return out


def _same(xs: Sequence[Any]) -> bool:
    first = xs[0]
    if all(x is first for x in xs):
        return True
    a0 = np.asarray(first)
    return all(np.shape(x) == a0.shape and np.asarray(x).dtype == a0.dtype and np.array_equal(np.asarray(x), a0)
               for x in xs[1:])


def _sweep_method(name: str, tasks: Sequence[Any], cfgs: Sequence[Any], batches: Sequence[Sequence[Mapping]],
                  tests: Sequence[Sequence[Mapping]], total: int, progress: bool) -> tuple[list[Any], dict[str, Any]]:
    """Train the ``K`` runs of one method in one vmapped step; ``([MethodResult] * K, sweep record)``."""
    import jax
    import jax.numpy as jnp
    from tqdm.auto import tqdm

    from lowrank_jax import compare as C

    k_runs = len(tasks)
    splits = [C.split_trainable(name, t.params, c, t.head_keys) for t, c in zip(tasks, cfgs)]
    frozen_leaves, frozen_defs = zip(*(jax.tree_util.tree_flatten(f) for f, _ in splits))
    train_leaves, train_defs = zip(*(jax.tree_util.tree_flatten(t) for _, t in splits))
    if len({len(x) for x in frozen_leaves}) != 1 or len({len(x) for x in train_leaves}) != 1:
        raise ValueError(f"{name}: the runs' trees differ in structure; they cannot share one step")
    shapes = {tuple((np.shape(x), str(x.dtype)) for x in leaves) for leaves in train_leaves}
    if len(shapes) != 1:
        raise ValueError(f"{name}: the runs' trainable arrays differ in shape; they cannot share one step")
    varying = [i for i in range(len(frozen_leaves[0])) if not _same([lv[i] for lv in frozen_leaves])]
    shared = list(frozen_leaves[0])
    stacked_frozen = [jnp.stack([jnp.asarray(lv[i]) for lv in frozen_leaves]) for i in varying]
    frozen_def = frozen_defs[0]      # runs may differ in static metadata used only at init (VeRA's seed)
    train_def = train_defs[0]
    trainable = jax.tree_util.tree_unflatten(
        train_def, [jnp.stack([jnp.asarray(lv[i]) for lv in train_leaves]) for i in range(len(train_leaves[0]))])
    frozen_bytes = C.tree_bytes(splits[0][0])
    n_train = C.tree_size(splits[0][1])
    del splits, train_leaves

    def frozen_of(vary):
        leaves = list(shared)
        for i, v in zip(varying, vary):
            leaves[i] = v
        return jax.tree_util.tree_unflatten(frozen_def, leaves)

    lr = cfgs[0].learning_rate(name)
    tx = C.make_optimizer(lr, cfgs[0].steps, cfgs[0].warmup_fraction)
    one = C.step_fn(tasks[0], tx)
    opt_state = jax.vmap(tx.init)(trainable)
    opt_bytes = C.tree_bytes(opt_state) // k_runs

    def sweep_step(trainable, opt_state, vary, batch):
        return jax.vmap(lambda t, o, v, b: one(t, o, frozen_of(v), b))(trainable, opt_state, vary, batch)

    get = C.PerShape(jax.jit(sweep_step, donate_argnums=(0, 1)))
    steps = [_pad_stack([b[t] for b in batches]) for t in range(len(batches[0]))]
    mem = C.memory_stats(get(trainable, opt_state, stacked_frozen, max(steps, key=lambda b: b["input_ids"].shape[-1])))
    losses: list[np.ndarray] = []
    times: list[float] = []
    t_train = time.perf_counter()
    for batch in tqdm(steps, desc=f"{name:>6s} ×{k_runs}", disable=not progress, mininterval=2.0):
        fn = get(trainable, opt_state, stacked_frozen, batch)
        t0 = time.perf_counter()
        trainable, opt_state, loss = fn(trainable, opt_state, stacked_frozen, batch)
        loss = np.asarray(loss)
        times.append(time.perf_counter() - t0)
        losses.append(loss)
        if not np.all(np.isfinite(loss)):
            raise FloatingPointError(f"{name}: training loss became {loss.tolist()} at step {len(losses)}")
    t_train = time.perf_counter() - t_train
    curves = np.stack(losses, axis=1) if losses else np.zeros((k_runs, 0))

    predict = C.make_predict(tasks[0])
    leaves = jax.tree_util.tree_leaves(trainable)
    results = []
    step_time = float(statistics.median(times))
    for k in range(k_runs):
        run = jax.tree_util.tree_unflatten(train_defs[k], [x[k] for x in leaves])
        frozen_k = frozen_of([v[k] for v in stacked_frozen])
        acc = C.evaluate(predict, run, frozen_k, tests[k])
        results.append(C.MethodResult(
            method=name, trainable_params=n_train, trainable_percent=100.0 * n_train / total,
            optimizer_state_bytes=opt_bytes, frozen_bytes=frozen_bytes, step_time_s=step_time / k_runs,
            peak_memory_bytes=int(mem["peak"]), test_accuracy=float(acc),
            train_loss=[float(v) for v in curves[k]], learning_rate=lr, compile_time_s=get.seconds / k_runs,
            train_time_s=t_train / k_runs, memory_analysis=mem))
    record = {"k": k_runs, "step_time_s": step_time, "compile_time_s": get.seconds, "train_time_s": t_train,
              "peak_memory_bytes": int(mem["peak"]), "batch_widths": sorted({s[-1] for s in get.compiled}),
              "stacked_frozen_leaves": len(varying)}
    return results, record


def _run_sweep(cfg: Any, seeds: Sequence[int], log: Callable[[str], None]) -> tuple[dict, list, dict]:
    from lowrank_jax import compare as C

    cfgs = [dataclasses.replace(cfg, seed=s) for s in seeds]
    t0 = time.perf_counter()
    tasks, totals, batches, tests = zip(*(C.prepare(c) for c in cfgs))
    total = totals[0]
    log(f"{cfg.model}: {total:,} params; {len(seeds)} seeds {list(seeds)} as one vmapped sweep per method; "
        f"loaded in {time.perf_counter() - t0:.0f} s")
    per_seed: dict[int, list] = {s: [] for s in seeds}
    failed: list[dict] = []
    sweep: dict[str, Any] = {}
    for name in cfg.methods:
        try:
            if name == "zeroshot":        # nothing to train: evaluate each seed's test subset
                rs = [C.run_method(name, t, c, b, e, total) for t, c, b, e in zip(tasks, cfgs, batches, tests)]
            else:
                rs, sweep[name] = _sweep_method(name, tasks, cfgs, batches, tests, total, cfg.progress)
        except (KeyboardInterrupt, MemoryError):
            raise
        except Exception as e:  # a method failing must not lose the others' results
            msg = C.error_line(e)
            failed.append({"method": name, "seed": None, "error": msg})
            log(f"{name}: FAILED — {msg}")
            continue
        for s, r in zip(seeds, rs):
            per_seed[s].append(dataclasses.asdict(r))
        if name in sweep:
            v = sweep[name]
            log(f"{name}: K={v['k']} acc {' '.join(f'{100 * r.test_accuracy:.1f}' for r in rs)}  "
                f"step {v['step_time_s']:.3f} s  compile {v['compile_time_s']:.1f} s  train {v['train_time_s']:.1f} s")
    return per_seed, failed, sweep


def run_seeds(cfg: Any, seeds: Sequence[int], sweep: bool = False,
              log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run ``cfg`` (a :class:`~lowrank_jax.compare.CompareConfig`) once per seed; write the summary.

    Writes ``results.json`` (``config``, ``summary``, ``per_seed``, ``failed``, ``sweep``, ``environment``)
    and ``compare.png`` (accuracy mean ± std vs trainable parameters, mean loss curves) to ``cfg.out``;
    sequential runs also leave each seed's own ``seed_<s>/results.json`` and figure.

    Returns:
      The results dict that was written.

    Raises:
      AssetNotInstalledError: a model or data asset package is missing.
      ValueError: no seed, or a seed listed twice.
    """
    import os
    import platform

    import jax

    from lowrank_jax.compare import format_table, run_compare

    seeds = tuple(int(s) for s in seeds)
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct integers, got {list(seeds)}")
    t_start = time.perf_counter()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if sweep:
        per_seed, failed, sweep_info = _run_sweep(cfg, seeds, log)
    else:
        per_seed, failed, sweep_info = {}, [], {}
        for s in seeds:
            log(f"--- seed {s}")
            res = run_compare(dataclasses.replace(cfg, seed=s, out=str(out / f"seed_{s}")), log=log)
            per_seed[s] = res["methods"]
            failed.extend({**f, "seed": s} for f in res["failed"])
    summary = summarize(per_seed, cfg.methods)
    config = {**cfg.to_json(), "seeds": list(seeds), "sweep": bool(sweep)}
    del config["seed"]
    results = {
        "config": config,
        "summary": summary,
        "per_seed": {str(s): rs for s, rs in per_seed.items()},
        "failed": failed,
        "sweep": sweep_info,
        "environment": {"jax": jax.__version__, "backend": jax.default_backend(), "device": str(jax.devices()[0]),
                        "cpu_count": os.cpu_count(), "machine": platform.machine()},
        "runtime_s": time.perf_counter() - t_start,
    }
    (out / "results.json").write_text(json.dumps(results, indent=1, allow_nan=False))
    plot_summary(results, out / "compare.png")
    if sweep:
        for s in seeds:
            log(f"\nseed {s}:\n" + format_table(per_seed[s]))
    log("")
    log(format_summary(summary, sweep_info))
    log(f"\nwrote {out / 'results.json'} and {out / 'compare.png'} ({results['runtime_s']:.0f} s)")
    return results
