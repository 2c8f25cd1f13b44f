"""``lowrank-jax analyze``: how full fine-tuning, LoRA and DoRA move the weights (DoRA paper, Fig. 2).

Each method is trained as in ``lowrank-jax compare`` (same batches, learning rates, head); at
``checkpoints`` evenly spaced steps the magnitude and direction change of every adapted kernel
(the attention query/value kernels of each layer) against the pretrained ``W0`` is recorded with
:mod:`lowrank_jax.analysis`::

    ΔM = (1/N) Σ_n | ‖W_n‖ − ‖W0_n‖ |          ΔD = (1/N) Σ_n (1 − cos(W_n, W0_n))

over the ``N`` output units (``magnitude_direction_tree`` for full fine-tuning,
``magnitude_direction_adapter`` for adapters: ``W = merge(frozen, adapter)``, ``W0`` the frozen kernel —
the dequantized NF4 kernel for QLoRA/QDoRA).

The figure puts ΔD on x and ΔM on y, one panel per method and kernel (query, value), one point per
(layer, checkpoint), coloured by step, with the least-squares line. Liu et al. (2024) report a
negative ΔD–ΔM slope for full fine-tuning and DoRA and a positive one for LoRA. ``analysis.json``
gives, per method and kernel (and both kernels pooled):

* ``pearson`` / ``spearman`` / ``slope`` over all (layer, checkpoint) points — this mixes the growth of
  both quantities over training (which pushes towards a positive correlation) with their trade-off;
* ``within_checkpoint_pearson``: the correlation across layers at each checkpoint (``null`` where
  undefined, e.g. every point equal), and its mean — the trade-off at a fixed amount of training.

Programmatic use::

    from lowrank_jax.analyze import run_analyze
    from lowrank_jax.compare import CompareConfig
    res = run_analyze(CompareConfig(methods=("full", "lora", "dora"), steps=150, out="runs/md"), checkpoints=6)
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["ANALYZE_METHODS", "checkpoint_steps", "correlations", "plot_analysis", "run_analyze"]

ANALYZE_METHODS: tuple[str, ...] = ("full", "lora", "dora", "vera", "dvora", "qlora", "qdora")
"""Methods that change the adapted kernels (``probe``/``zeroshot`` do not)."""

_PATH = re.compile(r".*?layers?_(\d+)/(?:.*/)?([^/]+)/kernel$")


def checkpoint_steps(steps: int, checkpoints: int) -> list[int]:
    """``checkpoints`` evenly spaced steps in ``1..steps`` ending at ``steps`` (fewer if ``steps`` is small)."""
    if checkpoints < 1 or steps < 1:
        raise ValueError(f"need steps >= 1 and checkpoints >= 1, got {steps}, {checkpoints}")
    return sorted({max(1, int(round(steps * (i + 1) / checkpoints))) for i in range(checkpoints)})


def _kernel_of(path: str) -> tuple[int, str]:
    """``(layer, kernel name)`` of ``.../layer_3/attention/self/query/kernel`` → ``(3, "query")``."""
    m = _PATH.match(path)
    if not m:
        raise ValueError(f"cannot read a layer index and kernel name from {path!r}")
    return int(m.group(1)), m.group(2)


def _finite_or_none(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    if x.size < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan
    return float(np.corrcoef(x, y)[0, 1])


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks with ties averaged (for Spearman's ρ)."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(x.size, float)
    ranks[order] = np.arange(x.size, dtype=float)
    for v in np.unique(x):
        tie = x == v
        if tie.sum() > 1:
            ranks[tie] = ranks[tie].mean()
    return ranks


def correlations(points: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Correlation of ΔD and ΔM over ``points`` (dicts with ``step``, ``delta_d``, ``delta_m``).

    Returns ``{"n", "pearson", "spearman", "slope", "within_checkpoint_pearson": {step: r | None},
    "within_checkpoint_pearson_mean"}``; undefined values (fewer than 3 points, a constant coordinate)
    are ``None``.
    """
    d = np.asarray([p["delta_d"] for p in points], float)
    m = np.asarray([p["delta_m"] for p in points], float)
    slope = float(np.polyfit(d, m, 1)[0]) if d.size >= 2 and np.ptp(d) > 0 else math.nan
    within = {}
    for step in sorted({p["step"] for p in points}):
        sel = np.asarray([p["step"] == step for p in points])
        within[str(step)] = _finite_or_none(_pearson(d[sel], m[sel]))
    defined = [v for v in within.values() if v is not None]
    return {
        "n": int(d.size),
        "pearson": _finite_or_none(_pearson(d, m)),
        "spearman": _finite_or_none(_pearson(_ranks(d), _ranks(m))) if d.size else None,
        "slope": _finite_or_none(slope),
        "within_checkpoint_pearson": within,
        "within_checkpoint_pearson_mean": float(np.mean(defined)) if defined else None,
    }


def _record(name: str, step: int, trainable: Any, frozen: Any, params0: Any, target: str) -> list[dict[str, Any]]:
    import lowrank_jax as lj

    if name == "full":
        md = lj.analysis.magnitude_direction_tree(params0, trainable["params"], target)
    else:
        md = lj.analysis.magnitude_direction_adapter(frozen, trainable["adapter"])
    out = []
    for path, v in sorted(md.items()):
        layer, kernel = _kernel_of(path)
        out.append({"step": step, "layer": layer, "kernel": kernel, "path": path,
                    "delta_m": float(v.delta_m), "delta_d": float(v.delta_d)})
    return out


def plot_analysis(results: Mapping[str, Any], path: str | Path) -> None:
    """ΔD (x) vs ΔM (y), one panel per method (columns) and kernel (rows); colour = step, marker = layer."""
    from lowrank_jax.compare import pyplot, save_figure

    plt = pyplot()

    methods = [m for m in results["methods"] if m.get("points")]
    kernels = sorted({p["kernel"] for m in methods for p in m["points"]})
    steps = results["checkpoints"]
    markers = "osD^v<>pPX*h"
    fig, axes = plt.subplots(max(len(kernels), 1), max(len(methods), 1), squeeze=False,
                             figsize=(4.2 * max(len(methods), 1), 3.6 * max(len(kernels), 1)))
    cmap = plt.get_cmap("viridis")
    for j, m in enumerate(methods):
        for i, kern in enumerate(kernels):
            ax = axes[i][j]
            pts = [p for p in m["points"] if p["kernel"] == kern]
            for p in pts:
                c = cmap(steps.index(p["step"]) / max(len(steps) - 1, 1))
                ax.scatter(p["delta_d"], p["delta_m"], color=c, marker=markers[p["layer"] % len(markers)], s=30)
            d = np.asarray([p["delta_d"] for p in pts])
            mm = np.asarray([p["delta_m"] for p in pts])
            corr = m["correlation"].get(kern, {})
            if d.size >= 2 and np.ptp(d) > 0:
                k, b = np.polyfit(d, mm, 1)
                xs = np.linspace(d.min(), d.max(), 10)
                ax.plot(xs, k * xs + b, "k--", lw=1)
            r = corr.get("pearson")
            w = corr.get("within_checkpoint_pearson_mean")
            ax.set_title(f"{m['label']} ({kern})\nr = {'n/a' if r is None else f'{r:+.2f}'}, "
                         f"within-step r = {'n/a' if w is None else f'{w:+.2f}'}", fontsize=9)
            ax.ticklabel_format(axis="both", style="sci", scilimits=(-2, 3))
            ax.grid(True, alpha=0.3)
            if i == len(kernels) - 1:
                ax.set_xlabel("ΔD (mean 1 − cos)")
            if j == 0:
                ax.set_ylabel("ΔM (mean |Δ‖W_n‖|)")
    layers = sorted({p["layer"] for m in methods for p in m["points"]})
    handles = [plt.Line2D([], [], color="gray", marker=markers[li % len(markers)], ls="", label=f"layer {li}")
               for li in layers]
    handles += [plt.Line2D([], [], color=cmap(i / max(len(steps) - 1, 1)), marker="o", ls="", label=f"step {s}")
                for i, s in enumerate(steps)]
    fig.legend(handles=handles, loc="center right", fontsize=8)
    cfg = results.get("config", {})
    save_figure(fig, path, f"magnitude vs direction change: {cfg.get('model', '')} on Rotten Tomatoes, "
                f"{cfg.get('steps', '?')} steps, rank {cfg.get('rank', '?')}", dpi=90, rect=(0, 0, 0.88, 1),
                title_size=11)


_LABEL = {"full": "FT", "lora": "LoRA", "dora": "DoRA", "vera": "VeRA", "dvora": "DVoRA", "qlora": "QLoRA",
          "qdora": "QDoRA"}


def run_analyze(cfg: Any, checkpoints: int = 6, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train each method of ``cfg`` (a :class:`~lowrank_jax.compare.CompareConfig`), recording (ΔD, ΔM) per
    adapted kernel at ``checkpoints`` steps; write ``analysis.json`` and ``analysis.png`` to ``cfg.out``.

    Full fine-tuning is measured on the kernels the adapters target (``cfg.targets``).

    Returns:
      ``{"config", "checkpoints", "methods": [{"method", "label", "points", "correlation": {kernel |
      "all": ...}, "test_accuracy", "train_loss", ...}], "failed", "environment"}``.

    Raises:
      ValueError: a method that does not change the kernels (``probe``, ``zeroshot``).
      AssetNotInstalledError: a model or data asset package is missing.
    """
    import jax

    from lowrank_jax import compare as C

    bad = [m for m in cfg.methods if m not in ANALYZE_METHODS]
    if bad:
        raise ValueError(f"analyze: method(s) {bad} do not change the adapted kernels; choose from "
                         f"{', '.join(ANALYZE_METHODS)}")
    steps_at = checkpoint_steps(cfg.steps, checkpoints)
    t_start = time.perf_counter()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    task, total, batches, tests = C.prepare(cfg)
    target = C.TARGETS[cfg.model][cfg.targets]
    log(f"{cfg.model}: {total:,} params; {cfg.steps} steps × batch {cfg.batch_size}; (ΔD, ΔM) of {target} "
        f"at steps {steps_at}")
    results: dict[str, Any] = {
        "config": {**cfg.to_json(), "checkpoints": checkpoints, "total_params": total},
        "checkpoints": steps_at, "methods": [], "failed": [],
        "environment": {"jax": jax.__version__, "backend": jax.default_backend(), "cpu_count": os.cpu_count(),
                        "machine": platform.machine()},
    }
    for name in cfg.methods:
        points: list[dict[str, Any]] = []
        t_md = 0.0

        def on_step(step, trainable, frozen, name=name, points=points):
            nonlocal t_md
            if step in steps_at:
                t0 = time.perf_counter()
                points.extend(_record(name, step, trainable, frozen, task.params, target))
                t_md += time.perf_counter() - t0

        try:
            r = C.run_method(name, task, cfg, batches, tests, total, on_step=on_step)
        except (KeyboardInterrupt, MemoryError):
            raise
        except Exception as e:  # a method failing must not lose the others' results
            msg = C.error_line(e)
            results["failed"].append({"method": name, "error": msg})
            log(f"{name}: FAILED — {msg}")
            continue
        kernels = sorted({p["kernel"] for p in points})
        corr = {k: correlations([p for p in points if p["kernel"] == k]) for k in kernels}
        corr["all"] = correlations(points)
        results["methods"].append({
            "method": name, "label": _LABEL.get(name, name), "points": points, "correlation": corr,
            "test_accuracy": r.test_accuracy, "trainable_params": r.trainable_params,
            "learning_rate": r.learning_rate, "step_time_s": r.step_time_s, "train_time_s": r.train_time_s,
            "analysis_time_s": t_md, "train_loss": r.train_loss,
        })
        log(f"{name}: acc {100 * r.test_accuracy:.1f}%  "
            + "  ".join(f"{k}: r={_fmt(c['pearson'])} within-step r={_fmt(c['within_checkpoint_pearson_mean'])}"
                        for k, c in corr.items())
            + f"  (train {r.train_time_s:.0f} s, analysis {t_md:.1f} s)")
    results["runtime_s"] = time.perf_counter() - t_start
    (out / "analysis.json").write_text(json.dumps(results, indent=1, allow_nan=False))
    plot_analysis(results, out / "analysis.png")
    log("")
    log(format_correlations(results))
    log(f"\nwrote {out / 'analysis.json'} and {out / 'analysis.png'} ({results['runtime_s']:.0f} s)")
    return results


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:+.2f}"


def format_correlations(results: Mapping[str, Any]) -> str:
    """One line per method and kernel: Pearson, Spearman, slope over all points; mean within-step Pearson."""
    lines = ["method  kernel  n    pearson  spearman  slope      within-step pearson (mean)"]
    for m in results["methods"]:
        for k, c in m["correlation"].items():
            slope = "n/a" if c["slope"] is None else f"{c['slope']:+.3g}"
            lines.append(f"{m['label']:<7} {k:<7} {c['n']:<4} {_fmt(c['pearson']):>7}  {_fmt(c['spearman']):>8}  "
                         f"{slope:<10} {_fmt(c['within_checkpoint_pearson_mean'])}")
    return "\n".join(lines)

