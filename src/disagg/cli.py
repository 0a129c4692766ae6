"""The `disagg` command: one subcommand per user task.

Subcommands import their heavy modules (torch, the engine) only when run, so `disagg --help`
answers at once. User errors print one line on stderr and exit 2; no traceback.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field

from disagg.cli_args import described as _help


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def _cmd_models(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from disagg.kv.layout import kv_bytes_per_token
    from disagg.model.presets import PRESETS
    from disagg.units import format_bytes

    table = Table(title="disagg models (presets)")
    for col in ("name", "weights", "params", "layers", "hidden", "heads q/kv/dim", "context", "KV/token fp16",
                "KV/token fp32"):
        table.add_column(col, justify="left" if col in ("name", "weights") else "right", no_wrap=True)
    for p in PRESETS.values():
        c = p.config
        table.add_row(p.name, p.source, _count(c.num_params()), str(c.num_layers), str(c.hidden_size),
                      f"{c.num_heads}/{c.num_kv_heads}/{c.head_dim}", f"{c.max_position_embeddings:,}",
                      format_bytes(kv_bytes_per_token(c, "fp16")), format_bytes(kv_bytes_per_token(c, "fp32")))
    console = Console(width=max(Console().width, 120))
    console.print(table)
    for p in PRESETS.values():
        console.print(f"  {p.name}: {p.description}", highlight=False)
    console.print("KV bytes per token = 2 (K and V) x layers x kv_heads x head_dim x bytes per element; "
                  "'random' presets have seeded random weights (shapes for benchmarks and size math).",
                  highlight=False)
    return 0


@dataclass(frozen=True)
class GenerateOptions:
    """what to generate (each flag also reads DISAGG_<FLAG> from the environment)"""

    prompt: str = field(default="", metadata=_help("the prompt text (required)"))
    chat: bool = field(default=False, metadata=_help("wrap the prompt in the model's chat template"))
    system: str | None = field(default=None, metadata=_help("system message for --chat"))
    max_tokens: int = field(default=256, metadata=_help("most tokens to generate"))
    temperature: float = field(default=0.0, metadata=_help("sampling temperature; 0 = greedy"))
    top_k: int = field(default=0, metadata=_help("sample from the k most likely tokens; 0 = off"))
    top_p: float = field(default=1.0, metadata=_help("nucleus sampling mass; 1 = off"))
    stop: tuple[str, ...] = field(default=(), metadata=_help("stop string"))
    ignore_eos: bool = field(default=False, metadata=_help("keep generating past end-of-sequence tokens"))
    quiet: bool = field(default=False, metadata=_help("print only the generated text, no statistics"))


@dataclass(frozen=True)
class KVSizeOptions:
    """what to size (each flag also reads DISAGG_<FLAG> from the environment)"""

    model: str = field(default="llama-3.1-8b", metadata=_help("preset name or a Hugging Face config.json / model "
                                                               "directory"))
    tokens: str = field(default="512", metadata=_help("context length(s) in tokens, comma-separated, e.g. 512,32768"))
    dtype: str = field(default="fp16", metadata=_help("the KV cache's dtype: fp16, bf16 or fp32"))


def _cmd_kv_size(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from disagg.cli_args import config_from_args
    from disagg.errors import ConfigError
    from disagg.kv.codecs import CODECS, bytes_per_token
    from disagg.kv.layout import dtype_bytes
    from disagg.model.presets import config_named
    from disagg.units import format_bytes

    opts = config_from_args(KVSizeOptions, args)
    cfg = config_named(opts.model)
    try:
        tokens = [int(t) for t in opts.tokens.split(",")]
        elem = dtype_bytes(opts.dtype)
    except ValueError as e:
        raise ConfigError(f"--tokens must be integers and --dtype fp16, bf16 or fp32: {e}") from None
    per = {c: bytes_per_token(c, cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, elem) for c in CODECS}
    print(f"{cfg.name}: 2 (K+V) x {cfg.num_layers} layers x {cfg.num_kv_heads} kv_heads x {cfg.head_dim} head_dim "
          f"x {elem} B = {format_bytes(per['none'])} per token")
    for n in tokens:
        print(f"  {n:,} tokens: {format_bytes(per['none'] * n)} ({per['none'] * n:,} bytes)")
    table = Table(title=f"{cfg.name} KV per request by wire codec (scales included)")
    table.add_column("codec")
    table.add_column("bytes/token", justify="right")
    for n in tokens:
        table.add_column(f"{n:,} tokens", justify="right")
    table.add_column(f"vs {opts.dtype}", justify="right")
    for codec in CODECS:
        label = f"none ({opts.dtype})" if codec == "none" else codec
        table.add_row(label, f"{per[codec]:,.0f}", *(format_bytes(per[codec] * n) for n in tokens),
                      f"{per[codec] / per['none']:.2f}x")
    Console(width=120).print(table)
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from disagg.cli_args import config_from_args
    from disagg.engine.config import EngineConfig
    from disagg.engine.llm_engine import LLMEngine
    from disagg.engine.sampling import SamplingParams
    from disagg.errors import InvalidRequestError

    opts = config_from_args(GenerateOptions, args)
    if not opts.prompt:
        raise InvalidRequestError("give a non-empty --prompt (or DISAGG_PROMPT)")
    config = config_from_args(EngineConfig, args)
    params = SamplingParams(max_tokens=opts.max_tokens, temperature=opts.temperature, top_k=opts.top_k,
                            top_p=opts.top_p, seed=config.seed, stop=opts.stop, ignore_eos=opts.ignore_eos)
    engine = LLMEngine(config)
    prompt = opts.prompt
    if opts.chat:
        messages = ([{"role": "system", "content": opts.system}] if opts.system else []) + [
            {"role": "user", "content": prompt}]
        prompt = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    t0 = time.perf_counter()
    engine.add_request("cli", prompt, params)
    ttft = None
    n_prompt = n_out = 0
    reason = None
    while engine.has_unfinished():
        for out in engine.step():
            ttft = ttft if ttft is not None else time.perf_counter() - t0
            sys.stdout.write(out.new_text)
            sys.stdout.flush()
            n_prompt, n_out, reason = out.num_prompt_tokens, out.num_output_tokens, out.finish_reason
    total = time.perf_counter() - t0
    sys.stdout.write("\n")
    if not opts.quiet:
        decode = (n_out - 1) / (total - ttft) if n_out > 1 and ttft is not None and total > ttft else 0.0
        print(f"[{n_prompt} prompt tokens, {n_out} generated, finish: {reason}; TTFT {1000 * (ttft or 0):.0f} ms, "
              f"decode {decode:.1f} tok/s on {engine.device.type}/{str(engine.dtype).removeprefix('torch.')}]",
              file=sys.stderr)
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from disagg.cli_args import config_from_args
    from disagg.engine.config import EngineConfig
    from disagg.serve.options import ServeOptions
    from disagg.serve.worker import serve

    serve(config_from_args(EngineConfig, args), config_from_args(ServeOptions, args))
    return 0


def _cmd_proxy(args: argparse.Namespace) -> int:
    from disagg.cli_args import config_from_args
    from disagg.serve.options import ProxyOptions
    from disagg.serve.proxy import run_proxy

    run_proxy(config_from_args(ProxyOptions, args))
    return 0


def _cmd_up(args: argparse.Namespace) -> int:
    from disagg.cli_args import config_from_args
    from disagg.engine.config import EngineConfig
    from disagg.serve.launcher import up
    from disagg.serve.options import UpOptions

    return up(config_from_args(UpOptions, args), config_from_args(EngineConfig, args))


def _cmd_transfer_bench(args: argparse.Namespace) -> int:
    from disagg.bench.options import TransferBenchOptions
    from disagg.bench.transfer import main
    from disagg.cli_args import config_from_args

    return main(config_from_args(TransferBenchOptions, args))


def _cmd_bench(args: argparse.Namespace) -> int:
    from disagg.bench.bench import main
    from disagg.bench.options import BenchOptions, LoadOptions
    from disagg.cli_args import config_from_args

    return main(config_from_args(BenchOptions, args), config_from_args(LoadOptions, args))


def _cmd_compare(args: argparse.Namespace) -> int:
    from disagg.bench.compare import main
    from disagg.bench.options import CompareOptions, LoadOptions
    from disagg.cli_args import config_from_args
    from disagg.engine.config import EngineConfig

    return main(config_from_args(CompareOptions, args), config_from_args(LoadOptions, args),
                config_from_args(EngineConfig, args))


def _cmd_plan(args: argparse.Namespace) -> int:
    from disagg.cli_args import config_from_args
    from disagg.sim.options import PlanOptions
    from disagg.sim.planner import main

    return main(config_from_args(PlanOptions, args))


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from disagg.bench.calibrate import main
    from disagg.cli_args import config_from_args
    from disagg.engine.config import EngineConfig
    from disagg.sim.options import CalibrateOptions

    return main(config_from_args(CalibrateOptions, args), config_from_args(EngineConfig, args))


def build_parser() -> argparse.ArgumentParser:
    from disagg import __version__
    from disagg.cli_args import add_config_args
    from disagg.engine.config import EngineConfig

    parser = argparse.ArgumentParser(prog="disagg", description="Serve an LLM single, replicated or "
                                     "disaggregated, measure it, and learn which one to run.")
    parser.add_argument("--version", action="version", version=f"disagg {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    from disagg.bench.options import BenchOptions, CompareOptions, LoadOptions, TransferBenchOptions
    from disagg.serve.options import ProxyOptions, ServeOptions, UpOptions
    from disagg.sim.options import CalibrateOptions, PlanOptions

    commands = [
        ("models", "list model presets with parameter counts and KV bytes per token", (), _cmd_models),
        ("generate", "generate text from a prompt, streamed to the terminal", (GenerateOptions, EngineConfig),
         _cmd_generate),
        ("serve", "serve a model over an OpenAI-compatible HTTP API (one worker)", (ServeOptions, EngineConfig),
         _cmd_serve),
        ("proxy", "one OpenAI endpoint in front of workers: single, replicated or disaggregated", (ProxyOptions,),
         _cmd_proxy),
        ("up", "start a local cluster of one architecture on a budget of cores or GPUs", (UpOptions, EngineConfig),
         _cmd_up),
        ("kv-size", "KV cache bytes of a model for given context lengths, by wire codec", (KVSizeOptions,),
         _cmd_kv_size),
        ("transfer-bench", "KV transfer GB/s and latency per size, next to a plain socket", (TransferBenchOptions,),
         _cmd_transfer_bench),
        ("bench", "load any OpenAI-compatible server and report TTFT, TPOT, ITL, throughput and goodput",
         (BenchOptions, LoadOptions), _cmd_bench),
        ("compare", "run single, replicated and disaggregated on one budget, the same sweep on each; report",
         (CompareOptions, LoadOptions, EngineConfig), _cmd_compare),
        ("plan", "predict single vs replicated vs disaggregated for any model, hardware and link (no torch)",
         (PlanOptions,), _cmd_plan),
        ("calibrate", "measure this machine's engine and fit the planner's cost model to it",
         (CalibrateOptions, EngineConfig), _cmd_calibrate),
    ]
    for name, text, configs, func in commands:
        p = sub.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")
        for cls in configs:
            add_config_args(p, cls)
        p.set_defaults(func=func)
    return parser


def main(argv: list[str] | None = None) -> int:
    from disagg.errors import DisaggError

    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        return args.func(args)
    except DisaggError as e:
        print(f"disagg: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("disagg: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
