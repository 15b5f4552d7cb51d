#!/usr/bin/env python3
"""tools/model_golden.py's output -> the test format of test_all.c, one folder per prompt.

  python3 tools/golden_to_txt.py GOLDEN_DIR tests/default

For each prompt of GOLDEN_DIR/index.json writes OUT/NAME/prompt.txt (the text),
OUT/NAME/golden.txt ("name count values..." lines: prompt_ids, greedy_ids, vocab) and
OUT/NAME/golden_logits.bin (float64 [prompt tokens][vocab], copied as it is).
Standard library only.
"""
import json
import os
import shutil
import sys


def main():
    src, out = sys.argv[1], sys.argv[2]
    with open(os.path.join(src, "index.json"), encoding="utf-8") as f:
        index = json.load(f)
    for p in index["prompts"]:
        d = os.path.join(out, p["name"])
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "prompt.txt"), "w", encoding="utf-8") as f:
            f.write(p["text"])
        shutil.copyfile(os.path.join(src, p["logits_file"]), os.path.join(d, "golden_logits.bin"))
        with open(os.path.join(d, "golden.txt"), "w") as f:
            f.write("# from tools/model_golden.py (transformers %s): logits of the float64 model at the "
                    "prompt's positions; greedy_ids from the float32 model, 64 tokens, no EOS stop\n"
                    % index.get("transformers", "5.17"))
            for name, vals in (("prompt_ids", p["ids"]), ("greedy_ids", p["greedy64_ids_f32"]),
                               ("vocab", [index["vocab_size"]])):
                f.write(f"{name} {len(vals)} " + " ".join(str(v) for v in vals) + "\n")
        print(f"{d}: {len(p['ids'])} prompt tokens, {len(p['greedy64_ids_f32'])} greedy")


if __name__ == "__main__":
    main()
