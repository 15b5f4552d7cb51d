"""Write a dsv2 model file with random bf16 weights in the DeepSeek-V2-Lite shape (or any
config.json), for benchmarks: no 31 GB Hugging Face download. Weights ~ U(-a, a) with the std of
a 0.02 normal (norms 1.0). numpy draws one pool of random bf16 per run; each tensor is a slice of
it at a random offset, so writing costs what the disk costs, not what the random numbers cost.

    python3 tools/make_random_model.py OUT.bin [--config-out DIR]   (DIR gets the config.json)
"""
import argparse, json, os, sys, time
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import numpy as np
import export

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


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="model file to write")
    ap.add_argument("--config-out", default=None, help="directory to write the config.json into")
    args = ap.parse_args()
    cfg_dir = args.config_out or os.path.dirname(os.path.abspath(args.out))
    os.makedirs(cfg_dir, exist_ok=True)
    with open(os.path.join(cfg_dir, "config.json"), "w") as f:
        json.dump(V2_LITE, f, indent=1)
    h = export.read_config(cfg_dir)
    names = export.tensor_names(h)
    total = sum(int(np.prod(s)) for _, s in names) * 2
    st = os.statvfs(os.path.dirname(os.path.abspath(args.out)))
    if st.f_bavail * st.f_frsize < total + (1 << 30):
        sys.exit(f"make_random_model: {total / 1e9:.1f} GB needed, {st.f_bavail * st.f_frsize / 1e9:.1f} GB free")
    rng = np.random.default_rng(0)
    pool_n = 1 << 27  # 128 Mi values = 256 MB
    a = 0.02 * np.sqrt(3.0)
    # float32 throughout: under NumPy 2 a float64 scalar would promote the pool to float64, and the
    # bit shift below would then cut float64s into halves (NaN and inf weights)
    pool = ((rng.random(pool_n, dtype=np.float32) * 2 - 1) * np.float32(a)).astype(np.float32)
    pool = (pool.view(np.uint32) >> 16).astype(np.uint16)  # float32 -> bf16 (truncation is fine here)
    one = np.full(1 << 16, 0x3F80, dtype=np.uint16)          # bf16 1.0, for the norms
    t0 = time.time()
    with open(args.out, "wb") as f:
        f.write(export.pack_header(h, "bf16"))
        off = export.HEADER_BYTES
        for name, shape in names:
            pad = (-off) % export.ALIGN
            f.write(b"\0" * pad)
            off += pad
            n = int(np.prod(shape))
            if name.endswith("norm.weight"):
                f.write(one[:n].tobytes())
            else:
                left = n
                while left:
                    k = min(left, pool_n // 2)
                    s = int(rng.integers(0, pool_n - k + 1))
                    f.write(pool[s:s + k].tobytes())
                    left -= k
            off += 2 * n
    print(f"make_random_model: wrote {args.out}: {off / 1e9:.2f} GB in {time.time() - t0:.1f} s "
          f"({off / 1e9 / (time.time() - t0):.2f} GB/s)", flush=True)


if __name__ == "__main__":
    main()
