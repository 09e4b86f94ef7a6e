"""Serving SmolLM2-135M-Instruct on the CPU: pagedkv against vLLM's CPU build, same requests.

Both systems get the same token ids, the same per-request output lengths (EOS ignored, so both do
the same work), greedy sampling, the same dequantized float32 weights cast to the same dtype, the
same 2 GiB of K/V memory and the same two warm-up requests; only the call to generate is timed.
pagedkv runs in this process; vLLM runs in its own venv (it pins its own torch and transformers)
as a long-lived child, benchmarks/vllm_driver.py, started once per dtype because its start-up
compiles the model (40-90 s on 2 cores). Repeats alternate the systems (A B A B) so that drift in this
machine's speed falls on both.

Workloads:
  mixed  the 64 chat requests of bench_smollm2.py (prompts 37-242 tokens, 16-128 new tokens each)
  long   12 chat requests with prompts of 300-1800 tokens and 200-400 new tokens each

Setup of the vLLM venv and the model directory: docs/benchmarks.md, "pagedkv against vLLM's CPU build".

    python benchmarks/bench_vllm_cpu.py --vllm-python ~/vllm-venv/bin/python
    python benchmarks/bench_vllm_cpu.py --workload mixed --dtype bfloat16 --repeats 1
    python benchmarks/bench_vllm_cpu.py --contend      # again with a competing CPU-bound process
"""

from __future__ import annotations

import argparse
import json
import os
import random
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from bench_kernels import sequential_read_gb_s
from bench_smollm2 import TOPICS, attention_flops, gemm_rate, log, matmul_flops, step_bound, workload

from pagedkv.loader import load_model
from pagedkv.models import ModelRunner
from pagedkv.models.gguf import smollm2_path
from pagedkv.scheduler import EngineConfig, LLMEngine, SamplingParams

HERE = Path(__file__).resolve().parent
DOCS = "docs/benchmarks.md, section \"pagedkv against vLLM's CPU build\""
KV_CACHE_GIB = 2  # vLLM's VLLM_CPU_KVCACHE_SPACE; pagedkv's pool gets the same bytes
MAX_MODEL_LEN = 2048
# Two short requests, not from any workload, so that neither system's prefix cache holds a
# workload prompt's blocks when the timed run starts.
WARM_UP_PROMPTS = [list(range(1, 9)), list(range(100, 164))]
WARM_UP_TOKENS = [8, 8]
# The competing process of --contend, a neighbour's single-threaded BLAS job: float32 matmuls
# on one thread keep one core busy; 256x256 operands stay in that core's cache, so it takes CPU
# time rather than memory bandwidth.
CONTENDER = (
    "import torch\n"
    "torch.set_num_threads(1)\n"
    "a, b = torch.randn(256, 256), torch.randn(256, 256)\n"
    "while True:\n"
    "    a @ b\n"
)


def long_workload(tok: Any, n: int, seed: int) -> tuple[list[list[int]], list[int]]:
    """Chat prompts of 300-1800 tokens (a request over a long list of topics) and 200-400 new
    tokens each, prompt + output within MAX_MODEL_LEN: prefill-heavy, and long contexts in decode."""
    rng = random.Random(seed)
    prompts, lengths = [], []
    for _ in range(n):
        new_tokens = rng.randint(200, 400)
        target = min(rng.randint(300, 1800), MAX_MODEL_LEN - new_tokens)
        topics: list[str] = []
        prompt: list[int] = []
        while True:  # the longest prompt within target, 8 topics at a time
            topics += [rng.choice(TOPICS) for _ in range(8)]
            question = "Write a long essay that connects these topics, one paragraph each: " + ", ".join(topics) + "."
            ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": question}]))
            if len(ids) > target:
                break
            prompt = ids
        prompts.append(prompt)
        lengths.append(new_tokens)
    return prompts, lengths


# 2048 (vLLM's) was tried: in one direct A/B 5% faster on the long workload, but in this benchmark's
# alternating run slower (bf16 18.6 against 17.2 s, fp32 32.2 against 28.3); no difference on mixed.
PAGEDKV_MAX_NUM_BATCHED_TOKENS = 1024


def run_pagedkv(model: Any, prompts: list[list[int]], lengths: list[int]) -> tuple[float, list[list[int]]]:
    """A fresh engine per run (an empty prefix cache, as vLLM's is emptied before each run),
    warmed up with WARM_UP_PROMPTS, then the whole workload at once."""
    config = EngineConfig(block_size=16, max_num_batched_tokens=PAGEDKV_MAX_NUM_BATCHED_TOKENS,
                          kv_cache_memory_bytes=KV_CACHE_GIB * 2**30, max_model_len=MAX_MODEL_LEN)
    engine = LLMEngine(ModelRunner(model), config)
    warm = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in WARM_UP_TOKENS]
    engine.generate(WARM_UP_PROMPTS, warm)
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in lengths]
    start = time.perf_counter()
    outputs = engine.generate(prompts, params)
    return time.perf_counter() - start, [o.output_token_ids for o in outputs]


def vllm_usable(python: str | None) -> str | None:
    """Why the vLLM interpreter cannot be used, or None when `import vllm` works in it."""
    if not python:
        return "no vLLM interpreter given (--vllm-python or PAGEDKV_VLLM_PYTHON)"
    resolved = shutil.which(python)
    if resolved is None:
        return f"{python} is not an executable"
    probe = subprocess.run([resolved, "-c", "import vllm"], capture_output=True, text=True)
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["(no output)"])[-1]
        return f"`import vllm` fails in {resolved}: {last}"
    return None


def vllm_model_dir(python: str, out: Path) -> Path:
    """The dequantized model directory vLLM loads, written by vllm_model_dir.py on first use."""
    cmd = [python, str(HERE / "vllm_model_dir.py"), "--gguf", str(smollm2_path()), "--out", str(out)]
    done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True)
    return Path(done.stdout.strip().splitlines()[-1])


class VLLMServer:
    """vllm_driver.py as a child process: one JSON command per timed generate call."""

    def __init__(self, python: str, model: Path, dtype: str, max_num_batched_tokens: int, max_num_seqs: int,
                 log_path: Path, env: dict[str, str]) -> None:
        self.log_path = log_path
        self._log = open(log_path, "w")  # closed in close()
        warm_up = json.dumps({"prompts": WARM_UP_PROMPTS, "max_tokens": WARM_UP_TOKENS})
        cmd = [python, str(HERE / "vllm_driver.py"), "--model", str(model), "--dtype", dtype,
               "--max-model-len", str(MAX_MODEL_LEN), "--max-num-batched-tokens", str(max_num_batched_tokens),
               "--max-num-seqs", str(max_num_seqs), "--warm-up", warm_up]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log,
                                     text=True, env=env)
        assert self.proc.stdout is not None
        # Nothing has been read from stdout yet, so select() on it sees every byte of the first line.
        ready, _, _ = select.select([self.proc.stdout], [], [], 900)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            self.close()
            raise RuntimeError(f"vLLM did not start; its log, {log_path}, ends with:\n{self.log_tail()}")
        self.load_seconds = float(json.loads(line)["load_seconds"])

    def generate(self, prompts: list[list[int]], lengths: list[int]) -> tuple[float, list[list[int]]]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"prompts": prompts, "max_tokens": lengths}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"vLLM exited mid-run; its log, {self.log_path}, ends with:\n{self.log_tail()}")
        answer = json.loads(line)
        return float(answer["seconds"]), answer["tokens"]

    def log_tail(self, lines: int = 20) -> str:
        self._log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def close(self) -> None:
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            self.proc.stdin.close()  # the driver's loop ends at EOF
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


@dataclass
class Runs:
    """One system's timed runs of one (workload, dtype, contention) cell."""

    seconds: list[float] = field(default_factory=list)
    tokens: list[list[list[int]]] = field(default_factory=list)
    others: list[float] = field(default_factory=list)  # the other processes' load, in cores

    def add(self, result: tuple[float, list[list[int]]], others: float) -> None:
        self.seconds.append(result[0])
        self.tokens.append(result[1])
        self.others.append(others)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    def deterministic(self) -> bool:
        return all(t == self.tokens[0] for t in self.tokens)


def busy_ticks() -> int:
    """Clock ticks every CPU of this machine has spent busy since boot (Linux's /proc/stat)."""
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, Path("/proc/stat").read_text().split()[1:9])
    return user + nice + system + irq + softirq + steal


def process_ticks(pid: int) -> int:
    """Clock ticks process `pid` (all its threads) has spent on a CPU."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime, stime


class OthersLoad:
    """How many cores the machine's other processes kept busy during a timed run.

    This machine is shared, and a run that a neighbour's job overlapped is slower for reasons of
    its own; the table shows the load so that such runs can be told apart. "Ours" is this process,
    the vLLM child and the --contend process (whose load is intended)."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.start = time.perf_counter()
        self.ticks = busy_ticks() - sum(map(process_ticks, pids))

    def cores(self) -> float:
        others = busy_ticks() - sum(map(process_ticks, self.pids)) - self.ticks
        return others / os.sysconf("SC_CLK_TCK") / (time.perf_counter() - self.start)


def settle(ours: list[int], quiet_cores: float = 0.1, longest_s: float = 60.0) -> float:
    """Wait (up to longest_s) until the machine's other processes stay below quiet_cores for a
    second, and return the seconds waited. vLLM's start-up leaves the kernel busy for a while
    (reclaiming and compacting the memory it touched): a run timed right after it measured up to
    45% slower, whichever system ran first."""
    start = time.perf_counter()
    while time.perf_counter() - start < longest_s:
        load = OthersLoad(ours)
        time.sleep(1.0)
        if load.cores() < quiet_cores:
            break
    return time.perf_counter() - start


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def vllm_env(threads_bind: str) -> dict[str, str]:
    """The environment vLLM's CPU build needs here: both cores bound to its OpenMP threads, the
    K/V budget, and the engine core in the driver's own process (a second process would compete
    with it for the same 2 cores)."""
    return {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": threads_bind, "VLLM_CPU_KVCACHE_SPACE": str(KV_CACHE_GIB),
            "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vllm-python", default=os.environ.get("PAGEDKV_VLLM_PYTHON"),
                        help="python of the venv holding vllm-cpu (default: $PAGEDKV_VLLM_PYTHON)")
    parser.add_argument("--vllm-model-dir", type=Path, default=Path("~/.cache/pagedkv/smollm2-135m-hf"),
                        help="where the dequantized model for vLLM is written once and read")
    parser.add_argument("--workload", choices=["mixed", "long", "both"], default="both")
    parser.add_argument("--dtype", nargs="+", choices=["bfloat16", "float32"], default=["bfloat16", "float32"])
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per system and cell, alternating")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--contend", action="store_true",
                        help="also run every cell with a competing single-threaded matmul process")
    parser.add_argument("--vllm-max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--vllm-max-num-seqs", type=int, default=128)
    parser.add_argument("--vllm-threads-bind", default="0-1", help="VLLM_CPU_OMP_THREADS_BIND")
    parser.add_argument("--vllm-log-dir", type=Path, default=Path(tempfile.gettempdir()),
                        help="where vLLM's logs go (its stderr), one file per dtype")
    args = parser.parse_args()

    problem = vllm_usable(args.vllm_python)
    if problem:
        log(f"{problem}.\nRunning the pagedkv rows only. To compare with vLLM, set up its CPU build in a venv "
            f"of its own as {DOCS} describes, then pass --vllm-python ~/vllm-venv/bin/python "
            f"or set PAGEDKV_VLLM_PYTHON.")
    python: str | None = None if problem else shutil.which(args.vllm_python)
    model_dir = vllm_model_dir(python, args.vllm_model_dir.expanduser()) if python else None

    _, tok = load_model("smollm2-135m", dtype=torch.float32, device="cpu")
    workloads = {"mixed": workload(tok, 64, args.seed), "long": long_workload(tok, 12, args.seed)}
    names = ["mixed", "long"] if args.workload == "both" else [args.workload]
    conditions = ["alone", "contended"] if args.contend else ["alone"]
    systems = ["pagedkv", "vLLM"] if python else ["pagedkv"]
    print(f"SmolLM2-135M-Instruct on {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{args.repeats} alternating repeat(s) per cell" + (" (vLLM not run)" if not python else ""))
    for name in names:
        prompts, lengths = workloads[name]
        print(f"  {name}: {len(prompts)} requests, prompts {min(map(len, prompts))}-{max(map(len, prompts))} tokens "
              f"({sum(map(len, prompts))} in all), {sum(lengths)} new tokens ({min(lengths)}-{max(lengths)} each)")
    if args.contend:
        print("  contended: alongside one process doing float32 256x256 matmuls on 1 thread (torch)")

    results: dict[tuple[str, str, str, str], Runs] = {}
    floors: dict[tuple[str, str], float] = {}
    bounds: dict[tuple[str, str], float] = {}  # prefill at the GEMM rate, decode at memory speed
    rates: dict[str, float] = {}  # sustained GEMM GFLOP/s per dtype
    shares: dict[str, float] = {}  # attention's part of each workload's matrix products
    for dtype_name in args.dtype:
        dtype = getattr(torch, dtype_name)
        model, _ = load_model("smollm2-135m", dtype=dtype, device="cpu")
        server = None
        if python and model_dir:
            log(f"starting vLLM, {dtype_name} (it compiles for a minute or two; log: {args.vllm_log_dir}) ...")
            server = VLLMServer(python, model_dir, dtype_name, args.vllm_max_num_batched_tokens,
                                args.vllm_max_num_seqs, args.vllm_log_dir / f"pagedkv-vllm-{dtype_name}.log",
                                vllm_env(args.vllm_threads_bind))
            log(f"  vLLM ready after {server.load_seconds:.0f} s")
            waited = settle([os.getpid(), server.proc.pid])
            log(f"  the machine settled after {waited:.0f} s")
        try:
            # The machine's rates, alone with vLLM idle, before and after the quiet runs: each a
            # sustained figure, and the better of the two, since a busy minute reads low (202
            # GFLOP/s in float32 once, where 390-430 is usual).
            measured = [(gemm_rate(dtype), sequential_read_gb_s())]
            for condition in conditions:
                if condition == "contended":
                    measured.append((gemm_rate(dtype), sequential_read_gb_s()))
                contender = (subprocess.Popen([sys.executable, "-c", CONTENDER]) if condition == "contended"
                             else None)
                try:
                    for name in names:
                        prompts, lengths = workloads[name]
                        for repeat in range(args.repeats):
                            for system in systems:
                                log(f"{name} {dtype_name} {condition}, "
                                    f"repeat {repeat + 1}/{args.repeats}: {system} ...")
                                runs = results.setdefault((name, dtype_name, condition, system), Runs())
                                ours = [os.getpid()] + [p.pid for p in (server and server.proc, contender) if p]
                                load = OthersLoad(ours)
                                if system == "pagedkv":
                                    result = run_pagedkv(model, prompts, lengths)
                                else:
                                    assert server is not None
                                    result = server.generate(prompts, lengths)
                                runs.add(result, load.cores())
                                log(f"  {runs.seconds[-1]:.2f} s, other processes busy {runs.others[-1]:.2f} cores")
                finally:
                    if contender is not None:
                        contender.kill()
                        contender.wait()
            if len(measured) == 1:
                measured.append((gemm_rate(dtype), sequential_read_gb_s()))
            rates[dtype_name], read = max(rate for rate, _ in measured), max(read for _, read in measured)
            for name in names:
                floors[name, dtype_name] = matmul_flops(model, *workloads[name]) / (rates[dtype_name] * 1e9)
                bounds[name, dtype_name] = step_bound(model, *workloads[name], rates[dtype_name], read)
                shares[name] = attention_flops(model, *workloads[name]) / matmul_flops(model, *workloads[name])
        finally:
            if server is not None:
                server.close()
        del model

    print("\n| workload | dtype | run | system | median (s) | min-max (s) | tok/s | vs matmul floor "
          "| pagedkv / vLLM time | slowdown vs alone | same tokens as vLLM | mean common prefix "
          "| others' load (cores) |")
    print("|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name in names:
        prompts, lengths = workloads[name]
        for dtype_name in args.dtype:
            floor = floors[name, dtype_name]
            for condition in conditions:
                cell = {s: results[name, dtype_name, condition, s] for s in systems}
                for system, runs in cell.items():
                    ratio = same = prefix = slowdown = ""
                    if "vLLM" in cell and system == "pagedkv":
                        ratio = f"{runs.median / cell['vLLM'].median:.2f}x"
                        theirs = cell["vLLM"].tokens[0]
                        same = f"{sum(a == b for a, b in zip(runs.tokens[0], theirs, strict=True))}/{len(prompts)}"
                        mean = statistics.mean(common_prefix(a, b) for a, b in zip(runs.tokens[0], theirs, strict=True))
                        prefix = f"{mean:.1f} of {statistics.mean(lengths):.1f}"
                    if condition == "contended":
                        slowdown = f"{runs.median / results[name, dtype_name, 'alone', system].median:.2f}x"
                    spread = f"{min(runs.seconds):.2f}-{max(runs.seconds):.2f}"
                    flag = "" if runs.deterministic() else " (tokens differ between repeats)"
                    print(f"| {name} | {dtype_name} | {condition} | {system}{flag} | {runs.median:.2f} | {spread} "
                          f"| {sum(lengths) / runs.median:.1f} | {runs.median / floor:.2f}x | {ratio} | {slowdown} "
                          f"| {same} | {prefix} | {max(runs.others):.2f} |")
            print(f"| {name} | {dtype_name} | | matmul floor ({shares[name]:.0%} of it attention's, "
                  f"{rates[dtype_name]:.0f} GFLOP/s) | {floor:.2f} | | {sum(lengths) / floor:.1f} | 1x | | | | | |")
            bound = bounds[name, dtype_name]
            print(f"| {name} | {dtype_name} | | bound: prompts at that rate, decode at memory speed | {bound:.2f} "
                  f"| | {sum(lengths) / bound:.1f} | {bound / floor:.2f}x | | | | | |")


if __name__ == "__main__":
    main()
