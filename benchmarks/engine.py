"""Engine speed on one CPU thread: prefill and decode tokens/s, against transformers `generate`
measured in the same run, with achieved memory bandwidth against this machine's measured one.

    .venv/bin/python benchmarks/engine.py [--threads 1] [--prompt-len 512] [--new-tokens 128]

Decode tok/s counts only decode steps (every request past its prompt). For transformers,
decode time = generate(N new tokens) - generate(1 new token), over N - 1 tokens.
"""

from __future__ import annotations

import argparse
import time

import torch
from rich.console import Console
from rich.table import Table

from disagg.engine.config import EngineConfig
from disagg.engine.llm_engine import LLMEngine
from disagg.engine.sampling import SamplingParams


def memory_bandwidth(gib: float = 1.0, repeats: int = 5) -> float:
    """Best-of read bandwidth (bytes/s) of summing a large fp32 tensor on the current threads."""
    x = torch.ones(int(gib * 2**30 / 4))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return x.numel() * 4 / best


def random_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, vocab, (n, length), generator=g).tolist()


def ours_prefill(engine: LLMEngine, prompt: list[int]) -> float:
    engine.block_manager.reset_prefix_cache()
    t0 = time.perf_counter()
    engine.generate([prompt], SamplingParams(max_tokens=1, temperature=0))
    return len(prompt) / (time.perf_counter() - t0)


def ours_decode(engine: LLMEngine, prompts: list[list[int]], new_tokens: int) -> tuple[float, float]:
    """(decode tok/s, mean decode step seconds) with all prompts running together."""
    engine.block_manager.reset_prefix_cache()
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(f"bench-{time.monotonic_ns()}-{i}", p, params)
    decode_time, decode_tokens, steps = 0.0, 0, 0
    while engine.has_unfinished():
        all_decoding = all(s.num_output_tokens >= 1 for s in engine.scheduler.running) and not engine.scheduler.waiting
        t0 = time.perf_counter()
        outs = engine.step()
        if all_decoding:
            decode_time += time.perf_counter() - t0
            decode_tokens += len(outs)
            steps += 1
    return decode_tokens / decode_time, decode_time / steps


def hf_speeds(model_dir: str, prompts: list[list[int]], new_tokens: int) -> tuple[float, float]:
    """(prefill tok/s, decode tok/s) of transformers generate at batch len(prompts)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.tensor(prompts)
    kw = {"do_sample": False, "pad_token_id": 0, "attention_mask": torch.ones_like(ids)}

    def run(n: int) -> float:
        t0 = time.perf_counter()
        with torch.inference_mode():
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)
        return time.perf_counter() - t0

    run(2)  # warm-up
    t1 = run(1)
    tn = run(new_tokens)
    return ids.numel() / t1, len(prompts) * (new_tokens - 1) / (tn - t1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--hf-batches", default="1,8")
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers reference")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (CUDA runs skip the CPU bandwidth probe)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    console = Console()
    batches = [int(b) for b in args.batches.split(",")]
    hf_batches = [] if args.no_hf else [int(b) for b in args.hf_batches.split(",")]

    bw = memory_bandwidth() if args.device == "cpu" else float("nan")
    engine = LLMEngine(EngineConfig(model=args.model, threads=args.threads, device=args.device, kv_cache_memory="4GiB",
                                    max_num_batched_tokens=max(512, args.prompt_len)))
    cfg = engine.model_config
    weight_bytes = cfg.num_params() * engine.kv_cache.layers[0].element_size()
    kv_token_bytes = engine.kv_cache.bytes_per_block(cfg, 1, engine.dtype)
    prompts = random_prompts(max(batches + hf_batches), args.prompt_len, cfg.vocab_size, seed=0)

    ours_prefill(engine, prompts[0])  # warm-up
    rows: list[tuple[str, str, float, float | None, float | None]] = []
    prefill = ours_prefill(engine, prompts[0])
    hf = {b: hf_speeds(str(engine_source_dir(engine)), prompts[:b], args.new_tokens) for b in hf_batches}
    hf_prefill = hf[hf_batches[0]][0] if hf_batches else None
    rows.append(("prefill", "1", prefill, hf_prefill, None))
    for b in batches:
        tps, step = ours_decode(engine, prompts[:b], args.new_tokens)
        ctx = args.prompt_len + args.new_tokens / 2  # mean context over the decode
        gbs = (weight_bytes + b * ctx * kv_token_bytes) / step / 1e9
        rows.append(("decode", str(b), tps, hf[b][1] if b in hf else None, gbs))

    dtype = str(engine.dtype).removeprefix("torch.")
    table = Table(title=f"{args.model} on {args.device}, {args.threads} thread(s), {dtype}, prompt {args.prompt_len}, "
                        f"{args.new_tokens} new tokens; memory bandwidth measured {bw / 1e9:.1f} GB/s")
    for col in ("phase", "batch", "disagg tok/s", "transformers tok/s", "ratio", "achieved GB/s", "% of bw"):
        table.add_column(col, justify="right")
    for phase, b, ours, ref, gbs in rows:
        table.add_row(phase, b, f"{ours:.1f}", "-" if ref is None else f"{ref:.1f}",
                      "-" if ref is None else f"{ours / ref:.2f}x",
                      "-" if gbs is None else f"{gbs:.1f}", "-" if gbs is None else f"{100 * gbs * 1e9 / bw:.0f}%")
    console.print(table)


def engine_source_dir(engine: LLMEngine) -> str:
    from disagg.model.loader import resolve

    src = resolve(engine.model_name)
    if src.weights_dir is None:
        raise SystemExit("the transformers reference needs a model with weights on disk; use --no-hf")
    return str(src.weights_dir)


if __name__ == "__main__":
    main()
