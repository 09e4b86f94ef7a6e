"""``pagedkv sim run | sweep | calibrate``: arguments in, tables, JSON and plots out."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from pagedkv.scheduler.params import EngineConfig
from pagedkv.sim.metrics import SLO
from pagedkv.sim.policies import POLICIES
from pagedkv.sim.workload import LengthDist, WorkloadConfig

SIZE = re.compile(r"^\s*([\d.e+]+)\s*([KMGT]i?B?)?\s*$", re.IGNORECASE)


def parse_bytes(text: str) -> int:
    """'2GiB', '512MiB', '1e9' -> bytes."""
    match = SIZE.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 512MiB or 2GiB)")
    number, unit = float(match.group(1)), (match.group(2) or "").upper().rstrip("B")
    scale = {"": 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}[unit]
    return int(number * scale)


def parse_length(text: str) -> LengthDist:
    """'fixed:128', 'uniform:16-300', 'lognormal:161,1.0' -> a length distribution."""
    kind, _, params = text.partition(":")
    try:
        if kind == "fixed":
            return LengthDist(kind="fixed", value=int(params))
        if kind == "uniform":
            low, high = params.split("-")
            return LengthDist(kind="uniform", low=int(low), high=int(high))
        if kind == "lognormal":
            mean, sigma = params.split(",")
            return LengthDist(kind="lognormal", mean=float(mean), sigma=float(sigma))
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"bad length {text!r}: {e}") from None
    raise argparse.ArgumentTypeError(f"bad length {text!r}; use fixed:N, uniform:LO-HI or lognormal:MEAN,SIGMA")


def add_arguments(sim: argparse.ArgumentParser) -> None:
    commands = sim.add_subparsers(dest="sim_command", required=True)
    run = commands.add_parser("run", help="run one workload under one or more policies")
    sweep = commands.add_parser("sweep", help="simulate a range of request rates per policy")
    for parser in (run, sweep):
        w = parser.add_argument_group("workload")
        w.add_argument("--num-requests", type=int, default=1000)
        w.add_argument("--arrival", choices=["poisson", "gamma", "offline", "closed"], default="poisson")
        w.add_argument("--rate", type=float, default=1.0, help="requests per second (poisson, gamma)")
        w.add_argument("--cv", type=float, default=1.0, help="burstiness of gamma arrivals (1 = poisson)")
        w.add_argument("--concurrency", type=int, default=8, help="clients of a closed loop")
        w.add_argument("--preset", choices=["sharegpt", "alpaca"], default="sharegpt")
        w.add_argument("--prompt-len", type=parse_length, help="instead of a preset: fixed:N, uniform:LO-HI, lognormal:MEAN,SIGMA")
        w.add_argument("--output-len", type=parse_length)
        w.add_argument("--prefix-groups", type=int, default=0)
        w.add_argument("--prefix-len", type=int, default=0)
        w.add_argument("--trace", type=Path, help="replay a JSONL trace instead")
        w.add_argument("--seed", type=int, default=0)
        e = parser.add_argument_group("engine")
        e.add_argument("--policy", default="paged", help=f"one of {', '.join(POLICIES)}, comma-separated, or all")
        e.add_argument("--block-size", type=int, default=16)
        e.add_argument("--kv-memory", type=parse_bytes, default=parse_bytes("256MiB"), help="KV pool size, e.g. 2GiB")
        e.add_argument("--max-num-seqs", type=int, default=256)
        e.add_argument("--max-num-batched-tokens", type=int, default=2048)
        e.add_argument("--max-model-len", type=int, default=2048)
        e.add_argument("--preemption-mode", choices=["recompute", "swap"], default="recompute")
        e.add_argument("--swap-space", type=parse_bytes, default=parse_bytes("256MiB"), help="CPU swap space for --preemption-mode swap")
        e.add_argument("--no-chunked-prefill", action="store_true", help="a step prefills whole prompts or decodes (vLLM v0)")
        e.add_argument("--no-prefix-caching", action="store_true")
        e.add_argument("--profile", type=Path, help="cost-model JSON (default: the shipped SmolLM2 CPU profile)")
        o = parser.add_argument_group("output")
        o.add_argument("--slo-ttft", type=float, default=10.0, help="goodput SLO on time to first token (s)")
        o.add_argument("--slo-tpot", type=float, default=0.5, help="goodput SLO on time per output token (s)")
        o.add_argument("--out", type=Path, help="write results.json (and plots with --plots) here")
        o.add_argument("--plots", action="store_true", help="draw PNG plots into --out (needs matplotlib)")
    run.add_argument("--executor", choices=["sim", "real"], default="sim", help="real: the engine and model, wall clock")
    run.add_argument("--model", default="smollm2-135m", help="model for --executor real")
    sweep.add_argument("--rates", required=True, type=lambda s: [float(x) for x in s.split(",")],
                       help="comma-separated request rates")
    sweep.add_argument("--latency-budget", type=float, help="s per output token (default: 3x the best at the lowest rate)")
    calibrate = commands.add_parser("calibrate", help="time the real model and fit a cost-model profile")
    calibrate.add_argument("--model", default="smollm2-135m")
    calibrate.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    calibrate.add_argument("--block-size", type=int, default=16)
    calibrate.add_argument("--max-num-batched-tokens", type=int, default=1024)
    calibrate.add_argument("--out", type=Path, required=True, help="where to write the profile JSON")


def workload_from(args) -> WorkloadConfig:
    custom = args.prompt_len is not None or args.output_len is not None
    return WorkloadConfig(
        num_requests=args.num_requests, arrival=args.arrival, rate=args.rate, cv=args.cv,
        concurrency=args.concurrency, preset=None if custom else args.preset,
        prompt=args.prompt_len, output=args.output_len, prefix_groups=args.prefix_groups,
        prefix_len=args.prefix_len, max_model_len=args.max_model_len, trace=args.trace, seed=args.seed,
    )


def engine_from(args) -> EngineConfig:
    return EngineConfig(
        block_size=args.block_size, kv_cache_memory_bytes=args.kv_memory, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.max_model_len,
        preemption_mode=args.preemption_mode, swap_space_bytes=args.swap_space,
        enable_chunked_prefill=not args.no_chunked_prefill, enable_prefix_caching=not args.no_prefix_caching,
    )


def policies_from(args) -> list[str]:
    chosen = list(POLICIES) if args.policy == "all" else args.policy.split(",")
    unknown = [p for p in chosen if p not in POLICIES]
    if unknown:
        raise ValueError(f"unknown policy {', '.join(unknown)}; choose from {', '.join(POLICIES)} or all")
    return chosen


def main(args) -> None:
    from pagedkv.sim import api, report

    if args.sim_command == "calibrate":
        import torch

        from pagedkv.sim.calibrate import calibrate

        profile = calibrate(args.model, getattr(torch, args.dtype), args.block_size, args.max_num_batched_tokens)
        profile.save(args.out)
        print(f"wrote {args.out}: {profile.fit_note}\n{profile.model_dump_json(indent=2)}")
        return
    workload, engine, slo = workload_from(args), engine_from(args), SLO(ttft_s=args.slo_ttft, tpot_s=args.slo_tpot)
    policies = policies_from(args)
    if args.sim_command == "run":
        results = []
        for policy in policies:
            if args.executor == "real":
                results.append(api.run_real(workload, engine, args.model, policy=policy, slo=slo, progress=True))
            else:
                results.append(api.simulate(workload, engine, policy, args.profile, slo, progress=True))
        print(report.table([s for _, s in results]))
        if args.out:
            report.write_json(args.out / "results.json", {
                "workload": workload.model_dump(), "engine": engine.model_dump(), "executor": args.executor,
                "summaries": [s.model_dump() for _, s in results],
            })
            if args.plots:
                report.plot_kv_over_time([r for r, _ in results], args.out / "kv_memory.png")
                report.plot_latency_cdf([r for r, _ in results], args.out / "latency_cdf.png")
            print(f"wrote {args.out}/")
        return
    result = api.sweep(workload, args.rates, policies, engine, args.profile, args.latency_budget, slo, progress=True)
    print(f"\nsustained rate (p50 latency per output token <= {result.latency_budget_s:.3f} s):")
    for policy, rate in result.sustained_rate.items():
        waste = [s.kv_waste for s in result.curves[policy]]
        print(f"  {policy:>18}: {rate:g} req/s   (KV memory waste {min(waste):.0%}-{max(waste):.0%} across rates)")
    if args.out:
        report.write_json(args.out / "sweep.json", result.model_dump())
        if args.plots:
            report.plot_sweep(result.rates, result.curves, args.out / "latency_vs_rate.png")
        print(f"wrote {args.out}/")
