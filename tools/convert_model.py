#!/usr/bin/env python3
"""A dsv2 model file -> the same model in another dtype, e.g. the default model in q8:

    python3 tools/convert_model.py dsv2_tiny.bin build/dsv2_tiny.q8.bin --dtype q8

Standard library only; tensor by tensor, in chunks (export.py's conversions). A q8 file is not
an input: q8 -> bf16 would not give back the weights, so re-export from the checkpoint instead.
read_model() is also the reader of tools/to_gguf.py.
"""
import argparse
import os
import struct
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import export  # noqa: E402

DTYPE_NAMES = {v: k for k, v in export.DTYPES.items()}
CHECKPOINT_DTYPES = {"fp32": "F32", "bf16": "BF16"}  # a file's dtype as export.convert() calls it


def fail(msg):
    print(f"{os.path.basename(sys.argv[0])}: error: {msg}", file=sys.stderr)
    sys.exit(1)


def read_model(path):
    """-> (header fields as export.read_config gives them, dtype name,
    [(hub name, shape, dtype of the tensor, offset, bytes)] in file order)"""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(export.HEADER_BYTES)
    except OSError as e:
        fail(f"{path}: cannot read ({e.strerror})")
    if len(head) < export.HEADER_BYTES or head[:4] != export.MAGIC:
        fail(f"{path}: not a dsv2 model file (bad magic)")
    version = struct.unpack_from("<I", head, 4)[0]
    if version != export.VERSION:
        fail(f"{path}: model file version {version}, this tool reads {export.VERSION}")
    ints = struct.unpack_from(f"<{len(export.HEADER_INTS)}i", head, 8)
    floats = struct.unpack_from(f"<{len(export.HEADER_FLOATS)}f", head, 8 + 4 * len(ints))
    h = dict(zip(export.HEADER_INTS, ints))
    h.update(zip(export.HEADER_FLOATS, floats))
    if h["dtype"] not in DTYPE_NAMES:
        fail(f"{path}: unknown dtype {h['dtype']}")
    dtype = DTYPE_NAMES[h["dtype"]]
    tensors, off = [], export.HEADER_BYTES
    for name, shape in export.tensor_names(h):
        off += -off % export.ALIGN
        tdtype = export.tensor_dtype(name, shape, dtype)
        n = export.tensor_bytes(shape, tdtype)
        tensors.append((name, shape, tdtype, off, n))
        off += n
    if off != size:
        fail(f"{path}: file is {size} bytes but its header needs {off} (truncated or corrupt)")
    return h, dtype, tensors


def convert_model(in_path, out_path, dtype):
    h, src_dtype, tensors = read_model(in_path)
    if src_dtype == "q8":
        fail(f"{in_path}: a q8 file cannot be converted (its weights are rounded); export from the checkpoint")
    chunk = 1 << 22  # values per read: a multiple of q8's block of 32
    t0 = time.time()
    with open(in_path, "rb") as src, open(out_path + ".tmp", "wb") as out:
        out.write(export.pack_header(h, dtype))
        for name, shape, tdtype, off, n in tensors:
            out.write(b"\0" * (-out.tell() % export.ALIGN))
            src.seek(off)
            width = n // export._numel(shape)
            dst = export.tensor_dtype(name, shape, dtype)
            for start in range(0, n, chunk * width):
                raw = src.read(min(chunk * width, n - start))
                out.write(export.convert(CHECKPOINT_DTYPES[tdtype], raw, dst))
    os.replace(out_path + ".tmp", out_path)
    print(f"convert_model: wrote {out_path} ({os.path.getsize(out_path) / 2**20:.1f} MiB, {dtype}) "
          f"in {time.time() - t0:.1f} s", file=sys.stderr)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_in", help="dsv2 model file (fp32 or bf16)")
    ap.add_argument("model_out", help="model file to write")
    ap.add_argument("--dtype", choices=list(export.DTYPES), required=True, help="weight type of the output")
    args = ap.parse_args()
    convert_model(args.model_in, args.model_out, args.dtype)


if __name__ == "__main__":
    main()
