#!/usr/bin/env python3
"""Reference values for the teaching kit's tests (--trace and -m ppl), from transformers.

Runs on the GPU machine (torch, transformers 5.17, tokenizers), from the repository root; the
CPU is enough (float64, tiny models). For each fixture in tests/fixtures/{lite,v2} it writes:

  tests/fixtures/NAME/trace_golden.txt  the reference's intermediate tensors at the last prompt
      position, one "L<layer>.<name> count values..." line each, named as dsv2 --trace names them:
      c_t^Q (eq. 12, after q_a_layernorm; v2 only), q_t,1^C and q_t,1^R (eqs. 13-14, head 1, the
      rope part after RoPE), c_t^KV (eq. 9, after kv_a_layernorm), k_t^R (eq. 15, after RoPE),
      k_t,1^C and v_t,1^C (eqs. 10-11, head 1, kv_b_proj's output), p_t,1,j (eq. 18, head 1's
      attention probabilities, when the eager attention returns them), o_t,i (eq. 18, o_proj's
      input), u_t (eq. 19, o_proj's output), s_i,t (eq. 22), experts and g_i,t (eq. 21, sorted by
      expert), h'_t-u_t (eq. 20, the MoE block's output) or FFN(u_t) (dense layers);
      plus trace_ids (the prompt ids) and trace_pos.
  tests/fixtures/NAME/ppl_golden.txt    perplexity of tests/ppl.txt: its ids (fixture tokenizer,
      BOS first), the window (max_position_embeddings), the summed -log p(next token) in nats and
      the number of predictions. Windows of W tokens overlap by one token (window k starts at
      k (W - 1)), exactly as dsv2's -m ppl runs them.

The reference is AutoModelForCausalLM.from_pretrained(fixture, dtype=torch.float64) with eager
attention and experts, as in tests/make_fixtures.py. RoPE is applied here with the model's own
rotary frequencies (model.model.rotary_emb) to the projections that forward hooks capture.

usage: python3 tests/make_teach_golden.py [--fixtures tests/fixtures] [--text tests/ppl.txt]
"""
import argparse
import os

import torch
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM

BOS = "<｜begin▁of▁sentence｜>"


def write_values(f, name, values):
    values = [float(v) for v in values]
    f.write(f"{name} {len(values)} " + " ".join(repr(v) for v in values) + "\n")


def read_golden(path):
    out = {}
    with open(path) as f:
        for line in f:
            if line.startswith("#") or not line.strip():
                continue
            parts = line.split()
            out[parts[0]] = [float(x) for x in parts[2:2 + int(parts[1])]]
    return out


def rotate(v, freqs):
    """RoPE on interleaved pairs (2i, 2i+1) as complex numbers times the model's complex freqs."""
    z = torch.complex(v[0::2].double(), v[1::2].double()) * freqs.to(torch.complex128)
    out = torch.empty(v.shape[0], dtype=torch.float64)
    out[0::2] = z.real
    out[1::2] = z.imag
    return out


def first_tensor(x):
    return x[0] if isinstance(x, (tuple, list)) else x


def route(gate, u, cfg):
    """(experts, weights) sorted by expert: the router module itself, as tests/make_fixtures.py calls it."""
    try:
        _, w, idx = gate(u[None])
        w, idx = w[0], idx[0]
    except Exception as e:  # fall back to the documented rule (PAPER.md)
        print(f"  router module call failed ({e!r}); recomputing the routing", flush=True)
        s = torch.softmax(u @ gate.weight.double().T, dim=-1)
        E, K = s.shape[0], cfg.num_experts_per_tok
        if cfg.topk_method == "group_limited_greedy":
            g = s.view(cfg.n_group, -1).max(dim=-1).values
            keep = torch.zeros(cfg.n_group, dtype=torch.bool)
            keep[g.topk(cfg.topk_group).indices] = True
            s = (s.view(cfg.n_group, -1) * keep[:, None]).view(E)
        w, idx = s.topk(K)
        w = w * cfg.routed_scaling_factor
    order = idx.argsort()
    return idx[order].tolist(), w[order].tolist()


def trace_golden(d, model, ids):
    cfg = model.config
    P = len(ids) - 1
    nope, rope, vdim, d_c = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    freqs = model.model.rotary_emb(torch.zeros(1, dtype=torch.float32), torch.tensor([[P]]))[0][0]
    vals, hooks = {}, []

    def row(t):
        x = first_tensor(t)
        while x.dim() > 3:  # [batch, 1, seq, d]: transformers 5 views the latent as one head
            x = x[:, 0]
        return x[0, P].detach().double()

    def put(name, v):
        vals[name] = [float(x) for x in v]

    for li, layer in enumerate(model.model.layers):
        att, mlp = layer.self_attn, layer.mlp
        L = f"L{li}."

        def on(mod, fn, pre=False):
            if pre:
                hooks.append(mod.register_forward_pre_hook(lambda m, a, k: fn(a[0] if a else next(iter(k.values()))),
                                                           with_kwargs=True))
            else:
                hooks.append(mod.register_forward_hook(lambda m, a, k, o: fn(o), with_kwargs=True))

        if getattr(cfg, "q_lora_rank", None):
            on(att.q_a_layernorm, lambda o, L=L: put(L + "c_t^Q", row(o)))
            qmod = att.q_b_proj
        else:
            qmod = att.q_proj

        def on_q(o, L=L):
            q = row(o)[: nope + rope]  # head 1 (index 0): nope values, then rope values
            put(L + "q_t,1^C", q[:nope])
            put(L + "q_t,1^R", rotate(q[nope:], freqs))

        def on_kv_a(o, L=L):
            put(L + "k_t^R", rotate(row(o)[d_c:d_c + rope], freqs))

        def on_kv_b(o, L=L):
            kv = row(o)[: nope + vdim]
            put(L + "k_t,1^C", kv[:nope])
            put(L + "v_t,1^C", kv[nope:])

        def on_attn(o, L=L):
            if isinstance(o, (tuple, list)) and len(o) > 1 and torch.is_tensor(o[1]) and o[1].dim() == 4:
                put(L + "p_t,1,j", o[1][0, 0, P, : P + 1].double())

        def on_mlp_in(x, L=L, mlp=mlp):
            if hasattr(mlp, "gate"):
                u = x[0, P].detach().double()
                put(L + "s_i,t", torch.softmax(u @ mlp.gate.weight.double().T, dim=-1))
                idx, w = route(mlp.gate, u, cfg)
                put(L + "experts", idx)
                put(L + "g_i,t", w)

        def on_mlp_out(o, L=L, mlp=mlp):
            put(L + ("h'_t-u_t" if hasattr(mlp, "gate") else "FFN(u_t)"), row(o))

        on(qmod, on_q)
        on(att.kv_a_proj_with_mqa, on_kv_a)
        on(att.kv_a_layernorm, lambda o, L=L: put(L + "c_t^KV", row(o)))
        on(att.kv_b_proj, on_kv_b)
        on(att.o_proj, lambda x, L=L: put(L + "o_t,i", row(x)), pre=True)
        on(att.o_proj, lambda o, L=L: put(L + "u_t", row(o)))
        on(att, on_attn)
        on(mlp, on_mlp_in, pre=True)
        on(mlp, on_mlp_out)
    with torch.no_grad():
        model(torch.tensor([ids]), use_cache=False)
    for h in hooks:
        h.remove()
    path = os.path.join(d, "trace_golden.txt")
    with open(path, "w") as f:
        f.write("# made by tests/make_teach_golden.py with torch %s, transformers %s; position %d of the prompt\n"
                % (torch.__version__, __import__("transformers").__version__, P))
        write_values(f, "trace_ids", ids)
        write_values(f, "trace_pos", [P])
        for name, v in vals.items():
            write_values(f, name, v)
    print(f"wrote {path}: {len(vals)} tensors at position {P} of {len(ids)} tokens "
          f"({', '.join(sorted({n.split('.', 1)[1] for n in vals}))})", flush=True)


def ppl_golden(d, model, tok, text_path):
    with open(text_path, encoding="utf-8") as f:
        text = f.read()
    ids = [tok.token_to_id(BOS)] + tok.encode(text, add_special_tokens=False).ids
    W = model.config.max_position_embeddings
    nats, count, nats_hf, windows = 0.0, 0, 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids) - 1, W - 1):
            chunk = torch.tensor([ids[start:start + W]])
            out = model(chunk, labels=chunk, use_cache=False)
            logp = torch.log_softmax(out.logits[0].double(), dim=-1)
            n = chunk.shape[1] - 1
            nats += -logp[torch.arange(n), chunk[0, 1:]].sum().item()
            nats_hf += out.loss.item() * n  # transformers' own shifted cross-entropy (mean over n)
            count += n
            windows += 1
    path = os.path.join(d, "ppl_golden.txt")
    with open(path, "w") as f:
        f.write("# made by tests/make_teach_golden.py: %s, windows of %d overlapping by one token\n" % (text_path, W))
        write_values(f, "ppl_ids", ids)
        write_values(f, "ppl_window", [W])
        write_values(f, "ppl_nats", [nats])
        write_values(f, "ppl_count", [count])
        write_values(f, "ppl_nats_transformers_loss", [nats_hf])
    print(f"wrote {path}: {len(ids)} tokens, {windows} windows of {W}, {count} predictions, loss {nats / count:.6f} "
          f"(transformers' loss: {nats_hf / count:.6f}), perplexity {torch.tensor(nats / count).exp().item():.4f}", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fixtures", default="tests/fixtures", help="folder of the fixtures (hub layout)")
    ap.add_argument("--text", default="tests/ppl.txt", help="text for the perplexity reference")
    args = ap.parse_args()
    torch.set_num_threads(8)
    for name in ("lite", "v2"):
        d = os.path.join(args.fixtures, name)
        tok = Tokenizer.from_file(os.path.join(d, "tokenizer.json"))
        ids = [int(x) for x in read_golden(os.path.join(d, "golden.txt"))["prompt_ids"]]
        model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float64, attn_implementation="eager",
                                                     experts_implementation="eager").eval()
        trace_golden(d, model, ids)
        ppl_golden(d, model, tok, args.text)


if __name__ == "__main__":
    main()
