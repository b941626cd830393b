"""A small OpenAI-compatible HTTP server for tests and benchmarks (aiohttp, in a thread or a process).

Answers ``POST /v1/chat/completions`` (plain and ``stream=true``) with ``"re: <last user message>"``
and word-count usage, ``POST /v1/embeddings`` with 4-dimensional vectors, ``GET /v1/models``.
The ``model`` of a request picks a behaviour, so one server serves every test:

- ``flaky-<n>``: the first ``n`` requests for this model get 429 with ``Retry-After: 0.2``
- ``busy-<n>``: the first ``n`` requests get 503 (no Retry-After: exponential backoff)
- ``down``: always 503
- ``leaky``: 401 whose body quotes the request's Authorization header (as some vendors do)
- ``quota-<n>``: the first ``n`` requests answered, then 429 (``Retry-After: 0.2``) until a test sets
  ``state["quota_open"] = True`` (a vendor's quota that runs out mid-job, then is raised)
- anything else: answered after ``latency_ms``.

Run as a script for benchmarks: ``python tests/_fake_openai.py --port 0 --latency-ms 50`` prints
the port on its first line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
import time
from collections import Counter


def make_app(latency_ms: float = 0.0):
    from aiohttp import web

    # answered: (model, last user message) -> how many 200 answers it got
    state = {"counts": Counter(), "auth": [], "times": [], "bodies": [], "answered": Counter(),
             "answered_by_model": Counter(), "quota_open": False}

    async def chat(request):
        body = await request.json()
        model = str(body.get("model"))
        state["counts"][model] += 1
        state["auth"].append(request.headers.get("Authorization"))
        state["times"].append(time.monotonic())
        state["bodies"].append(body)
        n = state["counts"][model]
        if model.startswith("flaky-") and n <= int(model.split("-")[1]):
            return web.json_response({"error": {"message": "rate limited", "type": "rate_limit_error"}},
                                     status=429, headers={"Retry-After": "0.2"})
        if model.startswith("busy-") and n <= int(model.split("-")[1]) or model == "down":
            return web.json_response({"error": {"message": "overloaded"}}, status=503)
        if (model.startswith("quota-") and not state["quota_open"]
                and state["answered_by_model"][model] >= int(model.split("-")[1])):
            return web.json_response({"error": {"message": "quota exceeded", "type": "rate_limit_error"}},
                                     status=429, headers={"Retry-After": "0.2"})
        if model == "leaky":
            header = request.headers.get("Authorization", "")
            return web.json_response({"error": {"message": f"Incorrect API key provided: {header}"}}, status=401)
        if latency_ms:
            await asyncio.sleep(latency_ms / 1000)
        messages = body.get("messages") or []
        question = next((m["content"] for m in reversed(messages) if m.get("role") == "user"), "")
        answer = f"re: {question}"
        state["answered"][(model, question)] += 1
        state["answered_by_model"][model] += 1
        usage = {
            "prompt_tokens": sum(len(str(m.get("content", "")).split()) for m in messages),
            "completion_tokens": len(answer.split()),
        }
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        if body.get("stream"):
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            words = answer.split(" ")
            for i, word in enumerate(words):
                piece = word if i == 0 else " " + word
                chunk = {"id": "x", "object": "chat.completion.chunk", "model": model,
                         "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]}
                await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
                await asyncio.sleep(0.01)
            last = {"id": "x", "object": "chat.completion.chunk", "model": model,
                    "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
            await resp.write(f"data: {json.dumps(last)}\n\n".encode())
            if (body.get("stream_options") or {}).get("include_usage"):
                await resp.write(f"data: {json.dumps({'id': 'x', 'choices': [], 'usage': usage})}\n\n".encode())
            await resp.write(b"data: [DONE]\n\n")
            return resp
        return web.json_response({
            "id": "chatcmpl-fake", "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": "stop"}],
            "usage": usage,
        })

    async def embeddings(request):
        body = await request.json()
        texts = body["input"] if isinstance(body["input"], list) else [body["input"]]
        data = [{"object": "embedding", "index": i, "embedding": [float(len(t)), 1.0, 0.0, -1.0]}
                for i, t in enumerate(texts)]
        return web.json_response({"object": "list", "data": data, "model": body.get("model")})

    async def models(request):
        return web.json_response({"object": "list", "data": [{"id": "fake", "object": "model"}]})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_get("/v1/models", models)
    return app, state


class FakeOpenAIServer:
    """The server in a background thread: ``with FakeOpenAIServer() as s: s.base_url``."""

    def __init__(self, latency_ms: float = 0.0) -> None:
        self.app, self.state = make_app(latency_ms)
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        from aiohttp import web

        asyncio.set_event_loop(self._loop)
        runner = web.AppRunner(self.app, access_log=None)
        self._loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, "127.0.0.1", 0)
        self._loop.run_until_complete(site.start())
        self.port = site._server.sockets[0].getsockname()[1]
        self._runner = runner
        self._ready.set()
        self._loop.run_forever()
        self._loop.run_until_complete(runner.cleanup())

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def __enter__(self) -> "FakeOpenAIServer":
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


def main() -> None:
    from aiohttp import web

    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--latency-ms", type=float, default=50.0)
    args = parser.parse_args()
    app, _ = make_app(args.latency_ms)

    async def run() -> None:
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", args.port)
        await site.start()
        print(site._server.sockets[0].getsockname()[1], flush=True)
        await asyncio.Event().wait()

    asyncio.run(run())


if __name__ == "__main__":
    main()
