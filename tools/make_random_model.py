#!/usr/bin/env python3
"""Write a dsv2 model file with random weights in DeepSeek-V2-Lite's or DeepSeek-V2's shape, for
benchmarks: no 31 GB download, standard library only.

    python3 tools/make_random_model.py OUT.bin [--shape v2-lite|v2] [--layers N] [--dtype bf16|q8]
                                       [--config CONFIG.json] [--config-out DIR] [--keep-routing]

The shapes are the hub's config.json (any other with --config), with two changes that make the
model neutral for comparisons and cost nothing in speed: greedy routing over all experts (no
device-limited groups) and plain RoPE (no YaRN). llama.cpp scores expert groups and YaRN's
attention scale differently from the paper; with these settings it computes the same model as
dsv2 (tools/to_gguf.py, docs/BENCHMARKS.md). The vocabulary is DeepSeek-V2's (102400), so its
tokenizer drives the model.

Weights: norms 1.0; every other tensor is a slice, at a random offset, of a pool of random values
made once (os.urandom): bf16 with the high byte mapped by bytes.translate to a sign and an exponent
that keeps magnitudes in [2^-11, 2^-5) (most above 2^-7; std 0.016), or, for q8, blocks
of 32 int8 in [-127, 127] with the scale 0.0346 / 127 (uniform in +-0.0346: std 0.02, the hub's
init). So writing costs what the disk costs, not what the random numbers cost. The config.json
written by --config-out is the one the model follows (tools/bench_hf.py reads it).
"""
import argparse
import json
import os
import random
import struct
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import export  # noqa: E402

V2_LITE = {  # deepseek-ai/DeepSeek-V2-Lite's config.json, the fields export.read_config reads
    "model_type": "deepseek_v2", "architectures": ["DeepseekV2ForCausalLM"],
    "hidden_size": 2048, "num_hidden_layers": 27, "num_attention_heads": 16, "num_key_value_heads": 16,
    "vocab_size": 102400, "q_lora_rank": None, "kv_lora_rank": 512, "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64, "v_head_dim": 128, "intermediate_size": 10944, "moe_intermediate_size": 1408,
    "n_routed_experts": 64, "n_shared_experts": 2, "num_experts_per_tok": 6, "first_k_dense_replace": 1,
    "moe_layer_freq": 1, "topk_method": "greedy", "n_group": 1, "topk_group": 1, "norm_topk_prob": False,
    "routed_scaling_factor": 1.0, "scoring_func": "softmax", "hidden_act": "silu",
    "max_position_embeddings": 163840, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
    "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                     "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
    "bos_token_id": 100000, "eos_token_id": 100001, "tie_word_embeddings": False,
    "attention_bias": False, "mlp_bias": False, "aux_loss_alpha": 0.001, "seq_aux": True,
}
V2 = dict(V2_LITE, **{  # deepseek-ai/DeepSeek-V2's
    "hidden_size": 5120, "num_hidden_layers": 60, "num_attention_heads": 128, "num_key_value_heads": 128,
    "q_lora_rank": 1536, "intermediate_size": 12288, "moe_intermediate_size": 1536, "n_routed_experts": 160,
    "topk_method": "group_limited_greedy", "n_group": 8, "topk_group": 3, "routed_scaling_factor": 16.0,
})
SHAPES = {"v2-lite": V2_LITE, "v2": V2}
NEUTRAL = {"topk_method": "greedy", "n_group": 1, "topk_group": 1, "rope_scaling": None}

POOL_VALUES = 1 << 26   # bf16 pool: at most 64 Mi values (128 MB)
POOL_BLOCKS = 1 << 21   # q8 pool: at most 2 Mi blocks of 32 (68 MB)
Q8_SCALE = struct.pack("<e", 0.02 * 3 ** 0.5 / 127)


def bf16_pool(n):
    """random bf16 values: the low byte (exponent's last bit, 7 mantissa bits) stays random; the
    high byte (sign, exponent's 7 high bits) is mapped to exponent pairs 116-117 (1/16 of the
    values), 118-119 (3/16), 120-121 (3/4), i.e. magnitudes in [2^-11, 2^-5)"""
    high = bytes((b & 0x80) | (58 if b & 0x7F < 8 else 59 if b & 0x7F < 32 else 60) for b in range(256))
    pool = bytearray(os.urandom(2 * n))
    pool[1::2] = pool[1::2].translate(high)
    return bytes(pool)


def q8_pool(n):
    """random Q8_0 blocks: the scale, then 32 int8 with -128 mapped to -127 (the quantizer's range)"""
    qs = os.urandom(32 * n).translate(bytes(b if b != 0x80 else 0x81 for b in range(256)))
    pool = bytearray(34 * n)
    pool[0::34] = Q8_SCALE[0:1] * n
    pool[1::34] = Q8_SCALE[1:2] * n
    for k in range(32):
        pool[2 + k::34] = qs[k::32]
    return bytes(pool)


def slices(pool, unit, n_units, rng):
    """n_units units (values or blocks, `unit` bytes each) of the pool, from random offsets"""
    pool_units = len(pool) // unit
    while n_units:
        k = min(n_units, pool_units // 2)
        start = rng.randrange(pool_units - k + 1)
        yield pool[start * unit:(start + k) * unit]
        n_units -= k


def tensor_data(name, shape, tdtype, pools, rng):
    n = export._numel(shape)
    if name.endswith("norm.weight"):  # RMSNorm weights: 1.0
        yield (b"\x80\x3f" if tdtype == "bf16" else struct.pack("<f", 1.0)) * n
    elif tdtype == "q8":
        yield from slices(pools["q8"], 34, n // 32, rng)
    else:
        for chunk in slices(pools["bf16"], 2, n, rng):
            yield chunk if tdtype == "bf16" else export.bf16_to_f32(chunk)


def model_config(args):
    if args.config:
        try:
            with open(args.config, encoding="utf-8") as f:
                cfg = json.load(f)
        except (OSError, ValueError) as e:
            sys.exit(f"make_random_model: {args.config}: cannot read ({e})")
    else:
        cfg = dict(SHAPES[args.shape])
    routing = ("topk_method", "n_group", "topk_group")
    cfg.update({k: v for k, v in NEUTRAL.items() if not (args.keep_routing and k in routing)})
    if args.layers is not None:
        if args.layers < 1:
            sys.exit("make_random_model: --layers must be >= 1")
        cfg["num_hidden_layers"] = args.layers
    return cfg


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="model file to write")
    ap.add_argument("--shape", choices=list(SHAPES), default="v2-lite", help="the hub model whose shape to take")
    ap.add_argument("--layers", type=int, help="number of layers (default: the shape's)")
    ap.add_argument("--dtype", choices=["bf16", "q8"], default="bf16", help="weight type (docs/FORMAT.md)")
    ap.add_argument("--config", help="a config.json to take the shape from instead of --shape")
    ap.add_argument("--config-out", help="directory to write the model's config.json into")
    ap.add_argument("--seed", type=int, default=0, help="seed of the slice offsets (the pool is os.urandom)")
    ap.add_argument("--keep-routing", action="store_true",
                    help="keep the config's expert routing (topk_method, n_group, topk_group): for tests, not comparisons")
    args = ap.parse_args()
    cfg = model_config(args)
    with tempfile.TemporaryDirectory() as tmp:
        for d in [tmp] + ([args.config_out] if args.config_out else []):
            os.makedirs(d, exist_ok=True)
            with open(os.path.join(d, "config.json"), "w") as f:
                json.dump(cfg, f, indent=1)
        h = export.read_config(tmp)
    names = export.tensor_names(h)
    tensors = [(name, shape, export.tensor_dtype(name, shape, args.dtype)) for name, shape in names]
    total = sum(export.tensor_bytes(shape, t) for _, shape, t in tensors)
    st = os.statvfs(os.path.dirname(os.path.abspath(args.out)))
    if st.f_bavail * st.f_frsize < total + (1 << 30):
        sys.exit(f"make_random_model: {total / 1e9:.1f} GB needed, {st.f_bavail * st.f_frsize / 1e9:.1f} GB free")
    t0 = time.time()
    rng = random.Random(args.seed)
    largest = max(export._numel(shape) for _, shape, _ in tensors)  # a small model needs a small pool
    pools = {"bf16": bf16_pool(min(POOL_VALUES, 2 * largest))}
    if args.dtype == "q8":
        pools["q8"] = q8_pool(min(POOL_BLOCKS, 2 * largest // 32))
    with open(args.out, "wb") as f:
        f.write(export.pack_header(h, args.dtype))
        for name, shape, tdtype in tensors:
            f.write(b"\0" * (-f.tell() % export.ALIGN))
            for chunk in tensor_data(name, shape, tdtype, pools, rng):
                f.write(chunk)
        size = f.tell()
    dt = time.time() - t0
    print(f"make_random_model: wrote {args.out}: {size / 1e9:.2f} GB ({args.dtype}, {h['n_layers']} layers) "
          f"in {dt:.1f} s ({size / 1e9 / max(dt, 1e-9):.2f} GB/s)", flush=True)


if __name__ == "__main__":
    main()
