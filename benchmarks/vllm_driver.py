"""Serve timed batches through vLLM's offline `LLM` for bench_vllm_cpu.py, one JSON line at a time.

Run by the vLLM venv's python as a long-lived child of bench_vllm_cpu.py, never in pagedkv's venv
(vLLM pins its own torch and transformers). vLLM's CPU start-up compiles the model for a minute or two,
so the child loads it once per dtype and then answers any number of timed batches:

    stdin:  {"prompts": [[token ids], ...], "max_tokens": [n, ...]}
    stdout: {"seconds": wall time of llm.generate alone, "tokens": [[generated ids], ...]}

Before the first command it prints one line, {"ready": true, ...}, once the model is loaded and
warmed up. stdout carries only these lines: vLLM logs to stdout by default, and C extensions may
print too, so file descriptor 1 is pointed at stderr and the protocol writes to a private copy of it.

The parent sets VLLM_CPU_OMP_THREADS_BIND, VLLM_CPU_KVCACHE_SPACE and VLLM_ENABLE_V1_MULTIPROCESSING=0
(the engine core runs in this process, so no second process competes for the 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, TextIO

from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt


def protocol_stream() -> TextIO:
    """A text stream on the original stdout; fd 1 and sys.stdout now go to stderr."""
    private = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return os.fdopen(private, "w", buffering=1)


def generate(llm: LLM, prompts: list[list[int]], max_tokens: list[int]) -> tuple[float, list[list[int]]]:
    """Greedy, EOS ignored, one SamplingParams per request: the same work pagedkv is given.

    The prefix cache is emptied first (untimed): this process serves every repeat, and a repeat
    would otherwise find its prompts cached by the one before, while pagedkv starts each repeat
    with a fresh engine. Prefix caching within one batch stays on, as it is in pagedkv."""
    if not llm.reset_prefix_cache():
        raise RuntimeError("vLLM did not reset its prefix cache")
    inputs = [TokensPrompt(prompt_token_ids=p) for p in prompts]
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in max_tokens]
    start = time.perf_counter()
    outputs = llm.generate(inputs, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    return seconds, [list(o.outputs[0].token_ids) for o in outputs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model directory written by vllm_model_dir.py")
    parser.add_argument("--dtype", required=True, choices=["bfloat16", "float32"])
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--max-num-batched-tokens", type=int, required=True)
    parser.add_argument("--max-num-seqs", type=int, required=True)
    parser.add_argument("--warm-up", required=True, help='a command, {"prompts": ..., "max_tokens": ...}, run untimed')
    args = parser.parse_args()

    out = protocol_stream()
    start = time.perf_counter()
    llm = LLM(
        model=args.model,
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_num_seqs=args.max_num_seqs,
    )
    # The same two short requests pagedkv warms up with: the first batches pay for lazy initialisation.
    warm_up = json.loads(args.warm_up)
    generate(llm, warm_up["prompts"], warm_up["max_tokens"])
    ready: dict[str, Any] = {"ready": True, "load_seconds": time.perf_counter() - start}
    print(json.dumps(ready), file=out)
    for line in sys.stdin:
        if not line.strip():
            continue
        command = json.loads(line)
        seconds, tokens = generate(llm, command["prompts"], command["max_tokens"])
        print(json.dumps({"seconds": seconds, "tokens": tokens}), file=out)


if __name__ == "__main__":
    main()
