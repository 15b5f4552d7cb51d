#!/usr/bin/env python3
"""export.py: a Hugging Face DeepSeek-V2 directory -> one dsv2 model file and/or tokenizer.bin.

SKELETON: the model part is written by the main author, the tokenizer part by the
tokenizer work stream (between the markers below).
"""
import argparse
import array
import json
import os
import struct
import sys
import time


def fail(msg):
    print(f"export.py: error: {msg}", file=sys.stderr)
    sys.exit(1)


# ---------------- tokenizer.bin (tokenizer work stream: from here to "end of tokenizer")

def export_tokenizer(hf_dir, out_path):
    """tokenizer.json + tokenizer_config.json in hf_dir -> out_path (tokenizer.bin)."""
    fail("tokenizer export not implemented yet")

# ---------------- end of tokenizer


# ---------------- model file
#
# Layout (all little-endian; docs/FORMAT.md has the table):
#   header, HEADER_BYTES long: magic "DSV2", version, then the int32 fields of HEADER_INTS and
#   the float32 fields of HEADER_FLOATS in that order, zero padded;
#   then every tensor in the order of tensor_names(), each starting at a multiple of ALIGN,
#   as fp32 or bf16 (the header's dtype), row-major in the Hugging Face shape [out, in].

MAGIC = b"DSV2"
VERSION = 1
HEADER_BYTES = 256
ALIGN = 64
DTYPES = {"fp32": 0, "bf16": 1}
HEADER_INTS = [
    "dtype", "dim", "n_layers", "n_heads", "vocab_size", "q_lora_rank", "kv_lora_rank",
    "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "intermediate_size",
    "moe_intermediate_size", "n_routed_experts", "n_shared_experts", "n_experts_per_tok",
    "first_k_dense_replace", "moe_layer_freq", "topk_method", "n_group", "topk_group",
    "norm_topk_prob", "max_position_embeddings", "rope_yarn", "original_max_position_embeddings",
    "bos_token_id", "eos_token_id",
]
HEADER_FLOATS = [
    "rms_norm_eps", "rope_theta", "routed_scaling_factor", "rope_factor", "beta_fast",
    "beta_slow", "mscale", "mscale_all_dim", "attention_factor",
]
TOPK_METHODS = {"greedy": 0, "group_limited_greedy": 1}


def read_config(hf_dir):
    """config.json -> dict of the header fields; refuses what dsv2.c does not implement."""
    path = os.path.join(hf_dir, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            c = json.load(f)
    except OSError as e:
        fail(f"{path}: cannot read ({e.strerror})")
    except json.JSONDecodeError as e:
        fail(f"{path}: not valid JSON ({e})")

    def need(key):
        if c.get(key) is None:
            fail(f"{path}: missing '{key}'")
        return c[key]

    if c.get("model_type") != "deepseek_v2":
        fail(f"{path}: model_type is {c.get('model_type')!r}; dsv2 supports 'deepseek_v2' only")
    if c.get("scoring_func", "softmax") != "softmax":
        fail(f"{path}: scoring_func {c['scoring_func']!r} is not supported (DeepSeek-V2 uses softmax)")
    method = c.get("topk_method", "greedy")
    if method not in TOPK_METHODS:
        fail(f"{path}: topk_method {method!r} is not supported (greedy or group_limited_greedy)")
    if c.get("hidden_act", "silu") != "silu":
        fail(f"{path}: hidden_act {c['hidden_act']!r} is not supported (silu)")
    if c.get("attention_bias") or c.get("mlp_bias"):
        fail(f"{path}: attention_bias / mlp_bias are not supported (DeepSeek-V2 has none)")
    if c.get("n_routed_experts") is None:
        fail(f"{path}: n_routed_experts is null (a dense model); dsv2 expects DeepSeekMoE layers")
    heads = need("num_attention_heads")
    if c.get("num_key_value_heads", heads) != heads:
        fail(f"{path}: num_key_value_heads must equal num_attention_heads under MLA")

    h = {k: 0 for k in HEADER_INTS}
    h.update({k: 0.0 for k in HEADER_FLOATS})
    h["dim"] = need("hidden_size")
    h["n_layers"] = need("num_hidden_layers")
    h["n_heads"] = heads
    h["vocab_size"] = need("vocab_size")
    h["q_lora_rank"] = c.get("q_lora_rank") or 0
    for k in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
              "intermediate_size", "moe_intermediate_size", "n_routed_experts",
              "max_position_embeddings"):
        h[k] = need(k)
    h["n_shared_experts"] = c.get("n_shared_experts") or 0
    h["n_experts_per_tok"] = need("num_experts_per_tok")
    h["first_k_dense_replace"] = c.get("first_k_dense_replace", 0)
    h["moe_layer_freq"] = c.get("moe_layer_freq", 1)
    h["topk_method"] = TOPK_METHODS[method]
    h["n_group"] = c.get("n_group") or 1
    h["topk_group"] = c.get("topk_group") or 1
    h["norm_topk_prob"] = int(bool(c.get("norm_topk_prob", False)))
    h["bos_token_id"] = c["bos_token_id"] if isinstance(c.get("bos_token_id"), int) else -1
    eos = c.get("eos_token_id")
    h["eos_token_id"] = eos if isinstance(eos, int) else (eos[0] if isinstance(eos, list) and eos else -1)
    h["rms_norm_eps"] = c.get("rms_norm_eps", 1e-6)
    h["rope_theta"] = c.get("rope_theta", 10000.0)
    h["routed_scaling_factor"] = c.get("routed_scaling_factor", 1.0)

    rs = c.get("rope_scaling") or c.get("rope_parameters")
    rtype = (rs or {}).get("type", (rs or {}).get("rope_type", "default"))
    if rs and "rope_theta" in rs:
        h["rope_theta"] = rs["rope_theta"]
    if rtype == "yarn":
        h["rope_yarn"] = 1
        h["rope_factor"] = need_in(rs, "factor", path)
        h["original_max_position_embeddings"] = need_in(rs, "original_max_position_embeddings", path)
        h["beta_fast"] = rs.get("beta_fast") or 32.0
        h["beta_slow"] = rs.get("beta_slow") or 1.0
        h["mscale"] = rs.get("mscale") or 0.0
        h["mscale_all_dim"] = rs.get("mscale_all_dim") or 0.0
        h["attention_factor"] = rs.get("attention_factor") or 0.0
    elif rtype not in (None, "default"):
        fail(f"{path}: rope_scaling type {rtype!r} is not supported (none or yarn)")

    if h["n_routed_experts"] % h["n_group"]:
        fail(f"{path}: n_routed_experts {h['n_routed_experts']} is not divisible by n_group {h['n_group']}")
    if not 0 < h["topk_group"] <= h["n_group"] or not 0 < h["n_experts_per_tok"] <= h["n_routed_experts"]:
        fail(f"{path}: topk_group / num_experts_per_tok out of range")
    if h["qk_rope_head_dim"] % 2:
        fail(f"{path}: qk_rope_head_dim must be even")
    if h["moe_layer_freq"] < 1:
        fail(f"{path}: moe_layer_freq must be >= 1")
    h["tie_word_embeddings"] = bool(c.get("tie_word_embeddings", False))
    return h


def need_in(d, key, path):
    if d.get(key) is None:
        fail(f"{path}: rope_scaling has no '{key}'")
    return d[key]


def is_moe_layer(h, l):
    # the original hub code's rule (transformers' native class ignores moe_layer_freq)
    return l >= h["first_k_dense_replace"] and l % h["moe_layer_freq"] == 0


def tensor_names(h):
    """(hub tensor name, shape) in file order; dsv2.c's map_weights() walks the same order."""
    d, nh = h["dim"], h["n_heads"]
    qk_head = h["qk_nope_head_dim"] + h["qk_rope_head_dim"]
    out = [("model.embed_tokens.weight", (h["vocab_size"], d))]
    for l in range(h["n_layers"]):
        p = f"model.layers.{l}."
        out.append((p + "input_layernorm.weight", (d,)))
        if h["q_lora_rank"]:
            out.append((p + "self_attn.q_a_proj.weight", (h["q_lora_rank"], d)))
            out.append((p + "self_attn.q_a_layernorm.weight", (h["q_lora_rank"],)))
            out.append((p + "self_attn.q_b_proj.weight", (nh * qk_head, h["q_lora_rank"])))
        else:
            out.append((p + "self_attn.q_proj.weight", (nh * qk_head, d)))
        out.append((p + "self_attn.kv_a_proj_with_mqa.weight", (h["kv_lora_rank"] + h["qk_rope_head_dim"], d)))
        out.append((p + "self_attn.kv_a_layernorm.weight", (h["kv_lora_rank"],)))
        out.append((p + "self_attn.kv_b_proj.weight",
                    (nh * (h["qk_nope_head_dim"] + h["v_head_dim"]), h["kv_lora_rank"])))
        out.append((p + "self_attn.o_proj.weight", (d, nh * h["v_head_dim"])))
        out.append((p + "post_attention_layernorm.weight", (d,)))
        if is_moe_layer(h, l):
            mi = h["moe_intermediate_size"]
            out.append((p + "mlp.gate.weight", (h["n_routed_experts"], d)))
            for e in range(h["n_routed_experts"]):
                q = f"{p}mlp.experts.{e}."
                out += [(q + "gate_proj.weight", (mi, d)), (q + "up_proj.weight", (mi, d)),
                        (q + "down_proj.weight", (d, mi))]
            if h["n_shared_experts"]:
                si = mi * h["n_shared_experts"]
                q = p + "mlp.shared_experts."
                out += [(q + "gate_proj.weight", (si, d)), (q + "up_proj.weight", (si, d)),
                        (q + "down_proj.weight", (d, si))]
        else:
            fi = h["intermediate_size"]
            q = p + "mlp."
            out += [(q + "gate_proj.weight", (fi, d)), (q + "up_proj.weight", (fi, d)),
                    (q + "down_proj.weight", (d, fi))]
    out.append(("model.norm.weight", (d,)))
    out.append(("lm_head.weight", (h["vocab_size"], d)))
    return out


def pack_header(h, dtype):
    h = dict(h, dtype=DTYPES[dtype])
    body = MAGIC + struct.pack("<I", VERSION)
    body += struct.pack(f"<{len(HEADER_INTS)}i", *[int(h[k]) for k in HEADER_INTS])
    body += struct.pack(f"<{len(HEADER_FLOATS)}f", *[float(h[k]) for k in HEADER_FLOATS])
    assert len(body) <= HEADER_BYTES
    return body + b"\0" * (HEADER_BYTES - len(body))


class SafeTensors:
    """Index of the tensors in model.safetensors or model-*.safetensors; reads one at a time."""

    def __init__(self, hf_dir):
        index = os.path.join(hf_dir, "model.safetensors.index.json")
        single = os.path.join(hf_dir, "model.safetensors")
        if os.path.exists(index):
            try:
                with open(index, encoding="utf-8") as f:
                    files = sorted(set(json.load(f)["weight_map"].values()))
            except (OSError, ValueError, KeyError) as e:
                fail(f"{index}: cannot read the shard index ({e})")
        elif os.path.exists(single):
            files = ["model.safetensors"]
        else:
            fail(f"{hf_dir}: no model.safetensors or model.safetensors.index.json")
        self.where = {}  # name -> (path, dtype, shape, start, end)
        for name in files:
            path = os.path.join(hf_dir, name)
            try:
                size = os.path.getsize(path)
                with open(path, "rb") as f:
                    n = struct.unpack("<Q", f.read(8))[0]
                    if n > size - 8:
                        raise ValueError("header longer than the file")
                    header = json.loads(f.read(n))
            except (OSError, ValueError, struct.error) as e:
                fail(f"{path}: not a readable safetensors file ({e})")
            for key, t in header.items():
                if key == "__metadata__":
                    continue
                start, end = t["data_offsets"]
                if 8 + n + end > size:
                    fail(f"{path}: tensor {key} runs past the end of the file (truncated?)")
                self.where[key] = (path, t["dtype"], tuple(t["shape"]), 8 + n + start, 8 + n + end)

    def __contains__(self, name):
        return name in self.where

    def stream(self, name, shape, chunk_elems=1 << 24):
        """Yield the tensor's values as little-endian float32 bytes, chunk by chunk."""
        if name not in self.where:
            fail(f"tensor {name} not found in the checkpoint")
        path, dtype, got, start, end = self.where[name]
        if tuple(got) != tuple(shape):
            fail(f"tensor {name} has shape {list(got)}, expected {list(shape)} from config.json")
        width = {"BF16": 2, "F16": 2, "F32": 4}.get(dtype)
        if width is None:
            fail(f"tensor {name}: dtype {dtype} is not supported (BF16, F16, F32)")
        with open(path, "rb") as f:
            f.seek(start)
            left = end - start
            while left:
                raw = f.read(min(left, chunk_elems * width))
                if not raw:
                    fail(f"{path}: unexpected end of file in {name}")
                left -= len(raw)
                yield dtype, raw


def bf16_to_f32(raw):
    """bf16 -> fp32 is a byte shuffle: the bf16 bits are the high half of the fp32 bits."""
    out = bytearray(2 * len(raw))
    out[2::4] = raw[0::2]
    out[3::4] = raw[1::2]
    return bytes(out)


def f32_to_bf16(raw):
    """fp32 -> bf16, rounding to nearest even (as torch does); NaN stays NaN."""
    words = array.array("I", raw)
    if sys.byteorder == "big":
        words.byteswap()
    out = array.array("H", bytes(2 * len(words)))
    for i, w in enumerate(words):
        if (w & 0x7F800000) == 0x7F800000 and (w & 0x7FFFFF):
            out[i] = (w >> 16) | 0x40
        else:
            out[i] = ((w + 0x7FFF + ((w >> 16) & 1)) >> 16) & 0xFFFF
    if sys.byteorder == "big":
        out.byteswap()
    return out.tobytes()


def f16_to_f32(raw):
    vals = struct.unpack(f"<{len(raw) // 2}e", raw)
    return struct.pack(f"<{len(vals)}f", *vals)


def convert(dtype_in, raw, dtype_out):
    if dtype_out == "bf16":
        if dtype_in == "BF16":
            return raw
        return f32_to_bf16(raw if dtype_in == "F32" else f16_to_f32(raw))
    if dtype_in == "F32":
        return raw
    return bf16_to_f32(raw) if dtype_in == "BF16" else f16_to_f32(raw)


def export_model(hf_dir, out_path, dtype):
    h = read_config(hf_dir)
    st = SafeTensors(hf_dir)
    names = tensor_names(h)
    if h["tie_word_embeddings"] and "lm_head.weight" not in st:
        names[-1] = ("model.embed_tokens.weight", names[-1][1])  # tied: the head is the embedding
    for l in range(h["n_layers"]):  # the checkpoint must agree with the dense/MoE layer rule
        has_gate = f"model.layers.{l}.mlp.gate.weight" in st
        if has_gate != is_moe_layer(h, l):
            fail(f"layer {l}: config.json says {'MoE' if is_moe_layer(h, l) else 'dense'} "
                 f"but the checkpoint {'has' if has_gate else 'lacks'} mlp.gate.weight")
    total = sum(_numel(s) for _, s in names)
    width = 2 if dtype == "bf16" else 4
    tmp = out_path + ".tmp"
    done, t0, last = 0, time.time(), 0.0
    try:
        with open(tmp, "wb") as out:
            out.write(pack_header(h, dtype))
            for name, shape in names:
                out.write(b"\0" * (-out.tell() % ALIGN))
                for dt, raw in st.stream(name, shape):
                    out.write(convert(dt, raw, dtype))
                done += _numel(shape)
                if time.time() - last > 1.0 or done == total:
                    last = time.time()
                    print(f"\rexport.py: {done / total:6.1%} of {total / 1e6:.1f}M parameters, "
                          f"{done * width / max(last - t0, 1e-9) / 1e6:.0f} MB/s", end="", file=sys.stderr)
        os.replace(tmp, out_path)
    except OSError as e:
        fail(f"{out_path}: cannot write ({e.strerror})")
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    print(f"\nexport.py: wrote {out_path} ({os.path.getsize(out_path) / 2**20:.1f} MiB, {dtype})",
          file=sys.stderr)


def _numel(shape):
    n = 1
    for s in shape:
        n *= s
    return n


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("hf_dir", help="Hugging Face model directory (config.json, *.safetensors, tokenizer.json)")
    ap.add_argument("model_out", nargs="?", help="output model file")
    ap.add_argument("--tokenizer", metavar="TOK_OUT", help="also write tokenizer.bin here")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="weight type in the model file")
    args = ap.parse_args()
    if not args.model_out and not args.tokenizer:
        fail("nothing to do: give MODEL_OUT and/or --tokenizer TOK_OUT")
    if not os.path.isdir(args.hf_dir):
        fail(f"{args.hf_dir}: not a directory")
    if args.tokenizer:
        export_tokenizer(args.hf_dir, args.tokenizer)
    if args.model_out:
        export_model(args.hf_dir, args.model_out, args.dtype)


if __name__ == "__main__":
    main()
