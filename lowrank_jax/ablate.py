"""``lowrank-jax ablate``: the ablations of the LoRA/DoRA papers on the ``compare`` task.

Every run trains like ``lowrank-jax compare`` (same model, batches, head, learning rates, budget):

* ``rank``: LoRA and DoRA (``--methods``) at each rank of ``--ranks`` (default 1, 2, 4, 8, 16, 64), with
  ``alpha = 2r`` (so the scale ``s = alpha / r = 2`` is the same at every rank) unless ``--alpha`` fixes it:
  test accuracy, trainable parameters, median step time, compiled step's peak memory.
* ``detach``: DoRA with the column norm ``‖W0 + s·A@B‖_col`` detached from the backward (the paper's
  §4.3 and PEFT's default) vs differentiated: test accuracy, peak step memory (XLA ``memory_analysis``),
  median step time.

Writes ``ablate.json`` and one figure per study (``ablate_rank.png``, ``ablate_detach.png``) to ``--out``.

**Step time.** Each run's median training-step time (``step_time_s``) moves with whatever else the machine
does while that run trains. After training, every variant's compiled step is therefore timed again,
**interleaved** (``time_rounds`` rounds; in each, ``time_steps`` steps of every variant on the widest
training batch, the order rotated each round): ``step_time_interleaved_s`` is the median over rounds, and
``step_time_ratio`` the median over rounds of the per-round ratio to the study's reference (LoRA, or the
first method, at ``cfg.rank`` in the rank study; the detached norm in the detach study). The figures plot
the interleaved times.

Programmatic use::

    from lowrank_jax.ablate import run_ablate
    from lowrank_jax.compare import CompareConfig
    res = run_ablate(CompareConfig(steps=150, out="runs/ablate"), studies=("rank",), ranks=(1, 8, 64))
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["STUDIES", "RANKS", "run_ablate", "plot_rank", "plot_detach", "format_rows"]

STUDIES: tuple[str, ...] = ("rank", "detach")
RANKS: tuple[int, ...] = (1, 2, 4, 8, 16, 64)
RANK_METHODS: tuple[str, ...] = ("lora", "dora", "qlora", "qdora")
"""Methods whose rank the rank study may sweep."""


def _row(r: Any, **extra: Any) -> dict[str, Any]:
    return {**extra, "method": r.method, "test_accuracy": r.test_accuracy, "trainable_params": r.trainable_params,
            "step_time_s": r.step_time_s, "peak_memory_bytes": r.peak_memory_bytes,
            "temp_bytes": int(r.memory_analysis.get("temp", 0)), "compile_time_s": r.compile_time_s,
            "train_time_s": r.train_time_s, "final_loss": r.train_loss[-1] if r.train_loss else None,
            "learning_rate": r.learning_rate}


def format_rows(rows: Sequence[Mapping[str, Any]], key: str) -> str:
    """A fixed-width table of one study's rows (``key``: the varied setting's column)."""
    head = (key, "method", "trainable", "step (in training)", "step (interleaved)", "ratio", "peak step mem", "temp",
            "test acc")
    out = [head]
    for r in rows:
        timed = r.get("step_time_interleaved_s")
        out.append((str(r[key]), r["method"], f"{r['trainable_params']:,}", f"{r['step_time_s']:.3f} s",
                    "-" if timed is None else f"{timed:.3f} s",
                    "-" if timed is None else f"{r['step_time_ratio']:.2f}",
                    f"{r['peak_memory_bytes'] / 2**20:.1f} MiB", f"{r['temp_bytes'] / 2**20:.1f} MiB",
                    f"{100 * r['test_accuracy']:.1f}%"))
    widths = [max(len(row[i]) for row in out) for i in range(len(head))]
    lines = []
    for j, row in enumerate(out):
        lines.append("  ".join(c.rjust(w) if i >= 2 else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def plot_rank(results: Mapping[str, Any], path: str | Path) -> None:
    """Accuracy, trainable parameters and step time against the rank (log₂ x), one line per method."""
    from lowrank_jax.compare import pyplot, save_figure

    plt = pyplot()
    rows = results["rank"]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    timed = "step_time_interleaved_s" if all("step_time_interleaved_s" in r for r in rows) else "step_time_s"
    panels = (("test_accuracy", "test accuracy (%)", 100.0, False), ("trainable_params", "trainable parameters",
              1.0, True), (timed, "step time (s)" + (", interleaved" if timed != "step_time_s" else ""), 1.0, False))
    for ax, (key, label, scale, logy) in zip(axes, panels):
        for method in dict.fromkeys(r["method"] for r in rows):
            pts = sorted((r["rank"], scale * r[key]) for r in rows if r["method"] == method)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=method)
        ax.set_xscale("log", base=2)
        if logy:
            ax.set_yscale("log")
        ax.set_xlabel("rank r")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    cfg = results.get("config", {})
    save_figure(fig, path, f"rank sweep ({cfg.get('model', '')}, {cfg.get('targets', '')} q/v, α = 2r, "
                f"{cfg.get('steps', '?')} steps × {cfg.get('batch_size', '?')})", dpi=90)


def plot_detach(results: Mapping[str, Any], path: str | Path) -> None:
    """Three bar panels (accuracy, peak step memory, step time): DoRA norm detached vs differentiated."""
    from lowrank_jax.compare import pyplot, save_figure

    plt = pyplot()
    rows = results["detach"]
    labels = ["detached" if r["detach_norm"] else "differentiated" for r in rows]
    timed = "step_time_interleaved_s" if all("step_time_interleaved_s" in r for r in rows) else "step_time_s"
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    for ax, (key, label, scale) in zip(axes, (("test_accuracy", "test accuracy (%)", 100.0),
                                              ("peak_memory_bytes", "peak step memory (MiB)", 2.0 ** -20),
                                              (timed, "step time (s)" + (", interleaved" if timed != "step_time_s"
                                                                         else ""), 1.0))):
        vals = [scale * r[key] for r in rows]
        bars = ax.bar(labels, vals, color=["tab:blue", "tab:orange"][:len(vals)])
        for b, v in zip(bars, vals):
            ax.annotate(f"{v:.4g}", (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom", fontsize=9)
        if key == "test_accuracy" and vals:
            ax.set_ylim(max(0.0, min(vals) - 5), min(100.0, max(vals) + 3))
        ax.set_ylabel(label)
        ax.grid(True, axis="y", alpha=0.3)
    cfg = results.get("config", {})
    save_figure(fig, path, f"DoRA r={cfg.get('rank', '?')}: column norm detached vs differentiated "
                f"({cfg.get('steps', '?')} steps)", dpi=90)


def time_interleaved(task: Any, variants: Sequence[tuple[str, Any]], batch: Mapping[str, Any], rounds: int,
                     steps: int, reference: int = 0) -> list[dict[str, float]]:
    """Time the training step of each ``(method name, CompareConfig)`` variant, interleaved.

    Returns, per variant, ``{"step_time_interleaved_s": median over rounds of the mean step time,
    "step_time_ratio": median over rounds of (this variant / variant ``reference``) in the same round}``.
    """
    import statistics

    import jax

    from lowrank_jax import compare as C

    states = []
    for name, c in variants:
        frozen, trainable = C.split_trainable(name, task.params, c, task.head_keys)
        tx = C.make_optimizer(c.learning_rate(name), c.steps, c.warmup_fraction)
        opt_state = tx.init(trainable)
        fn = C.make_step(task, tx).lower(trainable, opt_state, frozen, batch).compile()
        trainable, opt_state, loss = fn(trainable, opt_state, frozen, batch)     # warm-up
        jax.block_until_ready(loss)
        states.append([fn, trainable, opt_state, frozen])
    per_round: list[list[float]] = []
    for r in range(rounds):
        times = [0.0] * len(states)
        for i in [(j + r) % len(states) for j in range(len(states))]:
            fn, trainable, opt_state, frozen = states[i]
            t0 = time.perf_counter()
            for _ in range(steps):
                trainable, opt_state, loss = fn(trainable, opt_state, frozen, batch)
            jax.block_until_ready(loss)
            times[i] = (time.perf_counter() - t0) / steps
            states[i][1:3] = [trainable, opt_state]
        per_round.append(times)
    return [{"step_time_interleaved_s": float(statistics.median(t[i] for t in per_round)),
             "step_time_ratio": float(statistics.median(t[i] / t[reference] for t in per_round))}
            for i in range(len(states))]


def run_ablate(cfg: Any, studies: Sequence[str] = STUDIES, ranks: Sequence[int] = RANKS,
               rank_methods: Sequence[str] = ("lora", "dora"), time_rounds: int = 3, time_steps: int = 10,
               log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the ``studies`` with the training settings of ``cfg`` (a :class:`~lowrank_jax.compare.CompareConfig`;
    its ``methods`` are ignored); write ``ablate.json`` and the figures to ``cfg.out``. ``time_rounds = 0``
    skips the interleaved timing (see the module docstring).

    Returns:
      ``{"config", "rank": [rows], "detach": [rows], "failed", "environment"}``; a row has the varied
      setting (``rank`` / ``detach_norm``), ``method``, ``test_accuracy``, ``trainable_params``,
      ``step_time_s``, ``peak_memory_bytes``, ``temp_bytes``, ``compile_time_s``, ``final_loss`` and, with
      ``time_rounds``, ``step_time_interleaved_s`` and ``step_time_ratio``.

    Raises:
      ValueError: an unknown study, a bad rank or a method the rank study cannot sweep.
      AssetNotInstalledError: a model or data asset package is missing.
    """
    import jax

    from lowrank_jax import compare as C

    studies = tuple(studies)
    unknown = [s for s in studies if s not in STUDIES]
    if unknown or not studies:
        raise ValueError(f"unknown study {unknown or studies}; choose from {', '.join(STUDIES)}")
    ranks = tuple(int(r) for r in ranks)
    if not ranks or any(r <= 0 for r in ranks):
        raise ValueError(f"ranks must be positive integers, got {list(ranks)}")
    bad = [m for m in rank_methods if m not in RANK_METHODS]
    if bad:
        raise ValueError(f"the rank study sweeps {', '.join(RANK_METHODS)}, not {bad}")
    if time_rounds < 0 or time_steps < 1:
        raise ValueError(f"need time_rounds >= 0 and time_steps >= 1, got {time_rounds}, {time_steps}")
    t_start = time.perf_counter()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    task, total, batches, tests = C.prepare(cfg)
    n_test = int(sum(b["valid"].sum() for b in tests))
    log(f"{cfg.model}: {total:,} params; {cfg.steps} steps × batch {cfg.batch_size}; evaluating on {n_test:,}")
    results: dict[str, Any] = {
        "config": {**cfg.to_json(), "studies": list(studies), "ranks": list(ranks),
                   "rank_methods": list(rank_methods), "test_examples": n_test, "total_params": total,
                   "time_rounds": time_rounds, "time_steps": time_steps},
        "rank": [], "detach": [], "failed": [],
        "environment": {"jax": jax.__version__, "backend": jax.default_backend(), "cpu_count": os.cpu_count(),
                        "machine": platform.machine()},
    }
    del results["config"]["methods"]

    variants: dict[str, list[tuple[str, Any]]] = {"rank": [], "detach": []}

    def attempt(study: str, name: str, variant: Any, **setting: Any) -> None:
        try:
            r = C.run_method(name, task, variant, batches, tests, total)
        except (KeyboardInterrupt, MemoryError):
            raise
        except Exception as e:  # one failing run must not lose the others
            msg = C.error_line(e)
            results["failed"].append({"study": study, "method": name, **setting, "error": msg})
            log(f"{study} {name} {setting}: FAILED — {msg}")
            return
        results[study].append(_row(r, **setting))
        variants[study].append((name, variant))
        log(f"{study} {name} {setting}: acc {100 * r.test_accuracy:.1f}%  trainable {r.trainable_params:,}  "
            f"step {r.step_time_s:.3f} s  peak {r.peak_memory_bytes / 2**20:.1f} MiB")

    if "rank" in studies:
        for name in rank_methods:
            for rank in ranks:
                attempt("rank", name, dataclasses.replace(cfg, rank=rank), rank=rank)
    if "detach" in studies:
        for detach in (True, False):
            attempt("detach", "dora", dataclasses.replace(cfg, detach_norm=detach), detach_norm=detach)
    if time_rounds:
        widest = max(batches, key=lambda b: b["input_ids"].shape[1])
        for study, rows in ((s, results[s]) for s in STUDIES):
            if not rows:
                continue
            ref = 0
            if study == "rank":
                ref = next((i for i, r in enumerate(rows)
                            if r["rank"] == cfg.rank and r["method"] == rows[0]["method"]), 0)
            log(f"timing the {len(rows)} {study} variants interleaved ({time_rounds} rounds × {time_steps} steps)")
            for row, t in zip(rows, time_interleaved(task, variants[study], widest, time_rounds, time_steps, ref)):
                row.update(t)
    results["runtime_s"] = time.perf_counter() - t_start
    (out / "ablate.json").write_text(json.dumps(results, indent=1, allow_nan=False))
    if results["rank"]:
        plot_rank(results, out / "ablate_rank.png")
        log("\n" + format_rows(results["rank"], "rank"))
    if results["detach"]:
        plot_detach(results, out / "ablate_detach.png")
        log("\n" + format_rows(results["detach"], "detach_norm"))
    log(f"\nwrote {out / 'ablate.json'} and the figures ({results['runtime_s']:.0f} s)")
    return results
