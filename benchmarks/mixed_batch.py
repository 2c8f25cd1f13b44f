"""A batch mixing K adapters vs a batch with one: lowrank_jax (stacked, grouped) and PEFT (``adapter_names``).

Model: a Llama decoder (``lowrank_jax.models.llama``; its torch twin is ``transformers.LlamaForCausalLM``
with the same weights), ``--layers`` layers, hidden ``--hidden``, MLP ``--inter``, ``--heads`` heads
(``--kv-heads`` KV heads, head dim hidden/heads), vocab ``--vocab``, tied LM head, fp32; batch ``--batch`` ×
``--seq`` tokens. Adapters: ``--k`` LoRA adapters (r = ``--rank``, α = 2r) on q, k, v, o, gate, up and
down of every layer, each with its own random (trained-looking) factors; the same adapters are written
with ``lj.io.peft.save`` and loaded into PEFT, and the mixed-batch logits of both are compared first.

Variants (forward only, logits; one ``jax.jit`` each; torch under ``inference_mode``):

* ``jax_base``: the model without adapters;
* ``jax_single``: ``lj.apply(model, {"params": frozen}, adapter_0, ids)`` — one adapter, plain path;
* ``jax_mixed``: ``lj.apply(model, {"params": frozen}, lj.stack(adapters), ids, adapter_ids=…)`` with
  example ``b`` on adapter ``b mod K`` (every adapter in the batch);
* ``peft_single``: the PEFT model with ``adapter_0`` active;
* ``peft_mixed``: ``peft_model(ids, adapter_names=[…])``, the same assignment.

With ``--train`` also one value-and-grad step (w.r.t. the adapter, loss = mean logits²):
``jax_train_single`` and ``jax_train_mixed`` (PEFT refuses ``adapter_names`` in training).

Each round runs every variant ``--reps`` times and keeps its fastest call (order rotated every round)
after one warm-up round; reported: each variant's median wall time and process CPU time (all threads;
steadier than wall time on a shared machine) and the medians over rounds of the paired per-round
ratios ``jax_mixed / jax_single``, ``peft_mixed / peft_single``, ``jax_mixed / peft_mixed``, ….

Example::

    python benchmarks/mixed_batch.py --rounds 5 --reps 3 --train --json benchmarks/results/mixed_batch.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))
import lowrank_jax as lj  # noqa: E402
from lowrank_jax.models import llama  # noqa: E402
from lowrank_jax.stacking import stack  # noqa: E402

TARGETS = r"model/layers_\d+/(self_attn/(q|k|v|o)_proj|mlp/(gate|up|down)_proj)/kernel"


def build(args):
    import torch
    import transformers

    cfg = llama.LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.inter,
                            num_hidden_layers=args.layers, num_attention_heads=args.heads,
                            num_key_value_heads=args.kv_heads, head_dim=args.hidden // args.heads,
                            max_position_embeddings=max(2 * args.seq, 64))
    shared = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "rms_norm_eps", "max_position_embeddings", "rope_theta")
    hc = transformers.LlamaConfig(**{f: getattr(cfg, f) for f in shared}, tie_word_embeddings=True, hidden_act="silu")
    torch.manual_seed(0)
    tm = transformers.LlamaForCausalLM(hc).eval()
    params = llama.convert_hf_state_dict({k: v.detach().numpy() for k, v in tm.state_dict().items()})
    model = llama.LlamaForCausalLM(cfg)

    method = lj.LoRA(rank=args.rank, alpha=2.0 * args.rank, targets=TARGETS)
    adapters = []
    for k in range(args.k):
        frozen, ad = lj.init(method, params, jax.random.key(k))
        leaves, treedef = jax.tree_util.tree_flatten(ad)
        keys = jax.random.split(jax.random.key(100 + k), len(leaves))
        adapters.append(jax.tree_util.tree_unflatten(
            treedef, [v + 0.02 * jax.random.normal(kk, v.shape) for v, kk in zip(leaves, keys)]))

    from peft import PeftModel
    tmp = tempfile.mkdtemp(prefix="mixed_batch_")
    pm = None
    for k, ad in enumerate(adapters):
        d = os.path.join(tmp, f"a{k}")
        lj.io.peft.save(d, ad, frozen, name_map=lj.io.peft.llama_name_map(), task_type="CAUSAL_LM")
        if pm is None:
            pm = PeftModel.from_pretrained(tm, d, adapter_name="a0")
        else:
            pm.load_adapter(d, adapter_name=f"a{k}")
    pm.eval()
    return model, frozen, adapters, pm


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--k", type=int, default=8, help="adapters in the mixed batch")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--inter", type=int, default=1408)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=1, help="calls per variant per round; the round keeps the fastest")
    ap.add_argument("--train", action="store_true", help="also time a JAX value-and-grad step, single vs mixed")
    ap.add_argument("--no-peft", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.rounds < 1 or args.reps < 1:
        ap.error("--rounds and --reps must be >= 1")

    import torch

    model, frozen, adapters, pm = build(args)
    stacked = stack(adapters)
    ids = jax.random.randint(jax.random.key(1), (args.batch, args.seq), 0, args.vocab)
    aid = jnp.arange(args.batch) % args.k
    names = [f"a{int(i)}" for i in aid]
    ids_t = torch.from_numpy(np.asarray(ids).astype(np.int64))
    base = lj.base_params(frozen)

    f_base = jax.jit(lambda p, x: model.apply({"params": p}, x))
    f_single = jax.jit(lambda a, x: lj.apply(model, {"params": frozen}, a, x))
    f_mixed = jax.jit(lambda s, x, i: lj.apply(model, {"params": frozen}, s, x, adapter_ids=i))

    # correctness first: mixed == each example with its own adapter; PEFT's mixed batch agrees
    y_mixed = np.asarray(f_mixed(stacked, ids, aid))
    for b in range(min(args.batch, args.k)):
        one = np.asarray(f_single(adapters[int(aid[b])], ids[b:b + 1]))[0]
        err = np.abs(y_mixed[b] - one).max() / np.abs(one).max()
        assert err < 1e-4, (b, err)
    check = {}
    if not args.no_peft:
        with torch.inference_mode():
            y_peft = pm(input_ids=ids_t, adapter_names=names).logits.numpy()
        check["jax_mixed_vs_peft_mixed_max_rel_err"] = float(np.abs(y_mixed - y_peft).max() / np.abs(y_peft).max())
        print(f"mixed-batch logits, lowrank_jax vs PEFT: max rel err {check['jax_mixed_vs_peft_mixed_max_rel_err']:.2e}")

    def run_jax(f, *a):
        def call():
            jax.block_until_ready(f(*a))
        return call

    def peft_single():
        pm.set_adapter("a0")
        with torch.inference_mode():
            pm(input_ids=ids_t).logits

    def peft_mixed():
        with torch.inference_mode():
            pm(input_ids=ids_t, adapter_names=names).logits

    variants = {
        "jax_base": run_jax(f_base, base, ids),
        "jax_single": run_jax(f_single, adapters[0], ids),
        "jax_mixed": run_jax(f_mixed, stacked, ids, aid),
    }
    if not args.no_peft:
        variants["peft_single"] = peft_single
        variants["peft_mixed"] = peft_mixed
    if args.train:
        def loss_single(a):
            return jnp.mean(lj.apply(model, {"params": frozen}, a, ids) ** 2)

        def loss_mixed(s):
            return jnp.mean(lj.apply(model, {"params": frozen}, s, ids, adapter_ids=aid) ** 2)

        g_single = jax.jit(jax.value_and_grad(loss_single))
        g_mixed = jax.jit(jax.value_and_grad(loss_mixed))
        variants["jax_train_single"] = run_jax(g_single, adapters[0])
        variants["jax_train_mixed"] = run_jax(g_mixed, stacked)

    # machine-independent: XLA's cost analysis of each compiled JAX variant
    def cost(f, *a):
        c = f.lower(*a).compile().cost_analysis()
        c = c[0] if isinstance(c, (list, tuple)) else c
        return {"gflops": c.get("flops", float("nan")) / 1e9, "gbytes": c.get("bytes accessed", float("nan")) / 1e9}

    costs = {"jax_base": cost(f_base, base, ids), "jax_single": cost(f_single, adapters[0], ids),
             "jax_mixed": cost(f_mixed, stacked, ids, aid)}
    if args.train:
        costs.update(jax_train_single=cost(g_single, adapters[0]), jax_train_mixed=cost(g_mixed, stacked))
    print("XLA cost analysis: " + ", ".join(f"{n} {c['gflops']:.2f} GFLOP {c['gbytes']:.2f} GB" for n, c in costs.items()))

    names_v = list(variants)
    times: dict[str, list[float]] = {n: [] for n in names_v}
    cpu: dict[str, list[float]] = {n: [] for n in names_v}   # process CPU time (all threads)
    for r in range(args.rounds + 1):
        order = names_v[r % len(names_v):] + names_v[:r % len(names_v)]
        for n in order:
            dt = dc = float("inf")
            for _ in range(args.reps):
                t0, c0 = time.perf_counter(), time.process_time()
                variants[n]()
                dt, dc = min(dt, time.perf_counter() - t0), min(dc, time.process_time() - c0)
            if r > 0:
                times[n].append(dt)
                cpu[n].append(dc)
        if r > 0:
            print(f"round {r}: " + ", ".join(f"{n} {1e3 * times[n][-1]:.1f} ms ({1e3 * cpu[n][-1]:.0f} cpu)"
                                             for n in names_v), flush=True)

    def paired(a, b, t=None):
        t = times if t is None else t
        if a not in t or b not in t:
            return None
        return statistics.median(x / y for x, y in zip(t[a], t[b]))

    ratios = {
        "jax_mixed/jax_single": paired("jax_mixed", "jax_single"),
        "jax_single/jax_base": paired("jax_single", "jax_base"),
        "peft_mixed/peft_single": paired("peft_mixed", "peft_single"),
        "jax_mixed/peft_mixed": paired("jax_mixed", "peft_mixed"),
        "jax_single/peft_single": paired("jax_single", "peft_single"),
        "jax_train_mixed/jax_train_single": paired("jax_train_mixed", "jax_train_single"),
    }
    ratios = {k: v for k, v in ratios.items() if v is not None}
    cpu_ratios = {k: paired(*k.split("/"), t=cpu) for k in ratios}
    medians = {n: 1e3 * statistics.median(t) for n, t in times.items()}
    cpu_medians = {n: 1e3 * statistics.median(t) for n, t in cpu.items()}
    print("\nmedian ms: " + ", ".join(f"{n} {v:.1f}" for n, v in medians.items()))
    print("median cpu ms: " + ", ".join(f"{n} {v:.1f}" for n, v in cpu_medians.items()))
    print("paired ratios (median over rounds): " + ", ".join(f"{k} {v:.3f}" for k, v in ratios.items()))
    print("paired cpu-time ratios: " + ", ".join(f"{k} {v:.3f}" for k, v in cpu_ratios.items()))
    if args.json:
        out = {"args": vars(args), "median_ms": medians, "ratios": ratios, "times_s": times, "check": check,
               "median_cpu_ms": cpu_medians, "cpu_ratios": cpu_ratios, "cpu_s": cpu, "xla_cost": costs,
               "meta": {"jax": jax.__version__, "torch": torch.__version__, "platform": platform.platform(),
                        "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()}}
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
