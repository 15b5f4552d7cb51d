"""The transformers baseline for docs/BENCHMARKS.md: DeepseekV2ForCausalLM with the config.json
that tools/make_random_model.py wrote, random bf16 weights initialised on the GPU, a KV cache;
decode tok/s at a context (median of single-token steps) and prefill tok/s. Prints BENCH lines.

    python3 tools/bench_hf.py CONFIG_DIR [--ctx 512 8192] [--prompt 2048]
"""
import argparse, json, statistics, time
import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM


def timed(fn, reps):
    out = []
    for _ in range(reps):
        torch.cuda.synchronize(); t0 = time.perf_counter(); fn(); torch.cuda.synchronize()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("config_dir")
    ap.add_argument("--ctx", type=int, nargs="+", default=[512, 8192])
    ap.add_argument("--prompt", type=int, default=2048)
    args = ap.parse_args()
    cfg = AutoConfig.from_pretrained(args.config_dir)
    print(f"BENCH hf_version {transformers.__version__} torch {torch.__version__}", flush=True)
    torch.set_default_dtype(torch.bfloat16)
    t0 = time.time()
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.bfloat16, attn_implementation="sdpa")
    model.eval()
    print(f"BENCH hf_init_seconds {time.time() - t0:.1f}", flush=True)
    g = torch.Generator(device="cuda").manual_seed(0)
    with torch.no_grad():
        ids = torch.randint(0, cfg.vocab_size, (1, args.prompt), device="cuda", generator=g)
        model(ids[:, :128])  # warm-up
        sec = timed(lambda: model(ids), 2)
        print(f"BENCH hf_prefill tokens {args.prompt} seconds {sec:.4f} tok_per_s {args.prompt / sec:.1f}", flush=True)
        for ctx in args.ctx:
            ctx_ids = torch.randint(0, cfg.vocab_size, (1, ctx), device="cuda", generator=g)
            out = model(ctx_ids, use_cache=True)
            past = out.past_key_values
            tok = ctx_ids[:, -1:]
            times = []
            for i in range(25):
                # crop back so every step runs at the same context
                if hasattr(past, "crop"): past.crop(ctx)
                torch.cuda.synchronize(); t0 = time.perf_counter()
                model(tok, past_key_values=past, use_cache=True)
                torch.cuda.synchronize(); times.append(time.perf_counter() - t0)
            sec = statistics.median(times[5:])
            print(f"BENCH hf_decode ctx {ctx} ms {sec * 1e3:.2f} tok_per_s {1 / sec:.1f}", flush=True)
            del out, past
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
