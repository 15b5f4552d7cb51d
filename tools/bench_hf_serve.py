"""The transformers baseline of tools/bench_serving.sh: DeepseekV2ForCausalLM (random bf16 weights
from the config.json that tools/make_random_model.py wrote) decoding a batch with `generate`, the
way a user who already has transformers would serve B prompts at once.

    python3 tools/bench_hf_serve.py CONFIG_DIR --ctx 2048 8192 --batch 1 4 16 [--new 8 40] [--budget-s 200]

For each context and batch size B: B random prompts of ctx - n2 tokens each, then generate(max_new_tokens=n1) and
generate(max_new_tokens=n2) (greedy, min_new_tokens = max_new_tokens, so no early stop). Decode tok/s =
B (n2 - n1) / (t2 - t1), after one warm-up generate at each context: the prompt's cost cancels and what is left is n2 - n1 decode steps at contexts
up to ctx. Prints one BENCH line per batch size; a batch that runs out of memory prints
"BENCH hf_serve ... oom" and the larger ones (at that context) are skipped; --budget-s (for the
whole script) skips a run that would not finish in the time left (estimated from the last one).
"""
import argparse, time
import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config_dir")
    ap.add_argument("--ctx", type=int, nargs="+", required=True)
    ap.add_argument("--batch", type=int, nargs="+", required=True)
    ap.add_argument("--new", type=int, nargs=2, default=[8, 40], metavar=("N1", "N2"))
    ap.add_argument("--budget-s", type=float, default=200.0)
    args = ap.parse_args()
    n1, n2 = args.new
    t_start = time.time()
    cfg = AutoConfig.from_pretrained(args.config_dir)
    print(f"BENCH hf_version {transformers.__version__} torch {torch.__version__}", flush=True)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.bfloat16, attn_implementation="sdpa")
    model.eval()
    print(f"BENCH hf_init_seconds {time.time() - t_start:.1f}", flush=True)
    g = torch.Generator(device="cuda").manual_seed(0)
    for ctx in args.ctx:
        with torch.no_grad():  # warm-up at this context: the first generate pays for allocations and kernel choices
            ids = torch.randint(0, cfg.vocab_size, (1, ctx - n2), device="cuda", generator=g)
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, min_new_tokens=2, do_sample=False,
                           pad_token_id=0)
        last = 0.0  # seconds per sequence of the previous batch at this context
        for B in args.batch:
            left = args.budget_s - (time.time() - t_start)
            if last * B > left:
                print(f"BENCH hf_serve ctx {ctx} batch {B} skipped (about {last * B:.0f} s, {left:.0f} s left)", flush=True)
                break
            ids = torch.randint(0, cfg.vocab_size, (B, ctx - n2), device="cuda", generator=g)
            try:
                t0 = time.time()
                times = []
                with torch.no_grad():
                    for n in (n1, n2):
                        torch.cuda.synchronize()
                        t = time.perf_counter()
                        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                       do_sample=False, pad_token_id=0)
                        torch.cuda.synchronize()
                        times.append(time.perf_counter() - t)
                last = (time.time() - t0) / B
            except torch.OutOfMemoryError:
                print(f"BENCH hf_serve ctx {ctx} batch {B} oom", flush=True)
                break
            finally:
                del ids
                torch.cuda.empty_cache()
            tps = B * (n2 - n1) / (times[1] - times[0])
            print(f"BENCH hf_serve ctx {ctx} batch {B} tok_per_s {tps:.1f} gen_{n1}_s {times[0]:.2f} gen_{n2}_s {times[1]:.2f}",
                  flush=True)


if __name__ == "__main__":
    main()
