#!/usr/bin/env python3
"""Golden reference for the C implementation's tests (CPU is enough).

  python3 tools/model_golden.py HF_DIR OUT_DIR

For 3 prompts (English, Python, mixed), encoded with the trained tokenizer with BOS
prepended (what add_bos_token true means), writes:
  OUT_DIR/<name>.ids.i32      prompt ids, little-endian int32
  OUT_DIR/<name>.logits.f64   logits at every prompt position, little-endian float64, [n, vocab] row-major
  OUT_DIR/index.json          prompts, ids, shapes, the 64-token greedy continuation of each
                              prompt (float32 model, no EOS stop), config and notes.
The float64 model is transformers' DeepseekV2ForCausalLM loaded from HF_DIR (bf16 weights,
exact in float64) with experts_implementation="eager", with the DeepSeek-V2 YaRN softmax
scale enforced (see dsv2_hf.enforce_paper_rope). transformers itself computes RMSNorm, the
rotary product and the router softmax in float32 even in a float64 model: expect agreement
with an exact float64 implementation to ~1e-5, not 1e-12.
"""
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dsv2_hf as H  # noqa: E402

PROMPTS = {
    "english": "The Fulton County Grand Jury said Friday that the city",
    "code": "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "mixed": "# Print the average length of the words in a sentence.\nwords = sentence.split()\nprint(",
}
MAX_TOKENS = 24


def main():
    hf, out = sys.argv[1], sys.argv[2]
    os.makedirs(out, exist_ok=True)
    torch.set_grad_enabled(False)
    tok = H.RawTokenizer(os.path.join(hf, "tokenizer.json"))
    m32, rep, info = H.load_hf_dir(hf, torch.float32, eager_experts=True)
    m32.eval()
    m64, _, _ = H.load_hf_dir(hf, torch.float32, eager_experts=True)
    m64 = m64.double().eval()
    cfg = json.load(open(os.path.join(hf, "config.json")))
    index = {"bos_id": tok.bos, "eos_id": tok.eos, "bos_prepended": True, "vocab_size": cfg["vocab_size"],
             "logits_dtype": "float64 little-endian, [n_tokens, vocab_size] row-major",
             "ids_dtype": "int32 little-endian", "config": cfg, "rope_report": rep, "loading_info": info,
             "notes": __doc__.strip().split("\n\n")[-1], "prompts": []}
    for name, text in PROMPTS.items():
        ids = tok.encode(text)[:MAX_TOKENS]
        x = torch.tensor([ids])
        l64 = m64(input_ids=x, use_cache=False).logits[0].double()
        l32 = m32(input_ids=x, use_cache=False).logits[0].double()
        np.asarray(ids, dtype="<i4").tofile(os.path.join(out, f"{name}.ids.i32"))
        l64.numpy().astype("<f8").tofile(os.path.join(out, f"{name}.logits.f64"))
        cur, gen = list(ids), []
        for _ in range(64):
            nxt = int(m32(input_ids=torch.tensor([cur]), use_cache=False).logits[0, -1].argmax())
            gen.append(nxt)
            cur.append(nxt)
        index["prompts"].append({
            "name": name, "text": text, "ids": ids, "n_tokens": len(ids),
            "ids_file": f"{name}.ids.i32", "logits_file": f"{name}.logits.f64",
            "shape": [len(ids), int(l64.shape[-1])],
            "max_abs_diff_f32_vs_f64": float((l64 - l32).abs().max()),
            "argmax_last": int(l64[-1].argmax()),
            "greedy64_ids_f32": gen, "greedy64_text": tok.decode(gen)})
        print(name, len(ids), "tokens; f32 vs f64 max diff", index["prompts"][-1]["max_abs_diff_f32_vs_f64"],
              "greedy:", repr(tok.decode(gen))[:120], flush=True)
    with open(os.path.join(out, "index.json"), "w") as f:
        json.dump(index, f, indent=1, ensure_ascii=False)
    tot = sum(os.path.getsize(os.path.join(out, p)) for p in os.listdir(out))
    print(f"golden files: {tot / 2**20:.2f} MiB in {out}")


if __name__ == "__main__":
    main()
