"""How a generate job's prompt becomes tokens, and what its Accepted event
says. Each endpoint has its shaper (WorkerRuntime.shapers, wired by
workers.main): the chat and completion endpoints go through the model's
templates (TemplateShaper, here); llama-server's /completion and /infill
through workers.llama_server."""

from __future__ import annotations

from typing import Protocol

from schemas.events import Accepted
from schemas.jobs import CHAT_ENDPOINTS, GenerateJob
from schemas.templates import PromptBuilder
from workers.engine.interface import Tokenizer
from workers.engine.types import Sampling


class PromptShaper(Protocol):
    def tokens(self, job: GenerateJob) -> list[int]:
        """The prompt tokens of `job`; PromptError or InvalidRequest (a 400)
        when the job's prompt cannot be run."""
        ...

    def accepted(self, job: GenerateJob, sampling: Sampling, tokens: list[int]) -> Accepted:
        """The Accepted event of `job` once it is prepared."""
        ...


class TemplateShaper:
    """OpenAI's chat and completions, and /v1/generate: the text through the
    model's templates, then the model's tokenizer."""

    def __init__(self, prompts: PromptBuilder, tokenizer: Tokenizer) -> None:
        self.prompts = prompts
        self.tokenizer = tokenizer

    def tokens(self, job: GenerateJob) -> list[int]:
        if job.endpoint in CHAT_ENDPOINTS:
            tools = job.tools if job.tool_mode != "none" else None
            text = self.prompts.chat(job.messages or [], tools=tools)
        elif job.endpoint == "generate":
            # /v1/generate takes its prompt already formatted.
            text = job.prompt or ""
        else:
            text = self.prompts.completion(job.prompt or "")
        # Templates usually write the BOS token themselves; never add a second one.
        bos = self.tokenizer.bos_text
        add_special = self.tokenizer.add_bos and not (bos and text.startswith(bos))
        return self.tokenizer.tokenize(text, add_special=add_special, parse_special=True)

    def accepted(self, job: GenerateJob, sampling: Sampling, tokens: list[int]) -> Accepted:
        return Accepted(prompt_tokens=len(tokens))
