#!/usr/bin/env python3
"""Train the default model's byte-level BPE tokenizer (Hugging Face `tokenizers`).

  python3 tools/train_tokenizer.py --pretok-from .cache/deepseek-v2-tokenizer.json \
      --data data --out OUTDIR/tokenizer [--vocab 4096] [--max-bytes N]

The pre-tokenizer is copied verbatim, at run time, from DeepSeek-V2's tokenizer.json (the
path given by --pretok-from; the file is not part of the repository). Model BPE without
byte fallback over the 256 byte symbols, decoder ByteLevel, special tokens
<｜begin▁of▁sentence｜> = id 0 and <｜end▁of▁sentence｜> = id 1, a TemplateProcessing
post-processor that prepends BOS (as DeepSeek-V2's tokenizer.json does).
Writes tokenizer.json, tokenizer_config.json and tokenizer_stats.json to --out.
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from textdata import read_docs  # noqa: E402

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
CHAT_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ 'User: ' + message['content'] + '\n\n' }}{% elif message['role'] == 'assistant' %}"
    "{{ 'Assistant: ' + message['content'] + eos_token }}{% elif message['role'] == 'system' %}"
    "{{ message['content'] + '\n\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def tokenizer_config(tokenizer_class="LlamaTokenizerFast", max_len=1024):
    return {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": EOS,
        "clean_up_tokenization_spaces": False,
        "legacy": True,
        "model_max_length": max_len,
        "tokenizer_class": tokenizer_class,
        "chat_template": CHAT_TEMPLATE,
    }


def build_pretok(spec):
    """Python objects for the pre-tokenizer JSON (used only while training; the saved
    tokenizer.json gets the source JSON verbatim)."""
    from tokenizers import Regex, pre_tokenizers
    t = spec["type"]
    if t == "Sequence":
        return pre_tokenizers.Sequence([build_pretok(s) for s in spec["pretokenizers"]])
    if t == "Split":
        pat = spec["pattern"]
        pat = Regex(pat["Regex"]) if "Regex" in pat else pat["String"]
        return pre_tokenizers.Split(pat, behavior=spec["behavior"].lower(), invert=spec.get("invert", False))
    if t == "Digits":
        return pre_tokenizers.Digits(individual_digits=spec.get("individual_digits", False))
    if t == "ByteLevel":
        return pre_tokenizers.ByteLevel(add_prefix_space=spec.get("add_prefix_space", False),
                                        use_regex=spec.get("use_regex", True))
    raise SystemExit(f"unsupported pre-tokenizer type {t}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pretok-from", required=True, help="DeepSeek-V2 tokenizer.json to copy the pre_tokenizer from")
    ap.add_argument("--data", default="data")
    ap.add_argument("--out", required=True)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--max-bytes", type=int, default=0, help="0 = all training text")
    a = ap.parse_args()
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    src = json.load(open(a.pretok_from, encoding="utf-8"))
    pre_spec = src["pre_tokenizer"]
    docs = []
    for name in ("english_train.txt", "code_train.txt"):
        p = os.path.join(a.data, name)
        if os.path.exists(p):
            d = read_docs(p)
            if a.max_bytes:  # even subsample, half the budget per source
                tot = sum(len(x) for x in d)
                step = max(1, int(tot / (a.max_bytes / 2) + 0.999))
                d = d[::step]
            docs += d
            print(f"{name}: {len(d)} docs, {sum(len(x) for x in d)} chars", flush=True)
    if not docs:
        raise SystemExit("no training text under " + a.data)

    tok = Tokenizer(models.BPE(byte_fallback=False))
    tok.pre_tokenizer = build_pretok(pre_spec)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=a.vocab, min_frequency=2, show_progress=False,
                                  special_tokens=[BOS, EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    t0 = time.time()
    tok.train_from_iterator(docs, trainer=trainer, length=len(docs))
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, 0)])
    # put DeepSeek-V2's pre-tokenizer JSON in verbatim and check the result loads
    j = json.loads(tok.to_str())
    j["pre_tokenizer"] = pre_spec
    tok = Tokenizer.from_str(json.dumps(j, ensure_ascii=False))
    assert tok.token_to_id(BOS) == 0 and tok.token_to_id(EOS) == 1, "special token ids"
    assert tok.get_vocab_size() == a.vocab, tok.get_vocab_size()
    os.makedirs(a.out, exist_ok=True)
    tok.save(os.path.join(a.out, "tokenizer.json"))
    with open(os.path.join(a.out, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(tokenizer_config(), f, indent=2, ensure_ascii=False)
    # quality: bytes per token on the validation text, round trip check
    stats = {"vocab": a.vocab, "train_seconds": round(time.time() - t0, 1), "bos_id": 0, "eos_id": 1}
    for name in ("english_val.txt", "code_val.txt"):
        p = os.path.join(a.data, name)
        if not os.path.exists(p):
            continue
        vd = read_docs(p)
        enc = tok.encode_batch(vd, add_special_tokens=False)
        ntok = sum(len(e.ids) for e in enc)
        nb = sum(len(x.encode("utf-8")) for x in vd)
        bad = sum(tok.decode(e.ids, skip_special_tokens=False) != x for e, x in zip(enc[:50], vd[:50]))
        stats[name] = {"tokens": ntok, "bytes": nb, "bytes_per_token": round(nb / max(1, ntok), 3),
                       "roundtrip_failures_of_50": bad}
    sample = "Hello world!  def f(x):\n    return x**2 + 12345\n"
    e = tok.encode(sample)
    stats["sample"] = {"text": sample, "ids": e.ids, "tokens": e.tokens}
    with open(os.path.join(a.out, "tokenizer_stats.json"), "w", encoding="utf-8") as f:
        json.dump(stats, f, indent=1, ensure_ascii=False)
    print(json.dumps({k: v for k, v in stats.items() if k != "sample"}, indent=1), flush=True)
    print("sample:", e.tokens, flush=True)


if __name__ == "__main__":
    main()
