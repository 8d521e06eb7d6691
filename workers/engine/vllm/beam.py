"""`/v1/generate`'s use_beam_search on vLLM: vLLM's own beam search (the one
its OpenAI server runs), which steps AsyncLLM.generate one token at a time
for every beam."""

from __future__ import annotations

from typing import Any

from workers.engine.types import EngineRequest


async def beam_search(llm: Any, request: EngineRequest, max_tokens: int) -> Any:
    """The RequestOutput holding the request's best `n` hypotheses."""
    from vllm.entrypoints.generate.beam_search.online import BeamSearchOnlineMixin
    from vllm.sampling_params import BeamSearchParams

    class Search(BeamSearchOnlineMixin):  # type: ignore[misc]
        def __init__(self) -> None:
            self.engine_client = llm
            self.renderer = llm.renderer

    sampling = request.sampling
    params = BeamSearchParams(
        beam_width=sampling.n,
        max_tokens=max_tokens,
        ignore_eos=sampling.ignore_eos,
        length_penalty=sampling.length_penalty,
    )
    prompt = {"type": "token", "prompt_token_ids": list(request.prompt_tokens)}
    final = None
    async for output in Search().beam_search(prompt, request.request_id, params):
        final = output
    if final is None:
        raise RuntimeError("vLLM's beam search returned nothing")
    return final
