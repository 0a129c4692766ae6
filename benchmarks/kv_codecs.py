"""What each KV wire codec costs in quality on the bundled model.

For 10 prompts: prefill once, export the KV, pass it through each codec, import it into a decode
engine and continue greedily for 128 tokens. Reported per codec: wire bytes against fp16, the
largest logprob difference at the first decoded position (top-20 tokens), and agreement with the
uncompressed greedy continuation measured two ways:

- free-running: share of the 128 positions that match, and the mean first divergence. One flipped
  near-tie changes everything after it, so this mostly measures where the first flip happens.
- teacher-forced: at every --tf-stride'th position, the decode worker is given the uncompressed
  continuation so far and asked for one greedy token; the share that match. This is the per-token
  effect of the codec, without the cascade.

    .venv/bin/python benchmarks/kv_codecs.py [--new-tokens 128] [--tf-stride 4] [--threads 2]
"""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.table import Table

from disagg.engine.config import EngineConfig
from disagg.engine.llm_engine import ImportedKV, LLMEngine
from disagg.engine.sampling import SamplingParams
from disagg.kv.codecs import CODECS, decode, encode, wire_bytes

PROMPTS = [
    "Explain how a refrigerator keeps food cold.",
    "Write a short story about a robot who learns to paint.",
    "What are the main causes of the French Revolution?",
    "def quicksort(items):\n    \"\"\"Sort a list using quicksort.\"\"\"\n",
    "List five tips for staying focused while studying.",
    "Describe the water cycle for a ten-year-old.",
    "Translate to French: The weather is lovely today and we are going to the beach.",
    "Summarize the plot of Romeo and Juliet in a paragraph.",
    "Why is the sky blue? Give a scientific explanation.",
    "Compose a polite email declining a meeting invitation.",
]


def run(engine: LLMEngine, prompts: list[str], kvs: list[ImportedKV], first: list[int], n: int, tag: str):
    params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, logprobs=20)
    for i, (p, kv) in enumerate(zip(prompts, kvs, strict=True)):
        engine.add_request(f"{tag}-{i}", p, params, kv=kv, first_token_ids=[first[i]])
    tokens: dict[str, list[int]] = {}
    first_lp: dict[str, dict[int, float]] = {}
    while engine.has_unfinished():
        for o in engine.step():
            tokens.setdefault(o.request_id, []).extend(o.new_token_ids)
            if o.request_id not in first_lp and o.new_logprobs:
                first_lp[o.request_id] = dict(o.new_logprobs[0].top)
    ids = [f"{tag}-{i}" for i in range(len(prompts))]
    return [tokens[r] for r in ids], [first_lp[r] for r in ids]


def teacher_forced(engine: LLMEngine, prompts: list[str], kvs: list[ImportedKV], first: list[int],
                   base: list[list[int]], stride: int, tag: str) -> tuple[int, int]:
    """(matches, positions): greedy token j given the uncompressed tokens before it, for every
    `stride`'th j, against the uncompressed continuation."""
    wanted: dict[str, int] = {}
    for i, (p, kv) in enumerate(zip(prompts, kvs, strict=True)):
        for j in range(0, len(base[i]), stride):
            rid = f"{tag}-tf-{i}-{j}"
            wanted[rid] = base[i][j]
            engine.add_request(rid, p, SamplingParams(max_tokens=j + 2, temperature=0, ignore_eos=True), kv=kv,
                               first_token_ids=[first[i], *base[i][:j]])
    got: dict[str, int] = {}
    while engine.has_unfinished():
        for o in engine.step():
            if o.new_token_ids:
                got.setdefault(o.request_id, o.new_token_ids[0])
    return sum(got[r] == t for r, t in wanted.items()), len(wanted)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--tf-stride", type=int, default=4, help="teacher-forced check at every Nth position")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    cfg = EngineConfig(model="smollm2-135m", threads=args.threads, device="cpu", kv_cache_memory="512MiB")
    prefill, decoder = LLMEngine(cfg), LLMEngine(cfg)
    chats = [prefill.tokenizer.apply_chat_template([{"role": "user", "content": p}]) for p in PROMPTS]
    kvs, first = [], []
    for i, p in enumerate(chats):
        prefill.add_request(f"p{i}", p, SamplingParams(max_tokens=1, temperature=0), hold_blocks=True)
        while prefill.has_unfinished():
            for o in prefill.step():
                first.append(o.new_token_ids[0])
        kvs.append(prefill.export_kv(f"p{i}"))
        prefill.release(f"p{i}")

    fp16_bytes = sum(wire_bytes(encode("fp16", kv.data)) for kv in kvs)
    base_tokens, base_lp = run(decoder, chats, kvs, first, args.new_tokens, "none")
    table = Table(title=f"KV codecs on smollm2-135m (fp32 KV), {len(PROMPTS)} chat prompts, {args.new_tokens} greedy "
                        "tokens after an import")
    for col in ("codec", "bytes vs fp16", "max |dlogprob| at token 2", "free-running agreement",
                "mean first divergence", "teacher-forced agreement"):
        table.add_column(col, justify="right")
    for codec in CODECS:
        coded = []
        for kv in kvs:
            parts = encode(codec, kv.data)
            coded.append(ImportedKV(decode(codec, parts, tuple(kv.data.shape), kv.data.dtype), kv.num_tokens,
                                    kv.digest))
        nbytes = sum(wire_bytes(encode(codec, kv.data)) for kv in kvs)
        toks, lps = (base_tokens, base_lp) if codec == "none" else run(decoder, chats, coded, first,
                                                                        args.new_tokens, codec)
        same = [sum(a == b for a, b in zip(x, y, strict=True)) for x, y in zip(toks, base_tokens, strict=True)]
        diverge = [next((j for j, (a, b) in enumerate(zip(x, y, strict=True)) if a != b), len(x))
                   for x, y in zip(toks, base_tokens, strict=True)]
        tf_match, tf_n = teacher_forced(decoder, chats, coded, first, base_tokens,
                                        args.tf_stride, codec)
        dlp = max(abs(lp[t] - blp[t]) for lp, blp in zip(lps, base_lp, strict=True) for t in lp if t in blp)
        table.add_row(codec, f"{nbytes / fp16_bytes:.2f}x", f"{dlp:.4f}",
                      f"{100 * sum(same) / sum(len(t) for t in toks):.1f}%",
                      f"{sum(diverge) / len(diverge):.0f} of {len(toks[0])}", f"{100 * tf_match / tf_n:.1f}%")
    Console(width=120).print(table)


if __name__ == "__main__":
    main()
