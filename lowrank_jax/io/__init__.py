"""Adapters as files: lowrank_jax's own format, PEFT directories, and training checkpoints.

* :func:`save_adapter` / :func:`load_adapter` — a directory with ``adapter.safetensors`` (arrays) and
  ``adapter.json`` (method, layout, shapes, checksums); bitwise round trip, atomic writes.
* :class:`TrainCheckpointer` — orbax-checkpoint steps of adapter + optimizer state + PRNG state +
  method description (never the frozen base); restores onto the shardings of ``*_like`` trees.
* :mod:`lowrank_jax.io.peft` — ``save``/``load`` Hugging Face PEFT adapter directories (LoRA, rsLoRA,
  rank/alpha patterns, DoRA, VeRA) and ``merged_export`` of merged weights with Hugging Face names.

``TrainCheckpointer`` and ``peft`` are imported lazily (orbax is only needed for checkpoints).
"""

from __future__ import annotations

import importlib
from typing import Any

from lowrank_jax.io._format import register_method
from lowrank_jax.io.adapter_file import check_adapter_fits, load_adapter, read_adapter_info, save_adapter

__all__ = ["save_adapter", "load_adapter", "read_adapter_info", "check_adapter_fits", "register_method",
           "TrainCheckpointer", "peft"]


def __getattr__(name: str) -> Any:
    if name == "TrainCheckpointer":
        return importlib.import_module("lowrank_jax.io.checkpoint").TrainCheckpointer
    if name == "peft":
        return importlib.import_module("lowrank_jax.io.peft")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
