"""The ``byzerllm`` command, with the flags of Byzer-LLM's ``byzerllm`` tool (its deployment guide).

    byzerllm start                                   # a local Ray + Serve that outlives the command
    byzerllm deploy --pretrained_model_type custom/auto --infer_backend llama_cpp \\
        --cpus_per_worker 0.5 --gpus_per_worker 0 --num_workers 2 \\
        --infer_params n_ctx=2048 --model chat
    byzerllm query --model chat --query "What is the capital of France?"
    byzerllm stat --model chat
    byzerllm deploy --model base --lora_adapters facts=/jobs/a/adapter,tone=/jobs/b/adapter
    byzerllm add_adapter --model base --name more --path /jobs/c/adapter
    byzerllm undeploy --model chat
    byzerllm stop
    byzerllm submit examples/spark_submit_job.py     # spark-submit from this environment
    byzerllm run deploy.byzer                        # a Byzer-LLM script, statements as written

Every command but ``start``, ``stop``, ``submit`` and ``run`` joins the local cluster ``byzerllm start``
started (or one embedded in another Python process on this machine), or ``--ray_address``.
Errors are one line on stderr and exit code 1; ``--debug`` (or ``BYZERLLM_LOG_LEVEL=DEBUG``) adds
the traceback and Ray's logs.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from typing import Any, Callable

from . import __version__
from .errors import ByzerLLMError, ClusterError, ConfigError
from .settings import LOG_LEVEL_ENV, log_level

#: Longest error line printed without --debug (Ray's messages can carry whole remote tracebacks).
MAX_ERROR_CHARS = 600


class _Parser(argparse.ArgumentParser):
    """argparse with the one-line error of every other failure of the command."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"byzerllm: error: {message} (see `{self.prog} --help`)\n")


def _params(pairs: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--infer_params takes KEY=VALUE pairs, got {pair!r} (e.g. saas.model=qwen-max)")
        out[key] = value.strip('"').strip("'")
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="byzerllm",
        description="Deploy LLMs into Ray Serve and call them: Byzer-LLM's `byzerllm` command for PySpark.",
        epilog="Run `byzerllm <command> --help` for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"byzerllm {__version__} (byzerllm-spark)")
    debug = {"action": "store_true", "help": "print tracebacks and Ray's logs (also: BYZERLLM_LOG_LEVEL=DEBUG)"}
    parser.add_argument("--debug", **debug)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", help="one of:")
    # On each command too (`byzerllm deploy ... --debug`); SUPPRESS keeps it from resetting the global one.
    debug["default"] = argparse.SUPPRESS

    def command(name: str, help_text: str, *, model: bool = True, aliases: tuple[str, ...] = ()) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text, aliases=list(aliases))
        p.set_defaults(command=name)
        p.add_argument("--debug", **debug)
        p.add_argument(
            "--ray_address", default=None, metavar="ADDRESS",
            help="Ray cluster to use: HOST:PORT, ray://HOST:10001 or auto (default: the local cluster that "
                 "`byzerllm start` started, or one embedded in another Python process on this machine)",
        )
        if model:
            p.add_argument("--model", required=True, metavar="NAME", help="name of the deployed model (its unique instance name)")
        return p

    start = sub.add_parser(
        "start", help="start a local Ray + Serve (127.0.0.1) that outlives this command",
        description="Start a local Ray head and Ray Serve on 127.0.0.1 that keep running after this command, "
                    "so `byzerllm deploy`, `byzerllm query`, bls.chat(...) and Spark jobs on this machine share "
                    "the deployed models. Stop it with `byzerllm stop`.",
    )
    start.add_argument("--debug", **debug)
    start.add_argument("--num_cpus", type=int, default=None, metavar="N", help="CPUs the cluster offers (default: all of this machine's)")
    start.add_argument("--num_gpus", type=int, default=None, metavar="N", help="GPUs the cluster offers (default: all detected)")
    start.add_argument("--http_port", type=int, default=None, metavar="PORT",
                       help="port of Serve's HTTP endpoint on 127.0.0.1; 0: any free port (default: 8000, or a free port "
                            "when 8000 is taken)")
    start.add_argument("--no_dashboard", action="store_true",
                       help="do not start Ray's dashboard (faster; detached finetune jobs need it)")

    stop = sub.add_parser("stop", help="stop the local cluster that `byzerllm start` started, and only it",
                          description="Stop every process of the local cluster that `byzerllm start` started "
                                      "(its deployed models go with it). Nothing else is touched.")
    stop.add_argument("--debug", **debug)
    stop.add_argument("--timeout", type=float, default=60, metavar="SECONDS",
                      help="seconds to wait for a clean exit before killing what is left (default: 60)")

    deploy = command("deploy", "deploy a model: one Ray Serve application with --num_workers workers")
    deploy.add_argument("--pretrained_model_type", default="custom/auto", metavar="TYPE",
                        help="custom/auto (built-in engines), custom/<plugin> (e.g. custom/echo), a plugin's module "
                             "path, or saas/<vendor> (saas/openai for any OpenAI-compatible API) (default: custom/auto)")
    deploy.add_argument("--infer_backend", default=None, metavar="BACKEND",
                        help="engine for custom/auto: transformers, llama_cpp, vllm or embedding (default: transformers)")
    deploy.add_argument("--model_path", default=None, metavar="PATH",
                        help="model directory or .gguf file for custom/* types (default: the embedded SmolLM2-135M-Instruct)")
    deploy.add_argument("--model_table", default=None, metavar="TABLE", help="a Delta model table to load instead of --model_path")
    deploy.add_argument("--num_workers", type=int, default=1, metavar="N", help="workers (Serve replicas) of this model (default: 1)")
    deploy.add_argument("--min_workers", type=int, default=None, metavar="N",
                        help="autoscaling: the fewest workers, 0 scales to zero when idle (default: 1 with --max_workers)")
    deploy.add_argument("--max_workers", type=int, default=None, metavar="N",
                        help="autoscaling: the most workers, instead of a fixed --num_workers (default: no autoscaling)")
    deploy.add_argument("--cpus_per_worker", type=float, default=None, metavar="CPUS",
                        help="CPUs per worker, fractions allowed (default: 1, or 0.001 for saas/*)")
    deploy.add_argument("--gpus_per_worker", type=float, default=0, metavar="GPUS", help="GPUs per worker, fractions allowed (default: 0)")
    deploy.add_argument("--worker_concurrency", type=int, default=None, metavar="N",
                        help="requests one worker takes at once (default: 1, or 64 for --infer_backend vllm)")
    deploy.add_argument("--load_balance", default="lru", choices=("lru", "round_robin"),
                        help="how requests are spread over workers (default: lru)")
    deploy.add_argument("--infer_params", nargs="*", default=[], metavar="KEY=VALUE",
                        help="model parameters: saas.* (vendor), backend.* (engine), generation.* and plain keys, "
                             "e.g. saas.api_key=... saas.model=qwen-max")
    deploy.add_argument("--cache", default=None, metavar="CACHE",
                        help="response cache: true (answers of deterministic requests, on each worker's node), always "
                             "(every request), or a store URI such as redis://host:6379/0 (default: off)")
    deploy.add_argument("--lora_adapters", nargs="*", default=[], metavar="NAME=PATH",
                        help="LoRA adapters served over the base model, NAME=PATH pairs (space- or comma-separated): "
                             "PEFT adapter directories, e.g. facts=/jobs/a/adapter; a row picks one with its 'adapter' "
                             "key, an OpenAI client with model=MODEL:NAME (default: none)")
    deploy.add_argument("--max_loras", type=int, default=None, metavar="N",
                        help="the most LoRA adapters the model holds, with those added later (default: 8)")
    deploy.add_argument("--reconnect", action="store_true",
                        help="reuse a live deployment of the same name instead of failing")
    deploy.add_argument("--wait_ready_timeout", type=float, default=300, metavar="SECONDS",
                        help="seconds to wait for every worker to load (default: 300)")

    add_adapter = command("add_adapter", "add a LoRA adapter to a deployed model, without redeploying it")
    add_adapter.add_argument("--name", required=True, metavar="NAME", help="the adapter's name (rows pass it as 'adapter')")
    add_adapter.add_argument("--path", required=True, metavar="PATH", help="the PEFT adapter directory (or a model table)")
    command("undeploy", "remove a deployed model and its workers")
    command("stat", "the model's worker counters as JSON: total/busy/idle workers, requests, free slots...")
    command("workers", "per-worker details of a deployed model as JSON")
    command("list", "the deployed models as a JSON list", model=False)
    query = command("query", "ask a deployed model one question and print the answer", aliases=("chat",))
    query.add_argument("--query", required=True, metavar="TEXT", help="the question (the request's instruction)")
    query.add_argument("--system_msg", default=None, metavar="TEXT", help="a system message put before the question")
    query.add_argument("--temperature", type=float, default=None, help="sampling temperature; 0 is greedy")
    query.add_argument("--max_length", type=int, default=None, help="most new tokens of the answer")

    run = sub.add_parser(
        "run", help="run a Byzer-LLM script (!byzerllm setup, run command as LLM, load, save, set, select)",
        description="Run a Byzer-LLM script file as written: statements end with ';'. Ray is joined or started "
                    "(the script's rayAddress, else the local cluster of `byzerllm start`, else an embedded one that "
                    "ends with this command); Spark runs in local mode. Prints what each statement did and the rows "
                    "of the last select.",
    )
    run.add_argument("--debug", **debug)
    run.add_argument("script", metavar="FILE", help="the script file (- for standard input)")
    run.add_argument("--show", type=int, default=20, metavar="N", help="rows of the last select to print (default: 20)")

    submit = sub.add_parser(
        "submit", prefix_chars="+", add_help=False,  # every argument after `submit` is spark-submit's
        help="run spark-submit from this environment, activated or not",
        description="Run the spark-submit of the pyspark installed with byzerllm-spark, with SPARK_HOME set to "
                    "it and PYSPARK_PYTHON / PYSPARK_DRIVER_PYTHON set to this Python (unless already set). "
                    "Every argument is passed on; `byzerllm submit --help` shows spark-submit's options.",
    )
    submit.add_argument("spark_submit_args", nargs=argparse.REMAINDER,
                        help="spark-submit's options, the application and its arguments")
    return parser


def _connect(args: argparse.Namespace) -> Any:
    from . import cluster

    address = args.ray_address
    if address is None and cluster.find_local_cluster() is None:
        raise ClusterError(
            "no local cluster is running on this machine: start one with `byzerllm start`, "
            "or pass --ray_address HOST:PORT of a running Ray cluster"
        )
    if address not in (None, "auto") and "://" not in address:
        # Ray retries a dead address without end; say so at once.
        host, _, port = address.rpartition(":")
        try:
            socket.create_connection((host or "127.0.0.1", int(port)), timeout=5).close()
        except (OSError, ValueError):
            raise ClusterError(
                f"--ray_address={address!r} is not valid: no Ray answers there; pass the HOST:PORT that "
                "`ray start --head` printed, or leave it out to use the local cluster of `byzerllm start`"
            ) from None
    return cluster.init(ray_address=address)


def _start(args: argparse.Namespace) -> None:
    from . import cluster

    record, info = cluster.start_local_cluster(num_cpus=args.num_cpus, num_gpus=args.num_gpus,
                                               http_port=args.http_port, include_dashboard=not args.no_dashboard)
    print(f"started a local cluster: Ray at {record.ray_address}, models at {info.endpoint}/<model>")
    print(f"its log: {record.log}; stop it with `byzerllm stop`")


def _stop(args: argparse.Namespace) -> None:
    from . import cluster

    record = cluster.stop_local_cluster(timeout=args.timeout)
    print(f"stopped the local cluster at {record.ray_address}" if record
          else "no local cluster started by `byzerllm start` is running")


def _deploy(args: argparse.Namespace) -> None:
    from .api.deploy import deploy

    from .config import DEFAULT_MAX_LORAS, CacheSpec, parse_lora_adapters

    infer_params = _params(args.infer_params)  # a typo fails before the minutes of connecting
    cache = CacheSpec.parse(args.cache, "--cache")
    adapters = parse_lora_adapters(",".join(args.lora_adapters), "--lora_adapters")
    info = _connect(args)
    config = deploy(
        args.model, pretrained_model_type=args.pretrained_model_type, infer_backend=args.infer_backend,
        model_path=args.model_path, model_table=args.model_table, num_workers=args.num_workers,
        cpus_per_worker=args.cpus_per_worker, gpus_per_worker=args.gpus_per_worker,
        worker_concurrency=args.worker_concurrency, load_balance=args.load_balance,
        infer_params=infer_params, reconnect=args.reconnect,
        wait_ready_timeout=args.wait_ready_timeout, min_workers=args.min_workers, max_workers=args.max_workers,
        cache=cache, lora_adapters=adapters,
        max_loras=DEFAULT_MAX_LORAS if args.max_loras is None else args.max_loras,
    )
    workers = (f"{config.initial_workers} to {config.max_workers} workers, autoscaling" if config.autoscaling
               else f"{config.num_workers} workers")
    print(f"deployed {args.model!r} ({workers}) at {info.endpoint}/{args.model}/arrow"
          + (f", LoRA adapters: {', '.join(sorted(adapters))}" if adapters else ""))


def _add_adapter(args: argparse.Namespace) -> None:
    from .api.deploy import add_adapter

    _connect(args)
    names = add_adapter(args.model, args.name, args.path)
    print(f"added adapter {args.name!r} to {args.model!r}; its adapters: {', '.join(names)}")


def _undeploy(args: argparse.Namespace) -> None:
    from .api.deploy import undeploy

    _connect(args)
    undeploy(args.model)
    print(f"undeployed {args.model!r}")


def _stat(args: argparse.Namespace) -> None:
    from .api.deploy import stat

    _connect(args)
    print(json.dumps(stat(args.model), indent=4))


def _workers(args: argparse.Namespace) -> None:
    from .api.deploy import workers

    _connect(args)
    print(json.dumps(workers(args.model), indent=4))


def _list(args: argparse.Namespace) -> None:
    from .api.deploy import list_models

    _connect(args)
    print(json.dumps(list_models(), indent=4))


def _query(args: argparse.Namespace) -> None:
    from .api.chat import chat

    _connect(args)
    options = {"system_msg": args.system_msg, "temperature": args.temperature, "max_length": args.max_length}
    print(chat(args.model, args.query, **{k: v for k, v in options.items() if v is not None}))


def _submit(args: argparse.Namespace) -> int:
    import subprocess

    import pyspark

    if not args.spark_submit_args:
        raise ConfigError("submit needs the application to run, e.g. `byzerllm submit examples/spark_submit_job.py`")
    spark_home = os.path.dirname(os.path.abspath(pyspark.__file__))
    env = dict(os.environ, SPARK_HOME=spark_home)
    # Spark's Python workers otherwise run `python3` from PATH, which lacks this environment's packages.
    env.setdefault("PYSPARK_PYTHON", sys.executable)
    env.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    return subprocess.call([os.path.join(spark_home, "bin", "spark-submit"), *args.spark_submit_args], env=env)


def _run_script(args: argparse.Namespace) -> None:
    from . import cluster
    from .script import ScriptSession
    from .script.parser import Select

    if args.script == "-":
        text = sys.stdin.read()
    else:
        try:
            with open(args.script, encoding="utf-8") as f:
                text = f.read()
        except OSError as exc:
            raise ConfigError(f"cannot read the script {args.script!r}: {exc.strerror}") from None
    from .script.parser import parse

    parse(text)  # a script that does not parse fails before Ray and Spark start
    shared = cluster.find_local_cluster() is not None
    session = ScriptSession()
    result = session.run(text)
    for item in result:  # (warnings were logged as each statement ran)
        print(f"line {item.statement.line}: {item.summary}")
    selects = [r for r in result if isinstance(r.statement, Select)]
    last = result.last
    if selects and args.show > 0:
        selects[-1].value.show(args.show, truncate=100)
    elif last is not None and isinstance(last.value, str) and last.statement.kind == "statement":
        print(last.value)  # a --%chat script's answer
    embedded = "ray" in sys.modules and cluster.is_connected() and cluster.info().embedded
    if not shared and embedded and any(r.statement.kind == "run" for r in result):
        print("(the models ran in this command's own Ray and stop with it; `byzerllm start` keeps them running)",
              file=sys.stderr)


COMMANDS: dict[str, Callable[[argparse.Namespace], int | None]] = {
    "start": _start, "stop": _stop, "deploy": _deploy, "add_adapter": _add_adapter, "undeploy": _undeploy,
    "stat": _stat, "workers": _workers, "list": _list, "query": _query, "submit": _submit, "run": _run_script,
}


def _one_line(exc: BaseException) -> str:
    from .script import ScriptError, ScriptSyntaxError

    if isinstance(exc, (ScriptError, ScriptSyntaxError)):  # several lines: where in the script, what ran
        text = str(exc)
        return text if len(text) <= 4 * MAX_ERROR_CHARS else text[:4 * MAX_ERROR_CHARS] + "... (--debug: all of it)"
    text = " ".join(str(exc).split()) or "(no message)"
    if not isinstance(exc, ByzerLLMError):
        text = f"{type(exc).__name__}: {text}"
    if len(text) > MAX_ERROR_CHARS:
        text = text[:MAX_ERROR_CHARS] + "... (run with --debug for all of it)"
    return text


def main(argv: list[str] | None = None) -> int:
    """Run the ``byzerllm`` command; returns its exit code."""
    args = build_parser().parse_args(argv)
    if args.debug:
        os.environ[LOG_LEVEL_ENV] = "DEBUG"
    debug = log_level() == "DEBUG"
    try:
        if debug:
            from .config import redact

            shown = dict(vars(args), infer_params=redact(_params(getattr(args, "infer_params", []))))
            print(f"byzerllm {__version__}: {shown}", file=sys.stderr)
        return COMMANDS[args.command](args) or 0
    except KeyboardInterrupt:
        print("byzerllm: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if debug:
            import traceback

            traceback.print_exc()
        print(f"byzerllm: error: {_one_line(exc)}", file=sys.stderr)
        return 1
    finally:
        if args.command != "submit" and "ray" in sys.modules:
            from .cluster import shutdown

            try:
                shutdown()  # disconnects; the cluster and its models keep running
            except Exception:  # pragma: no cover - on the way out, after the command's own result
                pass


if __name__ == "__main__":
    sys.exit(main())
