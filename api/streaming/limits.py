"""The per-request limits a generation job meets before it is queued, from
the settings and the model's config: a 400 now instead of a queued job its
worker would refuse. Every family that queues generation jobs checks here."""

from __future__ import annotations

from api.errors import APIError
from schemas.jobs import GenerateJob
from schemas.registry import ModelConfig
from schemas.settings import Settings, get_settings


def limits(settings: Settings | None) -> Settings:
    """The settings given, else the process's own (batch validation has none)."""
    return settings if settings is not None else get_settings()


def check_generate(
    job: GenerateJob, config: ModelConfig | None, settings: Settings | None = None
) -> GenerateJob:
    """`job`, or the 400 of the first limit it breaks."""
    settings = limits(settings)
    stop = job.sampling.stop
    if len(stop) > settings.max_stop:
        raise APIError(
            400, f"at most {settings.max_stop} stop sequences (INFERQ_MAX_STOP)", param="stop"
        )
    if any(len(s) > settings.max_stop_length for s in stop):
        raise APIError(
            400,
            f"a stop sequence may hold at most {settings.max_stop_length} characters "
            "(INFERQ_MAX_STOP_LENGTH)",
            param="stop",
        )
    if job.messages is not None and len(job.messages) > settings.max_messages:
        raise APIError(
            400,
            f"at most {settings.max_messages} messages (INFERQ_MAX_MESSAGES)",
            param="messages",
        )
    if config is None:
        return job
    width = job.beam.width if job.beam is not None else job.sampling.n
    if width > config.parallel:
        raise APIError(
            400,
            f"n={width} needs {width} parallel slots; this model has {config.parallel} "
            "(its `parallel` setting)",
            param="n",
        )
    limit = job.sampling.max_tokens
    if limit is not None and limit > config.context_size:
        # The worker's own answer for a prompt plus max_tokens that cannot fit.
        raise APIError(
            400,
            f"max_tokens {limit} is more than the {config.context_size} tokens of context "
            f"a request of model '{job.model}' has",
            code="context_length_exceeded",
            param="max_tokens",
        )
    return job
