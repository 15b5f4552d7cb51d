#!/usr/bin/env python3
"""Train the default model (a tiny DeepSeek-V2) from scratch on one GPU.

  python3 tools/train.py --data data --tok OUT/tokenizer --out OUT [--time-budget 450] [--smoke]

Stage 1: pretraining at --ctx 256 tokens with plain RoPE (rope_theta 10000).
Stage 2: context extension like the paper: YaRN (factor 4 over 256 -> 1024,
         beta_fast 32, beta_slow 1, mscale = mscale_all_dim = 0.707) switched on and a
         short fine-tune at --long-ctx 1024.
Loss: next-token cross entropy + alpha1 * expert-level balance loss (paper eq. 23),
summed over the MoE layers (each layer's term is 1.0 at perfect balance).
Precision: fp32 master weights and AdamW state, bf16 autocast for the forward/backward.
LR: linear warmup, then cosine to min_lr over the stage's WALL-CLOCK budget (the number
of steps that fit is not known in advance); the schedule position is saved in the
checkpoint, so a resumed run continues it.
Checkpoints: OUT/ckpt/{model.pt, optim.pt, state.json} every --ckpt-every-s seconds and at
--deadline (wall seconds for this invocation; exit code 3 = stopped early, resume by
running the same command again). model.pt alone (fp32 weights) is enough to resume: the
optimizer then restarts with a short warmup.
At the end: full validation (loss, bits per byte), long-context table, expert load, the
Hugging Face directory OUT/hf (bf16, hub per-expert layout) reloaded and compared, samples.
"""
import argparse
import copy
import csv
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dsv2_hf as H  # noqa: E402
import model_config as MC  # noqa: E402
from textdata import read_docs  # noqa: E402

T0 = time.time()


def log(*a):
    print(f"[{time.time() - T0:7.1f}s]", *a, flush=True)


# ------------------------------------------------------------------ data
def tokenize_corpus(tok, data_dir, cache, smoke):
    """Token streams (int32 CPU tensors): docs as BOS + ids + EOS, concatenated."""
    if os.path.exists(cache):
        return torch.load(cache)
    out = {}
    for name in ("english_train", "english_val", "code_train", "code_val"):
        docs = read_docs(os.path.join(data_dir, name + ".txt"))
        if smoke:
            docs = docs[: (200 if name.endswith("train") else 20)]
        enc = tok.tok.encode_batch(docs, add_special_tokens=False)
        ids, lens = [], []
        for e in enc:
            seq = [tok.bos] + e.ids + [tok.eos]
            ids.extend(seq)
            lens.append(len(seq))
        out[name] = {"ids": torch.tensor(ids, dtype=torch.int32), "doc_lens": torch.tensor(lens),
                     "bytes": sum(len(d.encode("utf-8")) for d in docs), "docs": len(docs)}
        log(f"{name}: {len(docs)} docs, {len(ids)} tokens, {out[name]['bytes']} bytes")
    torch.save(out, cache)
    return out


class Batcher:
    def __init__(self, streams, dev, seed):
        self.en = streams["english_train"]["ids"].to(dev).long()
        self.code = streams["code_train"]["ids"].to(dev).long()
        self.g = torch.Generator(device=dev)
        self.g.manual_seed(seed)
        self.dev = dev

    def _windows(self, s, n, T):
        starts = torch.randint(0, s.numel() - T - 1, (n,), generator=self.g, device=self.dev)
        idx = starts[:, None] + torch.arange(T + 1, device=self.dev)[None, :]
        return s[idx]

    def get(self, B, T, code_frac):
        nc = int(round(B * code_frac))
        parts = []
        if B - nc:
            parts.append(self._windows(self.en, B - nc, T))
        if nc:
            parts.append(self._windows(self.code, nc, T))
        return torch.cat(parts, 0)


def val_windows(stream, T, max_windows=None):
    """Windows of T+1 tokens overlapping by one: every token after the first is predicted once."""
    s = stream["ids"].long()
    n = (s.numel() - 1) // T
    if max_windows:
        n = min(n, max_windows)
    return torch.stack([s[i * T: i * T + T + 1] for i in range(n)]) if n else s[None, : T + 1]


def long_sequences(stream, L, n_max):
    """First L+1 tokens of validation documents at least that long."""
    s, lens = stream["ids"].long(), stream["doc_lens"].tolist()
    out, pos = [], 0
    for ln in lens:
        if ln >= L + 1 and len(out) < n_max:
            out.append(s[pos: pos + L + 1])
        pos += ln
    return out


# ------------------------------------------------------------------ model bits
def lm_loss(model, x, reduction="mean"):
    logits = model(input_ids=x[:, :-1], use_cache=False).logits.float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction=reduction)


@torch.no_grad()
def evaluate(model, wins, cap, bs=64, amp=True):
    """Returns (mean loss over predicted tokens, total nats, n tokens)."""
    model.eval()
    cap.enabled = False
    tot, n = 0.0, 0
    for i in range(0, wins.shape[0], bs):
        x = wins[i: i + bs].cuda()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            l = lm_loss(model, x, reduction="sum")
        tot += float(l)
        n += x[:, 1:].numel()
    cap.enabled = True
    model.train()
    return tot / max(1, n), tot, n


@torch.no_grad()
def position_losses(model, seqs, cap, amp=True):
    """Mean loss at every position over the given sequences ([L] tensor)."""
    model.eval()
    cap.enabled = False
    acc = None
    for i in range(0, len(seqs), 8):
        x = torch.stack(seqs[i: i + 8]).cuda()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            logits = model(input_ids=x[:, :-1], use_cache=False).logits.float()
        l = F.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="none").sum(0)
        acc = l if acc is None else acc + l
    cap.enabled = True
    model.train()
    return (acc / len(seqs)).cpu()


def long_report(pl, short):
    return {"loss_pos_0_%d" % (short - 1): float(pl[:short].mean()),
            "loss_pos_%d_%d" % (short, pl.numel() - 1): float(pl[short:].mean()),
            "loss_by_64_positions": [round(float(pl[i:i + 64].mean()), 4) for i in range(0, pl.numel(), 64)]}


def build(hub_cfg, workdir, experts_impl):
    kw = {} if experts_impl == "default" else {"experts_implementation": experts_impl}
    torch.manual_seed(0)
    m = H.model_from_hub_config(hub_cfg, workdir, **kw)
    rep = H.enforce_paper_rope(m, hub_cfg)
    return m.cuda(), rep


def make_optim(model, lr, wd):
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed_tokens" not in n]
    nodecay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed_tokens" not in n)]
    kw = {"fused": True} if torch.cuda.is_available() else {}
    return torch.optim.AdamW([{"params": decay, "weight_decay": wd}, {"params": nodecay, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.95), eps=1e-8, **kw)


def lr_at(step, progress, peak, warmup, min_frac):
    w = min(1.0, (step + 1) / max(1, warmup))
    p = min(1.0, max(0.0, progress))
    return peak * w * (min_frac + (1 - min_frac) * 0.5 * (1 + math.cos(math.pi * p)))


@torch.no_grad()
def expert_load(model, cfg, wins, cap):
    """Fraction of routed slots each expert receives on the given windows, per MoE layer
    (count_i / (K_r * T); uniform = 1/N_r)."""
    model.eval()
    counts = {}
    for i in range(0, wins.shape[0], 64):
        x = wins[i: i + 64].cuda()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            model(input_ids=x[:, :-1], use_cache=False)
            cap.balance_loss(counts)
    model.train()
    return {str(li): (c / c.sum()).tolist() for li, c in sorted(counts.items())}


@torch.no_grad()
def generate(model, ids, n, greedy=True, temperature=0.8, top_k=40, seed=0, eos=None, max_ctx=1024):
    g = torch.Generator(device="cuda")
    g.manual_seed(seed)
    x = torch.tensor([ids], device="cuda")
    out = []
    for _ in range(n):
        logits = model(input_ids=x[:, -max_ctx:], use_cache=False).logits[0, -1].float()
        if greedy:
            nxt = int(logits.argmax())
        else:
            v, i = torch.topk(logits / temperature, top_k)
            nxt = int(i[torch.multinomial(v.softmax(-1), 1, generator=g)])
        out.append(nxt)
        if eos is not None and nxt == eos:
            break
        x = torch.cat([x, torch.tensor([[nxt]], device="cuda")], 1)
    return out


# ------------------------------------------------------------------ main
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="data")
    ap.add_argument("--tok", required=True, help="directory with tokenizer.json / tokenizer_config.json")
    ap.add_argument("--out", required=True)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--time-budget", type=float, default=450, help="wall seconds for both training stages")
    ap.add_argument("--long-frac", type=float, default=0.12, help="share of the budget for the YaRN fine-tune")
    ap.add_argument("--deadline", type=float, default=0, help="stop, checkpoint and exit 3 after this many wall seconds (0 = none)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--ctx", type=int, default=MC.PRETRAIN_CTX)
    ap.add_argument("--long-ctx", type=int, default=MC.PRETRAIN_CTX * MC.YARN_FACTOR)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--lr2", type=float, default=5e-4)
    ap.add_argument("--min-lr-frac", type=float, default=0.1)
    ap.add_argument("--warmup", type=int, default=150)
    ap.add_argument("--wd", type=float, default=0.1)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--alpha1", type=float, default=0.01)
    ap.add_argument("--code-frac", type=float, default=0.4)
    ap.add_argument("--eval-every-s", type=float, default=40)
    ap.add_argument("--ckpt-every-s", type=float, default=120)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--experts-impl", default="default", help="default|eager|grouped_mm|batched_mm")
    a = ap.parse_args()
    if a.smoke:
        a.time_budget, a.eval_every_s, a.ckpt_every_s, a.warmup = min(a.time_budget, 40), 10, 15, 10
    os.makedirs(a.out, exist_ok=True)
    ckdir = os.path.join(a.out, "ckpt")
    os.makedirs(ckdir, exist_ok=True)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    dev = "cuda"
    gpu = torch.cuda.get_device_name(0)
    import transformers
    log("torch", torch.__version__, "transformers", transformers.__version__, "gpu", gpu)

    hub1 = MC.hub_config(yarn=False)
    hub2 = MC.hub_config(yarn=True)
    params = MC.check(hub1)
    tok = H.RawTokenizer(os.path.join(a.tok, "tokenizer.json"))
    assert tok.tok.get_vocab_size() == hub1["vocab_size"], "tokenizer vocab != config vocab"
    assert tok.bos == hub1["bos_token_id"] and tok.eos == hub1["eos_token_id"]
    streams = tokenize_corpus(tok, a.data, os.path.join(a.out, "tokens.pt"), a.smoke)
    batcher = Batcher(streams, dev, a.seed)
    nval = 8 if a.smoke else 48
    vw = {d: val_windows(streams[f"{d}_val"], a.ctx, nval) for d in ("english", "code")}
    nlong = 4 if a.smoke else 24
    longseq = long_sequences(streams["english_val"], a.long_ctx, nlong) + long_sequences(streams["code_val"], a.long_ctx, nlong)
    if len(longseq) < 4:  # fall back to packed windows
        longseq = list(val_windows(streams["english_val"], a.long_ctx, nlong)) + list(val_windows(streams["code_val"], a.long_ctx, nlong))
    log(f"long-context eval: {len(longseq)} sequences of {a.long_ctx + 1} tokens")

    # ---- state / resume
    state_path = os.path.join(ckdir, "state.json")
    import ckpt_parts
    ckpt_parts.merge(ckdir)
    st = {"stage": 1, "step": 0, "stage_elapsed": 0.0, "tokens": 0, "total_steps": 0, "gpu_seconds": 0.0,
          "long_context": {}, "done": False}
    if os.path.exists(state_path):
        st.update(json.load(open(state_path)))
        log("resuming", st)
    budgets = {1: a.time_budget * (1 - a.long_frac), 2: a.time_budget * a.long_frac}
    metrics_path = os.path.join(a.out, "metrics.json")
    metrics = json.load(open(metrics_path)) if (os.path.exists(metrics_path) and os.path.exists(state_path)) else {}
    metrics.update({"gpu": gpu, "torch": torch.__version__, "transformers": transformers.__version__,
                    "params": params, "hub_config_stage1": hub1, "hub_config_final": hub2, "args": vars(a),
                    "data": {k: {"tokens": int(v["ids"].numel()), "bytes": v["bytes"], "docs": v["docs"]}
                             for k, v in streams.items()}})
    for sf in ("english_stats.json", "code_stats.json"):
        p = os.path.join(a.data, sf)
        if os.path.exists(p):
            js = json.load(open(p))
            js.get("val", {}).pop("held_out", None)
            metrics.setdefault("data_sources", {})[sf] = js
    p = os.path.join(a.tok, "tokenizer_stats.json")
    if os.path.exists(p):
        metrics["tokenizer"] = json.load(open(p))

    def save_metrics():
        with open(metrics_path, "w") as f:
            json.dump(metrics, f, indent=1)

    log_path = os.path.join(a.out, "train_log.csv")
    new_log = not os.path.exists(log_path) or st["total_steps"] == 0
    logf = open(log_path, "w" if new_log else "a", newline="")
    logw = csv.writer(logf)
    if new_log:
        logw.writerow(["stage", "step", "total_step", "tokens", "wall_s", "lr", "train_loss", "bal_loss",
                       "val_english", "val_code"])

    impl = a.experts_impl

    def make_stage_model(stage):
        nonlocal impl
        hub = hub1 if stage == 1 else hub2
        m, rep = build(hub, os.path.join(a.out, f"cfg_stage{stage}"), impl)
        src = os.path.join(ckdir, "model.pt")
        if os.path.exists(src):
            sd = torch.load(src, map_location="cuda")
            m.load_state_dict(sd, strict=False)
        return m, rep

    model, rope_rep = make_stage_model(st["stage"] if not st["done"] else 2)
    # probe: one fwd+bwd under autocast; fall back to eager experts if the default path fails
    try:
        x = batcher.get(2, 32, 0.5)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            lm_loss(model, x).backward()
        model.zero_grad(set_to_none=True)
    except Exception as e:  # noqa: BLE001
        log("default experts implementation failed under autocast:", repr(e)[:300], "-> eager")
        impl = "eager"
        model, rope_rep = make_stage_model(st["stage"])
    metrics["experts_impl"] = impl
    metrics.setdefault("rope_report", {})[f"stage{st['stage']}"] = rope_rep
    n_real = sum(p.numel() for p in model.parameters())
    assert n_real == params["total"], f"param count {n_real} != arithmetic {params['total']}"
    log(f"params {n_real} (active/token {params['active_per_token']}), bf16 {2 * n_real / 2**20:.2f} MiB")

    t_inv = time.time()

    def checkpoint(model, opt):
        torch.save(model.state_dict(), os.path.join(ckdir, "model.pt.tmp"))
        os.replace(os.path.join(ckdir, "model.pt.tmp"), os.path.join(ckdir, "model.pt"))
        if opt is not None:
            torch.save(opt.state_dict(), os.path.join(ckdir, "optim.pt"))
        with open(state_path, "w") as f:
            json.dump(st, f, indent=1)
        save_metrics()

    def run_stage(model, stage):
        cap = H.RouterCapture(model, hub1)
        peak = a.lr if stage == 1 else a.lr2
        T = a.ctx if stage == 1 else a.long_ctx
        B = a.batch if stage == 1 else max(1, a.batch * a.ctx // a.long_ctx)
        warm = a.warmup if stage == 1 else max(10, a.warmup // 5)
        opt = make_optim(model, peak, a.wd)
        op = os.path.join(ckdir, "optim.pt")
        fresh_opt = True
        if os.path.exists(op) and st["step"] > 0 and st["stage"] == stage:
            try:
                opt.load_state_dict(torch.load(op, map_location="cuda"))
                fresh_opt = False
            except Exception as e:  # noqa: BLE001
                log("optimizer state not loaded:", repr(e)[:200])
        warm_base = st["step"] if fresh_opt else 0  # a fresh optimizer on resume warms up again
        last_eval = last_ck = time.time()
        t_stage = time.time() - st["stage_elapsed"]
        ema = None
        model.train()
        while True:
            st["stage_elapsed"] = time.time() - t_stage
            prog = st["stage_elapsed"] / budgets[stage]
            if prog >= 1.0 or (a.smoke and st["step"] >= (30 if stage == 1 else 10)):
                break
            if a.deadline and time.time() - T0 > a.deadline:
                checkpoint(model, opt)
                log("deadline reached: checkpoint saved, exit 3")
                sys.exit(3)
            lr = lr_at(st["step"] - warm_base, prog, peak, warm, a.min_lr_frac)
            for gp in opt.param_groups:
                gp["lr"] = lr
            x = batcher.get(B, T, a.code_frac)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                ce = lm_loss(model, x)
                bal = cap.balance_loss()
            loss = ce + a.alpha1 * bal
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), a.clip)
            opt.step()
            st["step"] += 1
            st["total_steps"] += 1
            st["tokens"] += B * T
            if st["step"] % 10 == 0 or st["step"] == 1:
                cel, bl = float(ce), float(bal)
                if not math.isfinite(cel):
                    raise SystemExit(f"non-finite loss at step {st['step']}")
                ema = cel if ema is None else 0.9 * ema + 0.1 * cel
                row = [stage, st["step"], st["total_steps"], st["tokens"], round(time.time() - T0, 2), lr, cel, bl, "", ""]
                if time.time() - last_eval > a.eval_every_s:
                    ve, _, _ = evaluate(model, vw["english"][:16], cap)
                    vc, _, _ = evaluate(model, vw["code"][:16], cap)
                    row[-2:] = [ve, vc]
                    last_eval = time.time()
                    log(f"stage {stage} step {st['step']} tok {st['tokens'] / 1e6:.1f}M lr {lr:.2e} "
                        f"loss {cel:.3f} (ema {ema:.3f}) bal {bl:.3f} val en {ve:.3f} code {vc:.3f}")
                logw.writerow(row)
                logf.flush()
            if time.time() - last_ck > a.ckpt_every_s:
                checkpoint(model, opt)
                last_ck = time.time()
        cap.remove()
        return opt

    amp_ok = True
    if st["stage"] == 1 and not st["done"]:
        run_stage(model, 1)
        log(f"stage 1 done: {st['step']} steps, {st['tokens'] / 1e6:.1f}M tokens")
        cap = H.RouterCapture(model, hub1)
        pl = position_losses(model, longseq, cap, amp_ok)
        cap.remove()
        st["long_context"]["plain_rope_256_trained"] = long_report(pl, a.ctx)
        sd = model.state_dict()
        del model
        # switch on YaRN: same weights, new rotary frequencies / softmax scale
        model, rope_rep = build(hub2, os.path.join(a.out, "cfg_stage2"), impl)
        metrics["rope_report"]["stage2"] = rope_rep
        missing, unexpected = model.load_state_dict(sd, strict=False)
        assert not [k for k in missing if "rotary" not in k] and not unexpected, (missing, unexpected)
        cap = H.RouterCapture(model, hub1)
        pl = position_losses(model, longseq, cap, amp_ok)
        cap.remove()
        st["long_context"]["yarn_before_finetune"] = long_report(pl, a.ctx)
        log("long context:", json.dumps({k: {kk: vv for kk, vv in v.items() if "by_64" not in kk}
                                          for k, v in st["long_context"].items()}))
        st.update({"stage": 2, "step": 0, "stage_elapsed": 0.0})
        if os.path.exists(os.path.join(ckdir, "optim.pt")):
            os.remove(os.path.join(ckdir, "optim.pt"))
        checkpoint(model, None)
    if st["stage"] == 2 and not st["done"]:
        run_stage(model, 2)
        cap = H.RouterCapture(model, hub1)
        pl = position_losses(model, longseq, cap, amp_ok)
        cap.remove()
        st["long_context"]["yarn_after_finetune"] = long_report(pl, a.ctx)
        st["done"] = True
        checkpoint(model, None)
    st["gpu_seconds"] = st.get("gpu_seconds", 0.0) + (time.time() - t_inv)
    metrics["long_context"] = st["long_context"]
    metrics["train"] = {"steps_total": st["total_steps"], "tokens_seen": st["tokens"],
                        "stage_budgets_s": budgets, "wall_s_this_invocation": round(time.time() - T0, 1)}
    save_metrics()
    finish(a, model, hub1, hub2, streams, tok, metrics, save_metrics, impl)
    logf.close()


def finish(a, model, hub1, hub2, streams, tok, metrics, save_metrics, impl):
    """Final evaluation, HF export (bf16, per-expert), reload check, samples."""
    log("finish: final evaluation")
    # round the weights to bf16 exactly as exported; evaluate THAT model
    ref = copy.deepcopy(model)
    for p in ref.parameters():
        p.data = p.data.to(torch.bfloat16).float()
    cap = H.RouterCapture(ref, hub1)
    maxw = 8 if a.smoke else None
    final = {}
    for d in ("english", "code"):
        for T in (a.ctx, a.long_ctx):
            w = val_windows(streams[f"{d}_val"], T, maxw)
            loss, nats, n = evaluate(ref, w, cap, bs=max(1, 64 * a.ctx // T))
            # bytes of the part of the stream the windows cover (all but < T tokens at the end)
            covered = (streams[f"{d}_val"]["bytes"] * n / (streams[f"{d}_val"]["ids"].numel() - 1)
                       if maxw is None else None)
            final[f"{d}_ctx{T}"] = {"loss": loss, "tokens": n, "nats": nats,
                                    "bits_per_byte": (nats / math.log(2) / covered) if covered else None}
    metrics["final_val"] = final
    metrics["final_val_note"] = ("windows of ctx+1 tokens overlapping by one over the whole validation stream "
                                 "(docs as BOS+text+EOS); bits per byte = total nats / ln 2 / UTF-8 bytes of "
                                 "the validation documents; weights rounded to bf16 as exported")
    allw = torch.cat([val_windows(streams["english_val"], a.ctx, 64 if not a.smoke else 8),
                      val_windows(streams["code_val"], a.ctx, 64 if not a.smoke else 8)])
    metrics["expert_load"] = expert_load(ref, hub1, allw, cap)
    metrics["expert_load_note"] = "share of routed slots per expert on validation tokens (uniform = 1/16)"
    cap.remove()
    save_metrics()

    hfdir = os.path.join(a.out, "hf")
    H.save_hf_dir(ref, hub2, a.tok, hfdir)
    log("saved", hfdir, sorted(os.listdir(hfdir)))
    re_model, rep, info = H.load_hf_dir(hfdir, torch.float32)
    re_model = re_model.cuda().eval()
    ref.eval()
    x = allw[:4].cuda()
    xl = torch.stack([s for s in val_windows(streams["code_val"], a.long_ctx, 2)]).cuda()
    with torch.no_grad():
        diffs = []
        for inp in (x[:, :-1], xl[:, :-1]):
            l1 = ref(input_ids=inp, use_cache=False).logits.float()
            l2 = re_model(input_ids=inp, use_cache=False).logits.float()
            diffs.append(float((l1 - l2).abs().max()))
    ok = max(diffs) < 1e-3 and not info.get("missing_keys") and not info.get("unexpected_keys")
    metrics["reload_check"] = {"max_abs_logit_diff": diffs, "loading_info": info, "ok": ok, "rope_report": rep}
    log("reload check:", metrics["reload_check"]["max_abs_logit_diff"], "ok" if ok else "FAILED", info)
    # tokenizer through AutoTokenizer (transformers 5 may rebuild LlamaTokenizerFast as SentencePiece)
    metrics["tokenizer_check"] = tokenizer_check(hfdir, tok)
    save_metrics()
    samples = {}
    prompts = {"english": "The jury said that the city", "python": "def read_config(path):\n    "}
    for name, ptxt in prompts.items():
        ids = tok.encode(ptxt)
        for mode in ("greedy", "sampled"):
            out = generate(re_model, ids, 48 if a.smoke else 160, greedy=(mode == "greedy"), seed=1, eos=tok.eos)
            samples[f"{name}_{mode}"] = {"prompt": ptxt, "ids": out, "text": tok.decode(out)}
            log(f"--- {name} {mode}:\n{ptxt}{tok.decode(out)}")
    metrics["samples"] = samples
    metrics["samples_note"] = "reloaded bf16 model; sampled: temperature 0.8, top-k 40, seed 1; BOS prepended"
    save_metrics()
    with open(os.path.join(a.out, "samples.txt"), "w") as f:
        for k, v in samples.items():
            f.write(f"=== {k}\n{v['prompt']}{v['text']}\n\n")
    if not ok:
        raise SystemExit("reload check FAILED: the per-expert export does not reproduce the model")
    log("done")


def tokenizer_check(hfdir, tok):
    text = "Hello world!  The jury said:\n    x = 12345\n"
    want = tok.encode(text)
    res = {"raw_tokenizers_ids": want}
    try:
        from transformers import AutoTokenizer
        t = AutoTokenizer.from_pretrained(hfdir)
        got = t(text)["input_ids"]
        res.update({"class": type(t).__name__, "auto_ids": got, "match": got == want})
        if got != want:
            p = os.path.join(hfdir, "tokenizer_config.json")
            cfg = json.load(open(p))
            cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
            json.dump(cfg, open(p, "w"), indent=2, ensure_ascii=False)
            t = AutoTokenizer.from_pretrained(hfdir)
            got2 = t(text)["input_ids"]
            res.update({"rewrote_tokenizer_class": "PreTrainedTokenizerFast", "auto_ids_after": got2,
                        "match_after": got2 == want})
    except Exception as e:  # noqa: BLE001
        res["error"] = repr(e)[:300]
    log("tokenizer check:", {k: v for k, v in res.items() if "ids" not in k})
    return res


if __name__ == "__main__":
    main()
