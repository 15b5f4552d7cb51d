#!/usr/bin/env python3
"""Malformed Hugging Face checkpoints, and a few valid variations, for export.py's input checks.

  python3 tests/make_malformed.py OUT_DIR

Each case is a copy of tests/fixtures/lite or tests/fixtures/v2 with one thing changed, written to
OUT_DIR/NAME/. OUT_DIR/cases.txt lists them, one tab-separated line each:

  NAME  EXPECT  OUT  ARGS  OUT: the case's output folder; ARGS: export.py's arguments
  EXPECT `error:TEXT`      export.py must exit 1 with one stderr line `export.py: error: ...`
                           containing TEXT, and leave no file behind
  EXPECT `midway:HOW:TEXT`  the same, but tests/run_export.py disturbs the export while it writes
                           (HOW: sigint, sigterm, fsize); the error must be the last stderr line
  EXPECT `same:MODEL:TOK`  export.py must succeed and write model.bin / tok.bin identical to the
                           reference exports MODEL / TOK of the unchanged fixture (`-`: none)

test_all.c runs every case (make test). Standard library only.
"""
import json
import os
import shutil
import struct
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
LITE_REF, V2_REF, TOK_REF = "build/fixtures/lite.fp32.bin", "build/fixtures/v2.fp32.bin", "build/fixtures/lite.tok.bin"
ST = "model.safetensors"
SHARD1, SHARD2 = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
INDEX = "model.safetensors.index.json"
DELETE = object()  # edit_config: remove the key


# ---------------- safetensors and JSON helpers
# A case starts as hard links to the fixture's files; every change goes through write(), which
# unlinks first, so that no mutation can reach the committed fixtures.

def write(path, data):
    if os.path.exists(path):
        os.remove(path)
    with open(path, "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode())


def read_st(path):
    """-> (header dict in file order, data bytes)."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return json.loads(f.read(n)), f.read()


def write_st(path, header, data):
    """header: a dict, or the header's raw JSON bytes."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    write(path, struct.pack("<Q", len(raw)) + raw + data)


def tensors(header):
    return [k for k in header if k != "__metadata__"]


def last_tensor(header):
    return max(tensors(header), key=lambda k: header[k]["data_offsets"][1])


def edit_st(fn, name=ST):
    """A mutation: fn(header, data) edits the header in place, or returns a tuple (header, data)."""
    def apply(d):
        header, data = read_st(os.path.join(d, name))
        got = fn(header, data)
        if isinstance(got, tuple):
            header, data = got
        write_st(os.path.join(d, name), header, data)
    return apply


def raw_st_header(raw):
    """A mutation: the header's JSON replaced by raw bytes (the data kept)."""
    return edit_st(lambda h, data: (raw, data))


def set_entry(tensor, **fields):
    """A mutation: fields of one tensor's header entry set (DELETE removes one)."""
    def fn(h, data):
        for k, v in fields.items():
            if v is DELETE:
                del h[tensor][k]
            else:
                h[tensor][k] = v
    return edit_st(fn)


def edit_json(name, fn):
    """A mutation: fn(j) edits the JSON file's value in place."""
    def apply(d):
        path = os.path.join(d, name)
        with open(path, encoding="utf-8") as f:
            j = json.load(f)
        fn(j)
        write(path, json.dumps(j, indent=1))
    return apply


def edit_config(**changes):
    def fn(c):
        for k, v in changes.items():
            if v is DELETE:
                c.pop(k, None)
            else:
                c[k] = v
    return edit_json("config.json", fn)


def write_file(name, data):
    return lambda d: write(os.path.join(d, name), data)


def replace_in_config(old, new):
    """A mutation on config.json's text (for values json.dump cannot write, like 1e8 or NaN)."""
    def apply(d):
        path = os.path.join(d, "config.json")
        with open(path, encoding="utf-8") as f:
            text = f.read()
        assert old in text, old
        write(path, text.replace(old, new, 1))
    return apply


def truncate(name, nbytes):
    def apply(d):
        path = os.path.join(d, name)
        with open(path, "rb") as f:
            data = f.read()
        write(path, data[:-nbytes])
    return apply


# ---------------- mutations that need a few lines

def tensor_two_bytes_short(h, data):
    """The last tensor's data is 2 bytes short of its shape (the file ends early to match):
    the old export.py zero-filled the gap and wrote a model that ran."""
    t = last_tensor(h)
    h[t]["data_offsets"][1] -= 2
    return h, data[:-2]


def odd_bytes_bf16(h, data):
    t = last_tensor(h)
    h[t]["data_offsets"][1] -= 1
    return h, data[:-1]


def tensors_share_data(h, data):
    """Two layernorm weights of the same shape point at the same bytes."""
    h["model.layers.1.input_layernorm.weight"]["data_offsets"] = list(h["model.layers.0.input_layernorm.weight"]["data_offsets"])


def tensors_overlap_2_bytes(h, data):
    """A tensor starts 2 bytes inside the one before it (its length is right)."""
    order = sorted(tensors(h), key=lambda k: h[k]["data_offsets"][0])
    t = order[5]
    start, end = h[t]["data_offsets"]
    h[t]["data_offsets"] = [start - 2, end - 2]


def duplicate_name(h, data):
    raw = json.dumps(h)
    entry = json.dumps(h["model.norm.weight"])
    return raw[:-1].encode() + b', "model.norm.weight": ' + entry.encode() + b"}", data


def deep_nesting(h, data):
    return b"[" * 100000 + b"]" * 100000, data


def extra_tensor(name, shape):
    """A BF16 tensor appended to the data (in no way part of the model config.json describes)."""
    def fn(h, data):
        size = 2
        for s in shape:
            size *= s
        h[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [len(data), len(data) + size]}
        return h, data + bytes(size)
    return fn


def ninth_expert(h, data):
    """Layer 1 gets an expert 8 (the config has experts 0-7)."""
    for proj, shape in (("gate", (32, 64)), ("up", (32, 64)), ("down", (64, 32))):
        h, data = extra_tensor(f"model.layers.1.mlp.experts.8.{proj}_proj.weight", shape)(h, data)
    return h, data


def drop_tensor(name):
    def fn(h, data):
        del h[name]
    return fn


def as_i16(h, data):
    h["model.norm.weight"]["dtype"] = "I16"  # same size, a dtype that is not a float


def reorder_header(h, data):
    """The header's entries in reverse order, __metadata__ last (offsets unchanged)."""
    return {k: h[k] for k in reversed(list(h))}, data


def reorder_data(h, data):
    """The tensors' bytes stored in reverse order, offsets rewritten."""
    new, out = {}, bytearray()
    if "__metadata__" in h:
        new["__metadata__"] = h["__metadata__"]
    for k in sorted(tensors(h), key=lambda k: -h[k]["data_offsets"][0]):
        start, end = h[k]["data_offsets"]
        new[k] = dict(h[k], data_offsets=[len(out), len(out) + end - start])
        out += data[start:end]
    return new, bytes(out)


def gaps_between(h, data):
    """64 unused bytes before each tensor (allowed: harmless, nothing reads them)."""
    new, out = {}, bytearray()
    for k in sorted(tensors(h), key=lambda k: h[k]["data_offsets"][0]):
        start, end = h[k]["data_offsets"]
        out += b"\xff" * 64
        new[k] = dict(h[k], data_offsets=[len(out), len(out) + end - start])
        out += data[start:end]
    return new, bytes(out)


def padded_header(h, data):
    """The header JSON followed by spaces (the safetensors library pads it to 8 bytes)."""
    raw = json.dumps(h).encode()
    return raw + b" " * (8 - len(raw) % 8 + 16), data


def bf16_to_f32(h, data):
    """Every tensor stored as F32 (bf16 -> fp32 is exact): the fp32 export must not change."""
    new, out = {}, bytearray()
    for k in sorted(tensors(h), key=lambda k: h[k]["data_offsets"][0]):
        start, end = h[k]["data_offsets"]
        f32 = bytearray(2 * (end - start))
        f32[2::4], f32[3::4] = data[start:end:2], data[start + 1:end:2]
        new[k] = dict(h[k], dtype="F32", data_offsets=[len(out), len(out) + len(f32)])
        out += f32
    return new, bytes(out)


def with_inv_freq(h, data):
    """Older checkpoints store the rotary inv_freq buffers; they are recomputed, so ignored."""
    out = bytearray(data)
    for l in range(3):
        h[f"model.layers.{l}.self_attn.rotary_emb.inv_freq"] = {
            "dtype": "F32", "shape": [4], "data_offsets": [len(out), len(out) + 16]}
        out += bytes(16)
    return h, bytes(out)


def split_in_shards(d):
    """The single-file lite fixture as two shards and an index."""
    h, data = read_st(os.path.join(d, ST))
    os.remove(os.path.join(d, ST))
    names = sorted(tensors(h))
    weight_map = {}
    for shard, part in ((SHARD1, names[:40]), (SHARD2, names[40:])):
        sub, out = {}, bytearray()
        for k in part:
            start, end = h[k]["data_offsets"]
            sub[k] = dict(h[k], data_offsets=[len(out), len(out) + end - start])
            out += data[start:end]
            weight_map[k] = shard
        write_st(os.path.join(d, shard), sub, bytes(out))
    write(os.path.join(d, INDEX), json.dumps({"metadata": {"total_size": len(data)}, "weight_map": weight_map}, indent=1))


def in_both_shards(d):
    """lm_head.weight (shard 1) copied into shard 2 as well."""
    h1, data1 = read_st(os.path.join(d, SHARD1))
    h2, data2 = read_st(os.path.join(d, SHARD2))
    start, end = h1["lm_head.weight"]["data_offsets"]
    h2["lm_head.weight"] = dict(h1["lm_head.weight"], data_offsets=[len(data2), len(data2) + end - start])
    write_st(os.path.join(d, SHARD2), h2, data2 + data1[start:end])


def index_edit(fn):
    return edit_json(INDEX, fn)


def move_in_index(j):
    j["weight_map"]["lm_head.weight"] = SHARD2


def unlist_in_index(j):
    del j["weight_map"]["model.norm.weight"]


def tokenizer_edit(fn):
    return edit_json("tokenizer.json", fn)


def vocab_id(value):
    def fn(j):
        j["model"]["vocab"]["a"] = value
    return tokenizer_edit(fn)


# Real configs of the released checkpoints (hub config.json files, auto_map etc. left out): on the
# lite fixture's weights they must get past config.json and stop at the layer count.
V2_LITE = {
    "architectures": ["DeepseekV2ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "aux_loss_alpha": 0.001, "bos_token_id": 100000, "eos_token_id": 100001, "first_k_dense_replace": 1,
    "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 10944,
    "kv_lora_rank": 512, "max_position_embeddings": 163840, "model_type": "deepseek_v2",
    "moe_intermediate_size": 1408, "moe_layer_freq": 1, "n_group": 1, "n_routed_experts": 64,
    "n_shared_experts": 2, "norm_topk_prob": False, "num_attention_heads": 16, "num_experts_per_tok": 6,
    "num_hidden_layers": 27, "num_key_value_heads": 16, "pretraining_tp": 1, "q_lora_rank": None,
    "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 1.0, "scoring_func": "softmax", "seq_aux": True,
    "tie_word_embeddings": False, "topk_group": 1, "topk_method": "greedy", "torch_dtype": "bfloat16",
    "transformers_version": "4.33.1", "use_cache": True, "v_head_dim": 128, "vocab_size": 102400,
}
V2 = dict(V2_LITE, hidden_size=5120, intermediate_size=12288, moe_intermediate_size=1536, n_group=8,
          n_routed_experts=160, num_attention_heads=128, num_hidden_layers=60, num_key_value_heads=128,
          q_lora_rank=1536, routed_scaling_factor=16.0, topk_group=3, topk_method="group_limited_greedy",
          transformers_version="4.39.3")
# transformers 5 writes rope_parameters (with rope_theta inside) instead of rope_scaling
V2_LITE_TF5 = {k: v for k, v in V2_LITE.items() if k not in ("rope_scaling", "rope_theta")}
V2_LITE_TF5["rope_parameters"] = dict(V2_LITE["rope_scaling"], rope_theta=10000.0, rope_type="yarn")
del V2_LITE_TF5["rope_parameters"]["type"]


def whole_config(c):
    return write_file("config.json", json.dumps(c, indent=1))


# ---------------- the cases: (name, fixture, outputs, expected, mutation)
#   outputs: "model" (MODEL_OUT), "tok" (--tokenizer), "both", or a literal argument string
M, T, B = "model", "tok", "both"
BAD = [
    # safetensors: the header length and the header's JSON
    ("st_5_byte_file", "lite", M, "no 8-byte header length", write_file(ST, b"\x01\x02\x03\x04\x05")),
    ("st_header_len_past_eof", "lite", M, "past the end of the file", write_file(ST, struct.pack("<Q", 1000) + b"{}")),
    ("st_header_len_2_64", "lite", M, "past the end of the file", write_file(ST, b"\xff" * 8 + b"{}")),
    ("st_header_empty", "lite", M, "not valid JSON", raw_st_header(b"")),
    ("st_header_garbage", "lite", M, "not valid JSON", raw_st_header(b"\x00\x01garbage")),
    ("st_header_not_utf8", "lite", M, "not valid JSON", raw_st_header(b'{"\xff\xfe": 1}')),
    ("st_header_array", "lite", M, "not a JSON object", raw_st_header(b"[1, 2, 3]")),
    ("st_header_string", "lite", M, "not a JSON object", raw_st_header(b'"model"')),
    ("st_header_nested_100000", "lite", M, "nested too deeply", edit_st(deep_nesting)),
    ("st_header_duplicate_name", "lite", M, "appears twice", edit_st(duplicate_name)),
    ("st_metadata_not_object", "lite", M, "__metadata__", edit_st(lambda h, d: h.update(__metadata__=5))),
    # safetensors: one tensor's entry
    ("st_entry_number", "lite", M, "not an object", edit_st(lambda h, d: h.update({"lm_head.weight": 7}))),
    ("st_entry_missing_dtype", "lite", M, "unknown dtype None", set_entry("lm_head.weight", dtype=DELETE)),
    ("st_entry_missing_shape", "lite", M, "shape None", set_entry("lm_head.weight", shape=DELETE)),
    ("st_entry_missing_offsets", "lite", M, "data_offsets None", set_entry("lm_head.weight", data_offsets=DELETE)),
    ("st_dtype_unknown", "lite", M, "unknown dtype 'Q4_K'", set_entry("lm_head.weight", dtype="Q4_K")),
    ("st_dtype_number", "lite", M, "unknown dtype 2", set_entry("lm_head.weight", dtype=2)),
    ("st_dtype_list", "lite", M, "unknown dtype ['BF16']", set_entry("lm_head.weight", dtype=["BF16"])),
    ("st_shape_negative", "lite", M, "non-negative integers", set_entry("lm_head.weight", shape=[-400, -64])),
    ("st_shape_float", "lite", M, "non-negative integers", set_entry("lm_head.weight", shape=[400.0, 64])),
    ("st_shape_bool", "lite", M, "non-negative integers", set_entry("model.norm.weight", shape=[True, 64])),
    ("st_shape_string", "lite", M, "non-negative integers", set_entry("lm_head.weight", shape="400x64")),
    ("st_offsets_strings", "lite", M, "not a pair of integers", set_entry("lm_head.weight", data_offsets=["0", "51200"])),
    ("st_offsets_floats", "lite", M, "not a pair of integers", set_entry("lm_head.weight", data_offsets=[0.0, 51200.0])),
    ("st_offsets_one", "lite", M, "not a pair of integers", set_entry("lm_head.weight", data_offsets=[51200])),
    ("st_offsets_three", "lite", M, "not a pair of integers", set_entry("lm_head.weight", data_offsets=[0, 51200, 0])),
    ("st_offsets_object", "lite", M, "not a pair of integers", set_entry("lm_head.weight", data_offsets={"start": 0})),
    ("st_offsets_start_after_end", "lite", M, "0 <= start <= end", set_entry("lm_head.weight", data_offsets=[51200, 0])),
    ("st_offsets_negative", "lite", M, "0 <= start <= end", set_entry("lm_head.weight", data_offsets=[-2, 51198])),
    ("st_file_truncated", "lite", M, "truncated", truncate(ST, 200000)),
    ("st_file_1_byte_short", "lite", M, "truncated", truncate(ST, 1)),
    ("st_tensor_2_bytes_short", "lite", M, "bytes of data, but BF16", edit_st(tensor_two_bytes_short)),
    ("st_tensor_odd_bytes_bf16", "lite", M, "bytes of data, but BF16", edit_st(odd_bytes_bf16)),
    ("st_tensor_too_long", "lite", M, "bytes of data, but BF16", set_entry("lm_head.weight", data_offsets=[0, 51202])),
    ("st_tensor_shape_wrong_size", "lite", M, "bytes of data, but BF16", set_entry("lm_head.weight", shape=[401, 64])),
    ("st_tensors_share_data", "lite", M, "overlap", edit_st(tensors_share_data)),
    ("st_tensors_overlap_2_bytes", "lite", M, "overlap", edit_st(tensors_overlap_2_bytes)),
    # the tensors against config.json
    ("st_tensor_missing", "lite", M, "model.norm.weight [64] is missing", edit_st(drop_tensor("model.norm.weight"))),
    ("st_shape_transposed", "lite", M, "has shape [64, 400], expected [400, 64]", set_entry("lm_head.weight", shape=[64, 400])),
    ("st_dtype_i16", "lite", M, "is I16; export.py converts", edit_st(as_i16)),
    ("st_extra_expert", "lite", M, "model.layers.1.mlp.experts.8.down_proj.weight and 2 more not part of",
     edit_st(ninth_expert)),
    ("st_extra_tensor", "lite", M, "model.layers.0.mlp.bias not part of", edit_st(extra_tensor("model.layers.0.mlp.bias", (64,)))),
    ("config_fewer_layers", "lite", M, "model.layers.2.input_layernorm.weight and 34 more not part of",
     edit_config(num_hidden_layers=2)),
    ("config_fewer_experts", "lite", M, "mlp.gate.weight has shape [8, 64], expected [4, 64]", edit_config(n_routed_experts=4)),
    ("config_q_lora_rank_on_lite", "lite", M, "q_a_proj.weight [24, 64] is missing", edit_config(q_lora_rank=24)),
    ("config_moe_from_layer_0", "lite", M, "layer 0: config.json says MoE", edit_config(first_k_dense_replace=0)),
    ("config_one_more_layer", "lite", M, "says 4 layers, the checkpoint has no model.layers.3", edit_config(num_hidden_layers=4)),
    ("config_vocab_larger", "lite", M, "has shape [400, 64], expected [512, 64]", edit_config(vocab_size=512)),
    # config.json
    ("config_missing", "lite", M, "config.json: cannot read", lambda d: os.remove(os.path.join(d, "config.json"))),
    ("config_not_json", "lite", M, "config.json: not valid JSON", write_file("config.json", "{\"model_type\": ")),
    ("config_not_utf8", "lite", M, "config.json: not valid JSON", write_file("config.json", b"{\"model_type\": \"\xff\"}")),
    ("config_array", "lite", M, "config.json: not a JSON object", write_file("config.json", "[]")),
    ("config_nested_100000", "lite", M, "nested too deeply", write_file("config.json", "[" * 100000 + "]" * 100000)),
    ("config_layers_1e8", "lite", M, "num_hidden_layers is 100000000.0; expected an integer", replace_in_config('"num_hidden_layers": 3', '"num_hidden_layers": 1e8')),
    ("config_layers_100000000", "lite", M, "num_hidden_layers is 100000000; expected an integer in [1, 1024]", edit_config(num_hidden_layers=100000000)),
    ("config_layers_2_64", "lite", M, "num_hidden_layers is 18446744073709551616", edit_config(num_hidden_layers=2 ** 64)),
    ("config_hidden_string", "lite", M, "hidden_size is '64'", edit_config(hidden_size="64")),
    ("config_hidden_float", "lite", M, "hidden_size is 64.0", edit_config(hidden_size=64.0)),
    ("config_heads_bool", "lite", M, "num_attention_heads is True", edit_config(num_attention_heads=True)),
    ("config_vocab_zero", "lite", M, "vocab_size is 0", edit_config(vocab_size=0)),
    ("config_vocab_negative", "lite", M, "vocab_size is -400", edit_config(vocab_size=-400)),
    ("config_hidden_missing", "lite", M, "hidden_size is missing", edit_config(hidden_size=DELETE)),
    ("config_experts_null", "lite", M, "n_routed_experts is null", edit_config(n_routed_experts=None)),
    ("config_first_dense_string", "lite", M, "first_k_dense_replace is '1'", edit_config(first_k_dense_replace="1")),
    ("config_q_lora_rank_zero", "lite", M, "q_lora_rank is 0", edit_config(q_lora_rank=0)),
    ("config_rope_dim_odd", "lite", M, "qk_rope_head_dim must be even", edit_config(qk_rope_head_dim=7)),
    ("config_n_group_3", "lite", M, "not divisible by n_group 3", edit_config(n_group=3)),
    ("config_top_k_9_of_8", "lite", M, "num_experts_per_tok out of range", edit_config(num_experts_per_tok=9)),
    ("config_kv_heads_1", "lite", M, "num_key_value_heads must equal", edit_config(num_key_value_heads=1)),
    ("config_model_type_missing", "lite", M, "model_type is None", edit_config(model_type=DELETE)),
    ("config_topk_method_list", "lite", M, "topk_method ['greedy']", edit_config(topk_method=["greedy"])),
    ("config_topk_method_noaux", "lite", M, "topk_method 'noaux_tc' is not supported", edit_config(topk_method="noaux_tc")),
    ("config_norm_topk_string", "lite", M, "norm_topk_prob is 'false'; expected true or false", edit_config(norm_topk_prob="false")),
    ("config_tie_number", "lite", M, "tie_word_embeddings is 0", edit_config(tie_word_embeddings=0)),
    ("config_eos_two_ids", "lite", M, "eos_token_id lists 2 ids", edit_config(eos_token_id=[1, 0])),
    ("config_eos_string", "lite", M, "eos_token_id is '1'", edit_config(eos_token_id="1")),
    ("config_eos_past_vocab", "lite", M, "eos_token_id is 400", edit_config(eos_token_id=400)),
    ("config_bos_negative", "lite", M, "bos_token_id is -1", edit_config(bos_token_id=-1)),
    ("config_bos_list", "lite", M, "bos_token_id is [0]", edit_config(bos_token_id=[0])),
    ("config_eps_nan", "lite", M, "rms_norm_eps is nan", replace_in_config('"rms_norm_eps": 1e-06', '"rms_norm_eps": NaN')),
    ("config_eps_zero", "lite", M, "rms_norm_eps is 0", edit_config(rms_norm_eps=0)),
    ("config_eps_one", "lite", M, "rms_norm_eps is 1", edit_config(rms_norm_eps=1)),
    ("config_theta_string", "lite", M, "rope_theta is '10000'", edit_config(rope_theta="10000")),
    ("config_theta_1e39", "lite", M, "rope_theta is 1e+39; expected a finite number", edit_config(rope_theta=1e39)),
    ("config_theta_infinity", "lite", M, "rope_theta is inf", replace_in_config('"rope_theta": 10000.0', '"rope_theta": Infinity')),
    ("config_scaling_factor_negative", "lite", M, "routed_scaling_factor is -1.0", edit_config(routed_scaling_factor=-1.0)),
    ("config_rope_scaling_string", "lite", M, "rope_scaling is 'yarn'; expected null or an object", edit_config(rope_scaling="yarn")),
    ("config_rope_scaling_linear", "lite", M, "rope_scaling type 'linear' is not supported", edit_config(rope_scaling={"type": "linear", "factor": 2.0})),
    ("config_yarn_no_factor", "v2", M, "rope_scaling.factor is missing",
     edit_json("config.json", lambda c: c["rope_scaling"].pop("factor"))),
    ("config_yarn_factor_string", "v2", M, "rope_scaling.factor is '4'", edit_json("config.json", lambda c: c["rope_scaling"].update(factor="4"))),
    ("config_yarn_factor_half", "v2", M, "rope_scaling.factor is 0.5", edit_json("config.json", lambda c: c["rope_scaling"].update(factor=0.5))),
    ("config_yarn_original_max_float", "v2", M, "original_max_position_embeddings is 32.5",
     edit_json("config.json", lambda c: c["rope_scaling"].update(original_max_position_embeddings=32.5))),
    ("config_yarn_beta_negative", "v2", M, "rope_scaling.beta_fast is -32", edit_json("config.json", lambda c: c["rope_scaling"].update(beta_fast=-32))),
    # real configs on the lite fixture's weights: config.json passes, the layer count stops it
    ("real_v2_config", "lite", M, "config.json says 60 layers", whole_config(V2)),
    ("real_v2_lite_config", "lite", M, "config.json says 27 layers", whole_config(V2_LITE)),
    ("real_v2_lite_config_transformers5", "lite", M, "config.json says 27 layers", whole_config(V2_LITE_TF5)),
    # the shard index (v2 fixture)
    ("index_not_json", "v2", M, "not valid JSON", write_file(INDEX, "{\"weight_map\": {")),
    ("index_array", "v2", M, "no 'weight_map' object", write_file(INDEX, "[]")),
    ("index_no_weight_map", "v2", M, "no 'weight_map' object", index_edit(lambda j: j.pop("weight_map"))),
    ("index_weight_map_list", "v2", M, "no 'weight_map' object", index_edit(lambda j: j.update(weight_map=[SHARD1, SHARD2]))),
    ("index_shard_number", "v2", M, "tensor lm_head.weight: 1 is not a file name", index_edit(lambda j: j["weight_map"].update({"lm_head.weight": 1}))),
    ("index_shard_outside_dir", "v2", M, "'../lite/model.safetensors' is not a file name",
     index_edit(lambda j: j["weight_map"].update({"lm_head.weight": "../lite/model.safetensors"}))),
    ("index_shard_missing", "v2", M, "lists shard model-00003-of-00002.safetensors, which is not a file",
     index_edit(lambda j: j["weight_map"].update({"lm_head.weight": "model-00003-of-00002.safetensors"}))),
    ("index_wrong_shard", "v2", M, "has tensor lm_head.weight, which", index_edit(move_in_index)),
    ("index_tensor_unlisted", "v2", M, "has tensor model.norm.weight, which", index_edit(unlist_in_index)),
    ("index_lists_absent_tensor", "v2", M, "lists tensor model.layers.7.foo",
     index_edit(lambda j: j["weight_map"].update({"model.layers.7.foo": SHARD1}))),
    ("index_tensor_in_both_shards", "v2", M, "is also in", in_both_shards),
    ("index_shard_truncated", "v2", M, "truncated", truncate(SHARD2, 1000)),
    # tokenizer.json / tokenizer_config.json
    ("tok_not_json", "lite", T, "tokenizer.json: not valid JSON", write_file("tokenizer.json", "{\"model\"")),
    ("tok_array", "lite", T, "no 'model' object", write_file("tokenizer.json", "[]")),
    ("tok_no_model", "lite", T, "no 'model' object", tokenizer_edit(lambda j: j.pop("model"))),
    ("tok_vocab_list", "lite", T, "model.vocab is not", tokenizer_edit(lambda j: j["model"].update(vocab=["a", "b"]))),
    ("tok_vocab_id_string", "lite", T, "token 'a' has id '7'", vocab_id("7")),
    ("tok_vocab_id_negative", "lite", T, "token 'a' has id -1", vocab_id(-1)),
    ("tok_vocab_id_1e9", "lite", T, "token 'a' has id 1000000000", vocab_id(10 ** 9)),
    ("tok_vocab_id_float", "lite", T, "token 'a' has id 7.0", vocab_id(7.0)),
    ("tok_vocab_id_shared", "lite", T, "have the same id", tokenizer_edit(lambda j: j["model"]["vocab"].update(a=j["model"]["vocab"]["b"]))),
    ("tok_merges_string", "lite", T, "model.merges is not a list", tokenizer_edit(lambda j: j["model"].update(merges="a b"))),
    ("tok_added_id_missing", "lite", T, "added token", tokenizer_edit(lambda j: j["added_tokens"][0].pop("id"))),
    ("tok_added_not_list", "lite", T, "added_tokens is not a list", tokenizer_edit(lambda j: j.update(added_tokens={}))),
    ("tok_config_array", "lite", T, "tokenizer_config.json: not a JSON object", write_file("tokenizer_config.json", "[]")),
    ("tok_config_bos_number", "lite", T, "bos_token is 5", edit_json("tokenizer_config.json", lambda j: j.update(bos_token=5))),
    ("tok_config_add_bos_string", "lite", T, "add_bos_token is 'yes'", edit_json("tokenizer_config.json", lambda j: j.update(add_bos_token="yes"))),
    ("tok_both_outputs_bad_model", "lite", B, "vocab_size is 0", edit_config(vocab_size=0)),
    ("tok_larger_than_model", "lite", B, "tokenizer.json has 451 tokens, config.json's vocab_size is 400",
     tokenizer_edit(lambda j: j["model"]["vocab"].update(zzz=450))),
]
# where the outputs go (literal export.py arguments; {dir} the case, {out} its output folder)
BAD_OUTPUTS = [
    ("out_dir_missing", "{dir} {out}/no/such/dir/model.bin", "does not exist"),
    ("out_is_a_directory", "{dir} {out}", "is a directory"),
    ("out_parent_is_a_file", "{dir} {dir}/config.json/model.bin", "config.json is not a directory"),
    ("out_same_file_twice", "{dir} {out}/model.bin --tokenizer {out}/model.bin", "the same file"),
    ("out_unknown_flag", "{dir} {out}/model.bin --frobnicate", "unrecognized arguments: --frobnicate"),
    ("out_bad_dtype", "{dir} {out}/model.bin --dtype fp8", "invalid choice: 'fp8'"),
    ("out_nothing_to_do", "{dir}", "nothing to do"),
]
# the fixture as it is, disturbed while export.py writes (tests/run_export.py does it)
MIDWAY = [
    ("midway_ctrl_c", "sigint", "interrupted; no file written"),
    ("midway_sigterm", "sigterm", "interrupted; no file written"),
    ("midway_write_fails", "fsize", "model.bin: cannot write (File too large)"),
]
GOOD = [
    ("good_lite", "lite", M, LITE_REF, "-", None),
    ("good_v2_sharded", "v2", M, V2_REF, "-", None),
    ("good_lite_tokenizer", "lite", T, "-", TOK_REF, None),
    ("good_lite_both", "lite", B, LITE_REF, TOK_REF, None),
    ("good_lite_header_reordered", "lite", M, LITE_REF, "-", edit_st(reorder_header)),
    ("good_lite_data_reordered", "lite", M, LITE_REF, "-", edit_st(reorder_data)),
    ("good_lite_gaps_between_tensors", "lite", M, LITE_REF, "-", edit_st(gaps_between)),
    ("good_lite_header_padded", "lite", M, LITE_REF, "-", edit_st(padded_header)),
    ("good_lite_no_metadata", "lite", M, LITE_REF, "-", edit_st(lambda h, d: h.pop("__metadata__"))),
    ("good_lite_f32_weights", "lite", M, LITE_REF, "-", edit_st(bf16_to_f32)),
    ("good_lite_inv_freq_buffers", "lite", M, LITE_REF, "-", edit_st(with_inv_freq)),
    ("good_lite_in_two_shards", "lite", M, LITE_REF, "-", split_in_shards),
    ("good_lite_config_variants", "lite", M, LITE_REF, "-",
     edit_config(eos_token_id=[1], rope_theta=10000, n_group=None, topk_group=None, num_key_value_heads=DELETE,
                 rope_scaling={}, routed_scaling_factor=1, some_future_field={"x": [1, 2]})),
    ("good_v2_rope_parameters", "v2", M, V2_REF, "-",
     edit_json("config.json", lambda c: c.update(rope_parameters=dict(c.pop("rope_scaling"), rope_theta=c.pop("rope_theta"))))),
]


def make_case(out_dir, name, fixture, mutation):
    d = os.path.join(out_dir, name)
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    src = os.path.join(FIXTURES, fixture)
    for f in os.listdir(src):
        if f.endswith((".json", ".safetensors")):
            try:
                os.link(os.path.join(src, f), os.path.join(d, f))
            except OSError:  # another file system
                shutil.copyfile(os.path.join(src, f), os.path.join(d, f))
    if mutation:
        mutation(d)
    return d


def arguments(kind, d, out):
    return {M: f"{d} {out}/model.bin", T: f"{d} --tokenizer {out}/tok.bin",
            B: f"{d} {out}/model.bin --tokenizer {out}/tok.bin"}[kind]


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: python3 tests/make_malformed.py OUT_DIR")
    out_dir = sys.argv[1]
    os.makedirs(out_dir, exist_ok=True)
    lines = []
    for name, fixture, kind, needle, mutation in BAD:
        d, out = make_case(out_dir, name, fixture, mutation), os.path.join(out_dir, "out", name)
        lines.append([name, f"error:{needle}", out, arguments(kind, d, out)])
    for name, args, needle in BAD_OUTPUTS:
        d, out = make_case(out_dir, name, "lite", None), os.path.join(out_dir, "out", name)
        lines.append([name, f"error:{needle}", out, args.format(dir=d, out=out)])
    for name, how, needle in MIDWAY:
        d, out = make_case(out_dir, name, "lite", None), os.path.join(out_dir, "out", name)
        lines.append([name, f"midway:{how}:{needle}", out, arguments(B, d, out)])
    for name, fixture, kind, model_ref, tok_ref, mutation in GOOD:
        d, out = make_case(out_dir, name, fixture, mutation), os.path.join(out_dir, "out", name)
        lines.append([name, f"same:{model_ref}:{tok_ref}", out, arguments(kind, d, out)])
    with open(os.path.join(out_dir, "cases.txt"), "w") as f:
        f.write("".join("\t".join(line) + "\n" for line in lines))
    print(f"make_malformed.py: {len(BAD) + len(BAD_OUTPUTS) + len(MIDWAY)} malformed and {len(GOOD)} valid checkpoints in {out_dir}")


if __name__ == "__main__":
    main()
