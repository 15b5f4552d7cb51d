#!/usr/bin/env python3
"""A dsv2 model file -> a GGUF file for llama.cpp (its "deepseek2" architecture), the weights copied
unchanged: q8 blocks are llama.cpp's Q8_0 byte for byte, bf16 stays BF16, fp32 F32; only the
RMSNorm weights of a bf16 file become F32 (exactly; llama.cpp's CPU backend multiplies by F32 norms
only, and its converter writes them so too). For running llama.cpp on exactly the weights dsv2
runs (tools/bench_cpu.sh). Standard library only.

    python3 tools/to_gguf.py MODEL.bin OUT.gguf --tokenizer HF_TOKENIZER_DIR

HF_TOKENIZER_DIR holds DeepSeek-V2's tokenizer.json and tokenizer_config.json (../shared has one):
GGUF carries the vocabulary, as llama.cpp's own converter writes it (byte-level token strings, the
merges, ids past the tokenizer's padded with [PADn]; pre-tokenizer "deepseek-llm").

llama.cpp computes the same model as dsv2 only with greedy routing (it scores expert groups the
DeepSeek-V3 way) and without YaRN (it uses only mscale_all_dim); tools/make_random_model.py writes
such models. For others this prints a warning and writes the YaRN keys as llama.cpp's converter does.
In the llama.cpp this was checked against (commit c392e50, Feb. 2025; docs/BENCHMARKS.md) a model
counts as V2-Lite (no query compression) only when it has 27 layers: other layer counts need
q_lora_rank > 0, and this refuses the rest.
"""
import argparse
import json
import os
import struct
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from convert_model import export, fail, read_model  # noqa: E402  (export: the repo's export.py)

GGUF_ALIGN = 32
GGML_TYPE = {"fp32": 0, "q8": 8, "bf16": 30}          # ggml_type of a tensor
FILE_TYPE = {"fp32": 0, "q8": 7, "bf16": 32}          # llama_ftype: ALL_F32, MOSTLY_Q8_0, MOSTLY_BF16
U32, I32, F32, BOOL, STRING, ARRAY = 4, 5, 6, 7, 8, 9  # gguf value types
TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED = 1, 3, 4, 5


def gguf_string(s):
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def gguf_value(vtype, v):
    if vtype == STRING:
        return gguf_string(v)
    return struct.pack({U32: "<I", I32: "<i", F32: "<f", BOOL: "<?"}[vtype], v)


def gguf_kv(key, vtype, v):
    if vtype == ARRAY:
        etype, items = v
        body = struct.pack("<IQ", etype, len(items)) + b"".join(gguf_value(etype, x) for x in items)
    else:
        body = gguf_value(vtype, v)
    return gguf_string(key) + struct.pack("<I", vtype) + body


def vocabulary(tok_dir, vocab_size):
    """tokens, their types, merges, add_bos as llama.cpp's converter (_set_vocab_gpt2) writes them"""
    try:
        with open(os.path.join(tok_dir, "tokenizer.json"), encoding="utf-8") as f:
            tj = json.load(f)
        with open(os.path.join(tok_dir, "tokenizer_config.json"), encoding="utf-8") as f:
            tc = json.load(f)
    except (OSError, ValueError) as e:
        fail(f"{tok_dir}: cannot read tokenizer.json / tokenizer_config.json ({e})")
    by_id = {i: (t, TOKEN_NORMAL) for t, i in tj["model"]["vocab"].items()}
    for a in tj.get("added_tokens", []):
        by_id[a["id"]] = (a["content"], TOKEN_CONTROL if a["special"] else TOKEN_USER_DEFINED)
    if max(by_id) >= vocab_size:
        fail(f"{tok_dir}: the tokenizer has id {max(by_id)}, the model only {vocab_size} tokens")
    tokens = [by_id.get(i, (f"[PAD{i}]", TOKEN_UNUSED)) for i in range(vocab_size)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
    return [t for t, _ in tokens], [k for _, k in tokens], merges, bool(tc.get("add_bos_token", True))


def metadata(h, dtype, tok_dir):
    a = "deepseek2"
    kv = [("general.architecture", STRING, a), ("general.name", STRING, "dsv2 model file"),
          ("general.file_type", U32, FILE_TYPE[dtype]), ("general.alignment", U32, GGUF_ALIGN),
          (f"{a}.block_count", U32, h["n_layers"]),
          (f"{a}.context_length", U32, h["max_position_embeddings"]),
          (f"{a}.embedding_length", U32, h["dim"]),
          (f"{a}.feed_forward_length", U32, h["intermediate_size"]),
          (f"{a}.attention.head_count", U32, h["n_heads"]),
          (f"{a}.attention.head_count_kv", U32, h["n_heads"]),
          (f"{a}.rope.freq_base", F32, h["rope_theta"]),
          (f"{a}.attention.layer_norm_rms_epsilon", F32, h["rms_norm_eps"]),
          (f"{a}.expert_used_count", U32, h["n_experts_per_tok"]),
          (f"{a}.leading_dense_block_count", U32, h["first_k_dense_replace"]),
          (f"{a}.vocab_size", U32, h["vocab_size"]),
          (f"{a}.attention.kv_lora_rank", U32, h["kv_lora_rank"]),
          (f"{a}.attention.key_length", U32, h["qk_nope_head_dim"] + h["qk_rope_head_dim"]),
          (f"{a}.attention.value_length", U32, h["v_head_dim"]),
          (f"{a}.expert_feed_forward_length", U32, h["moe_intermediate_size"]),
          (f"{a}.expert_count", U32, h["n_routed_experts"]),
          (f"{a}.expert_shared_count", U32, h["n_shared_experts"]),
          (f"{a}.expert_weights_scale", F32, h["routed_scaling_factor"]),
          (f"{a}.expert_weights_norm", BOOL, bool(h["norm_topk_prob"])),
          (f"{a}.expert_gating_func", U32, 1),  # softmax
          (f"{a}.rope.dimension_count", U32, h["qk_rope_head_dim"]),
          (f"{a}.rope.scaling.yarn_log_multiplier", F32, 0.1 * h["mscale_all_dim"] if h["rope_yarn"] else 0.0)]
    if h["q_lora_rank"]:
        kv.append((f"{a}.attention.q_lora_rank", U32, h["q_lora_rank"]))
    if h["rope_yarn"]:
        kv += [(f"{a}.rope.scaling.type", STRING, "yarn"), (f"{a}.rope.scaling.factor", F32, h["rope_factor"]),
               (f"{a}.rope.scaling.original_context_length", U32, h["original_max_position_embeddings"])]
    tokens, types, merges, add_bos = vocabulary(tok_dir, h["vocab_size"])
    kv += [("tokenizer.ggml.model", STRING, "gpt2"), ("tokenizer.ggml.pre", STRING, "deepseek-llm"),
           ("tokenizer.ggml.tokens", ARRAY, (STRING, tokens)), ("tokenizer.ggml.token_type", ARRAY, (I32, types)),
           ("tokenizer.ggml.merges", ARRAY, (STRING, merges)),
           ("tokenizer.ggml.bos_token_id", U32, h["bos_token_id"]), ("tokenizer.ggml.eos_token_id", U32, h["eos_token_id"]),
           ("tokenizer.ggml.add_bos_token", BOOL, add_bos), ("tokenizer.ggml.add_eos_token", BOOL, False)]
    return kv


GGUF_NAMES = {  # hub name (after model.layers.N.) -> llama.cpp's name (after blk.N.)
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.q_a_proj": "attn_q_a",
    "self_attn.q_a_layernorm": "attn_q_a_norm", "self_attn.q_b_proj": "attn_q_b",
    "self_attn.kv_a_proj_with_mqa": "attn_kv_a_mqa", "self_attn.kv_a_layernorm": "attn_kv_a_norm",
    "self_attn.kv_b_proj": "attn_kv_b", "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "mlp.gate": "ffn_gate_inp", "mlp.shared_experts.gate_proj": "ffn_gate_shexp",
    "mlp.shared_experts.up_proj": "ffn_up_shexp", "mlp.shared_experts.down_proj": "ffn_down_shexp",
}


def gguf_tensors(tensors):
    """our tensors -> [(gguf name, dims innermost first, dtype, [(offset, bytes) pieces])]: the routed
    experts of a layer become one 3-D tensor per projection (all experts' gate_proj one after another);
    dtype "bf16->fp32" marks a bf16 vector written as F32"""
    out, experts = [], {}
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    for name, shape, tdtype, off, n in tensors:
        dims = list(reversed(shape))
        if len(shape) == 1 and tdtype == "bf16":
            tdtype = "bf16->fp32"
        if name in top:
            out.append((top[name], dims, tdtype, [(off, n)]))
            continue
        parts = name.split(".")  # model.layers.L.<rest>.weight
        layer, rest = int(parts[2]), ".".join(parts[3:-1])
        if rest.startswith("mlp.experts."):
            proj = parts[6]  # gate_proj / up_proj / down_proj
            key = (layer, proj)
            if key not in experts:
                experts[key] = (f"blk.{layer}.ffn_{proj.split('_')[0]}_exps.weight", dims, tdtype, [])
                out.append(experts[key])
            experts[key][3].append((off, n))
            continue
        out.append((f"blk.{layer}.{GGUF_NAMES[rest]}.weight", dims, tdtype, [(off, n)]))
    return [(name, dims + ([len(pieces)] if "_exps." in name else []), t, pieces) for name, dims, t, pieces in out]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="dsv2 model file")
    ap.add_argument("out", help="GGUF file to write")
    ap.add_argument("--tokenizer", required=True, help="directory with DeepSeek-V2's tokenizer.json and tokenizer_config.json")
    args = ap.parse_args()
    h, dtype, tensors = read_model(args.model)
    if h["topk_method"] != 0 or h["rope_yarn"]:
        print("to_gguf: warning: this model uses device-limited routing or YaRN, which llama.cpp computes "
              "differently from the paper: its outputs will differ from dsv2's", file=sys.stderr)
    if not h["q_lora_rank"] and h["n_layers"] != 27:
        fail(f"{args.model}: llama.cpp reads a model without q_lora_rank only with 27 layers (V2-Lite); this one has {h['n_layers']}")
    kv = metadata(h, dtype, args.tokenizer)
    gt = gguf_tensors(tensors)
    infos, offset = [], 0
    for name, dims, tdtype, pieces in gt:
        offset += -offset % GGUF_ALIGN
        gtype = GGML_TYPE[tdtype.split("->")[-1]]
        infos.append(gguf_string(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, gtype, offset))
        offset += sum(n for _, n in pieces) * (2 if tdtype == "bf16->fp32" else 1)
    head = b"GGUF" + struct.pack("<IQQ", 3, len(gt), len(kv)) + b"".join(gguf_kv(*e) for e in kv) + b"".join(infos)
    t0 = time.time()
    with open(args.model, "rb") as src, open(args.out + ".tmp", "wb") as out:
        out.write(head + b"\0" * (-len(head) % GGUF_ALIGN))
        start = out.tell()
        for name, dims, tdtype, pieces in gt:
            out.write(b"\0" * (-(out.tell() - start) % GGUF_ALIGN))
            for off, n in pieces:
                src.seek(off)
                while n:
                    buf = src.read(min(n, 1 << 26))
                    out.write(export.bf16_to_f32(buf) if tdtype == "bf16->fp32" else buf)
                    n -= len(buf)
    os.replace(args.out + ".tmp", args.out)
    size = os.path.getsize(args.out)
    print(f"to_gguf: wrote {args.out}: {len(gt)} tensors ({dtype}), {size / 1e9:.2f} GB in {time.time() - t0:.1f} s",
          file=sys.stderr)


if __name__ == "__main__":
    main()
