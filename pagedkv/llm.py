"""``LLM``: offline batch generation in the shape vLLM and nano-vllm users already write.

    llm = LLM(model="smollm2-135m", kv_cache_memory_bytes="512MiB")
    for out in llm.generate(["Hello, my name is"], SamplingParams(temperature=0, max_tokens=32)):
        print(out.outputs[0].text)
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from pagedkv.errors import InvalidRequestError
from pagedkv.loader import load_engine
from pagedkv.scheduler import LLMEngine, RequestOutput, SamplingParams
from pagedkv.scheduler.engine import Tokenizer

if TYPE_CHECKING:
    import torch

Prompt = str | Sequence[int]
Message = dict[str, str]

PROGRESS_MIN_PROMPTS = 4
"""``generate`` shows a progress bar from this many prompts on (fewer finish before it helps)."""


class LLM:
    """A model and its engine, run to completion on a batch of prompts.

    ``model`` is a name from :data:`pagedkv.MODEL_NAMES` or a ``.gguf`` path; the other
    keyword arguments are :class:`pagedkv.EngineConfig` fields (``block_size``,
    ``kv_cache_memory_bytes="1GiB"``, ``max_num_seqs``, ...). ``self.engine`` is the
    :class:`pagedkv.LLMEngine` underneath, for stats or a serving loop of your own.
    """

    def __init__(
        self,
        model: str = "smollm2-135m",
        dtype: str | torch.dtype | None = None,
        device: str | torch.device | None = None,
        **engine_config: Any,
    ) -> None:
        self.model = model
        self.engine: LLMEngine = load_engine(model, dtype=dtype, device=device, **engine_config)

    def get_tokenizer(self) -> Tokenizer | None:
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        priority: Sequence[int] | None = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt (text, or a list of token ids), batched continuously;
        return the finished outputs in prompt order. One prompt may be given bare.
        ``sampling_params`` is one for all or one per prompt (default: vLLM's, temperature 1)."""
        batch = _as_batch(prompts)
        show = use_tqdm and len(batch) >= PROGRESS_MIN_PROMPTS
        with tqdm(total=len(batch), desc="Processed prompts", unit="req", disable=not show, dynamic_ncols=True) as bar:
            generated = 0

            def progress(out: RequestOutput) -> None:
                nonlocal generated
                generated += sum(len(s.new_token_ids) for s in out.outputs)
                if out.finished:
                    bar.update(1)
                    bar.set_postfix_str(f"{generated / max(bar.format_dict['elapsed'], 1e-9):.1f} output tok/s")

            return self.engine.generate(batch, sampling_params, on_output=progress if show else None, priority=priority)

    def chat(
        self,
        messages: Sequence[Message] | Sequence[Sequence[Message]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Answer one conversation (a list of ``{"role", "content"}`` messages) or several,
        each rendered through the model's chat template."""
        tokenizer = self.get_tokenizer()
        if tokenizer is None or not tokenizer.chat_template:
            raise InvalidRequestError(f"model {self.model!r} has no chat template; use generate()", "messages")
        if not messages:
            raise InvalidRequestError("messages is empty", "messages")
        conversations = [messages] if isinstance(messages[0], dict) else messages
        # isinstance cannot tell mypy which of the two shapes ``messages`` has; the line above did
        prompts: list[Prompt] = [tokenizer.apply_chat_template(list(c)) for c in conversations]  # type: ignore[arg-type]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)


def _as_batch(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    """A list of prompts: a bare text prompt or a bare sequence of token ids (a list, a
    tuple, a 1-D array or tensor) becomes a list of one."""
    if isinstance(prompts, str):
        return [prompts]
    items: list[Any] = list(prompts)
    return [prompts] if items and _is_token_id(items[0]) else items  # type: ignore[list-item]  # one prompt


def _is_token_id(item: Any) -> bool:
    """An integer of any kind (``int``, numpy's, a 0-d integer tensor), not a prompt."""
    try:
        operator.index(item)
    except TypeError:
        return False
    return True
