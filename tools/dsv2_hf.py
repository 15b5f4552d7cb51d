"""Torch helpers shared by train.py and model_golden.py (GPU machine only).

- build/load DeepseekV2ForCausalLM from a hub-style config.json (rope_scaling + rope_theta),
- enforce_paper_rope(): make the YaRN model follow the DeepSeek-V2 checkpoints' semantics
  (PAPER.md): inv_freq from the YaRN ramp, cos/sin times mscale(mscale)/mscale(mscale_all_dim)
  and softmax scale (nope+rope)^-0.5 * mscale(factor, mscale_all_dim)^2. transformers'
  native DeepseekV2Attention used a bare qk_head_dim^-0.5 until PR #47435; this function
  reports what the installed version did and sets the paper value either way,
- per-expert (hub layout) safetensors export from the fused in-memory experts,
- routing capture for the expert-level balance loss.
"""
import json
import math
import os

import torch

from model_config import yarn_get_mscale


def load_config(dirpath):
    from transformers import AutoConfig
    return AutoConfig.from_pretrained(dirpath)


def model_from_hub_config(hub_cfg, workdir, **kw):
    """Random-init model from a hub-style config dict (goes through the same from_pretrained
    config path as the saved HF directory)."""
    from transformers import AutoModelForCausalLM
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump(hub_cfg, f, indent=2)
    cfg = load_config(workdir)
    # config.json says torch_dtype bfloat16 (the export); training wants fp32 master weights
    kw = dict(kw, dtype=torch.float32)
    try:
        m = AutoModelForCausalLM.from_config(cfg, **kw)
    except TypeError:
        m = AutoModelForCausalLM.from_config(cfg)
    m = m.float()
    assert all(p.dtype == torch.float32 for p in m.parameters())
    return m


def paper_inv_freq(hub_cfg):
    """inv_freq as DeepSeek-V2's modeling_deepseek.py computes it (float32)."""
    d = hub_cfg["qk_rope_head_dim"]
    base = float(hub_cfg["rope_theta"])
    inv = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    rs = hub_cfg.get("rope_scaling")
    if not rs:
        return inv, 1.0, 1.0
    f = float(rs["factor"])
    orig = int(rs["original_max_position_embeddings"])
    bf, bs = float(rs.get("beta_fast", 32)), float(rs.get("beta_slow", 1))

    def corr_dim(nrot):
        return (d * math.log(orig / (nrot * 2 * math.pi))) / (2 * math.log(base))
    low = max(math.floor(corr_dim(bf)), 0)
    high = min(math.ceil(corr_dim(bs)), d - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(d // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extra_mask = 1.0 - ramp                      # 1 = keep the original frequency
    freq_extra = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    freq_inter = freq_extra / f
    inv = freq_inter * (1 - extra_mask) + freq_extra * extra_mask
    cos_scale = yarn_get_mscale(f, rs.get("mscale", 1)) / yarn_get_mscale(f, rs.get("mscale_all_dim", 0))
    m = yarn_get_mscale(f, rs.get("mscale_all_dim", 0)) if rs.get("mscale_all_dim") else 1.0
    return inv, cos_scale, m * m


def enforce_paper_rope(model, hub_cfg):
    """Check (and fix) rotary inv_freq, cos/sin scale and softmax scale. Returns a report."""
    inv, cos_scale, sm_mult = paper_inv_freq(hub_cfg)
    qk = hub_cfg["qk_nope_head_dim"] + hub_cfg["qk_rope_head_dim"]
    want_scale = qk ** -0.5 * sm_mult
    rep = {"rope_scaling": hub_cfg.get("rope_scaling"), "softmax_scale_paper": want_scale,
           "cos_sin_scale_paper": cos_scale}
    rot = model.model.rotary_emb
    have = rot.inv_freq.detach().float().cpu()
    rep["rope_type_transformers"] = getattr(rot, "rope_type", None)
    rep["inv_freq_transformers"] = have.tolist()
    rep["inv_freq_paper"] = inv.tolist()
    rep["inv_freq_max_rel_diff"] = float(((have - inv).abs() / inv).max()) if have.shape == inv.shape else None
    rep["attention_scaling_transformers"] = float(getattr(rot, "attention_scaling", 1.0))
    if rep["inv_freq_max_rel_diff"] is None or rep["inv_freq_max_rel_diff"] > 1e-6:
        dev = rot.inv_freq.device
        rot.inv_freq = inv.to(dev)
        if hasattr(rot, "original_inv_freq"):
            rot.original_inv_freq = inv.clone().to(dev)
        rep["inv_freq_overridden"] = True
    if abs(rep["attention_scaling_transformers"] - cos_scale) > 1e-9:
        rot.attention_scaling = cos_scale
        rep["attention_scaling_overridden"] = True
    scales = sorted({float(l.self_attn.scaling) for l in model.model.layers})
    rep["softmax_scale_transformers"] = scales
    rep["softmax_scale_matched_paper_already"] = all(abs(s - want_scale) < 1e-9 for s in scales)
    for l in model.model.layers:
        l.self_attn.scaling = want_scale
    return rep


# ---------------------------------------------------------------- MoE helpers
def moe_modules(model):
    out = []
    for i, layer in enumerate(model.model.layers):
        m = layer.mlp
        if hasattr(m, "gate") and hasattr(m, "experts"):
            out.append((i, m))
    return out


def route(logits_fp32, cfg):
    """Group-limited greedy top-k (the paper's device-limited routing) on router logits
    [T, E]; returns scores s [T, E] (softmax, float32) and the chosen expert ids [T, K]."""
    s = logits_fp32.softmax(dim=-1)
    T, E = s.shape
    K = cfg["num_experts_per_tok"]
    if cfg["topk_method"] == "group_limited_greedy":
        G, TG = cfg["n_group"], cfg["topk_group"]
        gs = s.view(T, G, E // G).max(dim=-1).values
        gidx = torch.topk(gs, k=TG, dim=-1, sorted=False)[1]
        gmask = torch.zeros_like(gs).scatter_(1, gidx, 1.0)
        smask = gmask.unsqueeze(-1).expand(T, G, E // G).reshape(T, E)
        tmp = s.masked_fill(~smask.bool(), 0.0)
        idx = torch.topk(tmp, k=K, dim=-1, sorted=False)[1]
    else:
        idx = torch.topk(s, k=K, dim=-1, sorted=False)[1]
    return s, idx


class RouterCapture:
    """forward-pre-hooks on every MoE block keep its input; balance_loss() recomputes the
    router scores from it (with gradient) and the selection (no gradient). The native
    DeepseekV2Moe calls F.linear on gate.weight directly, so a hook on mlp.gate never fires."""

    def __init__(self, model, cfg):
        self.cfg = cfg
        self.mods = moe_modules(model)
        self.inputs = {}
        self.enabled = True
        self.handles = []
        for li, m in self.mods:
            self.handles.append(m.register_forward_pre_hook(self._hook(li)))

    def _hook(self, li):
        def fn(module, args, kwargs=None):
            if self.enabled:
                x = args[0] if args else kwargs.get("hidden_states")
                self.inputs[li] = x
        return fn

    def clear(self):
        self.inputs = {}

    def remove(self):
        for h in self.handles:
            h.remove()

    def balance_loss(self, counts=None):
        """sum over MoE layers of sum_i f_i P_i (paper eq. 23 without alpha1);
        f_i = N_r/(K_r T) * #tokens choosing i, P_i = mean_t s_i,t. 1.0 per layer when uniform."""
        E, K = self.cfg["n_routed_experts"], self.cfg["num_experts_per_tok"]
        total = 0.0
        for li, m in self.mods:
            x = self.inputs.get(li)
            if x is None:
                continue
            x = x.reshape(-1, x.shape[-1])
            logits = torch.nn.functional.linear(x.float(), m.gate.weight.float())
            s, idx = route(logits, self.cfg)
            T = s.shape[0]
            with torch.no_grad():
                cnt = torch.bincount(idx.reshape(-1), minlength=E).float()
                if counts is not None:
                    counts[li] = counts.get(li, 0) + cnt.cpu()
                f = cnt * (E / (K * T))
            P = s.mean(dim=0)
            total = total + (f * P).sum()
        self.clear()
        return total


# ---------------------------------------------------------------- export
def hub_state_dict(model, cfg, dtype=torch.bfloat16):
    """State dict in the hub layout: routed experts split into per-expert Linear weights
    model.layers.L.mlp.experts.E.{gate,up,down}_proj.weight. In memory transformers keeps
    experts.gate_up_proj [E, 2I, H] (rows 0..I-1 = gate, I..2I-1 = up: the forward does
    linear(x, gate_up_proj[e]).chunk(2) -> gate, up) and experts.down_proj [E, H, I]."""
    E, I, H = cfg["n_routed_experts"], cfg["moe_intermediate_size"], cfg["hidden_size"]
    out = {}
    for k, v in model.state_dict().items():
        v = v.detach()
        if k.endswith("mlp.experts.gate_up_proj"):
            pre = k[: -len("gate_up_proj")]
            if tuple(v.shape) == (E, H, 2 * I):      # transposed storage variant
                v = v.transpose(1, 2)
            assert tuple(v.shape) == (E, 2 * I, H), (k, v.shape)
            for e in range(E):
                out[f"{pre}{e}.gate_proj.weight"] = v[e, :I].contiguous()
                out[f"{pre}{e}.up_proj.weight"] = v[e, I:].contiguous()
        elif k.endswith("mlp.experts.down_proj"):
            pre = k[: -len("down_proj")]
            if tuple(v.shape) == (E, I, H):
                v = v.transpose(1, 2)
            assert tuple(v.shape) == (E, H, I), (k, v.shape)
            for e in range(E):
                out[f"{pre}{e}.down_proj.weight"] = v[e].contiguous()
        elif "rotary_emb" in k:
            continue
        else:
            out[k] = v
    return {k: v.to(dtype).contiguous().cpu() for k, v in out.items()}


def save_hf_dir(model, hub_cfg, tok_dir, outdir):
    """config.json (hub style), model.safetensors (bf16, per-expert), tokenizer files."""
    import shutil
    from safetensors.torch import save_file
    os.makedirs(outdir, exist_ok=True)
    sd = hub_state_dict(model, hub_cfg)
    assert "lm_head.weight" in sd and "model.embed_tokens.weight" in sd
    save_file(sd, os.path.join(outdir, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(outdir, "config.json"), "w") as f:
        json.dump(hub_cfg, f, indent=2)
        f.write("\n")
    for n in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(tok_dir, n), os.path.join(outdir, n))
    return sd


def load_hf_dir(d, dtype=torch.float32, eager_experts=False):
    """from_pretrained + the paper RoPE/softmax-scale check. Returns (model, report, info)."""
    from transformers import AutoModelForCausalLM
    kw = {"dtype": dtype, "output_loading_info": True}
    if eager_experts:
        kw["experts_implementation"] = "eager"
    try:
        model, info = AutoModelForCausalLM.from_pretrained(d, **kw)
    except TypeError:
        kw.pop("experts_implementation", None)
        model, info = AutoModelForCausalLM.from_pretrained(d, **kw)
    hub_cfg = json.load(open(os.path.join(d, "config.json")))
    rep = enforce_paper_rope(model, hub_cfg)
    info = {k: sorted(map(str, v)) for k, v in info.items() if v} if isinstance(info, dict) else {}
    return model, rep, info


class RawTokenizer:
    """tokenizers.Tokenizer with DeepSeek's BOS behaviour (add_bos_token true)."""

    def __init__(self, path):
        from tokenizers import Tokenizer
        self.tok = Tokenizer.from_file(path)
        self.bos = self.tok.token_to_id("<｜begin▁of▁sentence｜>")
        self.eos = self.tok.token_to_id("<｜end▁of▁sentence｜>")

    def encode(self, text, bos=True):
        ids = self.tok.encode(text, add_special_tokens=False).ids
        return ([self.bos] if bos else []) + ids

    def decode(self, ids):
        return self.tok.decode(list(ids), skip_special_tokens=False)
