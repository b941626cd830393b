"""llama.cpp through llama-cpp-python: GGUF models on CPU (or GPU layers with ``n_gpu_layers``).

Plain ``infer_params`` keys are llama.cpp's own ``Llama(...)`` arguments, as Byzer-LLM's deploy docs
give them (``n_gpu_layers``, ``verbose``, ``n_ctx``...); ``backend.*`` keys are accepted too. Unknown
keys are refused on the driver at ``deploy()``, before any worker starts.

A request's ``response_format`` constrains decoding through llguidance, as on the transformers backend:
a llama-cpp-python ``logits_processor`` masks, at each step, the tokens the schema forbids (compact JSON,
no control characters in strings), so the answer always parses. Why not llama.cpp's own JSON-schema
grammar (``json_schema_to_gbnf``): its sampler checks the grammar against all 49k candidate tokens of
SmolLM2 each step. Measured (2026-11-30, 16 extraction prompts, the same prompts and answer lengths,
one core, load 7): 6.59 s with the GBNF grammar, 5.27 s with llguidance: about 5 ms a token for the
grammar against 0.25 ms for llguidance's mask. llguidance's compact JSON is also a token shorter.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import re
import threading
from typing import Any, AsyncIterator

from ..errors import ConfigError, ContextLengthError, RequestRefusedError
from . import _generation
from ._model_files import find_gguf
from .base import OPENAI_GENERATION_KEYS, Backend, ChatResult, error_result, prompt_messages, stop_event

#: llama-cpp-python's error for a prompt longer than ``n_ctx`` (a ValueError): the caller's 400, not a 500.
_TOO_LONG = re.compile(r"Requested tokens \((\d+)\) exceed context window of (\d+)")


def _refused(exc: Exception) -> Exception:
    """llama.cpp's context overflow as :class:`ContextLengthError`; any other error as it is."""
    match = _TOO_LONG.search(str(exc)) if isinstance(exc, ValueError) else None
    return ContextLengthError(int(match.group(1)), int(match.group(2))) if match else exc


def _import_llama():
    try:
        from llama_cpp import Llama
    except ImportError as exc:
        raise ImportError(
            "infer_backend='llama_cpp' needs llama-cpp-python: pip install 'byzerllm-spark[llama-cpp]' "
            f"(scripts/setup.sh builds it once) ({exc})"
        ) from None
    return Llama


class _Grammar:
    """llama-cpp-python's ``logits_processor`` for one answer: feeds the token chosen last to the llguidance
    matcher, then sets the logits of the tokens it forbids to -inf (only end-of-sequence once it is done)."""

    def __init__(self, matcher, vocab_size: int, eos: int) -> None:
        import llguidance.numpy

        self.matcher, self.eos, self.numpy = matcher, eos, llguidance.numpy
        self.bitmask = llguidance.numpy.allocate_token_bitmask(1, vocab_size)
        self.started = False

    def __call__(self, input_ids, logits):
        matcher = self.matcher
        if self.started and not matcher.is_stopped():
            matcher.consume_token(int(input_ids[-1]))  # the token chosen at the previous step
        self.started = True
        if matcher.is_stopped() or matcher.is_error():
            end = logits[self.eos]
            logits[:] = float("-inf")
            logits[self.eos] = end
            return logits
        self.numpy.fill_next_token_bitmask(matcher, self.bitmask, 0)
        self.numpy.apply_token_bitmask_inplace(logits, self.bitmask)
        return logits


def llama_params(config, Llama) -> dict[str, Any]:
    """The ``Llama(...)`` arguments of a deployment: this backend's defaults, then ``infer_params``.

    Raises:
        ConfigError: a key that ``Llama.__init__`` does not take (listing the ones it does).
    """
    accepted = set(inspect.signature(Llama.__init__).parameters) - {"self", "model_path", "kwargs"}
    config.infer_params.check_keys("infer_backend='llama_cpp'", backend=accepted, plain=accepted)
    threads = max(1, int(round(config.cpus_per_worker)))
    params: dict[str, Any] = {
        "n_ctx": 2048,
        # Both thread counts follow the worker's CPUs: llama.cpp's default batch threads (all
        # cores) make two workers on one machine spin against each other.
        "n_threads": threads,
        "n_threads_batch": threads,
        "n_gpu_layers": -1 if config.gpus_per_worker > 0 else 0,
        "verbose": False,
    }
    given = {**config.infer_params.plain, **config.infer_params.backend}
    params.update(given)
    return params


class LlamaCppBackend(Backend):
    name = "llama_cpp"
    preferred_batch_size = 4

    @classmethod
    def check_config(cls, config) -> None:
        try:
            Llama = _import_llama()
        except ImportError:
            return  # not installed on the driver: each worker checks when it loads
        llama_params(config, Llama)

    def __init__(self, config, model_dir) -> None:
        super().__init__(config, model_dir)
        Llama = _import_llama()
        gguf = find_gguf(model_dir or "")
        if gguf is None:
            raise ConfigError(
                f"model_path={model_dir!r} is not valid for infer_backend='llama_cpp': it needs a .gguf file "
                "or a directory holding one (use infer_backend='transformers' for Hugging Face directories)"
            )
        self.params = llama_params(config, Llama)
        self.gguf = gguf
        self.llm = Llama(model_path=gguf, **self.params)
        self._lock = threading.Lock()
        self._grammars: dict[str, str] = {}  # schema key -> llguidance grammar
        self._ll_tokenizer = None  # llguidance's view of the GGUF vocabulary: built on the first response_format
        self.context_length = int(self.llm.n_ctx())
        completion = inspect.signature(self.llm.create_chat_completion).parameters
        self._gen_keys = set(completion) - {"messages", "stream", "self"}
        # Tools are refused (400, param "tools"): llama-cpp-python calls tools only through its own
        # chat formats ("chatml-function-calling"), not through the model's GGUF chat template.
        self.openai_keys = frozenset(OPENAI_GENERATION_KEYS) - {"tools", "tool_choice"}

    def check_request(self, req) -> None:
        """Refuse what this backend does not do (tools; ``logprobs`` unless deployed with ``logits_all=True``,
        which llama.cpp needs to keep every step's logits) and malformed sampling values, naming them."""
        super().check_request(req)
        _generation.stop_sequences(req.generation.get("stop"))
        _generation.penalties(req.generation, self.llm.n_vocab())
        if _generation.top_logprobs(req.generation) is not None and not self.params.get("logits_all"):
            raise RequestRefusedError(
                "logprobs: this llama_cpp deployment keeps no per-token logits; deploy it with "
                "infer_params={'logits_all': True} (llama.cpp then keeps n_ctx x vocabulary floats), or leave "
                "logprobs out", param="logprobs")

    def _gen_kwargs(self, req) -> dict[str, Any]:
        kwargs = req.sampling()
        for key, value in req.generation.items():
            if key in self._gen_keys:
                kwargs[key] = value
        # OpenAI's values as llama.cpp takes them (a Spark map carries them as text; logit_bias keys as ints).
        generation = req.generation
        if generation.get("stop") is not None:
            kwargs["stop"] = _generation.stop_sequences(generation["stop"])
        presence, frequency, bias = _generation.penalties(generation, self.llm.n_vocab())
        kwargs.update(presence_penalty=presence, frequency_penalty=frequency, logit_bias=bias or None)
        k = _generation.top_logprobs(generation)
        kwargs.update(logprobs=k is not None or None, top_logprobs=k)
        if generation.get("seed") not in (None, ""):
            kwargs["seed"] = int(generation["seed"])
        if req.response_format is not None:
            kwargs["logits_processor"] = [self._grammar(req.response_format)]
        return kwargs

    def _grammar(self, fmt) -> "_Grammar":
        """A fresh logits processor for one answer in ``fmt``; the grammar is compiled once per schema."""
        try:
            import llguidance
            import llguidance.llamacpp
        except ImportError as exc:
            raise ImportError("response_format on infer_backend='llama_cpp' needs llguidance: pip install "
                              f"'byzerllm-spark[llama-cpp]' ({exc})") from None
        if self._ll_tokenizer is None:  # ~1 s, once per worker
            from llama_cpp import llama_model_get_vocab

            self._ll_tokenizer = llguidance.llamacpp.lltokenizer_from_vocab(llama_model_get_vocab(self.llm.model))
        grammar = self._grammars.get(fmt.key)
        if grammar is None:
            # Compact JSON: a small model given free whitespace may spend its tokens on spaces and newlines.
            grammar = self._grammars[fmt.key] = llguidance.LLMatcher.grammar_from_json_schema(
                fmt.schema, overrides={"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "})
        matcher = llguidance.LLMatcher(self._ll_tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise ValueError(f"response_format: llguidance cannot use this schema: {matcher.get_error()}")
        return _Grammar(matcher, self._ll_tokenizer.vocab_size, self.llm.token_eos())

    def _answer(self, req) -> ChatResult:
        try:
            out = self.llm.create_chat_completion(messages=prompt_messages(req), **self._gen_kwargs(req))
        except ValueError as exc:
            raise _refused(exc) from None
        usage = out.get("usage") or {}
        choice = out["choices"][0]
        metadata = {
            "prompt_tokens": str(usage.get("prompt_tokens", 0)),
            "completion_tokens": str(usage.get("completion_tokens", 0)),
            "finish_reason": str(choice.get("finish_reason")),
        }
        logprobs = (choice.get("logprobs") or {}).get("content")
        if logprobs is not None:  # llama-cpp-python gives numpy floats and no bytes
            for entry in [e for item in logprobs for e in (item, *(item.get("top_logprobs") or []))]:
                entry["bytes"] = entry.get("bytes") or list(str(entry["token"]).encode("utf-8"))
            metadata["logprobs"] = json.dumps(logprobs, ensure_ascii=False, default=float)
        return ChatResult(response=choice["message"]["content"] or "", metadata=metadata)

    def _run(self, requests) -> list[ChatResult]:
        out = []
        stop = stop_event()
        with self._lock:  # one llama context: one generation at a time
            for req in requests:
                if stop.is_set():  # the caller went away: the rest of the batch is not worked on
                    out.append(ChatResult(error="cancelled: the caller went away"))
                    continue
                try:
                    out.append(self._answer(req))
                except Exception as exc:
                    out.append(error_result(exc))
        return out

    async def chat_batch(self, requests) -> list[ChatResult]:
        return await asyncio.to_thread(self._run, requests)

    async def stream_chat(self, request) -> AsyncIterator[str]:
        queue: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        done = object()
        gone = threading.Event()

        def produce() -> None:
            try:
                with self._lock:
                    tokens, finish = 0, "stop"
                    for chunk in self.llm.create_chat_completion(
                        messages=prompt_messages(request), stream=True, **self._gen_kwargs(request)
                    ):
                        if gone.is_set():  # the caller went away: stop at this token
                            break
                        choice = chunk["choices"][0]
                        piece = choice.get("delta", {}).get("content")
                        finish = choice.get("finish_reason") or finish
                        if piece:
                            tokens += 1  # llama-cpp-python streams one chunk per token
                            loop.call_soon_threadsafe(queue.put_nowait, piece)
                    # Its stream carries no usage: the context holds the prompt and the answer's tokens.
                    usage = {"prompt_tokens": str(max(0, self.llm.n_tokens - tokens)),
                             "completion_tokens": str(tokens), "finish_reason": str(finish)}
                    loop.call_soon_threadsafe(queue.put_nowait, ChatResult(metadata=usage))
            except Exception as exc:
                loop.call_soon_threadsafe(queue.put_nowait, _refused(exc))
            loop.call_soon_threadsafe(queue.put_nowait, done)

        task = loop.run_in_executor(None, produce)
        try:
            while True:
                item = await queue.get()
                if item is done:
                    break
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            gone.set()
            await asyncio.shield(task)  # the worker is busy until llama.cpp has really stopped

    async def count_tokens(self, texts: list[str]) -> list[int]:
        # llama_tokenize reads only the vocabulary: no lock, so counting never waits behind a generation.
        return [len(self.llm.tokenize(t.encode("utf-8"), add_bos=False, special=False)) for t in texts]

    def info(self) -> dict[str, Any]:
        return {"backend": self.name, "model_file": self.gguf, "params": {k: v for k, v in self.params.items()}}

    def close(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is not None:
            llm.close()
