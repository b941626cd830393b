"""Asking deployed models from Python: ``bls.chat``, ``bls.chat_batch``, ``bls.stream_chat``, ``bls.embed``.

They send the same Arrow request as Spark and the JVM (:mod:`..transport` does the HTTP), so a model
answers a notebook cell exactly as it answers a SQL query.
"""

from __future__ import annotations

import json
from typing import Any, Iterable, Iterator, Sequence

from .. import transport
from ..errors import RequestError
from ..protocol import arrow
from ..protocol.request import build_params
from ..transport import DEFAULT_TIMEOUT


def _endpoint(endpoint: str | None) -> str:
    if endpoint is not None:
        return endpoint
    from ..cluster import endpoint as cluster_endpoint

    return cluster_endpoint()


def request_batch(endpoint: str, model: str, params: Sequence[Any], **kwargs: Any):
    """Send request dicts (or JSON strings, or None) and return the result table."""
    encoded = [None if p is None else (p if isinstance(p, str) else json.dumps(p, ensure_ascii=False)) for p in params]
    return arrow.decode_results(transport.post_arrow(endpoint, model, arrow.encode_params(encoded), **kwargs))


def chat(model: str, instruction: str | None = None, *, endpoint: str | None = None,
         retry_seconds: float | None = None, **params: Any) -> str:
    """Ask a deployed model one question and return the answer text.

    Args:
        model: the deployed model's name.
        instruction: the user's question (or pass ``messages=[...]`` OpenAI-style instead).
        endpoint: base URL; default ``bls.endpoint()``.
        retry_seconds: how long to keep retrying connection errors and 5xx (a Serve proxy or worker
            that restarts); default ``$BYZERLLM_RETRY_SECONDS``, else 60.
        **params: the ``llm_param`` keys: ``temperature``, ``max_length``, ``top_p``,
            ``system_msg``, ``history``, ``user_role``, ``assistant_role``, ``messages``,
            ``response_format`` (OpenAI's shape, a dict or JSON text: ``{"type": "json_object"}`` or
            ``{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}}}``; the answer is then
            JSON text matching it), ``adapter`` (a LoRA adapter of the deployment, see
            ``deploy(lora_adapters=...)``; none: the base model), and ``generation_<name>`` (or
            ``**{"generation.<name>": v}``) for model-specific values.

    Raises:
        ModelNotFoundError: the model is not deployed (lists the deployed ones).
        RequestError: the model answered with an error (the message says why), a malformed
            ``response_format``, or an answer that does not match it.

    Example:
        >>> bls.chat("chat", "What is the capital of France?", temperature=0, max_length=32)  # doctest: +SKIP
        'The capital of France is Paris.'
        >>> bls.chat("chat", "Sentiment of 'I love it'", response_format={"type": "json_schema",
        ...          "json_schema": {"name": "label", "schema": {"enum": ["positive", "negative"]}}})  # doctest: +SKIP
        '"positive"'
    """
    (result,) = chat_batch(model, [build_params(instruction, **params)], endpoint=endpoint, raise_on_error=True,
                           retry_seconds=retry_seconds)
    return result


def stream_chat(
    model: str,
    instruction: str | None = None,
    *,
    endpoint: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    retry_seconds: float | None = None,
    **params: Any,
) -> Iterator[str]:
    """Ask a deployed model one question; yield the answer's text pieces as they come.

    Takes the arguments of :func:`chat` (``retry_seconds`` applies until the answer starts). Backends
    that stream (SaaS vendors, llama.cpp, plugins returning a generator) yield many pieces; the others one.

    Raises:
        ModelNotFoundError: the model is not deployed (lists the deployed ones).
        RequestError: the request was refused or the model failed (also midway through).

    Example:
        >>> for piece in bls.stream_chat("chat", "Tell me a story", max_length=64):  # doctest: +SKIP
        ...     print(piece, end="", flush=True)
    """
    endpoint = _endpoint(endpoint)
    body = json.dumps(build_params(instruction, **params), ensure_ascii=False).encode("utf-8")
    for item in transport.stream(endpoint, model, body, timeout=timeout, retry_seconds=retry_seconds):
        if "text" in item:
            yield item["text"]
        elif "error" in item:
            raise RequestError(f"model {model!r} failed while answering: {item['error']}")
        elif "metadata" in item:
            return


def chat_batch(
    model: str,
    requests_: Iterable[Any],
    *,
    endpoint: str | None = None,
    raise_on_error: bool | None = None,
    with_metadata: bool = False,
    batch_size: int = 1000,
    progress: bool | None = None,
    retry_seconds: float | None = None,
) -> list:
    """Send many requests at once, answered in order.

    Args:
        requests_: strings (instructions) or dicts of ``llm_param`` keys.
        raise_on_error: raise :class:`RequestError` on the first failed row. Default: True for texts
            (a failed row never turns into a silent None), False with ``with_metadata=True``
            (each row's ``error`` says why). ``False`` with texts returns None for a failed row.
        with_metadata: return dicts ``{"response", "error", "metadata"}`` instead of texts.
        batch_size: rows per request.
        progress: a progress bar of rows answered. Default: on a terminal, once a call has taken 2 s.
        retry_seconds: as in :func:`chat`.

    Returns:
        One entry per request: the answer text (None for a failed row unless raise_on_error),
        or the dict form with ``with_metadata=True``.
    """
    endpoint = _endpoint(endpoint)
    if raise_on_error is None:
        raise_on_error = not with_metadata
    items = [build_params(r) if isinstance(r, str) else r for r in requests_]
    out: list = []
    with _progress_bar(len(items), f"chat_batch {model}", progress) as bar:
        for start in range(0, len(items), batch_size):
            table = request_batch(endpoint, model, items[start : start + batch_size], retry_seconds=retry_seconds)
            responses = table.column("response").to_pylist()
            errors = table.column("error").to_pylist()
            metadata = table.column("metadata").to_pylist()
            for response, error, meta in zip(responses, errors, metadata):
                if error and raise_on_error:
                    raise RequestError(f"model {model!r} could not answer: {error}")
                if with_metadata:
                    out.append({"response": response, "error": error, "metadata": dict(meta or [])})
                else:
                    out.append(response)
            bar.update(len(responses))
    return out


def _progress_bar(total: int, desc: str, progress: bool | None):
    """A tqdm bar of rows: forced on or off by ``progress``; by default (None) shown only on a terminal
    and only after 2 s, so short calls and logs stay clean."""
    from tqdm.auto import tqdm

    from ..settings import progress_disable

    auto = progress is None
    return tqdm(total=total, desc=desc, unit="row", leave=False, disable=progress_disable() if auto else not progress,
                delay=2.0 if auto else 0)


def embed(model: str, texts: Sequence[str], *, endpoint: str | None = None,
          retry_seconds: float | None = None) -> list[list[float]]:
    """Embeddings of ``texts`` from a model deployed with an embedding backend (``retry_seconds`` as in
    :func:`chat`)."""
    endpoint = _endpoint(endpoint)
    body = transport.post_arrow(endpoint, model, arrow.encode_params(list(texts)), route="embed",
                                retry_seconds=retry_seconds)
    table = arrow.decode_results(body)
    errors = [e for e in table.column("error").to_pylist() if e]
    if errors:
        raise RequestError(f"model {model!r} could not embed: {errors[0]}")
    return table.column("embedding").to_pylist()
