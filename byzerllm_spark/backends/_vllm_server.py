"""Runs vLLM's OpenAI-compatible server for one worker of ``infer_backend='vllm'``: a script for the vLLM
environment's interpreter (``.venv-vllm/bin/python``), never imported by the package.

It imports only the standard library and vLLM, because that environment has neither byzerllm_spark nor
Ray (vLLM pins its own torch and transformers, which would break the main environment). Two modes:

``python _vllm_server.py --engine-args``
    prints vLLM's engine argument names (the fields of ``vllm.engine.arg_utils.AsyncEngineArgs``) as a
    JSON list: what ``deploy()`` checks ``backend.*`` keys against.

``python _vllm_server.py '<json spec>'``
    serves ``{"model": dir, "host": ..., "port": ..., "served_model_name": ..., "engine_args": {...}}``
    with vLLM's own server (``vllm.entrypoints.openai.api_server``): each engine argument becomes its
    command-line flag (``max_model_len`` -> ``--max-model-len 2048``; a bool becomes ``--name`` or
    ``--no-name`` as vLLM's own parser declares them), so vLLM parses and checks every value itself.

The server lives exactly as long as its worker: the worker starts this script in a new session
(process group) with a pipe on stdin and never writes to it. When the worker process ends, however it
ends (undeploy, a crash, SIGKILL), the kernel closes the pipe; the watchdog thread here reads end of file
and kills the whole process group, vLLM's engine-core and model-worker processes included. (Not
``prctl(PR_SET_PDEATHSIG)``: it fires when the *thread* that started the child exits, and Serve builds
replicas in threads that end.)
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import threading


def engine_arg_names() -> list[str]:
    from vllm.engine.arg_utils import AsyncEngineArgs

    return sorted(f.name for f in dataclasses.fields(AsyncEngineArgs) if not f.name.startswith("_"))


def _watch_parent() -> None:
    """Kill this process group once stdin (the worker's end of the pipe) is closed."""
    try:
        while sys.stdin.buffer.read(65536):
            pass
    except Exception:
        pass
    os.killpg(os.getpgrp(), signal.SIGKILL)


def _argv(spec: dict, parser) -> list[str]:
    options = parser._option_string_actions  # every flag vLLM's server parser declares
    argv = ["--model", spec["model"], "--host", spec["host"], "--port", str(spec["port"]),
            "--served-model-name", spec["served_model_name"]]
    argv += [str(a) for a in spec.get("server_args", [])]
    for name, value in spec.get("engine_args", {}).items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            negative = "--no-" + name.replace("_", "-")
            if value:
                argv.append(flag)
            elif negative in options:
                argv.append(negative)
            # else: a plain on-switch, off by default
        elif isinstance(value, (dict, list)):
            argv += [flag, json.dumps(value)]
        else:
            argv += [flag, str(value)]
    return argv


def serve(spec: dict) -> None:
    threading.Thread(target=_watch_parent, name="byzerllm-parent-watch", daemon=True).start()
    from vllm.entrypoints.launchers.api_server import entry
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = make_arg_parser(FlexibleArgumentParser(description="vLLM server of a Byzer-LLM worker"))
    sys.argv = [sys.argv[0]] + _argv(spec, parser)
    print("byzerllm-spark: vllm server argv:", " ".join(sys.argv[1:]), flush=True)
    entry.main()


if __name__ == "__main__":
    if sys.argv[1:] == ["--engine-args"]:
        print(json.dumps(engine_arg_names()))
    else:
        serve(json.loads(sys.argv[1]))
