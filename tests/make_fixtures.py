#!/usr/bin/env python3
"""Reference fixtures for dsv2's tests, made with transformers' native DeepseekV2ForCausalLM.

Runs on the GPU machine (torch, transformers 5.17, tokenizers, safetensors). For each tiny
random checkpoint it writes, under OUT/NAME/:
  config.json, model.safetensors (or two shards + index), tokenizer.json,
  tokenizer_config.json  -- a Hugging Face directory in the HUB's layout (per-expert tensors)
  golden_logits.bin      -- float64 [n_tokens][vocab]: logits of the float64 reference for
                            every position of prompt + greedy continuation
  golden.txt             -- prompt text, prompt ids (BOS first), greedy ids, and unit-test
                            values taken from the reference modules (rope, rmsnorm, softmax,
                            routing); one "name count values..." line each

The reference is the model reloaded from the saved bf16 files (so the rotary inv_freq buffer
is never rounded; see ../shared/PAPER.md), run in float64 with eager experts and attention.

usage: python3 tests/make_fixtures.py --pretokenizer-from TOKENIZER_JSON --out tests/fixtures
"""
import argparse
import json
import math
import os
import sys
import sysconfig

import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
CHAT_TEMPLATE = (  # DeepSeek-V2-Chat's template (tokenizer_config.json of the hub checkpoints)
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ 'User: ' + message['content'] + '\n\n' }}{% elif message['role'] == 'assistant' %}"
    "{{ 'Assistant: ' + message['content'] + eos_token }}{% elif message['role'] == 'system' %}"
    "{{ message['content'] + '\n\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
TOK_VOCAB = 384

COMMON = dict(
    architectures=["DeepseekV2ForCausalLM"], model_type="deepseek_v2", vocab_size=400,
    hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
    qk_nope_head_dim=16, v_head_dim=12, kv_lora_rank=32, intermediate_size=128,
    moe_intermediate_size=32, n_shared_experts=2, first_k_dense_replace=1, moe_layer_freq=1,
    hidden_act="silu", rms_norm_eps=1e-6, rope_theta=10000.0, attention_bias=False,
    tie_word_embeddings=False, scoring_func="softmax", norm_topk_prob=False,
    bos_token_id=0, eos_token_id=1, torch_dtype="bfloat16", use_cache=True,
)
FIXTURES = {
    # DeepSeek-V2-Lite's shape of things: no query compression, greedy top-k, plain RoPE
    "lite": dict(COMMON, q_lora_rank=None, qk_rope_head_dim=8, n_routed_experts=8,
                 num_experts_per_tok=3, topk_method="greedy", n_group=1, topk_group=1,
                 routed_scaling_factor=1.0, max_position_embeddings=256, rope_scaling=None),
    # DeepSeek-V2's: query compression, device-limited routing, scaled routed experts, YaRN
    # (mscale != mscale_all_dim so that both YaRN factors are exercised)
    "v2": dict(COMMON, q_lora_rank=24, qk_rope_head_dim=16, n_routed_experts=12,
               num_experts_per_tok=3, topk_method="group_limited_greedy", n_group=4, topk_group=2,
               routed_scaling_factor=2.5, max_position_embeddings=128,
               rope_scaling=dict(type="yarn", factor=4.0, original_max_position_embeddings=32,
                                 beta_fast=32.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=0.8)),
}
PROMPTS = {
    "lite": "The cache holds one latent per token.",
    "v2": "def attention(q, k, v):\n    # Multi-head Latent Attention caches only the latent\n"
          "    return softmax(q @ k.T) @ v\n",
}
N_GREEDY = 24


def train_tokenizer(pretok_json, out_dir):
    """A small byte-level BPE with DeepSeek-V2's pre-tokenizer, trained on Python's stdlib."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    with open(pretok_json, encoding="utf-8") as f:
        pre = json.load(f)["pre_tokenizer"]
    tok = Tokenizer(models.BPE())
    # the pre-tokenizer is set through the JSON form, exactly as DeepSeek-V2 has it
    spec = json.loads(tok.to_str())
    spec["pre_tokenizer"] = pre
    spec["decoder"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
    tok = Tokenizer.from_str(json.dumps(spec))
    stdlib = sysconfig.get_paths()["stdlib"]
    files = sorted(os.path.join(stdlib, f) for f in os.listdir(stdlib) if f.endswith(".py"))[:60]
    trainer = trainers.BpeTrainer(vocab_size=TOK_VOCAB, special_tokens=[BOS, EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train(files, trainer)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    cfg = dict(add_bos_token=True, add_eos_token=False, bos_token=BOS, eos_token=EOS, pad_token=EOS,
               clean_up_tokenization_spaces=False, legacy=True, model_max_length=256,
               tokenizer_class="LlamaTokenizerFast", chat_template=CHAT_TEMPLATE)
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=1, ensure_ascii=False)
    return tok


def randomize(model, gen):
    """Random weights with O(1) activations, so logits and routing scores are well spread."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=gen))
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
            else:
                fan_in = p.shape[-1]
                gain = 2.0 if (name.endswith("mlp.gate.weight") or "lm_head" in name) else 1.0
                p.copy_(gain * torch.randn(p.shape, generator=gen) / math.sqrt(fan_in))
            p.copy_(p.to(torch.bfloat16).to(torch.float32))  # parameters only, never buffers


def hub_state_dict(model):
    """transformers keeps experts fused ([E, 2I, H] and [E, H, I]); the hub files have them per expert."""
    out = {}
    for name, t in model.state_dict().items():
        t = t.detach().to(torch.bfloat16).contiguous()
        if name.endswith("mlp.experts.gate_up_proj"):
            p = name[: -len("gate_up_proj")]
            inter = t.shape[1] // 2
            for e in range(t.shape[0]):  # linear(x, gate_up).chunk(2): gate rows first, then up
                out[f"{p}{e}.gate_proj.weight"] = t[e, :inter].clone()
                out[f"{p}{e}.up_proj.weight"] = t[e, inter:].clone()
        elif name.endswith("mlp.experts.down_proj"):
            p = name[: -len("down_proj")]
            for e in range(t.shape[0]):
                out[f"{p}{e}.down_proj.weight"] = t[e].clone()
        elif "rotary_emb" not in name:
            out[name] = t.clone()
    return out


def save_hub(model, out_dir, shards):
    sd = hub_state_dict(model)
    names = sorted(sd)
    if shards == 1:
        save_file(sd, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
        return
    per = (len(names) + shards - 1) // shards
    weight_map = {}
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: sd[n] for n in names[s * per:(s + 1) * per]}
        save_file(part, os.path.join(out_dir, fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=1)


def routing_margins(model, ids):
    """Smallest gap between the last kept and the first dropped expert (and group) score over
    all tokens and MoE layers: float32 vs float64 rounding must not flip a routing decision."""
    gaps = []

    def hook(gate, inp, out):  # gate: DeepseekV2TopkRouter (mlp.gate)
        x = inp[0].reshape(-1, inp[0].shape[-1]).to(torch.float64)
        s = torch.softmax(x @ gate.weight.to(torch.float64).T, dim=-1)
        if gate.topk_method == "group_limited_greedy":
            g = s.view(s.shape[0], gate.num_group, -1).max(dim=-1).values
            gs = g.sort(dim=-1, descending=True).values
            gaps.append((gs[:, gate.topk_group - 1] - gs[:, gate.topk_group]).min().item())
            keep = g >= gs[:, gate.topk_group - 1:gate.topk_group]
            s = (s.view(s.shape[0], gate.num_group, -1) * keep[..., None]).view(s.shape[0], -1)
        v = s.sort(dim=-1, descending=True).values
        gaps.append((v[:, gate.top_k - 1] - v[:, gate.top_k]).min().item())

    hs = []
    for layer in model.model.layers:
        if hasattr(layer.mlp, "gate"):
            hs.append(layer.mlp.gate.register_forward_hook(hook))
    with torch.no_grad():
        model(torch.tensor([ids]))
    for h in hs:
        h.remove()
    return min(gaps)


def write_values(f, name, values):
    values = [float(v) for v in values]
    f.write(f"{name} {len(values)} " + " ".join(repr(v) for v in values) + "\n")


def unit_values(ref, cfg, f, gen):
    """Values computed by the reference's own modules for dsv2's unit tests."""
    m = ref.model
    rot = m.rotary_emb
    write_values(f, "rope_inv_freq", rot.inv_freq.float().tolist())
    write_values(f, "rope_attention_scaling", [rot.attention_scaling])
    pos = torch.tensor([[0, 1, 7, 31, 33, 63, 100]])
    fc = rot(torch.zeros(1, dtype=torch.float32), pos)[0]  # complex [pos][rope_dim/2], scaled
    write_values(f, "rope_positions", pos[0].tolist())
    write_values(f, "rope_cos", fc.real.flatten().tolist())
    write_values(f, "rope_sin", fc.imag.flatten().tolist())
    write_values(f, "softmax_scale", [m.layers[0].self_attn.scaling])
    x = torch.randn(cfg["hidden_size"], generator=gen, dtype=torch.float64) * 3
    norm = m.layers[0].input_layernorm
    write_values(f, "rmsnorm_x", x.tolist())
    write_values(f, "rmsnorm_w", norm.weight.tolist())
    write_values(f, "rmsnorm_y", norm(x[None]).flatten().tolist())
    v = torch.randn(37, generator=gen, dtype=torch.float64) * 4
    write_values(f, "softmax_x", v.tolist())
    write_values(f, "softmax_y", torch.softmax(v, dim=-1).tolist())
    gate = m.layers[1].mlp.gate
    x = torch.randn(8, cfg["hidden_size"], generator=gen, dtype=torch.float64)
    logits, w, idx = gate(x)
    order = idx.argsort(dim=-1)  # torch.topk(sorted=False) order is unspecified: sort by expert
    write_values(f, "route_logits", logits.flatten().tolist())
    write_values(f, "route_idx", idx.gather(1, order).flatten().tolist())
    write_values(f, "route_weight", w.gather(1, order).flatten().tolist())


def make_fixture(name, spec, tok, out_root, pretok_json):
    d = os.path.join(out_root, name)
    os.makedirs(d, exist_ok=True)
    for fn in os.listdir(d):
        os.remove(os.path.join(d, fn))
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(spec, f, indent=1)
    for fn in ("tokenizer.json", "tokenizer_config.json"):
        with open(os.path.join(out_root, "_tok", fn), "rb") as src, open(os.path.join(d, fn), "wb") as dst:
            dst.write(src.read())
    ids = [tok.token_to_id(BOS)] + tok.encode(PROMPTS[name], add_special_tokens=False).ids
    config = AutoConfig.from_pretrained(d)

    for seed in range(100):  # a seed whose routing and greedy choices are far from ties
        gen = torch.Generator().manual_seed(1000 + seed)
        torch.manual_seed(1000 + seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager",
                                                 experts_implementation="eager")
        model.eval()
        randomize(model, gen)
        margin = routing_margins(model.double(), ids)
        model.float()
        if margin > 1e-4:
            break
        print(f"{name}: seed {seed}: routing margin {margin:.2e}, trying another seed", file=sys.stderr)
    save_hub(model, d, shards=2 if name == "v2" else 1)

    # the reference: reloaded from the hub-layout files
    ref32 = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        a = model(torch.tensor([ids])).logits
        b = ref32(torch.tensor([ids])).logits
    reload_diff = (a - b).abs().max().item()
    print(f"{name}: in-memory vs reloaded per-expert files: max |diff| = {reload_diff:.3e}", file=sys.stderr)
    assert reload_diff < 1e-5, "the per-expert layout does not reload to the same model"

    ref = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float64, attn_implementation="eager",
                                               experts_implementation="eager").eval()
    seq, min_gap = list(ids), float("inf")
    with torch.no_grad():
        for _ in range(N_GREEDY):
            logits = ref(torch.tensor([seq])).logits[0, -1]
            top2 = logits.topk(2).values
            min_gap = min(min_gap, (top2[0] - top2[1]).item())
            seq.append(int(logits.argmax()))
        logits = ref(torch.tensor([seq])).logits[0]
    margin = routing_margins(ref, seq)
    print(f"{name}: {len(ids)} prompt + {N_GREEDY} greedy tokens; min top-2 logit gap {min_gap:.3e}, "
          f"min routing gap {margin:.3e}; softmax scale {ref.model.layers[0].self_attn.scaling:.6f}",
          file=sys.stderr)
    logits.numpy().astype("<f8").tofile(os.path.join(d, "golden_logits.bin"))
    with open(os.path.join(d, "golden.txt"), "w") as f:
        f.write("# made by tests/make_fixtures.py with torch %s, transformers %s\n"
                % (torch.__version__, __import__("transformers").__version__))
        write_values(f, "prompt_ids", ids)
        write_values(f, "greedy_ids", seq[len(ids):])
        write_values(f, "vocab", [spec["vocab_size"]])
        write_values(f, "min_greedy_gap", [min_gap])
        write_values(f, "min_routing_gap", [margin])
        unit_values(ref, spec, f, torch.Generator().manual_seed(7))
    with open(os.path.join(d, "prompt.txt"), "w", encoding="utf-8") as f:
        f.write(PROMPTS[name])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pretokenizer-from", required=True, help="a tokenizer.json with DeepSeek-V2's pre-tokenizer")
    ap.add_argument("--out", default="tests/fixtures", help="output folder")
    args = ap.parse_args()
    torch.set_num_threads(8)
    os.makedirs(os.path.join(args.out, "_tok"), exist_ok=True)
    tok = train_tokenizer(args.pretokenizer_from, os.path.join(args.out, "_tok"))
    for name, spec in FIXTURES.items():
        make_fixture(name, spec, tok, args.out, args.pretokenizer_from)
    for fn in os.listdir(os.path.join(args.out, "_tok")):
        os.remove(os.path.join(args.out, "_tok", fn))
    os.rmdir(os.path.join(args.out, "_tok"))


if __name__ == "__main__":
    main()
