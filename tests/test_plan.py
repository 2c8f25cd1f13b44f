"""lowrank_jax.plan and ``lowrank-jax plan``: byte counts against independent arithmetic and the real trees."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowrank_jax as lj
from lowrank_jax import cli
from lowrank_jax import plan as lp
from lowrank_jax.models.llama import LlamaConfig, LlamaForCausalLM

ALL_LINEARS = r".*/(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)/kernel"
TINY = dict(vocab=96, hidden=48, intermediate=80, layers=2, heads=4, kv_heads=2, head_dim=12, tied=False)


def _tiny_llama():
    cfg = LlamaConfig(vocab_size=TINY["vocab"], hidden_size=TINY["hidden"], intermediate_size=TINY["intermediate"],
                      num_hidden_layers=TINY["layers"], num_attention_heads=TINY["heads"],
                      num_key_value_heads=TINY["kv_heads"], head_dim=TINY["head_dim"], tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    params = model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    spec = lp.llama_spec("tiny", source="test", **TINY)
    return model, params, spec


def _nbytes(tree) -> int:
    return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(tree))


# ------------------------------------------------------------------------------------- the headline numbers

def test_one_billion_fp32_adam_full_is_4_4_8_gb():
    [p] = lp.plan(1e9, ["full"], dtype="float32", optimizer="adam")
    assert (p.weights, p.gradients, p.optimizer_state, p.adapters) == (4 * 10**9, 4 * 10**9, 8 * 10**9, 0)
    assert p.trainable_params == 10**9
    # total: weights + Adam state + what the backward holds (activations + the largest tensor's update)
    assert p.total == p.weights + p.optimizer_state + p.activations + p.update + p.backend_extra


def test_optimizers_and_dtypes_scale_as_documented():
    full = {o: lp.plan(1e9, ["full"], dtype="bfloat16", optimizer=o)[0] for o in ("adam", "adamw", "sgd")}
    assert full["adam"].weights == full["adam"].gradients == 2 * 10**9
    # two moments in the trainables' dtype, as optax keeps them; float32 on request
    assert full["adam"].optimizer_state == full["adamw"].optimizer_state == 4 * 10**9
    assert lp.plan(1e9, ["full"], dtype="bfloat16", moments_dtype="float32")[0].optimizer_state == 8 * 10**9
    assert full["sgd"].optimizer_state == 0
    # adapters are float32 whatever the base dtype: 4 B each, 8 B of Adam state each
    lora = lp.plan(1e9, ["lora"], dtype="bfloat16")[0]
    assert lora.optimizer_state == 2 * lora.adapters == 8 * lora.trainable_params


@pytest.mark.parametrize("name,count", [("1b", 1_100_048_384), ("8b", 8_030_261_248), ("70b", 70_553_706_496),
                                        ("smollm2", 134_515_008), ("minilm", 22_566_146)])
def test_config_parameter_counts(name, count):
    # published totals: TinyLlama-1.1B, Llama-3-8B, Llama-3-70B, SmolLM2-135M; MiniLM-L6 + 2-way head (README)
    assert lp.model_spec(name).n_params == count


@pytest.mark.parametrize("name", ["1b", "smollm2", "minilm"])
def test_config_counts_match_the_reference_models(name):
    spec = lp.model_spec(name)
    if spec.family == "bert":
        from lowrank_jax.models.bert import BertClassifier, BertConfig
        model = BertClassifier(BertConfig(), num_labels=2)
    else:
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=spec.vocab, hidden_size=spec.hidden, intermediate_size=spec.intermediate,
            num_hidden_layers=spec.n_layers, num_attention_heads=spec.n_heads, num_key_value_heads=spec.n_kv_heads,
            head_dim=spec.head_dim, tie_word_embeddings=spec.tied_embeddings))
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 2), jnp.int32))["params"])
    assert sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(shapes)) == spec.n_params


def test_params_spec_keeps_the_count_exact():
    for n in (1e6, 1e9, 7e9, 7e10):
        spec = lp.params_spec(n)
        assert spec.n_params == int(n) and spec.other_params >= 0
    with pytest.raises(ValueError, match="--params"):
        lp.params_spec(1e4, hidden=1024)


# ------------------------------------------------------------------------------------- against the real trees

@pytest.mark.parametrize("method,make", [
    ("lora", lambda: lj.LoRA(rank=4, targets=ALL_LINEARS)),
    ("dora", lambda: lj.DoRA(rank=4, targets=ALL_LINEARS)),
    ("vera", lambda: lj.VeRA(rank=8, targets=ALL_LINEARS)),
    ("qlora", lambda: lj.LoRA(rank=4, targets=ALL_LINEARS, quant=lj.NF4())),
    ("qdora", lambda: lj.DoRA(rank=4, targets=ALL_LINEARS, quant=lj.NF4())),
])
def test_trainable_and_frozen_bytes_match_lj_init(method, make):
    model, params, spec = _tiny_llama()
    m = make()
    frozen, adapter = lj.init(m, params, jax.random.key(1))
    [p] = lp.plan(spec, [method], dtype="float32", rank=4, vera_rank=8)
    flat = {"/".join(str(getattr(k, "key", k)) for k in path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
    expected = sum(lj.expected_count(m, leaf.shape) for path, leaf in flat.items()
                   if path.rsplit("/", 2)[-2] in {l.name for l in spec.linears})
    assert p.trainable_params == lj.count_params(adapter) == expected
    assert p.adapters == p.gradients == 4 * expected
    assert p.optimizer_state == 8 * expected
    assert p.weights == _nbytes(frozen)          # base (NF4 where quantized) + DoRA norm cache / VeRA projections


def test_nf4_bytes_match_the_stored_arrays():
    from lowrank_jax.quant import nf4

    for shape in ((64, 64), (48, 80), (33, 7), (256, 300)):
        w = jax.random.normal(jax.random.key(0), shape)
        for dq in (True, False):
            q = nf4.quantize(w, block_size=64, double_quant=dq)
            assert lp.nf4_bytes(math.prod(shape), 64, dq) == q.nbytes
    # ~4.127 bits/weight with double quantization, 4.5 without
    assert 8 * lp.nf4_bytes(2**24) / 2**24 == pytest.approx(4.127, abs=1e-3)
    assert 8 * lp.nf4_bytes(2**24, double_quant=False) / 2**24 == 4.5


def test_nf4_head_matches_lj_quantize():
    model, params, spec = _tiny_llama()
    base = lj.quantize(params, lj.NF4())
    frozen, _ = lj.init(lj.LoRA(rank=4, targets=ALL_LINEARS), base, jax.random.key(1))
    [p] = lp.plan(spec, ["qlora"], dtype="float32", rank=4, nf4_head=True)
    assert p.weights == _nbytes(frozen)


# ------------------------------------------------------------------------------------- structure of the terms

def test_fsdp_divides_states_not_activations():
    one, eight = (lp.plan("8b", ["full", "lora"], dtype="float32", devices=d) for d in (1, 8))
    for a, b in zip(one, eight):
        assert b.weights == -(-a.weights // 8) and b.optimizer_state == -(-a.optimizer_state // 8)
        assert b.gradients == -(-a.gradients // 8)
        assert b.activations <= a.activations      # per-device batch: only backend fusion counts differ
        assert b.backend_extra > 0                 # gathered weights kept from forward to backward


def test_backends_remat_and_options_order_the_totals():
    cpu = lp.plan("1b", dtype="bfloat16", backend="cpu")
    gpu = lp.plan("1b", dtype="bfloat16", backend="gpu")
    assert all(g.total < c.total for g, c in zip(gpu, cpu))
    none = lp.plan("8b", ["lora"], backend="gpu", remat="none")[0]
    lin = lp.plan("8b", ["lora"], backend="gpu", remat="linear_outputs")[0]
    full = lp.plan("8b", ["lora"], backend="gpu", remat="full")[0]
    assert full.activations < lin.activations < none.activations
    # XLA:CPU, unrolled layers: remat is CSE'd away -> planned as none, with a note
    cpu_full = lp.plan("8b", ["lora"], backend="cpu", remat="full")[0]
    assert cpu_full.activations == lp.plan("8b", ["lora"], backend="cpu")[0].activations and cpu_full.notes
    assert lp.plan("8b", ["lora"], backend="cpu", remat="full", scanned=True)[0].activations < cpu_full.activations
    kept = lp.plan("8b", ["full"], keep_grads=True)[0]
    assert kept.total >= lp.plan("8b", ["full"])[0].total
    fixed = lp.plan("8b", ["lora"], devices=8, frozen_dot_fix=True)[0]
    assert fixed.total < lp.plan("8b", ["lora"], devices=8)[0].total


def test_activation_formula_by_hand():
    # one TinyLlama layer, fp32, 512 tokens, XLA:CPU, one device, full fine-tuning:
    # 4·N·(6d + 2·h·hd + 2·kv·hd + 5f) + 4·3·h·T²
    n, d, f, h, kv, hd, t = 512, 2048, 5632, 32, 4, 64, 512
    layer = 4 * n * (6 * d + 2 * h * hd + 2 * kv * hd + 5 * f) + 4 * 3 * h * t * t
    head = 4 * n * 32000 * 3 + 2 * 4 * n * d
    act = lp.activation_bytes(lp.model_spec("1b"), method="full", dtype="float32", batch=1, seq=512, rank=16,
                              remat="none", backend="cpu")
    assert act == {"layers": 22 * layer, "head": head, "total": 22 * layer + head}
    lora = lp.activation_bytes(lp.model_spec("1b"), method="lora", dtype="float32", batch=1, seq=512, rank=16,
                               remat="none", backend="cpu")
    assert lora["layers"] - act["layers"] == 22 * (4 * n * 2 * f + 4 * n * 16 * 7)   # gate/up addends, x·A


@pytest.mark.parametrize("kwargs,flag", [
    (dict(methods=["lorax"]), "--method"), (dict(dtype="int8"), "--dtype"), (dict(optimizer="lion"), "--optimizer"),
    (dict(remat="some"), "--remat"), (dict(backend="npu"), "--backend"), (dict(rank=0), "--rank"),
    (dict(devices=0), "--devices"), (dict(seq=-1), "--seq"), (dict(rank=100000), "--rank"),
])
def test_errors_name_the_flag(kwargs, flag):
    with pytest.raises(ValueError, match=flag):
        lp.plan("1b", **kwargs)
    with pytest.raises(ValueError, match="--config"):
        lp.model_spec("9b")


# ------------------------------------------------------------------------------------- CLI

def test_cli_table(capsys):
    assert cli.main(["plan", "--params", "1e9", "--dtype", "float32", "--methods", "full,lora,qlora"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("| full |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2:5] == ["4.00", "4.00", "8.00"]              # weights, gradients, optimizer (GB)
    assert "| lora |" in out and "| qlora |" in out and "fits 24G" in out


def test_cli_json_equals_plan(capsys):
    assert cli.main(["plan", "--config", "8b", "--devices", "8", "--dtype", "float32", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["model"]["n_params"] == 8_030_261_248 and data["settings"]["devices"] == 8
    expected = [p.as_dict() for p in lp.plan("8b", dtype="float32", devices=8)]
    assert data["plans"] == json.loads(json.dumps(expected))
    assert [p["method"] for p in data["plans"]] == list(lp.METHODS)


@pytest.mark.parametrize("argv,msg", [
    (["plan"], "exactly one of --params"),
    (["plan", "--params", "1e9", "--config", "1b"], "exactly one of --params"),
    (["plan", "--params", "lots"], "--params"),
    (["plan", "--config", "1b", "--layers", "4"], "--hidden/--layers"),
    (["plan", "--config", "1b", "--methods", "lora,nope"], "--method"),
    (["plan", "--config", "1b", "--batch", "0"], "--batch"),
])
def test_cli_errors(argv, msg, capsys):
    assert cli.main(argv) == 2
    assert msg in capsys.readouterr().err


def test_cli_params_suffix(capsys):
    assert cli.main(["plan", "--params", "8B", "--methods", "full", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["model"]["n_params"] == 8 * 10**9


# ------------------------------------------------------------------------------------- against the compiler

@pytest.mark.slow
@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_plan_within_10_percent_of_xla_two_layers(method):
    """A 2-layer model of TinyLlama's widths: plan vs ``memory_analysis`` (args + temps), abstract params."""
    import os
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks"))
    import plan_vs_xla as pvx

    r = pvx.compile_case("1b", method, layers=2)
    p = pvx.plan_for(r)
    assert 0.9 <= p.total / pvx.xla_total(r) <= 1.1
