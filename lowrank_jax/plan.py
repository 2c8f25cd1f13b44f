"""Memory planner: what a training step needs per device, for full fine-tuning and every adapter method.

Pure arithmetic (no jax at import, nothing traced). :func:`plan` returns one :class:`MemoryPlan` per
method; ``lowrank-jax plan`` prints them as a table (or ``--json``). Sizes are bytes **per device**.

Terms (``P`` parameters, ``T`` trainable scalars, ``b`` bytes per element of ``dtype``, ``D`` devices;
adapter arrays and their gradients are float32, as the library keeps them):

* **weights** -- full: ``P·b``. LoRA/DoRA/VeRA: the frozen base ``P·b`` (DoRA adds its cached
  ``‖W0_j‖²``, ``4·out`` bytes per kernel; VeRA its shared projections ``4·r·(max_in + max_out)``).
  QLoRA/QDoRA: the adapted kernels in NF4 (:func:`nf4_bytes`: 4.127 bits/weight with double quant,
  block 64), everything else (embeddings, norms, LM head unless ``nf4_head``) in ``dtype``.
* **gradients** -- full: ``P·b``; adapters: ``4·T``.
* **optimizer state** -- Adam/AdamW: two moments per trainable scalar in the trainables' dtype, as optax
  keeps them (``8·T`` for adapters; ``8·P`` for float32 full fine-tuning); SGD: 0.
* **adapters** -- ``4·T``: LoRA ``r·(in+out)`` per kernel, DoRA ``+ out``, VeRA ``r + out``.
* **activations** -- what the backward pass keeps (:func:`activation_bytes`): per layer a sum over the
  tensors the step saves, times the layers, plus the loss head (float32 logits).
* **backend** -- weight copies the compiled step keeps from the forward to the backward pass
  (:func:`backend_extra_bytes`): float32 converts of 16-bit weights on XLA:CPU, and under FSDP the
  all-gathered weights (XLA reuses the forward's gather for the backward: every device ends up holding the
  whole base). Neither for NF4 kernels, which are dequantized per use.

FSDP (``devices > 1``) divides weights, gradients, optimizer state and adapters by ``D``, not activations:
``batch`` is per device.

**Total.** Gradients and saved activations are not alive together: the backward pass frees each layer's
saved activations as it produces that layer's gradients, and with a per-tensor optimizer (Adam, AdamW,
SGD) XLA applies the update to each gradient as soon as it exists. So, for full fine-tuning,

    total = weights + optimizer + activations + update + backend,
    update = b·n_max + m·b_m·n_max/D

(``n_max`` the largest parameter -- the LM head or embedding -- whose full gradient exists before its
reduce-scatter, plus its ``m`` fresh moments), and for adapters
``total = weights + optimizer + adapters + adapter gradients + activations + backend``. With
``keep_grads=True`` (gradients kept to the end of the backward pass: global-norm clipping, accumulation)
the full fine-tuning total uses ``max(activations + update, gradients)`` instead.
``lowrank-jax plan --params 1e9 --dtype float32 --methods full`` shows 4 GB weights, 4 GB gradients and
8 GB of Adam state.

Model configs (:data:`CONFIGS`): ``1b`` TinyLlama-1.1B, ``8b`` Llama-3-8B, ``70b`` Llama-3-70B (their
published Hugging Face ``config.json`` values, quoted at :data:`_LLAMA_PRESETS`), and the bundled
reference models ``smollm2`` (SmolLM2-135M, :class:`lowrank_jax.models.llama.LlamaConfig` defaults) and
``minilm`` (all-MiniLM-L6-v2 + a 2-way classifier head, :class:`lowrank_jax.models.bert.BertConfig`
defaults). A bare parameter count gets an assumed Llama-style shape (:func:`params_spec`).

Checked against XLA's ``memory_analysis`` of the real train step of the Llama reference model, compiled
with abstract parameters at 1B and 8B on 1 and 8 (FSDP) host devices: ``benchmarks/plan_vs_xla.py``
(float32: within 5 % of arguments + temporaries in 15 of 16 cases; 8B full fine-tuning on 8 devices is
0.82 of it -- XLA's heap packing leaves 11 GiB of gaps -- and 1.01 of XLA's peak live bytes). The
backend terms come from the buffer assignment (``benchmarks/diag_plan_temps.py``). ``gpu``/``tpu``
use the same formulas without the XLA:CPU-specific counts; they were not measured.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

__all__ = [
    "BACKENDS",
    "CONFIGS",
    "DTYPES",
    "METHODS",
    "OPTIMIZERS",
    "REMAT",
    "Linear",
    "MemoryPlan",
    "ModelSpec",
    "activation_bytes",
    "backend_extra_bytes",
    "format_table",
    "llama_spec",
    "model_spec",
    "nf4_bytes",
    "params_spec",
    "plan",
    "with_layers",
]

METHODS = ("full", "lora", "dora", "vera", "qlora", "qdora")
OPTIMIZERS = {"adam": 2, "adamw": 2, "sgd": 0}   # moments per trainable scalar
DTYPES = {"float32": 4, "bfloat16": 2, "float16": 2}
REMAT = ("none", "full", "linear_outputs")
BACKENDS = ("cpu", "gpu", "tpu")
CONFIGS = ("1b", "8b", "70b", "smollm2", "minilm")
NF4_BLOCK = 64
NF4_NESTED_BLOCK = 256


# ------------------------------------------------------------------------------------------ models

@dataclasses.dataclass(frozen=True)
class Linear:
    """One adaptable projection of a layer: kernel ``(n_in, n_out)``."""

    name: str
    n_in: int
    n_out: int


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Shapes a plan needs. ``linears`` are the kernels of one layer that adapters target (every one).

    ``other_params`` counts everything that is not a layer kernel (embeddings, norms, biases, the LM or
    classification head); ``head_params`` is the part of it used as a matmul weight at the end (the LM
    head, or the tied embedding table used as one; 0 when the head is tiny); ``largest_param`` the size of
    the largest single array.
    """

    name: str
    family: str                  # "llama" (pre-norm, gated SiLU MLP, GQA, RoPE), "bert" (post-LN, GELU)
    n_layers: int
    hidden: int
    intermediate: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab: int
    tied_embeddings: bool
    linears: tuple[Linear, ...]
    other_params: int
    head_params: int
    largest_param: int
    loss_classes: int            # width of the logits the loss sees (vocab for an LM, labels for a classifier)
    source: str

    @property
    def layer_kernel_params(self) -> int:
        return sum(l.n_in * l.n_out for l in self.linears)

    @property
    def n_params(self) -> int:
        """Total parameter count."""
        return self.n_layers * self.layer_kernel_params + self.other_params


def llama_spec(name: str, *, vocab: int, hidden: int, intermediate: int, layers: int, heads: int,
               kv_heads: int, head_dim: int, tied: bool, source: str) -> ModelSpec:
    """A Llama-style decoder (:class:`lowrank_jax.models.llama.LlamaForCausalLM`).

    Per layer: ``q (d, h·hd)``, ``k, v (d, kv·hd)``, ``o (h·hd, d)``, ``gate, up (d, f)``, ``down (f, d)``,
    two RMSNorm scales ``d``; plus the embedding ``V·d``, the final norm ``d`` and, untied, ``lm_head
    (d, V)``. No biases.
    """
    lin = (Linear("q_proj", hidden, heads * head_dim), Linear("k_proj", hidden, kv_heads * head_dim),
           Linear("v_proj", hidden, kv_heads * head_dim), Linear("o_proj", heads * head_dim, hidden),
           Linear("gate_proj", hidden, intermediate), Linear("up_proj", hidden, intermediate),
           Linear("down_proj", intermediate, hidden))
    embed = vocab * hidden
    other = layers * 2 * hidden + embed + hidden + (0 if tied else embed)
    largest = max(embed, max(l.n_in * l.n_out for l in lin))
    return ModelSpec(name, "llama", layers, hidden, intermediate, heads, kv_heads, head_dim, vocab, tied, lin,
                     other, embed, largest, vocab, source)


_LLAMA_PRESETS = {
    # TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T config.json: hidden_size 2048, intermediate_size
    # 5632, num_hidden_layers 22, num_attention_heads 32, num_key_value_heads 4, vocab_size 32000,
    # tie_word_embeddings false (head_dim 2048/32 = 64). 1,100,048,384 parameters.
    "1b": dict(vocab=32000, hidden=2048, intermediate=5632, layers=22, heads=32, kv_heads=4, head_dim=64,
               tied=False, source="TinyLlama-1.1B (HF config.json)"),
    # meta-llama/Meta-Llama-3-8B config.json: hidden_size 4096, intermediate_size 14336, num_hidden_layers
    # 32, num_attention_heads 32, num_key_value_heads 8, vocab_size 128256, tie_word_embeddings false
    # (head_dim 128). 8,030,261,248 parameters.
    "8b": dict(vocab=128256, hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8, head_dim=128,
               tied=False, source="Llama-3-8B (HF config.json)"),
    # meta-llama/Meta-Llama-3-70B config.json: hidden_size 8192, intermediate_size 28672, num_hidden_layers
    # 80, num_attention_heads 64, num_key_value_heads 8, vocab_size 128256, tie_word_embeddings false
    # (head_dim 128). 70,553,706,496 parameters.
    "70b": dict(vocab=128256, hidden=8192, intermediate=28672, layers=80, heads=64, kv_heads=8, head_dim=128,
                tied=False, source="Llama-3-70B (HF config.json)"),
}


def _smollm2_spec() -> ModelSpec:
    from lowrank_jax.models.llama import LlamaConfig

    c = LlamaConfig()
    return llama_spec("smollm2", vocab=c.vocab_size, hidden=c.hidden_size, intermediate=c.intermediate_size,
                      layers=c.num_hidden_layers, heads=c.num_attention_heads, kv_heads=c.num_key_value_heads,
                      head_dim=c.head_dim, tied=c.tie_word_embeddings,
                      source="SmolLM2-135M (lowrank_jax.models.llama.LlamaConfig defaults)")


def _minilm_spec(num_labels: int = 2) -> ModelSpec:
    """all-MiniLM-L6-v2 as :class:`lowrank_jax.models.bert.BertClassifier` (no pooler, ``num_labels`` head).

    Per layer: ``query, key, value, attention/output/dense (d, d)``, ``intermediate (d, f)``,
    ``output (f, d)``, each with a bias, and two LayerNorms (scale + bias); embeddings: word ``V·d``,
    position ``512·d``, token type ``2·d``, one LayerNorm; head ``(d, labels)`` + bias.
    """
    from lowrank_jax.models.bert import BertConfig

    c = BertConfig()
    d, f = c.hidden_size, c.intermediate_size
    lin = (Linear("query", d, d), Linear("key", d, d), Linear("value", d, d), Linear("attention_output", d, d),
           Linear("intermediate", d, f), Linear("output", f, d))
    per_layer_other = 4 * d + f + d + 2 * 2 * d           # 6 biases + 2 LayerNorms (scale, bias)
    embed = (c.vocab_size + c.max_position_embeddings + c.type_vocab_size) * d + 2 * d
    other = c.num_hidden_layers * per_layer_other + embed + d * num_labels + num_labels
    return ModelSpec("minilm", "bert", c.num_hidden_layers, d, f, c.num_attention_heads, c.num_attention_heads,
                     d // c.num_attention_heads, c.vocab_size, False, lin, other, 0, c.vocab_size * d,
                     num_labels, "all-MiniLM-L6-v2 (lowrank_jax.models.bert.BertConfig defaults) + 2-way head")


def params_spec(n_params: float, *, hidden: int | None = None, layers: int | None = None) -> ModelSpec:
    """A Llama-style model of about ``n_params`` parameters, for ``--params``.

    Only the count is known, so the shape is assumed: every parameter sits in the layers' linears
    (no embeddings), ``hidden = d`` with MHA (``heads = d/64``), a gated MLP of width ``f = 8d/3``
    (rounded to a multiple of 64), i.e. ``12·d²`` weights per layer, ``d ≈ (100·N/12)^(1/3)`` (multiple of
    64) and as many layers as fit (``≈ d/100``; ``d/layers`` is 93 for TinyLlama-1.1B, 128 for Llama-3-8B,
    102 for Llama-3-70B); the
    remainder counts as other (non-kernel) parameters, so the count is exact. No vocabulary: the loss head
    is not planned. Weights, gradients and optimizer state depend only on the count; adapter sizes and
    activations on this assumed shape.
    """
    if not n_params > 0:
        raise ValueError(f"--params must be > 0, got {n_params!r}")
    n = float(n_params)
    if hidden is None:
        if layers is None:
            hidden = max(64, int(round((100 * n / 12) ** (1 / 3) / 64)) * 64)
        else:
            hidden = max(64, int(round(math.sqrt(n / (12 * layers)) / 64)) * 64)
    f = max(64, int(round(8 * hidden / 3 / 64)) * 64)
    heads = max(1, hidden // 64)
    lin = (Linear("q_proj", hidden, hidden), Linear("k_proj", hidden, hidden), Linear("v_proj", hidden, hidden),
           Linear("o_proj", hidden, hidden), Linear("gate_proj", hidden, f), Linear("up_proj", hidden, f),
           Linear("down_proj", f, hidden))
    per_layer = sum(l.n_in * l.n_out for l in lin)
    if layers is None:
        layers = max(1, int(n // per_layer))
    kernels = layers * per_layer
    if kernels > n:
        raise ValueError(f"--params {n:.4g} is smaller than {layers} layer(s) of width {hidden} "
                         f"({kernels:,} weights); pass a smaller --hidden or --layers")
    other = int(round(n)) - kernels     # the count stays exact: the remainder counts as other parameters
    return ModelSpec(f"{n:.3g} params", "llama", layers, hidden, f, heads, heads, 64, 0, False, lin, other, 0,
                     max(l.n_in * l.n_out for l in lin), 0,
                     f"--params {n:.3g}: assumed shape d={hidden}, f={f}, {layers} layers, MHA")


def model_spec(name: str) -> ModelSpec:
    """The :class:`ModelSpec` of a config name in :data:`CONFIGS`."""
    key = str(name).lower()
    if key in _LLAMA_PRESETS:
        return llama_spec(key, **_LLAMA_PRESETS[key])
    if key == "smollm2":
        return _smollm2_spec()
    if key == "minilm":
        return _minilm_spec()
    raise ValueError(f"unknown --config {name!r}; choose one of {', '.join(CONFIGS)}")


def with_layers(spec: ModelSpec, n_layers: int) -> ModelSpec:
    """``spec`` with ``n_layers`` layers (same widths): quick compiler checks on a shallower model."""
    per_layer_other = {"llama": 2 * spec.hidden}.get(spec.family)
    if per_layer_other is None:
        d, f = spec.hidden, spec.intermediate
        per_layer_other = 4 * d + f + d + 4 * d
    other = spec.other_params + (n_layers - spec.n_layers) * per_layer_other
    return dataclasses.replace(spec, n_layers=n_layers, other_params=other, name=f"{spec.name}[{n_layers}L]")


# ------------------------------------------------------------------------------------------ bytes

def nf4_bytes(n: int, block: int = NF4_BLOCK, double_quant: bool = True) -> int:
    """Bytes of one NF4 matrix of ``n`` weights, exactly as :class:`~lowrank_jax.quant.nf4.NF4Array` stores it.

    ``ceil(n/2)`` packed codes; with double quantization ``nb = ceil(n/block)`` uint8 absmax codes,
    ``ceil(nb/256)`` float32 nested scales and one float32 offset (0.5 + 1/64 + 1/4096 B/weight = 4.127
    bits); without, ``4·nb`` float32 absmax (4.5 bits).
    """
    nb = -(-n // block)
    if double_quant:
        return -(-n // 2) + nb + 4 * (-(-nb // NF4_NESTED_BLOCK)) + 4
    return -(-n // 2) + 4 * nb


def _trainable_per_kernel(method: str, n_in: int, n_out: int, rank: int, vera_rank: int) -> int:
    """Trainable scalars one method adds to an ``(n_in, n_out)`` kernel (== ``lj.expected_count``)."""
    if method in ("lora", "qlora"):
        return rank * (n_in + n_out)
    if method in ("dora", "qdora"):
        return rank * (n_in + n_out) + n_out
    if method == "vera":
        return vera_rank + n_out
    raise ValueError(method)


# ------------------------------------------------------------------------------------------ activations

def _coefficients(backend: str, devices: int) -> tuple[int, int, int, int]:
    """``(c_d, c_f, c_p, c_l)`` of :func:`activation_bytes` for a backend (see there)."""
    if backend != "cpu":
        return 4, 3, 1, 2
    return (6, 5, 3, 3) if devices == 1 else (6, 5, 2, 3)


def activation_bytes(spec: ModelSpec, *, method: str, dtype: str, batch: int, seq: int, rank: int,
                     remat: str, backend: str, devices: int = 1) -> dict[str, int]:
    """Bytes the backward pass needs from the forward pass, per device (``batch`` is per device).

    With ``N = batch·seq`` tokens, ``a`` bytes per activation element (``dtype``), ``d, f, h, kv, hd, T``
    the hidden, MLP width, heads, KV heads, head dim and sequence length, one Llama decoder layer saves::

        layer = a·N·(c_d·d + 2·h·hd + 2·kv·hd + c_f·f) + 4·c_p·batch·h·T² + 4·N·r·n_lin

    * ``2·h·hd``: the rotated queries and the attention context; ``2·kv·hd``: the rotated keys and values;
    * ``4·batch·h·T²``: float32 softmax probabilities (the model computes attention in float32);
    * ``4·N·r`` per adapted linear (``n_lin`` of them): the adapter's ``x·A`` (float32);
    * ``c_d·d``: the residual stream and the two RMSNorm inputs/outputs; ``c_f·f``: the MLP's gate, up and
      ``silu(gate)·up`` (and ``silu``'s own intermediates).

    The counts ``c`` are the backend's fusion decisions:

    * ``gpu``/``tpu`` (**not measured** here, no such device): each saved tensor once, ``c_d = 4, c_f = 3,
      c_p = 1``.
    * ``cpu`` (XLA:CPU, read off the buffer assignment of the compiled 1.1B step,
      ``benchmarks/diag_plan_temps.py``): ``c_f = 5`` (gate, up, ``sigmoid``, ``silu`` and ``silu·up``);
      ``c_d = 6`` (two norm outputs are kept in two layouts); one device ``c_p = 3`` -- jax's default
      softmax (``jax_softmax_custom_jvp`` off) differentiates ``exp(x − max)/sum`` and XLA keeps ``exp``,
      the probabilities and a *materialized broadcast* of ``1/sum`` -- while the SPMD-partitioned (FSDP)
      program fuses the broadcast away: ``c_p = 2``. With a factored
      adapter on ``gate``/``up``, ``c_f`` grows by one for each: XLA fuses the ``base + branch`` sum into
      its consumers and keeps both addends alive instead of the sum.
    * BERT-style (post-LN, GELU, ``minilm``): ``c_f`` is 2 smaller (no gate); with a factored adapter on
      ``cpu`` the addends are kept for q/k/v (they feed the attention einsums), both LayerNorm inputs and
      the GELU input: ``c_d + 5``, ``c_f + 1`` (inferred from the compiled MiniLM step; loosely checked).
    * Non-float32 ``dtype`` on ``cpu``: the adapter branch's float32 copy of each distinct layer input
      (``4·N·(3d + f)`` per layer) -- an estimate, not fitted.

    The loss head adds ``4·N·V·c_l`` (float32 logits, their ``exp`` and their gradient, ``c_l = 3`` on cpu,
    2 otherwise; ``V`` the logits width) and the final norm ``2·a·N·d``.

    Remat (each decoder layer under ``jax.checkpoint``): ``"none"`` keeps every layer's tensors;
    ``"full"`` (nothing saveable) keeps each layer's input ``a·N·d`` and recomputes one layer at a time
    (``+ layer`` once); ``"linear_outputs"`` (``dots_with_no_batch_dims_saveable``) keeps the input and the
    output of every projection (``a·N·(h·hd + 2·kv·hd + 2d + 2f)``; with a factored adapter each projection
    is two dots -- the base product and the branch -- so the outputs are kept twice, plus ``4·N·r`` per
    adapted projection) and recomputes one layer.

    Returns ``{"layers": ..., "head": ..., "total": ...}``.
    """
    if backend not in BACKENDS:
        raise ValueError(f"--backend: unknown value {backend!r}; choose one of {', '.join(BACKENDS)}")
    if remat not in REMAT:
        raise ValueError(f"--remat: unknown value {remat!r}; choose one of {', '.join(REMAT)}")
    a = DTYPES[dtype]
    n = batch * seq
    d, f, h, kv, hd, t = spec.hidden, spec.intermediate, spec.n_heads, spec.n_kv_heads, spec.head_dim, seq
    adapted = method != "full"
    cpu = backend == "cpu"
    n_lin = len(spec.linears)
    c_d, c_f, c_p, c_l = _coefficients(backend, devices)
    if spec.family == "llama":
        if cpu and adapted:
            c_f += sum(1 for l in spec.linears if l.name in ("gate_proj", "up_proj"))
        mlp_out = 2 * f
    else:                                  # bert: GELU MLP (the intermediate output and its GELU), post-LN
        c_f -= 2
        if cpu and adapted:                # addends kept for q/k/v (einsums), the two LayerNorm inputs, GELU
            c_d += 5
            c_f += 1
        mlp_out = f
    layer = a * n * (c_d * d + 2 * h * hd + 2 * kv * hd + c_f * f) + 4 * c_p * batch * h * t * t
    if adapted:
        layer += 4 * n * rank * n_lin
        if cpu and a != 4:
            layer += 4 * n * (3 * d + f)
    layer_input = a * n * d
    if remat == "none":
        layers = spec.n_layers * layer
    elif remat == "full":
        layers = spec.n_layers * layer_input + layer
    else:
        outs = a * n * (h * hd + 2 * kv * hd + 2 * d + mlp_out)
        if adapted:
            outs = 2 * outs + 4 * n * rank * n_lin
        layers = spec.n_layers * (layer_input + outs) + layer
    head = 4 * n * spec.loss_classes * c_l + 2 * a * n * d
    return {"layers": int(layers), "head": int(head), "total": int(layers + head)}


def backend_extra_bytes(spec: ModelSpec, *, method: str, dtype: str, devices: int, backend: str,
                        frozen_dot_fix: bool = False, nf4_head: bool = False) -> int:
    """Weight copies the compiled step keeps beyond the plan's other terms, per device.

    * **16-bit weights on XLA:CPU** (``cpu``): XLA:CPU has no 16-bit GEMM, so it converts each matmul
      weight to float32, and since the same converted weight serves the forward product and the backward
      input gradient (common-subexpression elimination), each copy lives from the forward to the backward
      pass: ``4`` bytes per matmul weight (every layer kernel and the LM head; under FSDP of the gathered,
      i.e. whole, weight, instead of the gathered 16-bit one). QLoRA/QDoRA's NF4 kernels are dequantized
      per use (forward, and again in the backward), so only a non-NF4 LM head remains.
    * **FSDP** (``devices > 1``; XLA's SPMD partitioner): each matmul weight is all-gathered for the
      forward product and the backward's ``g·Wᵀ`` reuses that gathered copy (CSE), so every gathered weight
      lives from the forward to the backward pass: ``b`` bytes per layer-kernel and LM-head weight -- the
      whole unsharded base, on every device (measured on XLA:CPU; the passes involved are not
      CPU-specific, but GPU/TPU were not measured). NF4 kernels are gathered and dequantized per use: not
      retained.
    * An NF4 LM head (``nf4_head``, as ``lj.quantize`` stores it) is dequantized for the logits, right at
      the step's peak: ``b`` bytes per head weight.

    ``frozen_dot_fix=True`` models the proposed execution-path fix for factored adapters (each frozen base
    product a ``custom_vjp`` whose uses read the weight behind a fake data dependency on their input;
    prototyped in ``benchmarks/diag_plan_temps.py``): no copy is retained for the adapted kernels; the LM
    head (not adapted) keeps its.
    """
    b = DTYPES[dtype]
    kernels = spec.n_layers * spec.layer_kernel_params
    head = spec.head_params
    quantized = method in ("qlora", "qdora")
    if quantized or (frozen_dot_fix and method != "full"):
        kernels = 0
    extra = 0
    if nf4_head and quantized:
        extra += b * head
        head = 0
    if backend == "cpu" and b != 4:
        per_weight = 4          # the float32 convert (of the gathered weight under FSDP; the gather itself dies)
    elif devices > 1:
        per_weight = b          # the gathered weight
    else:
        per_weight = 0
    return int(extra + per_weight * (kernels + head))


# ------------------------------------------------------------------------------------------ plan

@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Per-device bytes of one method's training step (see the module docstring for each term)."""

    method: str
    model: str
    dtype: str
    devices: int
    backend: str
    n_params: int
    trainable_params: int
    weights: int
    gradients: int
    optimizer_state: int
    adapters: int
    activations: int
    update: int
    backend_extra: int
    total: int
    notes: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"notes": list(self.notes)}


def _check_choice(flag: str, value: Any, choices: Sequence[Any]) -> None:
    if value not in choices:
        raise ValueError(f"{flag}: unknown value {value!r}; choose one of {', '.join(map(str, choices))}")


def _check_positive_int(flag: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{flag} must be an integer >= 1, got {value!r}")


def plan(model: ModelSpec | str | float, methods: Sequence[str] = METHODS, *, dtype: str = "bfloat16",
         optimizer: str = "adam", rank: int = 16, vera_rank: int = 256, batch: int = 1, seq: int = 512,
         remat: str = "none", devices: int = 1, backend: str = "cpu", scanned: bool = False,
         keep_grads: bool = False, nf4_head: bool = False, frozen_dot_fix: bool = False,
         moments_dtype: str | None = None) -> list[MemoryPlan]:
    """One :class:`MemoryPlan` per method, per device, in bytes.

    Args:
      model: a :class:`ModelSpec`, a config name (:data:`CONFIGS`) or a parameter count (:func:`params_spec`).
      methods: any of :data:`METHODS` (``full`` = full fine-tuning; every layer kernel adapted otherwise;
        ``qlora``/``qdora`` store the adapted kernels as NF4, as ``LoRA(..., quant=NF4())``).
      dtype: storage and compute dtype of the base weights and activations.
      optimizer: ``adam``/``adamw`` (two moments per trainable scalar) or ``sgd`` (none).
      moments_dtype: dtype of the optimizer moments; ``None``: the trainable arrays' dtype, as optax does
        (float32 for adapters and float32 weights, ``dtype`` for full fine-tuning).
      rank: LoRA/DoRA rank; ``vera_rank``: VeRA's shared rank.
      batch, seq: sequences per device and tokens per sequence.
      remat: ``none``, ``full`` or ``linear_outputs`` per layer (see :func:`activation_bytes`).
      devices: FSDP devices: weights, gradients, optimizer state and adapters are divided by it.
      backend: ``cpu`` (XLA:CPU, checked against the compiler), ``gpu``/``tpu`` (each saved tensor once and
        no CPU-specific copies; not checked).
      scanned: the layers run under ``nn.scan``/``lax.scan``. On ``cpu`` remat only pays off then: in an
        unrolled model XLA:CPU drops the optimization barriers ``jax.checkpoint`` relies on before CSE, so
        the recomputation merges with the forward pass and everything is saved as without remat.
      keep_grads: all gradients stay alive to the end of the backward pass (global-norm clipping, gradient
        accumulation) instead of each being consumed by the optimizer as soon as it exists.
      nf4_head: QLoRA/QDoRA with the LM head in NF4 too (``lj.quantize(params, lj.NF4())`` quantizes every
        kernel; default: only the adapted ones, as ``LoRA(quant=NF4())``).
      frozen_dot_fix: model the proposed execution-path fix (:func:`backend_extra_bytes`).

    Raises:
      ValueError naming the flag for an unknown method, dtype, optimizer, remat or backend, a non-positive
      size, or a rank above a kernel's ``min(in, out)``.

    Example:
      >>> [p] = plan(1e9, ["full"], dtype="float32")
      >>> p.weights, p.gradients, p.optimizer_state
      (4000000000, 4000000000, 8000000000)
    """
    if isinstance(model, ModelSpec):
        spec = model
    elif isinstance(model, (int, float)) and not isinstance(model, bool):
        spec = params_spec(model)
    else:
        spec = model_spec(model)
    if isinstance(methods, str):
        methods = (methods,)
    if not methods:
        raise ValueError("--methods: give at least one method")
    for m in methods:
        _check_choice("--method", m, METHODS)
    _check_choice("--dtype", dtype, tuple(DTYPES))
    _check_choice("--optimizer", optimizer, tuple(OPTIMIZERS))
    _check_choice("--remat", remat, REMAT)
    _check_choice("--backend", backend, BACKENDS)
    if moments_dtype is not None:
        _check_choice("--moments-dtype", moments_dtype, tuple(DTYPES))
    for flag, v in (("--rank", rank), ("--vera-rank", vera_rank), ("--batch", batch), ("--seq", seq),
                    ("--devices", devices)):
        _check_positive_int(flag, v)
    if any(m != "full" and m != "vera" for m in methods):
        for l in spec.linears:
            if rank > min(l.n_in, l.n_out):
                raise ValueError(f"--rank {rank} exceeds min(in, out) = {min(l.n_in, l.n_out)} of {l.name} "
                                 f"({l.n_in}, {l.n_out}) in {spec.name}")
    b = DTYPES[dtype]
    moments = OPTIMIZERS[optimizer]
    D = devices
    P = spec.n_params
    kernels = [(l, spec.n_layers) for l in spec.linears]
    kernel_w = spec.n_layers * spec.layer_kernel_params
    effective_remat = remat
    out: list[MemoryPlan] = []
    for method in methods:
        notes: list[str] = []
        if remat != "none" and backend == "cpu" and not scanned:
            effective_remat = "none"
            notes.append(f"remat {remat!r} saves ~nothing in an unrolled model on XLA:CPU (recomputation CSE'd "
                         "with the forward); planned as none -- pass scanned=True/--scanned for nn.scan layers")
        up = 0
        if method == "full":
            trainable = P
            weights, grads, adapters = P * b, P * b, 0
            mb = DTYPES[moments_dtype] if moments_dtype else b
            opt = mb * moments * P
            # the largest parameter's full gradient (before a reduce-scatter under FSDP) + its new moments
            up = b * spec.largest_param + -(-mb * moments * spec.largest_param // D)
        else:
            trainable = sum(_trainable_per_kernel(method, l.n_in, l.n_out, rank, vera_rank) * n for l, n in kernels)
            if method in ("qlora", "qdora"):
                weights = (P - kernel_w) * b + sum(nf4_bytes(l.n_in * l.n_out) * n for l, n in kernels)
                if nf4_head and spec.head_params:
                    weights += nf4_bytes(spec.head_params) - b * spec.head_params
                notes.append("NF4 (block 64, double quant) on the adapted kernels"
                             + (" and the LM head" if nf4_head else "") + f"; the rest in {dtype}")
            else:
                weights = P * b
            if method in ("dora", "qdora"):
                weights += 4 * sum(l.n_out * n for l, n in kernels)           # cached ‖W0_j‖²
            if method == "vera":
                weights += 4 * vera_rank * (max(l.n_in for l in spec.linears) + max(l.n_out for l in spec.linears))
            adapters = 4 * trainable
            grads = 4 * trainable
            opt = (DTYPES[moments_dtype] if moments_dtype else 4) * moments * trainable
        act = activation_bytes(spec, method=method, dtype=dtype, batch=batch, seq=seq, rank=rank,
                               remat=effective_remat, backend=backend, devices=D)["total"]
        extra = backend_extra_bytes(spec, method=method, dtype=dtype, devices=D, backend=backend,
                                    frozen_dot_fix=frozen_dot_fix, nf4_head=nf4_head)
        weights, grads, opt, adapters = (-(-x // D) for x in (weights, grads, opt, adapters))
        if method == "full":
            live = max(act + up, grads) if keep_grads else act + up
            total = weights + opt + live + extra
        else:
            total = weights + opt + adapters + grads + act + extra
        out.append(MemoryPlan(method, spec.name, dtype, D, backend, P, trainable, weights, grads, opt, adapters,
                              act, up, extra, total, tuple(notes)))
    return out


# ------------------------------------------------------------------------------------------ table

def _gb(x: int) -> str:
    return f"{x / 1e9:.2f}"


def format_table(plans: Sequence[MemoryPlan], fits: Sequence[float] = (16, 24, 80)) -> str:
    """A Markdown table: per-device sizes in GB (1e9 bytes) and whether ``total`` fits a device of each size
    in ``fits`` -- device sizes in GiB (2^30 bytes: an "80 GB" GPU has 80 GiB)."""
    head = ["method", "trainable", "weights", "gradients", "optimizer", "adapters", "activations", "backend",
            "total"] + [f"fits {g:g}G" for g in fits]
    rows = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for p in plans:
        cells = [p.method, f"{p.trainable_params:,}", _gb(p.weights), _gb(p.gradients), _gb(p.optimizer_state),
                 _gb(p.adapters), _gb(p.activations), _gb(p.backend_extra), _gb(p.total)]
        cells += ["yes" if p.total <= g * 2**30 else "no" for g in fits]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)
