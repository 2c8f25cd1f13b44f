"""``lowrank-jax compare``: fine-tune one pretrained model with every method under the same budget.

Each method trains on the same batches in the same order, from the same head initialisation, for the
same number of steps, with its own learning rate (AdamW without weight decay, linear warm-up then
linear decay to zero):

=========  ==================================================================================
method     what is trained
=========  ==================================================================================
``full``   every parameter (the baseline all others are a fraction of)
``probe``  only the classification head; the encoder is frozen (a linear probe)
``lora``   ``LoRA(rank=r, alpha=2r)`` on the attention query/value kernels + the head
``dora``   ``DoRA(rank=r, alpha=2r)`` on the same kernels + the head
``vera``   ``VeRA(rank=256)`` on the same kernels + the head
``qlora``  ``lora`` over a fully quantized encoder: every dense kernel NF4
           (``NF4(block_size=64, double_quant=True)``), embeddings and norms bfloat16 (QLoRA's base)
``qdora``  ``dora`` over the same fully quantized encoder
``dvora``  ``DVoRA(rank=256)`` (DoRA's magnitude over VeRA's direction) on the same kernels + the head;
           not in the default list (``--methods ...,dvora``)
=========  ==================================================================================

The classification head (``classifier/kernel``, ``classifier/bias``) is trainable in every method
(PEFT's ``modules_to_save``): the trainable state is the pytree ``{"adapter": adapter, "params":
head}``; ``params`` is inserted into the frozen tree inside the loss, so the optimizer state holds
only adapter + head. For ``full`` the adapter is empty and ``params`` is the whole tree; for
``probe`` the adapter is empty and ``params`` is the head.

For each method the run records: trainable parameters, optimizer-state bytes, frozen-base bytes
(NF4 storage where quantized), median step time, the compiled step's peak memory from XLA's
``memory_analysis`` (``argument + output − alias + temp`` bytes, at the widest batch shape), test
accuracy and the training-loss curve. A method that raises (e.g. an unfinished QLoRA path) is
reported as failed with its error; the others still run.

With ``model="smollm2"`` the SmolLM2-135M decoder is fine-tuned as a classifier without a new
head: the prompt ``"Review: <text>\\nSentiment:"`` is scored by the two logits of the label tokens
``" negative"`` / ``" positive"`` at the last real token (the tied LM head restricted to two rows),
trained with cross-entropy over those two logits. ``zeroshot`` evaluates that score untrained.

Programmatic use::

    from lowrank_jax.compare import CompareConfig, run_compare
    results = run_compare(CompareConfig(methods=("probe", "lora"), steps=20, out="runs/x"))
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "MINILM_METHODS",
    "SMOLLM2_METHODS",
    "OPTIONAL_METHODS",
    "DEFAULT_LR",
    "TARGETS",
    "CompareConfig",
    "MethodResult",
    "build_method",
    "run_compare",
    "format_table",
    "plot_results",
    "pyplot",
    "save_figure",
]

MINILM_METHODS: tuple[str, ...] = ("full", "probe", "lora", "dora", "vera", "qlora", "qdora")
"""The default methods of ``compare`` for MiniLM, in the default order."""

SMOLLM2_METHODS: tuple[str, ...] = ("zeroshot", "full", "lora", "dora", "vera", "qlora", "qdora")
"""Methods ``compare`` knows for SmolLM2 (``zeroshot``: the untrained prompt score)."""

OPTIONAL_METHODS: tuple[str, ...] = ("dvora",)
"""Methods ``compare`` knows for both models but runs only when listed in ``methods``."""

DEFAULT_LR: dict[str, float] = {
    "full": 1e-4,
    "probe": 3e-2,
    "lora": 5e-3,
    "dora": 5e-3,
    "vera": 3e-2,
    "dvora": 3e-2,
    "qlora": 5e-3,
    "qdora": 5e-3,
    "zeroshot": 0.0,
}
"""Per-method peak learning rates (override all with ``--lr`` or some with ``--lr lora=1e-3,...``).

Tuned for the default budget (150 steps × 16 examples, seed 0, 1000 test examples): full 5e-5 / 1e-4 /
2e-4 → 78.3 / 79.5 / 78.3 %; probe 3e-3 / 1e-2 / 3e-2 → 75.1 / 76.5 / 77.1 %; LoRA 1e-3 / 2e-3 / 5e-3 /
1e-2 → 78.0 / 78.4 / 79.7 / 60.5 % (diverges); DoRA 2e-3 / 5e-3 → 78.4 / 80.0 %; VeRA 1e-2 / 3e-2 →
78.2 / 80.0 %; DVoRA 1e-2 / 3e-2 → 78.0 / 79.3 % (whole test split). Short budgets favour high rates; for long runs
lower them.
"""

TARGETS: dict[str, dict[str, str]] = {
    "minilm": {
        "attention": r"bert/encoder/layer_\d+/attention/self/(query|value)/kernel",
        "all": r"bert/encoder/layer_\d+/(attention/self/(query|key|value)|attention/output/dense"
               r"|intermediate/dense|output/dense)/kernel",
    },
    "smollm2": {
        "attention": r"model/layers_\d+/self_attn/(q_proj|v_proj)/kernel",
        "all": r"model/layers_\d+/(self_attn/(q|k|v|o)_proj|mlp/(gate|up|down)_proj)/kernel",
    },
}
"""Adapter target regexes per model: ``attention`` (query/value projections) or ``all`` linears."""

HEAD_KEY = "classifier"
"""Top-level params entry of the MiniLM classification head (trainable in every method)."""


# ----------------------------------------------------------------------------------- config

@dataclasses.dataclass
class CompareConfig:
    """Settings of one comparison run (the CLI flags of ``lowrank-jax compare``).

    Attributes:
      model: ``"minilm"`` (all-MiniLM-L6-v2 encoder + linear head) or ``"smollm2"`` (SmolLM2-135M).
      methods: method names, a subset of :data:`MINILM_METHODS` / :data:`SMOLLM2_METHODS`.
      rank: LoRA/DoRA/QLoRA/QDoRA rank ``r``; ``alpha`` defaults to ``2r``.
      alpha: LoRA/DoRA scaling numerator (``None``: ``2 * rank``).
      vera_rank: VeRA's (and DVoRA's) shared-projection rank.
      detach_norm: DoRA/QDoRA/DVoRA treat the column norm as a constant in the backward (``True``, the
        paper's and PEFT's default) or differentiate through it (``False``).
      targets: ``"attention"`` (query/value projections) or ``"all"`` (every linear of the encoder).
      steps: optimizer steps per method.
      batch_size: examples per step (and per evaluation batch).
      seq_len: truncation length in tokens (special tokens included).
      buckets: batch widths (tokens); examples go to the smallest bucket that fits, so the step is
        compiled once per bucket; ``None`` picks ``(32, seq_len)`` (``(seq_len,)`` if ``seq_len <= 32``).
      seed: data order, train/test split, head and adapter initialisation.
      lr: ``{method: learning rate}`` overrides of :data:`DEFAULT_LR`.
      warmup_fraction: fraction of the steps with a linear learning-rate warm-up.
      eval_examples: size of the (seeded, fixed) test subset; ``0`` evaluates the whole test split.
      test_fraction: fraction of movies held out for the test split.
      out: output folder for ``results.json`` and ``compare.png``.
      progress: show tqdm progress bars.
    """

    model: str = "minilm"
    methods: tuple[str, ...] = MINILM_METHODS
    rank: int = 8
    alpha: float | None = None
    vera_rank: int = 256
    detach_norm: bool = True
    targets: str = "attention"
    steps: int = 150
    batch_size: int = 16
    seq_len: int = 48
    buckets: tuple[int, ...] | None = None
    seed: int = 0
    lr: dict[str, float] = dataclasses.field(default_factory=dict)
    warmup_fraction: float = 0.1
    eval_examples: int = 0
    test_fraction: float = 0.2
    out: str = "compare_out"
    progress: bool = True

    def __post_init__(self) -> None:
        known = (MINILM_METHODS if self.model == "minilm" else SMOLLM2_METHODS) + OPTIONAL_METHODS
        if self.model not in TARGETS:
            raise ValueError(f"model must be one of {sorted(TARGETS)}, got {self.model!r}")
        self.methods = tuple(self.methods)
        bad = [m for m in self.methods if m not in known]
        if bad or not self.methods:
            raise ValueError(f"unknown method(s) {bad} for model {self.model!r}; choose from {', '.join(known)}")
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"methods listed twice: {list(self.methods)}")
        if self.targets not in TARGETS[self.model]:
            raise ValueError(f"targets must be one of {sorted(TARGETS[self.model])}, got {self.targets!r}")
        for name, v in (("rank", self.rank), ("vera_rank", self.vera_rank), ("steps", self.steps),
                        ("batch_size", self.batch_size), ("seq_len", self.seq_len)):
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if self.eval_examples < 0:
            raise ValueError(f"eval_examples must be >= 0 (0 = the whole test split), got {self.eval_examples}")
        unknown_lr = set(self.lr) - set(DEFAULT_LR)
        if unknown_lr:
            raise ValueError(f"learning rate given for unknown method(s) {sorted(unknown_lr)}")
        if self.buckets is None:
            self.buckets = (32, self.seq_len) if self.seq_len > 32 else (self.seq_len,)
        self.buckets = tuple(sorted({int(b) for b in self.buckets if 0 < int(b) <= self.seq_len} | {self.seq_len}))

    @property
    def lora_alpha(self) -> float:
        """``alpha`` or its default ``2 * rank``."""
        return float(self.alpha) if self.alpha is not None else 2.0 * self.rank

    def learning_rate(self, method: str) -> float:
        """Peak learning rate of ``method`` (override, else :data:`DEFAULT_LR`)."""
        return float(self.lr.get(method, DEFAULT_LR[method]))

    def to_json(self) -> dict[str, Any]:
        """The settings as JSON-able values (learning rates resolved per method)."""
        d = dataclasses.asdict(self)
        d["methods"] = list(self.methods)
        d["buckets"] = list(self.buckets)
        d["alpha"] = self.lora_alpha
        d["lr"] = {m: self.learning_rate(m) for m in self.methods}
        d["target_regex"] = TARGETS[self.model][self.targets]
        del d["progress"]
        return d


@dataclasses.dataclass
class MethodResult:
    """What one method's run measured (one entry of ``results.json``'s ``methods``)."""

    method: str
    trainable_params: int
    trainable_percent: float
    optimizer_state_bytes: int
    frozen_bytes: int
    step_time_s: float
    peak_memory_bytes: int
    test_accuracy: float
    train_loss: list[float]
    learning_rate: float
    compile_time_s: float
    train_time_s: float
    memory_analysis: dict[str, int]


# ----------------------------------------------------------------------------------- methods

def build_method(name: str, cfg: CompareConfig) -> Any:
    """The ``lowrank_jax`` method value for an adapter method name (``None`` for full/probe/zeroshot).

    Raises:
      ValueError: unknown name.
    """
    import lowrank_jax as lj

    targets = TARGETS[cfg.model][cfg.targets]
    if name in ("full", "probe", "zeroshot"):
        return None
    if name in ("lora", "qlora"):
        return lj.LoRA(rank=cfg.rank, alpha=cfg.lora_alpha, targets=targets)
    if name in ("dora", "qdora"):
        return lj.DoRA(rank=cfg.rank, alpha=cfg.lora_alpha, targets=targets, detach_norm=cfg.detach_norm)
    if name == "vera":
        return lj.VeRA(rank=cfg.vera_rank, targets=targets, seed=cfg.seed)
    if name == "dvora":
        return lj.DVoRA(rank=cfg.vera_rank, targets=targets, seed=cfg.seed, detach_norm=cfg.detach_norm)
    raise ValueError(f"unknown method {name!r}")


QUANTIZED_BASE = ("qlora", "qdora")


def frozen_base(name: str, params: Mapping[str, Any]) -> Any:
    """The frozen base a method adapts: for ``qlora``/``qdora`` every dense kernel NF4 (block 64, double
    quantization) and every other floating leaf bfloat16, as bitsandbytes' ``load_in_4bit`` + QLoRA."""
    import lowrank_jax as lj

    if name in QUANTIZED_BASE:
        return lj.quantize(params, lj.NF4(block_size=64, double_quant=True), rest_dtype="bfloat16")
    return params


def split_trainable(name: str, params: Mapping[str, Any], cfg: CompareConfig, head_keys: Sequence[str],
                    ) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(frozen, trainable)`` for method ``name``.

    ``trainable = {"adapter": adapter, "params": subtree}``: ``params`` holds whole top-level entries
    of the params tree that are trained directly (all of them for ``full``, the head entries
    ``head_keys`` otherwise) and are removed from ``frozen``.
    """
    import jax
    import jax.numpy as jnp

    import lowrank_jax as lj

    def copy(tree):  # the step donates the trainable tree: never hand it the caller's buffers
        return jax.tree_util.tree_map(lambda x: jnp.array(x, copy=True), tree)

    params = dict(params)
    if name == "full":
        return {}, {"adapter": {}, "params": copy(params)}
    head = copy({k: params[k] for k in head_keys})
    rest = {k: v for k, v in params.items() if k not in head_keys}
    method = build_method(name, cfg)
    if method is None:                                   # probe / zeroshot
        return rest, {"adapter": {}, "params": head}
    frozen, adapter = lj.init(method, frozen_base(name, rest), jax.random.key(cfg.seed))
    return dict(frozen), {"adapter": adapter, "params": head}


def tree_bytes(tree: Any) -> int:
    """Bytes of every array leaf of ``tree`` (NF4 kernels count their packed storage)."""
    import jax

    return int(sum(int(np.prod(np.shape(x))) * np.dtype(x.dtype).itemsize
                   for x in jax.tree_util.tree_leaves(tree) if hasattr(x, "dtype")))


def tree_size(tree: Any) -> int:
    """Number of scalars in ``tree``'s array leaves."""
    import jax

    return int(sum(int(np.prod(np.shape(x))) for x in jax.tree_util.tree_leaves(tree)))


def make_optimizer(lr: float, steps: int, warmup_fraction: float) -> Any:
    """AdamW (no weight decay), linear warm-up over ``warmup_fraction`` of ``steps``, then linear decay to 0."""
    import optax

    warm = max(1, int(round(warmup_fraction * steps))) if warmup_fraction > 0 else 0
    if warm and warm < steps:
        sched = optax.join_schedules(
            [optax.linear_schedule(0.0, lr, warm), optax.linear_schedule(lr, 0.0, steps - warm)], [warm])
    else:
        sched = optax.linear_schedule(lr, 0.0, max(steps, 1))
    return optax.adamw(sched, weight_decay=0.0)


# ----------------------------------------------------------------------------------- tasks

@dataclasses.dataclass
class Task:
    """A model + data + scoring function: what ``compare`` needs to know about one model.

    ``logits(model, merged_frozen, adapter, batch)`` returns ``(B, 2)`` float32 class logits;
    ``params`` is the full pretrained tree; ``head_keys`` the top-level entries trained by every
    method; ``train``/``test`` are :class:`~lowrank_jax.data.rotten_tomatoes.TokenizedSplit` s.
    """

    name: str
    model: Any
    params: dict[str, Any]
    head_keys: tuple[str, ...]
    train: Any
    test: Any
    logits: Callable[..., Any]


def _minilm_task(cfg: CompareConfig) -> Task:
    import lowrank_jax as lj
    from lowrank_jax.data.rotten_tomatoes import load_rt_splits
    from lowrank_jax.models.bert import load_minilm_classifier

    model, params = load_minilm_classifier(num_labels=2, rng=cfg.seed)
    train, test = load_rt_splits(cfg.test_fraction, cfg.seed, cfg.seq_len)

    def logits(model, params, adapter, batch):
        return lj.apply(model, {"params": params}, adapter, batch["input_ids"], batch["attention_mask"],
                        deterministic=True)

    return Task("minilm", model, dict(params), (HEAD_KEY,), train, test, logits)


SMOLLM2_PROMPT = ("Review:", "\nSentiment:")   # the review is tokenized with a leading space
SMOLLM2_LABEL_WORDS = (" negative", " positive")   # label 0 = rotten, 1 = fresh


def _smollm2_task(cfg: CompareConfig) -> Task:
    import jax.numpy as jnp

    import lowrank_jax as lj
    from lowrank_jax.data.rotten_tomatoes import TokenizedSplit, load_rotten_tomatoes, split_by_movie
    from lowrank_jax.models.llama import load_smollm2, load_smollm2_tokenizer

    model, params = load_smollm2()
    tok = load_smollm2_tokenizer()
    label_ids = []
    for w in SMOLLM2_LABEL_WORDS:
        ids = tok.encode(w).ids
        label_ids.append(ids[0])
    head = tok.encode(SMOLLM2_PROMPT[0]).ids
    tail = tok.encode(SMOLLM2_PROMPT[1]).ids
    room = cfg.seq_len - len(head) - len(tail)
    if room < 4:
        raise ValueError(f"seq_len {cfg.seq_len} leaves no room for the review in the SmolLM2 prompt")

    def tokenize(examples):
        encs = tok.encode_batch([" " + e.text.strip() for e in examples])
        ids = [np.asarray(head + e.ids[:room] + tail, np.int32) for e in encs]
        return TokenizedSplit(ids, np.asarray([e.label for e in examples], np.int32), [e.movie for e in examples])

    train_ex, test_ex = split_by_movie(load_rotten_tomatoes(), cfg.test_fraction, cfg.seed)
    label_arr = np.asarray(label_ids, np.int32)

    def logits(model, params, adapter, batch):
        # Right padding is harmless for a causal model; the last real token is at length - 1.
        hidden = lj.apply(model, {"params": params}, adapter, batch["input_ids"], batch["attention_mask"],
                          return_hidden=True)
        last = jnp.sum(batch["attention_mask"], axis=-1) - 1
        h = jnp.take_along_axis(hidden, jnp.maximum(last, 0)[:, None, None], axis=1)[:, 0]
        table = params["model"]["embed_tokens"]["embedding"]
        rows = jnp.take(table, label_arr, axis=0)          # tied LM head, the two label rows
        return (h.astype(jnp.float32) @ rows.astype(jnp.float32).T)

    return Task("smollm2", model, dict(params), (), tokenize(train_ex), tokenize(test_ex), logits)


def load_task(cfg: CompareConfig) -> Task:
    """Load model, weights and the Rotten Tomatoes splits for ``cfg.model``.

    Raises:
      AssetNotInstalledError: an asset package is missing (its message has the install command).
    """
    return _minilm_task(cfg) if cfg.model == "minilm" else _smollm2_task(cfg)


# ----------------------------------------------------------------------------------- training

def _batch_arrays(batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: batch[k] for k in ("input_ids", "attention_mask", "labels", "valid")}


def train_batches(task: Task, cfg: CompareConfig) -> list[dict[str, np.ndarray]]:
    """The ``cfg.steps`` training batches, identical for every method (epoch ``e`` shuffles with ``seed + e``)."""
    from lowrank_jax.data.rotten_tomatoes import iterate_batches

    out: list[dict[str, np.ndarray]] = []
    epoch = 0
    while len(out) < cfg.steps:
        before = len(out)
        for b in iterate_batches(task.train, cfg.batch_size, cfg.buckets, shuffle=True,
                                 seed=cfg.seed + epoch, drop_remainder=True):
            out.append(_batch_arrays(b))
            if len(out) == cfg.steps:
                break
        if len(out) == before:
            raise ValueError("the training split yields no full batch; lower --batch-size")
        epoch += 1
    return out


def test_batches(task: Task, cfg: CompareConfig) -> list[dict[str, np.ndarray]]:
    """Batches of a fixed, seeded subset of ``cfg.eval_examples`` test examples (all if 0)."""
    from lowrank_jax.data.rotten_tomatoes import TokenizedSplit, iterate_batches

    test = task.test
    if cfg.eval_examples and cfg.eval_examples < len(test):
        idx = np.sort(np.random.default_rng(cfg.seed + 12345).permutation(len(test))[:cfg.eval_examples])
        test = TokenizedSplit([test.input_ids[i] for i in idx], test.labels[idx], [test.movies[i] for i in idx])
    return [_batch_arrays(b) for b in iterate_batches(test, cfg.batch_size, cfg.buckets, shuffle=False)]


def _loss(logits: Any, batch: Mapping[str, Any]) -> Any:
    import jax.numpy as jnp
    import optax

    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])
    w = batch["valid"].astype(jnp.float32)
    return jnp.sum(ce * w) / jnp.maximum(jnp.sum(w), 1.0)


def step_fn(task: Task, tx: Any) -> Callable[..., Any]:
    """``step(trainable, opt_state, frozen, batch) -> (trainable, opt_state, loss)``, not jitted.

    ``trainable = {"adapter": ..., "params": ...}``; its ``params`` are inserted into ``frozen``
    (top-level entries) before the factored forward pass.
    """
    import jax
    import optax

    def loss(trainable, frozen, batch):
        merged = {**frozen, **trainable["params"]}
        return _loss(task.logits(task.model, merged, trainable["adapter"], batch), batch)

    def step(trainable, opt_state, frozen, batch):
        value, grads = jax.value_and_grad(loss)(trainable, frozen, batch)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, value

    return step


def make_step(task: Task, tx: Any) -> Any:
    """:func:`step_fn` jitted; ``trainable`` and ``opt_state`` are donated."""
    import jax

    return jax.jit(step_fn(task, tx), donate_argnums=(0, 1))


def make_predict(task: Task) -> Any:
    """Jitted ``predict(trainable, frozen, batch) -> (#correct, #valid)``."""
    import jax
    import jax.numpy as jnp

    def predict(trainable, frozen, batch):
        merged = {**frozen, **trainable["params"]}
        logits = task.logits(task.model, merged, trainable["adapter"], batch)
        ok = (jnp.argmax(logits, -1) == batch["labels"]) & batch["valid"]
        return jnp.sum(ok), jnp.sum(batch["valid"])

    return jax.jit(predict)


def memory_stats(compiled: Any) -> dict[str, int]:
    """XLA ``memory_analysis`` of a compiled step, plus ``peak = argument + output − alias + temp``."""
    ma = compiled.memory_analysis()
    if ma is None:
        return {"peak": 0}
    if isinstance(ma, (list, tuple)):
        ma = ma[0]
    d = {k: int(getattr(ma, f"{k}_size_in_bytes", 0) or 0)
         for k in ("argument", "output", "alias", "temp", "generated_code")}
    d["peak"] = d["argument"] + d["output"] - d["alias"] + d["temp"]
    return d


def evaluate(predict: Any, trainable: Any, frozen: Any, batches: Sequence[Mapping[str, np.ndarray]]) -> float:
    """Accuracy over ``batches`` (dummy rows excluded)."""
    correct = total = 0
    for b in batches:
        c, n = predict(trainable, frozen, b)
        correct += int(c)
        total += int(n)
    return correct / max(total, 1)


class PerShape:
    """Lowers and compiles a jitted step once per batch shape (``args[-1]["input_ids"]``), timing the compiles."""

    def __init__(self, step: Any) -> None:
        self.step = step
        self.compiled: dict[tuple[int, ...], Any] = {}
        self.seconds = 0.0

    def __call__(self, *args: Any) -> Any:
        shape = tuple(args[-1]["input_ids"].shape)
        if shape not in self.compiled:
            t0 = time.perf_counter()
            self.compiled[shape] = self.step.lower(*args).compile()
            self.seconds += time.perf_counter() - t0
        return self.compiled[shape]


def error_line(e: BaseException) -> str:
    """``Type: first line of the message`` (at most 500 characters): how a failed run is reported."""
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:500]


def prepare(cfg: CompareConfig) -> tuple[Task, int, list[dict[str, np.ndarray]], list[dict[str, np.ndarray]]]:
    """``(task, total parameter count, training batches, test batches)`` for ``cfg``.

    Raises:
      AssetNotInstalledError: an asset package is missing.
    """
    task = load_task(cfg)
    return task, tree_size(task.params), train_batches(task, cfg), test_batches(task, cfg)


def run_method(name: str, task: Task, cfg: CompareConfig, batches: Sequence[Mapping[str, np.ndarray]],
               tests: Sequence[Mapping[str, np.ndarray]], total_params: int,
               on_step: Callable[[int, Any, Any], None] | None = None) -> MethodResult:
    """Train and evaluate one method; see :class:`MethodResult`.

    ``on_step(step, trainable, frozen)``, if given, is called after each optimizer step (``step`` counts
    from 1) with the current trainable tree; it must not keep references to its arrays (the next step
    donates them). Its time is not part of the step times.
    """
    import jax
    from tqdm.auto import tqdm

    frozen, trainable = split_trainable(name, task.params, cfg, task.head_keys)
    n_train = tree_size(trainable)
    frozen_bytes = tree_bytes(frozen)
    lr = cfg.learning_rate(name)
    predict = make_predict(task)
    if name == "zeroshot":
        acc = evaluate(predict, trainable, frozen, tests)
        return MethodResult(name, 0, 0.0, 0, frozen_bytes, 0.0, 0, acc, [], 0.0, 0.0, 0.0, {})
    tx = make_optimizer(lr, cfg.steps, cfg.warmup_fraction)
    opt_state = tx.init(trainable)
    opt_bytes = tree_bytes(opt_state)
    get = PerShape(make_step(task, tx))
    widest = max(batches, key=lambda b: b["input_ids"].shape[1])
    mem = memory_stats(get(trainable, opt_state, frozen, widest))

    losses: list[float] = []
    times: list[float] = []
    bar = tqdm(batches, desc=f"{name:>6s}", disable=not cfg.progress, leave=True, mininterval=2.0)
    t_train = time.perf_counter()
    for batch in bar:
        fn = get(trainable, opt_state, frozen, batch)
        t0 = time.perf_counter()
        trainable, opt_state, loss = fn(trainable, opt_state, frozen, batch)
        loss = float(loss)
        times.append(time.perf_counter() - t0)
        losses.append(loss)
        if not math.isfinite(loss):
            raise FloatingPointError(f"{name}: training loss became {loss} at step {len(losses)}")
        if on_step is not None:
            on_step(len(losses), trainable, frozen)
        bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
    bar.close()
    t_train = time.perf_counter() - t_train
    acc = evaluate(predict, trainable, frozen, tests)
    jax.block_until_ready(trainable)
    return MethodResult(
        method=name, trainable_params=n_train, trainable_percent=100.0 * n_train / total_params,
        optimizer_state_bytes=opt_bytes, frozen_bytes=frozen_bytes,
        step_time_s=float(statistics.median(times)), peak_memory_bytes=int(mem["peak"]),
        test_accuracy=float(acc), train_loss=losses, learning_rate=lr, compile_time_s=get.seconds,
        train_time_s=t_train, memory_analysis=mem,
    )


# ----------------------------------------------------------------------------------- report

def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB" if n >= 2**20 else f"{n / 2**10:,.1f} KiB"


def format_table(methods: Sequence[Mapping[str, Any]], failed: Sequence[Mapping[str, Any]] = ()) -> str:
    """The results as a fixed-width text table (failed methods listed below it)."""
    head = ("method", "trainable", "% full", "opt state", "frozen base", "step (median)",
            "peak step mem", "test acc")
    rows = [head]
    for r in methods:
        rows.append((
            r["method"], f"{r['trainable_params']:,}", f"{r['trainable_percent']:.3f}%",
            _mib(r["optimizer_state_bytes"]), _mib(r["frozen_bytes"]), f"{r['step_time_s']:.3f} s",
            _mib(r["peak_memory_bytes"]), f"{100 * r['test_accuracy']:.1f}%",
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = []
    for j, row in enumerate(rows):
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    for f in failed:
        lines.append(f"{f['method']}: FAILED — {f['error']}")
    return "\n".join(lines)


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the non-interactive Agg backend (the figures are only written to files)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig: Any, path: str | Path, title: str, dpi: int = 100, rect: tuple[float, ...] | None = None,
                title_size: float | None = None) -> None:
    """Title ``fig``, lay it out (inside ``rect``, figure coordinates), write it to ``path`` and close it."""
    fig.suptitle(title, fontsize=title_size)
    fig.tight_layout(rect=rect)
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)


def plot_results(results: Mapping[str, Any], path: str | Path) -> None:
    """Save a two-panel PNG: test accuracy vs trainable parameters (log x) and the loss curves."""
    plt = pyplot()

    methods = results["methods"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    placed: list[tuple[float, float]] = []
    span = max([100 * r["test_accuracy"] for r in methods], default=1.0) - \
        min([100 * r["test_accuracy"] for r in methods], default=0.0)
    for r in methods:
        n = max(r["trainable_params"], 1)
        acc = 100 * r["test_accuracy"]
        ax1.scatter([n], [acc], s=40)
        # Stack the labels of (nearly) coinciding points instead of printing them over each other.
        near = sum(abs(math.log10(n) - x) < 0.3 and abs(acc - y) < 0.04 * max(span, 1e-9) for x, y in placed)
        placed.append((math.log10(n), acc))
        ax1.annotate(r["method"], (n, acc), textcoords="offset points", xytext=(5, 4 - 11 * near))
    ax1.set_xscale("log")
    ax1.set_xlabel("trainable parameters (log scale)")
    ax1.set_ylabel("test accuracy (%)")
    ax1.set_title("accuracy vs trainable parameters")
    ax1.grid(True, which="both", alpha=0.3)
    for r in methods:
        y = np.asarray(r["train_loss"], float)
        if y.size == 0:
            continue
        k = max(1, min(25, y.size // 10))
        smooth = np.convolve(y, np.ones(k) / k, mode="valid")
        ax2.plot(np.arange(k, y.size + 1), smooth, label=r["method"])
    ax2.set_xlabel("step")
    ax2.set_ylabel("training loss (moving average)")
    ax2.set_title("training loss")
    ax2.grid(True, alpha=0.3)
    if any(r["train_loss"] for r in methods):
        ax2.legend()
    cfg = results.get("config", {})
    save_figure(fig, path, f"{cfg.get('model', '')} on Rotten Tomatoes: {cfg.get('steps', '?')} steps × batch "
                f"{cfg.get('batch_size', '?')}, seq ≤ {cfg.get('seq_len', '?')}", dpi=110)


def run_compare(cfg: CompareConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every method of ``cfg``, write ``results.json`` and ``compare.png`` to ``cfg.out``.

    Returns:
      The results dict (``{"config", "methods", "failed", "environment"}``) that was written.

    Raises:
      AssetNotInstalledError: a model or data asset package is missing.
    """
    import jax

    t_start = time.perf_counter()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    task, total, batches, tests = prepare(cfg)
    n_test = int(sum(b["valid"].sum() for b in tests))
    log(f"{cfg.model}: {total:,} params; train {len(task.train):,} / test {len(task.test):,} examples "
        f"(held-out movies), evaluating on {n_test:,}; {cfg.steps} steps × batch {cfg.batch_size}, "
        f"widths {list(cfg.buckets)}")

    results: dict[str, Any] = {
        "config": {**cfg.to_json(), "total_params": total, "train_examples": len(task.train),
                   "test_examples": n_test},
        "methods": [],
        "failed": [],
        "environment": {"jax": jax.__version__, "backend": jax.default_backend(),
                        "device": str(jax.devices()[0]), "cpu_count": os.cpu_count(),
                        "machine": platform.machine()},
    }
    for name in cfg.methods:
        try:
            r = run_method(name, task, cfg, batches, tests, total)
        except (KeyboardInterrupt, MemoryError):
            raise
        except Exception as e:  # a method failing must not lose the others' results
            msg = error_line(e)
            results["failed"].append({"method": name, "error": msg})
            log(f"{name}: FAILED — {msg}")
            continue
        results["methods"].append(dataclasses.asdict(r))
        log(f"{name}: acc {100 * r.test_accuracy:.1f}%  trainable {r.trainable_params:,}  "
            f"step {r.step_time_s:.3f} s  compile {r.compile_time_s:.1f} s  train {r.train_time_s:.1f} s")
    results["runtime_s"] = time.perf_counter() - t_start
    (out / "results.json").write_text(json.dumps(results, indent=1))
    plot_results(results, out / "compare.png")
    log("")
    log(format_table(results["methods"], results["failed"]))
    log(f"\nwrote {out / 'results.json'} and {out / 'compare.png'} ({results['runtime_s']:.0f} s)")
    return results
