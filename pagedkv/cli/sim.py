"""``pagedkv sim run | sweep | fleet | search | calibrate``: arguments in, tables, JSON and plots out.

Workload flags are :class:`WorkloadConfig`'s fields and engine flags :class:`EngineConfig`'s
(one ``--max-model-len`` sets both). Nothing here imports torch until ``--executor real``
or ``calibrate`` runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pagedkv.cli.flags import add_model_flags, given_fields
from pagedkv.scheduler.config import EngineConfig
from pagedkv.sim.fleet import ROUTERS, Router
from pagedkv.sim.metrics import SLO
from pagedkv.sim.policies import POLICIES, Policy
from pagedkv.sim.workload import LengthDist, WorkloadConfig

ENGINE_FLAGS_UNUSED = ("seed", "gpu_memory_fraction", "max_model_len")
"""Engine fields a simulation has no use for (no sampling, no GPU) or takes from the
workload's flag (``--max-model-len``)."""


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


def add_command(commands: argparse._SubParsersAction) -> None:
    sim = commands.add_parser("sim", help="the workload simulator: run, sweep, fleet, search, calibrate")
    sim.set_defaults(run=main)
    subcommands = sim.add_subparsers(dest="sim_command", required=True)
    run = subcommands.add_parser("run", help="run one workload under one or more policies")
    sweep = subcommands.add_parser("sweep", help="simulate a range of request rates per policy")
    fleet = subcommands.add_parser("fleet", help="simulate replicas of one engine behind a router")
    for parser in (run, sweep, fleet):
        add_model_flags(parser, WorkloadConfig, "workload (WorkloadConfig)", parsers={LengthDist: parse_length})
        add_model_flags(parser, EngineConfig, "engine (EngineConfig)", exclude=ENGINE_FLAGS_UNUSED)
        parser.add_argument("--policy", default="paged",
                            help=f"one of {', '.join(POLICIES)}, comma-separated, or all")
        parser.add_argument("--profile", type=Path, help="cost-model JSON (default: the shipped SmolLM2 CPU profile)")
        o = parser.add_argument_group("output")
        o.add_argument("--slo-ttft", type=float,
                       help=f"goodput SLO on time to first token, s (default: {SLO().ttft_s})")
        o.add_argument("--slo-tpot", type=float,
                       help=f"goodput SLO on time per output token, s (default: {SLO().tpot_s})")
        o.add_argument("--out", type=Path, help="write results.json (and plots with --plots) here")
        o.add_argument("--plots", action="store_true", help="draw PNG plots into --out (needs matplotlib)")
    run.add_argument("--executor", choices=["sim", "real"], default="sim",
                     help="real: the engine and model, wall clock")
    run.add_argument("--model", default="smollm2-135m", help="model for --executor real")
    run.add_argument("--runs", type=int, default=1,
                     help="simulate R times (other workload seeds, step times varying as the profile's fit "
                          "residuals did) and print each metric's median and 90%% interval")
    sweep.add_argument("--rates", required=True, type=lambda s: [float(x) for x in s.split(",")],
                       help="comma-separated request rates")
    sweep.add_argument("--latency-budget", type=float,
                       help="s per output token (default: 3x the best at the lowest rate)")
    fleet.add_argument("--replicas", type=int, required=True, help="how many replicas of the engine")
    fleet.add_argument("--router", default="round-robin",
                       help=f"one of {', '.join(ROUTERS)}, comma-separated, or all")
    search = subcommands.add_parser(
        "search", help="the cheapest configurations that meet an SLO at --rate, or the rate each sustains without it")
    add_model_flags(search, WorkloadConfig, "workload (WorkloadConfig)", parsers={LengthDist: parse_length})
    search.add_argument("--slo", required=True, help='bounds, e.g. "ttft_p90<2s,tpot_p50<100ms"')
    search.add_argument("--space", type=Path,
                        help="JSON of SearchSpace's lists (kv_cache_memory_bytes, block_size, max_num_seqs, "
                             "max_num_batched_tokens, enable_chunked_prefill, preemption_mode, replicas); default: "
                             "64-512 MiB, 16-token blocks, 32 or 128 seqs, 512 or 1024 tokens, 1 or 2 replicas")
    search.add_argument("--router", default="least-outstanding", help=f"for fleets: one of {', '.join(ROUTERS)}")
    search.add_argument("--profile", type=Path, help="cost-model JSON (default: the shipped SmolLM2 CPU profile)")
    search.add_argument("--out", type=Path, help="write search.json (and frontier.png with --plots) here")
    search.add_argument("--plots", action="store_true", help="draw the frontier into --out (needs matplotlib)")
    calibrate = subcommands.add_parser("calibrate", help="time the real model and fit a cost-model profile")
    calibrate.add_argument("--model", default="smollm2-135m")
    calibrate.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    add_model_flags(calibrate, EngineConfig, "engine (EngineConfig)", include=("block_size", "max_num_batched_tokens"))
    calibrate.add_argument("--out", type=Path, required=True, help="where to write the profile JSON")
    calibrate.add_argument("--parts", type=int, default=1,
                           help="time the calibration workloads in this many parts, one after another (each a "
                                "slice of every workload); 2 or more record how the machine's speed moves "
                                "whole runs (run_noise), which `sim run --runs` draws from")


def workload_from(args: argparse.Namespace) -> WorkloadConfig:
    """The workload the flags describe (``--prompt``/``--output`` replace the default preset)."""
    return WorkloadConfig(**given_fields(args, WorkloadConfig))


def engine_from(args: argparse.Namespace) -> EngineConfig:
    """The engine config the flags describe; its context length is the workload's."""
    given = given_fields(args, EngineConfig, exclude=ENGINE_FLAGS_UNUSED)
    return EngineConfig(**given, max_model_len=workload_from(args).max_model_len)


def slo_from(args: argparse.Namespace) -> SLO:
    bounds = {"ttft_s": args.slo_ttft, "tpot_s": args.slo_tpot}
    return SLO(**{k: v for k, v in bounds.items() if v is not None})


def policies_from(args: argparse.Namespace) -> list[Policy]:
    """``--policy``: names from :data:`POLICIES`, comma-separated, or ``all``."""
    if args.policy == "all":
        return list(POLICIES)
    names: list[str] = args.policy.split(",")
    unknown = [name for name in names if name not in POLICIES]
    if unknown:
        raise ValueError(f"unknown policy {', '.join(unknown)}; choose from {', '.join(POLICIES)} or all")
    return [policy for name in names for policy in POLICIES if policy == name]


def routers_from(args: argparse.Namespace) -> list[Router]:
    """``--router``: names from :data:`ROUTERS`, comma-separated, or ``all``."""
    names: list[str] = list(ROUTERS) if args.router == "all" else args.router.split(",")
    unknown = [name for name in names if name not in ROUTERS]
    if unknown:
        raise ValueError(f"unknown router {', '.join(unknown)}; choose from {', '.join(ROUTERS)} or all")
    return [router for name in names for router in ROUTERS if router == name]


def main(args: argparse.Namespace) -> None:
    from pagedkv.sim import api, report

    if args.sim_command == "calibrate":
        from pagedkv.sim.calibrate import calibrate

        config = EngineConfig(**given_fields(args, EngineConfig))
        profile = calibrate(args.model, args.dtype, config.block_size, config.max_num_batched_tokens,
                            parts=args.parts)
        profile.save(args.out)
        print(f"wrote {args.out}: {profile.fit_note}\n{profile.model_dump_json(indent=2)}")
        return
    if args.sim_command == "search":
        _search(args)
        return
    workload, engine, slo = workload_from(args), engine_from(args), slo_from(args)
    policies = policies_from(args)
    if args.sim_command == "run" and args.runs != 1:
        if args.executor == "real":
            raise ValueError("--runs repeats simulations; it does not apply to --executor real")
        intervals = [api.simulate_intervals(workload, engine, args.runs, policy, args.profile, slo, progress=True)
                     for policy in policies]
        print(report.interval_table(intervals))
        if args.out:
            report.write_json(args.out / "intervals.json", {
                "workload": workload.model_dump(), "engine": engine.model_dump(),
                "intervals": [i.model_dump() for i in intervals],
            })
            print(f"wrote {args.out}/")
        return
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
    if args.sim_command == "fleet":
        if len(policies) != 1:
            raise ValueError("sim fleet runs one --policy at a time (compare routers with --router all)")
        fleets = [api.simulate_fleet(workload, engine, args.replicas, router, policies[0], args.profile, slo,
                                     progress=True)[1] for router in routers_from(args)]
        print(report.table([f.fleet.model_copy(update={"policy": f"{f.router} x{args.replicas}"}) for f in fleets]))
        for f in fleets:
            print(f"\n{f.router}, per replica (routed / completed / rejected, TTFT p50, prefix hit rate):")
            for i, (routed, s) in enumerate(zip(f.routed, f.replicas, strict=True)):
                print(f"  replica {i}: {routed} / {s.completed} / {s.rejected}, {s.ttft_s.p50:.2f} s, "
                      f"{s.prefix_hit_rate:.1%}")
        if args.out:
            report.write_json(args.out / "fleet.json", {
                "workload": workload.model_dump(), "engine": engine.model_dump(), "replicas": args.replicas,
                "fleets": [f.model_dump() for f in fleets],
            })
            print(f"wrote {args.out}/")
        return
    result = api.sweep(workload, args.rates, policies, engine, args.profile, args.latency_budget, slo, progress=True)
    print(f"\nsustained rate (p50 latency per output token <= {result.latency_budget_s:.3f} s):")
    for name, rate in result.sustained_rate.items():
        waste = [s.kv_waste for s in result.curves[name]]
        print(f"  {name:>18}: {rate:g} req/s   (KV memory waste {min(waste):.0%}-{max(waste):.0%} across rates)")
    if args.out:
        report.write_json(args.out / "sweep.json", result.model_dump())
        if args.plots:
            report.plot_sweep(result.rates, result.curves, args.out / "latency_vs_rate.png")
        print(f"wrote {args.out}/")


def _search(args: argparse.Namespace) -> None:
    import time

    from pagedkv.sim import api, report
    from pagedkv.sim.search import SearchSpace

    if args.router not in ROUTERS:
        raise ValueError(f"unknown router {args.router}; choose from {', '.join(ROUTERS)}")
    space = SearchSpace.model_validate_json(args.space.read_text()) if args.space else SearchSpace()
    start = time.perf_counter()
    workload = workload_from(args)
    rate = workload.rate if "rate" in given_fields(args, WorkloadConfig) else None  # without: sustained rates
    result = api.capacity_search(workload, args.slo, space, rate, args.router, args.profile, progress=True)
    seconds = time.perf_counter() - start
    print(report.search_table(result))
    met = len(result.frontier)
    print(f"\n{result.simulations} simulations in {seconds:.0f} s over {len(result.candidates)} configurations; "
          + (f"{met} meet the SLO at {rate:g} req/s" if rate else f"{met} on the frontier"))
    if args.out:
        report.write_json(args.out / "search.json", result.model_dump())
        if args.plots:
            report.plot_search(result, args.out / "frontier.png")
        print(f"wrote {args.out}/")
