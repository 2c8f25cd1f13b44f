"""Peers, side by side: lowrank_jax vs PEFT (PyTorch CPU), Flax NNX LoRA and Qwix, same model and step.

One command trains the same model (same shapes, rank, optimizer, batch) in every system and reports, per
system and method: median step time, the paired ratio to our figure (interleaved rounds, same machine),
XLA ``memory_analysis()`` of the compiled step (JAX systems), peak RSS of the system's process (all),
trainable parameters, and compile time (lower + XLA compile of the step; for PEFT the model wrapping).

Systems (each in its own worker subprocess, so peak RSS is per system):

* ``lowrank_jax`` -- linen ``lj.train.make_train_step`` (LoRA r=8, DoRA r=8, VeRA r=256, QLoRA = LoRA r=8
  over NF4 block 64 + double quant); the frozen fwd+bwd floor; on the bench model also 2-D input
  ``(2048, 1024)`` variants, ``nn.scan`` + ``nn.remat(save only linear outputs)`` LoRA/DoRA, and our NNX
  path (``lowrank_jax.execution.nnx.apply``) LoRA/DoRA on an NNX copy of the bench model.
* ``peft``        -- PyTorch eager CPU + PEFT 0.21: LoRA, DoRA (``use_dora``), VeRA, QLoRA (every adapted
  ``nn.Linear`` replaced by ``bitsandbytes.nn.Linear4bit`` nf4 block 64 + compressed statistics, bnb's CPU
  backend), ``torch.optim.Adam``.
* ``nnx``         -- ``flax.nnx.LoRALinear(lora_rank=8)`` in place of every ``nnx.Linear``; trainable state =
  ``nnx.LoRAParam`` (note: NNX's LoRA has no alpha, scale 1).
* ``qwix``        -- ``qwix.apply_lora_to_model(nnx_model, LoraProvider(rank=8, alpha=16[, weight_qtype='nf4',
  tile_size=64]))``.

JAX steps are one ``jax.jit`` (fwd + bwd + Adam) donating trainable + optimizer state, compiled AOT
(``lower().compile()``); the compiled object is what is timed and what ``memory_analysis()`` describes.
NNX/Qwix use the functional form (``nnx.split(model, nnx.LoRAParam, ...)`` + ``jax.jit``), which compiles
to the same program as ``nnx.jit`` + ``nnx.Optimizer`` (shared/reference/peers_measured.md).

Models: ``bench`` (train_step.py's: 4 blocks of q,k,v,o 1024², fc1 1024->4096, fc2 4096->1024, no bias,
fp32, input (8, 256, 1024), loss mean(out²), adapters on all 24 linears) and ``minilm`` (all-MiniLM-L6-v2
shapes: 6 BERT layers, hidden 384, 12 heads, FFN 1536, vocab 30522, random weights, input ids (16, 128),
loss mean(hidden²), adapters on all 36 encoder linears: query, key, value, attention-output, intermediate,
output).

Precision and devices: ``--dtype bfloat16`` casts every system's frozen weights and the input to bf16
(adapters stay fp32 as PEFT's ``autocast_adapter_dtype`` keeps them; NF4 bases are quantized from the bf16
weights); JAX systems run on JAX's default device (a GPU when one is present), PEFT on CUDA when torch sees
one, else the CPU; each worker reports its device. Throughput: the model FLOPs of a method are the XLA
``cost_analysis`` FLOPs of lowrank_jax's unrolled step of that method (scan/remat recompute, 2-D and NNX-path
variants count the same useful work; QLoRA counts as LoRA); every system's case of that method is
credited with them, so TFLOP/s compare the same work. ``--peak-tflops P`` adds model FLOP utilisation
(MFU = TFLOP/s / P) — pass the device's dense peak for the dtype; nothing is assumed. ``--tokens N``
shrinks the bench input (smoke runs).

Timing: workers are built one after the other (so compiles do not overlap), then the orchestrator runs
rounds; in each round every worker in turn (system order rotated each round) runs one step of each of its
methods (method order rotated each round); only one worker computes at a time. Round 0 is a warm-up.
Ratio = median over rounds of (case time / reference time in the same round); the reference is lowrank_jax
LoRA r=8 on the same input. Absolute ms on a shared machine move 2x with load: quote ratios.

    # against a clean export of the commit to measure (the working tree may hold others' edits):
    rm -rf /tmp/peers_src && mkdir /tmp/peers_src && git archive HEAD | tar -x -C /tmp/peers_src
    PYTHONPATH=/tmp/peers_src python benchmarks/peers.py --quick --json peers_quick.json   # bench, core methods
    PYTHONPATH=/tmp/peers_src python benchmarks/peers.py --models bench,minilm --rounds 6 --json peers.json
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
MiB = 1024.0 ** 2
SYSTEMS = ("lowrank_jax", "nnx", "qwix", "peft")
BENCH_TOKENS = 2048   # default; --tokens
MINILM = dict(vocab=30522, hidden=384, layers=6, heads=12, ffn=1536, max_pos=512, batch=16, seq=128)


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def rss_now_mib() -> float:
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


# ================================================================================ JAX helpers

def jax_imports():
    global jax, jnp, np, optax, nnx, nn, lj
    import jax  # noqa: F401
    import jax.numpy as jnp  # noqa: F401
    import numpy as np  # noqa: F401
    import optax  # noqa: F401
    import flax.linen as nn  # noqa: F401
    from flax import nnx  # noqa: F401
    try:
        import lowrank_jax as lj  # noqa: F401  (PYTHONPATH / installed checkout first)
    except ImportError:
        sys.path.insert(0, os.path.join(HERE, os.pardir))
        import lowrank_jax as lj  # noqa: F401
    sys.path.insert(0, HERE)  # train_step.py: the bench model (lowrank_jax is already imported above)


def mem_info(compiled) -> dict:
    m = compiled.memory_analysis()
    return {"arg_bytes": int(m.argument_size_in_bytes), "out_bytes": int(m.output_size_in_bytes),
            "alias_bytes": int(m.alias_size_in_bytes), "temp_bytes": int(m.temp_size_in_bytes)}


def aot(fn, *args):
    # a full collection first: a gen-2 pass triggered by the garbage of earlier cases would otherwise land
    # in whichever case's tracing crosses the threshold (measured: +0.07 s on one case's lowering)
    gc.collect()
    c0, t0 = time.process_time(), time.perf_counter()
    lowered = fn.lower(*args)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2, c2 = time.perf_counter(), time.process_time()
    # cpu_s: CPU seconds this process spent (all its threads); less load-sensitive than wall time
    return compiled, {"lower_s": t1 - t0, "compile_s": t2 - t1, "lower_compile_s": t2 - t0,
                      "lower_compile_cpu_s": c2 - c0}


def mse(out):
    return jnp.mean(jnp.square(out.astype(jnp.float32)))   # the loss in fp32 whatever the compute dtype


def bench_input(flat=False, dtype="float32", tokens=BENCH_TOKENS):
    shape = (tokens, 1024) if flat else (8, tokens // 8, 1024)
    return jax.random.normal(jax.random.key(0), shape, jnp.float32).astype(dtype)


def cast_floats(tree, dtype):
    """Every floating leaf of ``tree`` in ``dtype`` (the frozen weights of a ``--dtype`` run)."""
    return jax.tree_util.tree_map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


def cast_nnx_base(model, dtype):
    """Cast an NNX model's non-LoRA ``Param``s to ``dtype`` in place (LoRA params stay fp32)."""
    if dtype == "float32":
        return model
    state = nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam)))
    nnx.update(model, cast_floats(state, dtype))
    return model


def xla_flops(compiled) -> float | None:
    """FLOPs XLA counts for one call of ``compiled`` (``cost_analysis``), or None."""
    try:
        ca = compiled.cost_analysis()
        ca = ca[0] if isinstance(ca, (list, tuple)) else ca
        return float(ca["flops"])
    except Exception:  # noqa: BLE001
        return None


def minilm_input():
    return jax.random.randint(jax.random.key(0), (MINILM["batch"], MINILM["seq"]), 0, MINILM["vocab"], jnp.int32)


# ------------------------------------------------------------------------ NNX models (NNX, Qwix, our NNX path)

def nnx_models():
    class NBlock(nnx.Module):
        def __init__(self, lin, rngs):
            d, f = 1024, 4096
            self.q, self.k, self.v, self.o = (lin(d, d, rngs) for _ in range(4))
            self.fc1, self.fc2 = lin(d, f, rngs), lin(f, d, rngs)

        def __call__(self, x):
            x = x + self.o(nnx.silu(self.q(x)) * self.k(x) + self.v(x))
            return x + self.fc2(nnx.relu(self.fc1(x)))

    class NNet(nnx.Module):
        def __init__(self, lin, rngs, layers=4):
            self.blocks = nnx.List([NBlock(lin, rngs) for _ in range(layers)])

        def __call__(self, x):
            for b in self.blocks:
                x = b(x)
            return x

    H, F, NH = MINILM["hidden"], MINILM["ffn"], MINILM["heads"]

    class NBertLayer(nnx.Module):  # HF BertLayer (post-LN), attention mask all ones
        def __init__(self, lin, rngs):
            self.query, self.key, self.value, self.attn_out = (lin(H, H, rngs) for _ in range(4))
            self.ln1 = nnx.LayerNorm(H, epsilon=1e-12, rngs=rngs)
            self.inter, self.out = lin(H, F, rngs), lin(F, H, rngs)
            self.ln2 = nnx.LayerNorm(H, epsilon=1e-12, rngs=rngs)

        def __call__(self, x):
            B, T, _ = x.shape
            hd = H // NH
            q, k, v = (t.reshape(B, T, NH, hd) for t in (self.query(x), self.key(x), self.value(x)))
            p = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(float(hd)), axis=-1)
            a = jnp.einsum("bhqk,bkhd->bqhd", p, v).reshape(B, T, H)
            x = self.ln1(x + self.attn_out(a))
            return self.ln2(x + self.out(nnx.gelu(self.inter(x), approximate=False)))

    class NBert(nnx.Module):
        def __init__(self, lin, rngs):
            self.word = nnx.Embed(MINILM["vocab"], H, rngs=rngs)
            self.pos = nnx.Embed(MINILM["max_pos"], H, rngs=rngs)
            self.typ = nnx.Embed(2, H, rngs=rngs)
            self.ln = nnx.LayerNorm(H, epsilon=1e-12, rngs=rngs)
            self.layers = nnx.List([NBertLayer(lin, rngs) for _ in range(MINILM["layers"])])

        def __call__(self, ids):
            T = ids.shape[1]
            x = self.word(ids) + self.pos(jnp.arange(T))[None] + self.typ(jnp.zeros_like(ids))
            x = self.ln(x)
            for layer in self.layers:
                x = layer(x)
            return x

    return NNet, NBert


def nnx_model(model_name, lin):
    NNet, NBert = nnx_models()
    return (NNet if model_name == "bench" else NBert)(lin, nnx.Rngs(42))


def plain_lin(bias):
    return lambda i, o, rngs: nnx.Linear(i, o, use_bias=bias, rngs=rngs)


def nnx_functional_case(model, x, tx, wrt):
    """Functional NNX step: trainable = the ``wrt`` state, jax.jit, donated; returns (call, info)."""
    graphdef, train, rest = nnx.split(model, wrt, ...)
    opt = tx.init(train)

    def step(train, opt, rest, xb):
        def loss(t):
            return mse(nnx.merge(graphdef, t, rest)(xb))
        val, g = jax.value_and_grad(loss)(train)
        u, opt = tx.update(g, opt, train)
        return optax.apply_updates(train, u), opt, val

    compiled, ct = aot(jax.jit(step, donate_argnums=(0, 1)), train, opt, rest, x)
    state = {"t": train, "o": opt}

    def call():
        state["t"], state["o"], loss = compiled(state["t"], state["o"], rest, x)
        return loss

    info = dict(ct, **mem_info(compiled), xla_flops=xla_flops(compiled))
    info["trainable"] = int(sum(l.size for l in jax.tree_util.tree_leaves(train)))
    return call, info


# ================================================================================ workers

def build_lowrank_jax(model_name, quick, dtype="float32", tokens=BENCH_TOKENS):
    import train_step as ts   # bench model
    from lowrank_jax.execution import nnx as lnx
    tx = optax.adam(1e-4)
    cases = {}

    if model_name == "bench":
        targets = ts.TARGETS
        specs = [("frozen", False, False), ("lora8", False, False), ("dora8", False, False),
                 ("vera256", False, False), ("qlora8", False, False),
                 ("frozen_2d", True, False), ("lora8_2d", True, False),
                 ("scan_lora8", False, True), ("scan_dora8", False, True), ("scan_dora8_named", False, True)]
        if quick:
            specs = [s for s in specs if s[0] in ("frozen", "lora8", "dora8", "qlora8", "scan_lora8", "scan_dora8",
                                                  "scan_dora8_named")]
    else:
        targets = r".*/(query|key|value|dense)/kernel"
        specs = [("frozen", False, False), ("lora8", False, False), ("dora8", False, False),
                 ("vera256", False, False), ("qlora8", False, False)]

    def method(name):
        base = name.replace("scan_", "").replace("_2d", "")
        if base == "qlora8":
            return lj.LoRA(rank=8, alpha=16.0, targets=targets, quant=lj.NF4(block_size=64, double_quant=True))
        if base.startswith("lora"):
            return lj.LoRA(rank=8, alpha=16.0, targets=targets)
        if base == "dora8_named":   # names its outputs "lin_out" itself; the model does not
            return lj.DoRA(rank=8, alpha=16.0, targets=targets, output_name="lin_out")
        if base.startswith("dora"):
            return lj.DoRA(rank=8, alpha=16.0, targets=targets)
        return lj.VeRA(rank=256, targets=targets)

    built = {}

    def model_for(flat, scan, policy="lin_out"):
        key = (flat, scan, policy)
        if key not in built:
            if model_name == "bench":
                model = ts.Net(scan=scan, policy=policy)
                x = bench_input(flat, dtype, tokens)
                call_x = x
            else:
                from lowrank_jax.models.bert import BertConfig, BertModel
                model = BertModel(BertConfig())
                x = minilm_input()
                call_x = x
            # init and layout discovery in fp32 (an fp32-param scan over a bf16 carry would change its dtype)
            init_x = call_x.astype(jnp.float32) if jnp.issubdtype(call_x.dtype, jnp.floating) else call_x
            variables = model.init(jax.random.key(42), init_x)
            built[key] = (model, x, cast_floats(variables["params"], dtype), lj.discover(model, variables, init_x))
        return built[key]

    for name, flat, scan in specs:
        try:
            model, x, params, layouts = model_for(flat, scan, "lin_out_named_by_method" if name.endswith("_named")
                                                  else "lin_out")
            if name.startswith("frozen"):
                if model_name == "bench":
                    def step(c, p, xb, model=model):
                        return jax.value_and_grad(lambda cc: mse(model.apply({"params": p}, cc * xb)))(c)
                    c = jnp.asarray(1.0, dtype)
                else:
                    # floor for the encoder: grad w.r.t. a scalar on the embedding table (no weight grads,
                    # no optimizer): forward + activation backward through every layer
                    def step(c, p, xb, model=model):
                        def f(cc):
                            pp = dict(p, embeddings=dict(p["embeddings"], word_embeddings={
                                "embedding": cc * p["embeddings"]["word_embeddings"]["embedding"]}))
                            return mse(model.apply({"params": pp}, xb))
                        return jax.value_and_grad(f)(c)
                    c = jnp.asarray(1.0, dtype)
                compiled, ct = aot(jax.jit(step), c, params, x)
                cases[name] = (lambda compiled=compiled, c=c, params=params, x=x: compiled(c, params, x),
                               dict(ct, **mem_info(compiled), xla_flops=xla_flops(compiled), trainable=0))
                continue
            m = method(name)
            gc.collect()   # as in aot(): no collection left over from earlier cases billed to this init
            c0, t0 = time.process_time(), time.perf_counter()
            frozen, adapter = lj.init(m, params, jax.random.key(1), layouts=layouts)
            jax.block_until_ready((frozen, adapter))
            init_s = time.perf_counter() - t0
            extra = {"init_s": init_s, "init_cpu_s": time.process_time() - c0}
            if name == "qlora8":   # NF4 init again (warm: no first-call tracing)
                t0 = time.perf_counter()
                jax.block_until_ready(lj.init(m, params, jax.random.key(1), layouts=layouts))
                extra["init_warm_s"] = time.perf_counter() - t0
            trs = lj.train.make_train_step(model, lambda run, b: mse(run(b["x"])), tx)
            opt = trs.init(adapter)
            batch = {"x": x}
            compiled, ct = aot(trs.step, adapter, opt, frozen, batch, None)
            st = {"a": adapter, "o": opt}

            def call(compiled=compiled, st=st, frozen=frozen, batch=batch):
                st["a"], st["o"], loss = compiled(st["a"], st["o"], frozen, batch, None)
                return loss
            cases[name] = (call, dict(ct, **mem_info(compiled), **extra, xla_flops=xla_flops(compiled),
                                      trainable=int(lj.count_params(adapter))))
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            cases[name] = (None, {"error": f"{type(e).__name__}: {e}"[:300]})

    if model_name == "bench" and not quick:   # our NNX path on the NNX copy of the bench model
        nmodel = cast_nnx_base(nnx_model("bench", plain_lin(False)), dtype)
        x = bench_input(False, dtype, tokens)
        params = lnx.params_of(nmodel)
        layouts = lnx.discover(nmodel)
        for name in ("nnx_lora8", "nnx_dora8"):
            try:
                m = method(name.replace("nnx_", ""))
                m_targets = m
                frozen, adapter = lj.init(m_targets, params, jax.random.key(1), layouts=layouts)
                opt = tx.init(adapter)

                def step(a, o, fz, xb, nmodel=nmodel):
                    val, g = jax.value_and_grad(lambda aa: mse(lnx.apply(nmodel, fz, aa, xb)))(a)
                    u, o = tx.update(g, o, a)
                    return optax.apply_updates(a, u), o, val
                compiled, ct = aot(jax.jit(step, donate_argnums=(0, 1)), adapter, opt, frozen, x)
                st = {"a": adapter, "o": opt}

                def call(compiled=compiled, st=st, frozen=frozen, x=x):
                    st["a"], st["o"], loss = compiled(st["a"], st["o"], frozen, x)
                    return loss
                cases[name] = (call, dict(ct, **mem_info(compiled), xla_flops=xla_flops(compiled),
                                          trainable=int(lj.count_params(adapter))))
            except Exception as e:  # noqa: BLE001
                traceback.print_exc()
                cases[name] = (None, {"error": f"{type(e).__name__}: {e}"[:300]})
    return cases, jax.block_until_ready, jax_device_meta()


def build_nnx(model_name, quick, dtype="float32", tokens=BENCH_TOKENS):
    tx = optax.adam(1e-4)
    bias = model_name != "bench"
    lin = lambda i, o, rngs: nnx.LoRALinear(i, o, lora_rank=8, use_bias=bias, rngs=rngs)  # noqa: E731
    model = cast_nnx_base(nnx_model(model_name, lin), dtype)
    x = bench_input(False, dtype, tokens) if model_name == "bench" else minilm_input()
    call, info = nnx_functional_case(model, x, tx, nnx.LoRAParam)
    return {"lora8": (call, info)}, jax.block_until_ready, jax_device_meta()


def build_qwix(model_name, quick, dtype="float32", tokens=BENCH_TOKENS):
    import qwix
    tx = optax.adam(1e-4)
    bias = model_name != "bench"
    x = bench_input(False, dtype, tokens) if model_name == "bench" else minilm_input()
    path = ".*" if model_name == "bench" else r".*(query|key|value|attn_out|inter|out)"
    cases = {}
    for name, kw in (("lora8", {}), ("qlora8", {"weight_qtype": "nf4", "tile_size": 64})):
        try:
            base = cast_nnx_base(nnx_model(model_name, plain_lin(bias)), dtype)   # NF4 from the cast weights
            gc.collect()   # as before every timed init/compile
            t0 = time.perf_counter()
            lm = qwix.apply_lora_to_model(base, qwix.LoraProvider(module_path=path, rank=8, alpha=16.0, **kw),
                                          x, rngs=nnx.Rngs(1))
            jax.block_until_ready(nnx.state(lm))
            wrap_s = time.perf_counter() - t0
            del base
            call, info = nnx_functional_case(lm, x, tx, nnx.LoRAParam)
            info["init_s"] = wrap_s
            cases[name] = (call, info)
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            cases[name] = (None, {"error": f"{type(e).__name__}: {e}"[:300]})
    return cases, jax.block_until_ready, jax_device_meta()


def build_peft(model_name, quick, dtype="float32", tokens=BENCH_TOKENS):
    import torch
    import peft
    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]

    if model_name == "bench":
        class Block(torch.nn.Module):
            def __init__(self):
                super().__init__()
                d, f = 1024, 4096
                L = lambda i, o: torch.nn.Linear(i, o, bias=False)  # noqa: E731
                self.q, self.k, self.v, self.o, self.fc1, self.fc2 = L(d, d), L(d, d), L(d, d), L(d, d), L(d, f), L(f, d)

            def forward(self, x):
                x = x + self.o(torch.nn.functional.silu(self.q(x)) * self.k(x) + self.v(x))
                return x + self.fc2(torch.relu(self.fc1(x)))

        class Net(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.blocks = torch.nn.ModuleList([Block() for _ in range(4)])

            def forward(self, x):
                for b in self.blocks:
                    x = b(x)
                return x

        make = Net
        targets = ["q", "k", "v", "o", "fc1", "fc2"]
        x = torch.randn(8, tokens // 8, 1024).to(dev, tdtype)
        fwd = lambda m: m(x)  # noqa: E731
    else:
        from transformers import BertConfig, BertModel
        cfg = BertConfig(vocab_size=MINILM["vocab"], hidden_size=MINILM["hidden"], num_hidden_layers=MINILM["layers"],
                         num_attention_heads=MINILM["heads"], intermediate_size=MINILM["ffn"],
                         max_position_embeddings=MINILM["max_pos"], hidden_dropout_prob=0.0,
                         attention_probs_dropout_prob=0.0, attn_implementation="eager")
        make = lambda: BertModel(cfg, add_pooling_layer=False)  # noqa: E731
        targets = ["query", "key", "value", "dense"]
        ids = torch.randint(0, MINILM["vocab"], (MINILM["batch"], MINILM["seq"])).to(dev)
        fwd = lambda m: m(input_ids=ids).last_hidden_state  # noqa: E731

    def to_4bit(model):
        import bitsandbytes as bnb
        for mod in list(model.modules()):
            for cname, child in list(mod.named_children()):
                if isinstance(child, torch.nn.Linear) and cname in targets:
                    q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                          compute_dtype=tdtype, quant_type="nf4", compress_statistics=True)
                    q.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, quant_type="nf4",
                                                 compress_statistics=True, blocksize=64)
                    if child.bias is not None:
                        q.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
                    setattr(mod, cname, q.to(dev))   # quantizes (from the --dtype weights)
        return model

    configs = {
        "lora8": lambda: peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=targets),
        "dora8": lambda: peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=targets, use_dora=True),
        "vera256": None if quick else (lambda: peft.VeraConfig(r=256, target_modules=targets, vera_dropout=0.0)),
        "qlora8": lambda: peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=targets),
    }
    cases = {}
    for name, cfgf in configs.items():
        if cfgf is None:
            continue
        try:
            base = make().to(dev, tdtype)
            gc.collect()   # as before every timed init/compile
            t0 = time.perf_counter()
            if name == "qlora8":
                base = to_4bit(base)
            pm = peft.get_peft_model(base, cfgf())
            wrap_s = time.perf_counter() - t0
            params = [p for p in pm.parameters() if p.requires_grad]
            opt = torch.optim.Adam(params, lr=1e-4)

            def call(pm=pm, opt=opt):
                opt.zero_grad(set_to_none=True)
                loss = fwd(pm).float().pow(2).mean()
                loss.backward()
                opt.step()
                return loss.detach()
            info = {"trainable": int(sum(p.numel() for p in params)), "init_s": wrap_s}
            if name == "qlora8":
                layer = next(m for m in pm.modules() if type(m).__name__ == "Linear4bit")
                info["quant_layer"] = f"{type(layer).__module__}.{type(layer).__name__}"
            cases[name] = (call, info)
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            cases[name] = (None, {"error": f"{type(e).__name__}: {e}"[:300]})
    sync = (lambda v: (torch.cuda.synchronize(), v)[1]) if dev.type == "cuda" else (lambda v: v)
    return cases, sync, {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu (torch)",
                         "torch": torch.__version__}


def jax_device_meta():
    d = jax.devices()[0]
    return {"device": f"{d.platform}: {d.device_kind}", "jax": jax.__version__}


def worker(system, model_name, quick, dtype="float32", tokens=BENCH_TOKENS):
    """Build, report, then serve 'round R' / 'quit' commands from stdin (one JSON line per reply)."""
    out = sys.stdout
    sys.stdout = sys.stderr   # library prints must not corrupt the protocol
    if system != "peft":
        jax_imports()
        jax.block_until_ready(jax.jit(lambda a: a @ a)(jnp.ones((64, 64))))
    rss0 = rss_now_mib()
    t0 = time.perf_counter()
    cases, sync, dev_meta = {"lowrank_jax": build_lowrank_jax, "nnx": build_nnx, "qwix": build_qwix,
                             "peft": build_peft}[system](model_name, quick, dtype, tokens)
    info = {k: v[1] for k, v in cases.items()}
    live = [k for k, v in cases.items() if v[0] is not None]
    meta = {"build_s": time.perf_counter() - t0, "rss_runtime_mib": rss0, "rss_built_mib": rss_now_mib(),
            "dtype": dtype, **dev_meta}
    if system != "peft":
        meta["lowrank_jax_file"] = getattr(sys.modules.get("lowrank_jax"), "__file__", None)
    out.write(json.dumps({"ready": True, "info": info, "meta": meta}) + "\n")
    out.flush()
    for line in sys.stdin:
        cmd = line.split()
        if not cmd:
            continue
        if cmd[0] == "quit":
            ru = resource.getrusage(resource.RUSAGE_SELF)
            out.write(json.dumps({"peak_rss_mib": ru.ru_maxrss / 1024.0}) + "\n")
            out.flush()
            return
        r = int(cmd[1])
        reps = int(cmd[2]) if len(cmd) > 2 else 1
        order = live[r % len(live):] + live[:r % len(live)] if live else []
        times, losses = {}, {}
        for k in order:
            # reps > 1: the first step of a case pays for the caches the previous case (or process) evicted;
            # time the mean of the following reps - 1 steps
            for i in range(reps):
                t = time.perf_counter()
                v = sync(cases[k][0]())
                if i == 0:
                    t_first = time.perf_counter() - t
                    total = 0.0
                else:
                    total += time.perf_counter() - t
            times[k] = total / (reps - 1) if reps > 1 else t_first
            try:
                losses[k] = float(v[0] if isinstance(v, tuple) else v)
            except Exception:  # noqa: BLE001
                losses[k] = None
        out.write(json.dumps({"times": times, "losses": losses}) + "\n")
        out.flush()


# ================================================================================ orchestrator

class Worker:
    def __init__(self, system, model_name, quick, dtype="float32", tokens=BENCH_TOKENS):
        self.system = system
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", system, "--model", model_name,
               "--dtype", dtype, "--tokens", str(tokens)]
        if quick:
            cmd.append("--quick")
        self.p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        self.ready = None

    def read(self):
        line = self.p.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.system} exited (rc={self.p.poll()})")
        return json.loads(line)

    def send(self, s):
        self.p.stdin.write(s + "\n")
        self.p.stdin.flush()


def reference_for(case):
    return "lora8_2d" if case.endswith("_2d") else "lora8"


PAIRS = {  # (numerator system, case) / (denominator system, case): the issue's targets
    "bench": [
        ("LoRA r=8 / frozen floor, 3-D input", ("lowrank_jax", "lora8"), ("lowrank_jax", "frozen"), 1.06),
        ("LoRA r=8 / frozen floor, 2-D input", ("lowrank_jax", "lora8_2d"), ("lowrank_jax", "frozen_2d"), 1.06),
        ("lowrank_jax LoRA / Qwix LoRA", ("lowrank_jax", "lora8"), ("qwix", "lora8"), 0.95),
        ("lowrank_jax LoRA / NNX LoRALinear", ("lowrank_jax", "lora8"), ("nnx", "lora8"), 0.95),
        ("lowrank_jax QLoRA / Qwix NF4 QLoRA", ("lowrank_jax", "qlora8"), ("qwix", "qlora8"), 0.95),
        ("lowrank_jax LoRA / PEFT LoRA", ("lowrank_jax", "lora8"), ("peft", "lora8"), 0.75),
        ("lowrank_jax DoRA / PEFT DoRA", ("lowrank_jax", "dora8"), ("peft", "dora8"), 0.60),
        ("lowrank_jax VeRA / PEFT VeRA", ("lowrank_jax", "vera256"), ("peft", "vera256"), None),
        ("lowrank_jax QLoRA / PEFT QLoRA (bnb CPU)", ("lowrank_jax", "qlora8"), ("peft", "qlora8"), None),
        ("DoRA / LoRA, nn.scan + remat(save lin_out)", ("lowrank_jax", "scan_dora8"), ("lowrank_jax", "scan_lora8"), 1.15),
        ("DoRA(output_name='lin_out') / LoRA, nn.scan + remat(save lin_out)", ("lowrank_jax", "scan_dora8_named"),
         ("lowrank_jax", "scan_lora8"), 1.15),
        ("DoRA / LoRA, unrolled", ("lowrank_jax", "dora8"), ("lowrank_jax", "lora8"), None),
        ("QLoRA / LoRA (ours)", ("lowrank_jax", "qlora8"), ("lowrank_jax", "lora8"), None),
        ("our NNX DoRA / our linen DoRA", ("lowrank_jax", "nnx_dora8"), ("lowrank_jax", "dora8"), 1.05),
        ("our NNX LoRA / our linen LoRA", ("lowrank_jax", "nnx_lora8"), ("lowrank_jax", "lora8"), None),
    ],
    "minilm": [
        ("LoRA r=8 / frozen floor", ("lowrank_jax", "lora8"), ("lowrank_jax", "frozen"), None),
        ("lowrank_jax LoRA / Qwix LoRA", ("lowrank_jax", "lora8"), ("qwix", "lora8"), None),
        ("lowrank_jax LoRA / NNX LoRALinear", ("lowrank_jax", "lora8"), ("nnx", "lora8"), None),
        ("lowrank_jax QLoRA / Qwix NF4 QLoRA", ("lowrank_jax", "qlora8"), ("qwix", "qlora8"), None),
        ("lowrank_jax LoRA / PEFT LoRA", ("lowrank_jax", "lora8"), ("peft", "lora8"), None),
        ("lowrank_jax DoRA / PEFT DoRA", ("lowrank_jax", "dora8"), ("peft", "dora8"), None),
        ("lowrank_jax VeRA / PEFT VeRA", ("lowrank_jax", "vera256"), ("peft", "vera256"), None),
        ("lowrank_jax QLoRA / PEFT QLoRA (bnb CPU)", ("lowrank_jax", "qlora8"), ("peft", "qlora8"), None),
        ("DoRA / LoRA (ours)", ("lowrank_jax", "dora8"), ("lowrank_jax", "lora8"), None),
    ],
}


def paired(times, a, b):
    ta, tb = times.get(a, {}), times.get(b, {})
    rs = sorted(ta[r] / tb[r] for r in ta if r in tb)
    if not rs:
        return None, None
    q = (rs[len(rs) // 4], rs[(3 * len(rs)) // 4]) if len(rs) >= 3 else (rs[0], rs[-1])
    return statistics.median(rs), q


def base_method(case):
    """The unrolled lowrank_jax case whose FLOPs are this case's model FLOPs (QLoRA's: LoRA's)."""
    c = case.replace("scan_", "").replace("nnx_", "").replace("_named", "").replace("_2d", "")
    return "lora8" if c == "qlora8" else c


def run_model(model_name, systems, rounds, quick, reps=1, dtype="float32", tokens=BENCH_TOKENS, peak_tflops=None):
    log(f"=== model {model_name}: building {', '.join(systems)} (one at a time)")
    workers = []
    for s in systems:
        t0 = time.perf_counter()
        w = Worker(s, model_name, quick, dtype, tokens)
        try:
            w.ready = w.read()
        except Exception as e:  # noqa: BLE001
            log(f"  {s}: failed to start: {e}")
            continue
        workers.append(w)
        errs = {k: v["error"] for k, v in w.ready["info"].items() if "error" in v}
        log(f"  {s}: built in {time.perf_counter() - t0:.1f}s; cases {list(w.ready['info'])}"
            + (f"; errors {errs}" if errs else ""))
    times: dict = {}     # (system, case) -> {round: seconds}
    losses: dict = {}
    for r in range(rounds + 1):
        t_round = time.perf_counter()
        k = r % len(workers)
        for w in workers[k:] + workers[:k]:
            w.send(f"round {r} {reps}")
            rep = w.read()
            for c, t in rep["times"].items():
                if r > 0:
                    times.setdefault((w.system, c), {})[r] = t
                losses[(w.system, c)] = rep["losses"].get(c)
        log(f"[{model_name} {'warm-up' if r == 0 else f'round {r}/{rounds}'}] {time.perf_counter() - t_round:.1f}s")
    result = {"systems": {}, "pairs": []}
    for w in workers:
        w.send("quit")
        try:
            peak = w.read()["peak_rss_mib"]
        except Exception:  # noqa: BLE001
            peak = None
        w.p.wait(timeout=120)
        rows = {}
        for c, inf in w.ready["info"].items():
            row = dict(inf)
            t = times.get((w.system, c))
            if t:
                row["times_s"] = [t[r] for r in sorted(t)]
                row["median_ms"] = statistics.median(row["times_s"]) * 1e3
                ref = ("lowrank_jax", reference_for(c))
                if (w.system, c) != ref:   # this / our LoRA r=8 (same input), paired
                    row["ratio_to_our_lora"], row["ratio_to_our_lora_iqr"] = paired(times, (w.system, c), ref)
                if w.system != "lowrank_jax" and ("lowrank_jax", c) in times:   # ours (same method) / this
                    row["ours_over_this"], row["ours_over_this_iqr"] = paired(times, ("lowrank_jax", c), (w.system, c))
                row["last_loss"] = losses.get((w.system, c))
            rows[c] = row
        result["systems"][w.system] = {"cases": rows, "peak_rss_mib": peak, **w.ready["meta"]}
    ours = result["systems"].get("lowrank_jax", {}).get("cases", {})
    for data in result["systems"].values():
        for c, row in data["cases"].items():
            flops = ours.get(base_method(c), {}).get("xla_flops")
            if flops and row.get("median_ms"):
                row["model_flops"] = flops
                row["tflops_per_s"] = flops / (row["median_ms"] * 1e-3) / 1e12
                if peak_tflops:
                    row["mfu"] = row["tflops_per_s"] / peak_tflops
    for label, a, b, target in PAIRS[model_name]:
        med, iqr = paired(times, a, b)
        if med is None:
            continue
        ia = result["systems"].get(a[0], {}).get("cases", {}).get(a[1], {})
        ib = result["systems"].get(b[0], {}).get("cases", {}).get(b[1], {})
        d = {"pair": label, "num": a, "den": b, "ratio": med, "iqr": iqr, "target": target,
             "met": (med <= target) if target else None}
        if "temp_bytes" in ia and "temp_bytes" in ib:
            d["temp_diff_mib"] = (ia["temp_bytes"] - ib["temp_bytes"]) / MiB
        result["pairs"].append(d)
    return result


def fmt(v, spec=".3f"):
    return "–" if v is None else format(v, spec)


def print_model(model_name, res):
    devs = "; ".join(f"{s}: {d.get('device', '?')}, {d.get('dtype', '?')}" for s, d in res["systems"].items())
    print(f"\n### model: {model_name} ({devs})\n")
    print("| system | method | median ms | this / our LoRA r=8 [IQR] | ours (same method) / this [IQR] | XLA arg MiB | XLA temp MiB | args+temp MiB "
          "| peak RSS MiB (process) | trainable | compile s wall (CPU) | init/wrap s | model TFLOP/s | MFU |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for s, data in res["systems"].items():
        for c, r in data["cases"].items():
            if "error" in r:
                print(f"| {s} | {c} | failed: {r['error'][:150]} |||||||||")
                continue
            def rq(k):
                v, q = r.get(k), r.get(k + "_iqr")
                return f"{v:.3f} [{q[0]:.2f}, {q[1]:.2f}]" if v else "–"
            ratio = rq("ratio_to_our_lora") if r.get("ratio_to_our_lora") else ("1 (ref)" if "median_ms" in r else "–")
            ratio += " | " + rq("ours_over_this")
            mem = ("–", "–", "–")
            if "temp_bytes" in r:
                mem = (f"{r['arg_bytes'] / MiB:.1f}", f"{r['temp_bytes'] / MiB:.1f}",
                       f"{(r['arg_bytes'] + r['temp_bytes']) / MiB:.1f}")
            comp = (f"{r['lower_compile_s']:.2f} ({r['lower_compile_cpu_s']:.2f})" if "lower_compile_cpu_s" in r
                    else f"{r['lower_compile_s']:.2f}" if "lower_compile_s" in r else "– (eager)")
            init = fmt(r.get("init_s"), ".2f") + (f" (warm {r['init_warm_s']:.2f})" if "init_warm_s" in r else "")
            mfu = f"{100 * r['mfu']:.1f} %" if "mfu" in r else "–"
            print(f"| {s} | {c} | {fmt(r.get('median_ms'), '.0f')} | {ratio} | {mem[0]} | {mem[1]} | {mem[2]} | "
                  f"{fmt(data.get('peak_rss_mib'), '.0f')} | {r.get('trainable', 0):,} | {comp} | {init} | "
                  f"{fmt(r.get('tflops_per_s'), '.3f')} | {mfu} |")
    print("\n| pair | paired ratio [IQR] | target | met? | temp diff MiB |")
    print("|---|---:|---:|---|---:|")
    for d in res["pairs"]:
        print(f"| {d['pair']} | {d['ratio']:.3f} [{d['iqr'][0]:.3f}, {d['iqr'][1]:.3f}] | "
              f"{'≤ ' + format(d['target'], '.2f') if d['target'] else '–'} | "
              f"{'–' if d['met'] is None else ('yes' if d['met'] else 'NO')} | {fmt(d.get('temp_diff_mib'), '+.1f')} |")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=None, help="comma list of bench,minilm (default: both; --quick: bench)")
    ap.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma list of {','.join(SYSTEMS)}")
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds after 1 warm-up (default 6; --quick 2)")
    ap.add_argument("--quick", action="store_true",
                    help="bench model, core methods only (frozen, LoRA, DoRA, QLoRA and the nn.scan + remat LoRA/DoRA "
                         "cases; no VeRA, 2-D or NNX-path variants), 2 timed rounds")
    ap.add_argument("--reps", type=int, default=1,
                    help="steps per case per round; with 2 or more the first is untimed (cold caches after the "
                         "previous case or process) and the mean of the others is the round's time")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                    help="frozen weights and input of every system (adapters stay fp32); bfloat16 for accelerators")
    ap.add_argument("--tokens", type=int, default=BENCH_TOKENS,
                    help=f"bench-model tokens per step, batch 8 x seq tokens/8 (default {BENCH_TOKENS}; smaller for smoke runs)")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="the device's dense peak TFLOP/s for --dtype: adds model FLOP utilisation (MFU) per case")
    ap.add_argument("--json", help="write every number (per-round times, memory, compile, RSS) here")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args.worker, args.model, args.quick, args.dtype, args.tokens)
        return 0
    if args.reps < 1:
        ap.error(f"--reps must be >= 1, got {args.reps}")
    if args.tokens < 8 or args.tokens % 8:
        ap.error(f"--tokens must be a positive multiple of 8 (batch 8), got {args.tokens}")
    if args.peak_tflops is not None and not args.peak_tflops > 0:
        ap.error(f"--peak-tflops must be > 0, got {args.peak_tflops}")
    models = (args.models or ("bench" if args.quick else "bench,minilm")).split(",")
    systems = [s for s in args.systems.split(",") if s]
    rounds = args.rounds if args.rounds is not None else (2 if args.quick else 6)
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "argv": sys.argv, "python": platform.python_version(), "cpus": os.cpu_count(),
            "PYTHONPATH": os.environ.get("PYTHONPATH", ""), "rounds": rounds, "quick": args.quick,
            "loadavg_start": os.getloadavg(), "reps": args.reps, "dtype": args.dtype, "tokens": args.tokens,
            "peak_tflops": args.peak_tflops}
    try:
        meta["cpu"] = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except Exception:  # noqa: BLE001
        pass
    print(json.dumps(meta), flush=True)
    t0 = time.perf_counter()
    results = {}
    for m in models:
        results[m] = run_model(m, systems, rounds, args.quick, args.reps, args.dtype, args.tokens, args.peak_tflops)
        print_model(m, results[m])
        sys.stdout.flush()
    meta["wall_s"] = time.perf_counter() - t0
    meta["loadavg_end"] = os.getloadavg()
    print(f"\nwall {meta['wall_s']:.0f}s; load average start {meta['loadavg_start']} end {meta['loadavg_end']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "models": results}, f, indent=1, default=str)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
