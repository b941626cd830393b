"""The backend interface: batch-first and async inside, whatever engine sits behind it."""

from __future__ import annotations

import abc
import contextvars
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable

from ..errors import ConfigError, RequestError

if TYPE_CHECKING:
    from ..config import DeployConfig
    from ..protocol.request import ChatRequest


#: The stop signal of the request being answered: the worker sets it when the caller has gone away
#: (Serve cancels the request on a client disconnect), and engines that run in threads check it
#: between tokens or rows, so no worker keeps generating for nobody. A context variable, so it
#: reaches the engine's thread through ``asyncio.to_thread`` without changing the backend interface.
STOP: contextvars.ContextVar[threading.Event | None] = contextvars.ContextVar("byzerllm_stop", default=None)


def stop_requested() -> bool:
    """True once the caller of the request being answered has gone away (see :data:`STOP`)."""
    event = STOP.get()
    return event is not None and event.is_set()


def stop_event() -> threading.Event:
    """The current request's stop event (a fresh, never-set one outside a worker)."""
    return STOP.get() or threading.Event()


#: Called by a backend as each row of a batch is answered (``(row index in the batch, result)``), where its
#: rows finish one by one (SaaS calls): the worker's response cache keeps a row as soon as it is answered,
#: so a batch that fails or is abandoned later has lost none of its answered rows. Optional for backends:
#: the worker keeps every row the batch returns anyway.
ANSWERED: contextvars.ContextVar[Callable[[int, Any], None] | None] = contextvars.ContextVar(
    "byzerllm_answered", default=None)


def row_answered(index: int, result: Any) -> None:
    """Report row ``index`` of the batch being answered as done (see :data:`ANSWERED`); never raises."""
    hook = ANSWERED.get()
    if hook is not None:
        try:
            hook(index, result)
        except Exception:  # a cache write must never fail the row
            pass


@dataclass(slots=True)
class ChatResult:
    """The answer to one request: text, or an error message; metadata as strings."""

    response: str | None = None
    error: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)


def check_structured(request: "ChatRequest", result: ChatResult) -> ChatResult:
    """``result`` checked against the request's ``response_format`` (whatever engine answered): an answer
    that is not JSON or does not match the schema becomes that row's error, its raw text kept as the
    response, so a caller never takes it for a valid value."""
    fmt = request.response_format
    if fmt is None or result.error is not None:
        return result
    why = fmt.check(result.response)
    if why is None:
        return result
    if result.metadata.get("finish_reason") == "length":
        why += f"; it was cut at max_length={request.max_length} tokens: raise max_length"
    return ChatResult(response=result.response, error=why, metadata={**result.metadata, "http_status": "502"})


#: The OpenAI request fields that reach an engine as ``generation.<name>`` (``/v1`` maps them; SQL callers may pass
#: them too). A built-in engine names those it honours (:attr:`Backend.openai_keys`); any other of these is
#: refused with a 400 that names it, never silently dropped.
OPENAI_GENERATION_KEYS = ("stop", "seed", "presence_penalty", "frequency_penalty", "logit_bias", "logprobs",
                          "top_logprobs", "tools", "tool_choice")


def error_result(exc: BaseException) -> ChatResult:
    """A failed row's :class:`ChatResult`: a refused request keeps its 400 status and ``param`` (see
    :class:`~byzerllm_spark.errors.RequestRefusedError`); anything else is the engine's failure."""
    from ..errors import RequestRefusedError

    if isinstance(exc, RequestRefusedError):
        return ChatResult(error=str(exc), metadata=exc.metadata())
    return ChatResult(error=f"{type(exc).__name__}: {exc}")


def prompt_messages(request: "ChatRequest", hint: bool = True) -> list[dict[str, str]]:
    """The request's messages as a local engine prompts them: with a ``response_format`` (and ``hint``), its
    :meth:`~byzerllm_spark.protocol.structured.ResponseFormat.hint` ends the system message."""
    messages = request.messages()
    fmt = request.response_format
    if fmt is None or not hint:
        return messages
    if messages[0]["role"] == "system":
        messages[0] = {"role": "system", "content": messages[0]["content"] + "\n\n" + fmt.hint()}
    else:
        messages.insert(0, {"role": "system", "content": fmt.hint()})
    return messages


class Backend(abc.ABC):
    """One loaded model inside one worker (Serve replica).

    Subclasses load their engine in ``__init__`` (heavy imports go there, never at module level)
    and answer whole batches in :meth:`chat_batch`. A row that fails gets its own error; the
    batch goes on.
    """

    #: Name shown in errors and ``workers()``.
    name: str = "backend"
    #: True for backends that answer :meth:`embed_batch` (the ``/embed`` route, ``array<float>`` in SQL).
    supports_embedding: bool = False
    #: Rows per HTTP request that callers (the Spark functions) send by default: large for cheap
    #: models so per-request overhead is amortised, small for LLMs so work spreads over workers.
    preferred_batch_size: int = 16
    #: The most tokens the model can handle (its context window), or None when unknown (SaaS
    #: vendors check their own). A request's ``max_length`` above it is refused before any work.
    context_length: int | None = None
    #: True for engines that serve LoRA adapters over their base model: :meth:`load_adapter` registers one
    #: by name, and each request's ``adapter`` (None: the base model) says which answers it.
    supports_lora: bool = False

    def __init__(self, config: "DeployConfig", model_dir: str | None) -> None:
        self.config = config
        self.model_dir = model_dir

    def load_adapter(self, name: str, path: str) -> None:
        """Load the LoRA adapter in directory ``path`` (a PEFT adapter: ``adapter_config.json`` and its
        weights) under ``name``, so that requests with ``adapter == name`` are answered with it.

        The worker calls this for each of ``deploy(lora_adapters=...)`` before it takes requests, and for
        ``bls.add_adapter`` later; it checks names, ``max_loras`` and unknown adapters itself, so an
        engine only loads. Rows of one batch may name different adapters (or none): an engine must never
        answer a row with another row's adapter.

        Raises:
            ConfigError: this engine serves no adapters, or the adapter does not fit the base model.
        """
        raise ConfigError(f"lora_adapters: backend {self.name!r} serves no LoRA adapters; deploy the base model "
                          "with infer_backend='transformers' (or 'vllm'), or merge the adapter "
                          "(bls.sft(..., merge=True)) and deploy the merged model")

    @classmethod
    def check_config(cls, config: "DeployConfig") -> None:
        """On the driver, before any worker starts: refuse ``infer_params`` keys this engine would not
        use. Runs without loading the engine where it can (nothing heavy is imported for it).

        Raises:
            ConfigError: naming the key and listing the valid ones.
        """
        config.infer_params.check_keys(f"infer_backend={cls.name!r}")

    #: The keys of :data:`OPENAI_GENERATION_KEYS` this engine honours; None: every ``generation.*`` key goes to
    #: the engine as it is (SaaS vendors and plugins decide for themselves).
    openai_keys: frozenset | None = None

    def check_request(self, request: "ChatRequest") -> None:
        """Refuse, before any work, a request that asks for something this engine does not do. The default
        refuses the keys of :data:`OPENAI_GENERATION_KEYS` outside :attr:`openai_keys` (a null or false value is
        "not set"). Engines add their own rules (``super().check_request(request)`` first).

        Raises:
            RequestRefusedError: naming the parameter (``param``), its value and the fix.
        """
        if self.openai_keys is None or not request.generation:  # most rows carry no generation keys
            return
        from ..errors import RequestRefusedError, bad_value

        for key in OPENAI_GENERATION_KEYS:
            value = request.generation.get(key)
            if value in (None, False, "", [], {}, "false") or key in self.openai_keys:
                continue
            if key == "tool_choice" and value in ("none", "auto"):  # without tools: nothing to choose
                continue
            honoured = ", ".join(k for k in OPENAI_GENERATION_KEYS if k in self.openai_keys)
            raise RequestRefusedError(bad_value(
                key, value if not isinstance(value, (list, dict)) else f"<{type(value).__name__} of {len(value)}>",
                f"backend {self.name!r} does not support it (it honours {honoured}); leave it out or deploy "
                "another backend"), param=key)

    @abc.abstractmethod
    async def chat_batch(self, requests: "list[ChatRequest]") -> list[ChatResult]:
        """Answer every request, in order; a failed row gets ``ChatResult(error=...)``."""

    async def stream_chat(self, request: "ChatRequest") -> AsyncIterator[Any]:
        """Yield pieces (str) of one answer; a last :class:`ChatResult` item may carry its metadata
        (token usage, finish reason). Default: the whole answer as one piece, then its metadata."""
        (result,) = await self.chat_batch([request])
        if result.error:
            error = RequestError(result.error)
            status = str(result.metadata.get("http_status", ""))
            error.status = int(status) if status.isdigit() else 500  # the HTTP status a caller gets
            raise error
        yield result.response or ""
        yield ChatResult(metadata=dict(result.metadata))

    async def embed_batch(self, texts: list[str]) -> list[list[float]]:
        raise NotImplementedError(f"backend {self.name!r} does not compute embeddings")

    async def count_tokens(self, texts: list[str]) -> list[int]:
        """The number of tokens of each text with the model's own tokenizer: the text alone, without the chat
        template or special tokens (a request adds those, the same few per row), and without generating.
        The ``tokenize`` route and ``llm_count_tokens`` call this.

        Raises:
            NotImplementedError: the engine has no tokenizer here; the message says what to use instead.
        """
        raise NotImplementedError(f"backend {self.name!r} has no tokenizer to count with; count with a model "
                                  "deployed with infer_backend='transformers' or 'llama_cpp' of the same family")

    def info(self) -> dict[str, Any]:
        return {"backend": self.name, "model_dir": self.model_dir}

    def close(self) -> None:
        """Release the engine (called when the worker stops)."""
