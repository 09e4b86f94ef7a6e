"""Write SmolLM2-135M-Instruct as a Hugging Face model directory that vLLM's CPU build can load.

The model ships only as a Q4_1 GGUF file (pagedkv loads it directly). vLLM's GGUF path goes through
its own quantized kernels, which would compare a different computation; so this dequantizes the file
once with transformers to float32 and writes safetensors plus the tokenizer and its chat template.
Both systems then start from the same dequantized weights.

Run with the vLLM venv's python (it needs transformers and gguf, neither of which pagedkv's venv
must share with vLLM):

    ~/vllm-venv/bin/python benchmarks/vllm_model_dir.py --gguf PATH [--out ~/.cache/pagedkv/smollm2-135m-hf]

PATH is what `python -c "from pagedkv.models.gguf import smollm2_path; print(smollm2_path())"` prints
in pagedkv's venv (bench_vllm_cpu.py passes it). Nothing is written when --out already holds a model.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

DEFAULT_OUT = Path("~/.cache/pagedkv/smollm2-135m-hf").expanduser()


def holds_model(directory: Path) -> bool:
    """A directory save_pretrained has completed: config, weights and tokenizer are all there."""
    return all((directory / name).exists() for name in ("config.json", "model.safetensors", "tokenizer.json"))


def write_model_dir(gguf: Path, out: Path) -> None:
    """Dequantize `gguf` to float32 and save it, with its tokenizer, under `out`."""
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # transformers refuses save_pretrained on a model loaded from GGUF, so the weights move to a
    # plain model built from the same config; the copy must be exact for the comparison to hold.
    # The config loses its GGUF quantization_config: saved, it would make vLLM look for GGUF weights.
    settings = {k: v for k, v in loaded.config.to_dict().items() if k != "quantization_config"}
    config = type(loaded.config).from_dict(settings)
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict())
    source, copied = loaded.state_dict(), fresh.state_dict()
    assert source.keys() == copied.keys(), "the fresh model's parameters differ from the loaded model's"
    for name, tensor in source.items():
        assert torch.equal(tensor, copied[name]), f"{name} was not copied bit for bit"
    if tokenizer.chat_template is None:
        raise SystemExit(f"{gguf} carries no chat template; vLLM's chat prompts would differ from pagedkv's")
    out.mkdir(parents=True, exist_ok=True)
    fresh.save_pretrained(out)
    tokenizer.save_pretrained(out)  # writes chat_template.jinja (or the template in tokenizer_config.json)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", type=Path, required=True, help="the SmolLM2-135M-Instruct GGUF file")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"model directory (default {DEFAULT_OUT})")
    args = parser.parse_args()
    out = args.out.expanduser()
    if holds_model(out):
        print(f"{out} already holds a model; nothing to do", file=sys.stderr)
    else:
        write_model_dir(args.gguf, out)
        print(f"wrote {out}", file=sys.stderr)
    print(out)


if __name__ == "__main__":
    main()
