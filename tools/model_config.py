#!/usr/bin/env python3
"""The default model's configuration (hub-style config.json of DeepseekV2ForCausalLM) and
its parameter arithmetic. Stdlib only, so it runs anywhere:

  python3 tools/model_config.py            # print the counts, exit 1 if over 16 MiB
  python3 tools/model_config.py --write DIR [--yarn]

Every DeepSeek-V2 feature is on: MLA with a query latent (q_lora_rank) and a small KV
latent (kv_lora_rank), decoupled RoPE keys (qk_rope_head_dim), one dense first layer,
2 shared + 16 routed experts with group-limited greedy top-4 routing over 4 groups
(topk_group 2), routed_scaling_factor 2.0, norm_topk_prob false, untied lm_head.
"""
import argparse
import copy
import json
import math
import os
import sys

LIMIT_BYTES = 16 * 1024 * 1024       # hard limit on the exported bf16 file
HEADER_ALLOWANCE = 64 * 1024         # generous room for the C export's header

PRETRAIN_CTX = 256
YARN_FACTOR = 4

BASE = {
    "architectures": ["DeepseekV2ForCausalLM"],
    "model_type": "deepseek_v2",
    "vocab_size": 4096,
    "hidden_size": 256,
    "intermediate_size": 768,          # dense FFN of layer 0
    "moe_intermediate_size": 64,       # each routed expert; shared = 2 x 64 = 128
    "num_hidden_layers": 6,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "q_lora_rank": 96,
    "kv_lora_rank": 64,
    "qk_nope_head_dim": 32,
    "qk_rope_head_dim": 16,
    "v_head_dim": 32,
    "n_shared_experts": 2,
    "n_routed_experts": 16,
    "num_experts_per_tok": 4,
    "topk_method": "group_limited_greedy",
    "n_group": 4,
    "topk_group": 2,
    "routed_scaling_factor": 2.0,
    "norm_topk_prob": False,
    "scoring_func": "softmax",
    "first_k_dense_replace": 1,
    "moe_layer_freq": 1,
    "ep_size": 1,
    "aux_loss_alpha": 0.01,
    "seq_aux": False,
    "hidden_act": "silu",
    "max_position_embeddings": PRETRAIN_CTX,
    "initializer_range": 0.02,
    "rms_norm_eps": 1e-6,
    "use_cache": True,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "pad_token_id": None,
    "pretraining_tp": 1,
    "tie_word_embeddings": False,
    "rope_theta": 10000.0,
    "rope_scaling": None,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "torch_dtype": "bfloat16",
}

YARN = {
    "type": "yarn",
    "rope_type": "yarn",
    "factor": float(YARN_FACTOR),
    "original_max_position_embeddings": PRETRAIN_CTX,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "mscale": 0.707,
    "mscale_all_dim": 0.707,
}


def hub_config(yarn=False, **overrides):
    c = copy.deepcopy(BASE)
    c.update(overrides)
    if yarn:
        c["rope_scaling"] = dict(YARN)
        c["max_position_embeddings"] = PRETRAIN_CTX * YARN_FACTOR
    return c


def yarn_get_mscale(scale, mscale=1.0):
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def count_params(c):
    """Exact parameter count of DeepseekV2ForCausalLM for config dict c."""
    H, V, L, n = c["hidden_size"], c["vocab_size"], c["num_hidden_layers"], c["num_attention_heads"]
    qk = c["qk_nope_head_dim"] + c["qk_rope_head_dim"]
    attn = 0
    if c["q_lora_rank"]:
        attn += H * c["q_lora_rank"] + c["q_lora_rank"] + c["q_lora_rank"] * n * qk
    else:
        attn += H * n * qk
    attn += H * (c["kv_lora_rank"] + c["qk_rope_head_dim"]) + c["kv_lora_rank"]
    attn += c["kv_lora_rank"] * n * (c["qk_nope_head_dim"] + c["v_head_dim"])
    attn += n * c["v_head_dim"] * H
    norms = 2 * H
    dense = 3 * H * c["intermediate_size"]
    E, I, K = c["n_routed_experts"], c["moe_intermediate_size"], c["num_experts_per_tok"]
    expert = 3 * H * I
    shared = 3 * H * I * c["n_shared_experts"]
    gate = E * H
    n_dense = min(c["first_k_dense_replace"], L)
    n_moe = L - n_dense
    emb = V * H
    head = V * H
    total = emb + head + H + L * (attn + norms) + n_dense * dense + n_moe * (gate + shared + E * expert)
    active = total - n_moe * (E - K) * expert
    # KV cache per token per layer (values): MLA caches the latent and the shared rope key
    mla_cache = c["kv_lora_rank"] + c["qk_rope_head_dim"]
    mha_cache = n * (qk + c["v_head_dim"])  # full keys (nope+rope) and values per head
    return {
        "total": total, "active_per_token": active,
        "active_per_token_excl_embedding": active - emb,
        "embedding": emb, "lm_head": head,
        "attention_per_layer": attn, "dense_ffn": dense,
        "moe_per_layer": gate + shared + E * expert, "routed_expert": expert,
        "moe_layers": n_moe, "dense_layers": n_dense,
        "bf16_bytes": 2 * total,
        "kv_cache_values_per_token_per_layer": {"mla": mla_cache, "mha_same_heads": mha_cache},
    }


def check(c, quiet=False):
    p = count_params(c)
    ok = p["bf16_bytes"] + HEADER_ALLOWANCE <= LIMIT_BYTES
    if not quiet:
        print(json.dumps(p, indent=1))
        print(f"bf16 file ~ {p['bf16_bytes'] / 2**20:.2f} MiB (+ header) of the {LIMIT_BYTES / 2**20:.0f} MiB limit:",
              "OK" if ok else "TOO BIG")
    if not ok:
        raise SystemExit(f"model too big: {p['total']} params = {p['bf16_bytes']} bf16 bytes > limit")
    return p


def write(dirpath, c):
    os.makedirs(dirpath, exist_ok=True)
    with open(os.path.join(dirpath, "config.json"), "w") as f:
        json.dump(c, f, indent=2)
        f.write("\n")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--write")
    ap.add_argument("--yarn", action="store_true")
    a = ap.parse_args()
    c = hub_config(yarn=a.yarn)
    check(c)
    if a.write:
        write(a.write, c)
    sys.exit(0)
