#!/usr/bin/env python3
"""export.py: a Hugging Face DeepSeek-V2 directory -> one dsv2 model file and/or tokenizer.bin.

SKELETON: the model part is written by the main author, the tokenizer part by the
tokenizer work stream (between the markers below).
"""
import argparse
import json
import os
import struct
import sys


def fail(msg):
    print(f"export.py: error: {msg}", file=sys.stderr)
    sys.exit(1)


# ---------------- tokenizer.bin (tokenizer work stream: from here to "end of tokenizer")

def export_tokenizer(hf_dir, out_path):
    """tokenizer.json + tokenizer_config.json in hf_dir -> out_path (tokenizer.bin)."""
    fail("tokenizer export not implemented yet")

# ---------------- end of tokenizer


# ---------------- model file (main author)

def export_model(hf_dir, out_path, dtype):
    fail("model export not implemented yet")


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
