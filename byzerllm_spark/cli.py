"""The ``byzerllm`` command (seed 002): deploy, undeploy, stat, list and chat against a running Ray.

    byzerllm deploy --pretrained_model_type custom/auto --infer_backend transformers \\
        --cpus_per_worker 0.5 --gpus_per_worker 0 --num_workers 2 \\
        --infer_params backend.max_batch_size=8 generation.temperature=0 --model chat
    byzerllm stat --model chat
    byzerllm chat --model chat --query "What is the capital of France?"
    byzerllm undeploy --model chat

Deployments outlive the command, so it joins an existing cluster (``--ray_address auto``; start
one with ``ray start --head``).
"""

from __future__ import annotations

import argparse
import json
import sys

from .config import redact


def _params(pairs: list[str] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--infer_params takes key=value pairs, got {pair!r} (e.g. saas.model=qwen-max)")
        out[key] = value.strip('"').strip("'")
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="byzerllm", description="Deploy and call LLMs on Ray Serve.")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--ray_address", default="auto", help="Ray cluster address (default: auto)")
        p.add_argument("--model", required=True, help="the deployment's name")

    deploy = sub.add_parser("deploy", help="deploy a model")
    common(deploy)
    deploy.add_argument("--pretrained_model_type", default="custom/auto")
    deploy.add_argument("--infer_backend", default=None)
    deploy.add_argument("--model_path", default=None)
    deploy.add_argument("--model_table", default=None)
    deploy.add_argument("--num_workers", type=int, default=1)
    deploy.add_argument("--cpus_per_worker", type=float, default=None)
    deploy.add_argument("--gpus_per_worker", type=float, default=0)
    deploy.add_argument("--worker_concurrency", type=int, default=1)
    deploy.add_argument("--load_balance", default="lru")
    deploy.add_argument("--infer_params", nargs="*", default=[], metavar="KEY=VALUE")
    deploy.add_argument("--reconnect", action="store_true")
    deploy.add_argument("--wait_ready_timeout", type=float, default=300)

    for name, help_text in (("undeploy", "remove a model"), ("stat", "worker counters (seed 002)"),
                            ("workers", "per-worker details")):
        common(sub.add_parser(name, help=help_text))
    chat = sub.add_parser("chat", help="ask a deployed model")
    common(chat)
    chat.add_argument("--query", required=True)
    chat.add_argument("--temperature", default=None)
    chat.add_argument("--max_length", default=None)
    ls = sub.add_parser("list", help="deployed models")
    ls.add_argument("--ray_address", default="auto")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import byzerllm_spark as bls

    shown = {k: v for k, v in vars(args).items() if k != "infer_params"}
    if getattr(args, "infer_params", None):
        shown["infer_params"] = redact(_params(args.infer_params))
    print("Command Line Arguments:\n" + "-" * 50)
    for key, value in shown.items():
        print(f"{key:<20}: {value}")
    print("-" * 50)
    bls.init(ray_address=args.ray_address)
    if args.command == "deploy":
        bls.deploy(
            args.model, pretrained_model_type=args.pretrained_model_type, infer_backend=args.infer_backend,
            model_path=args.model_path, model_table=args.model_table, num_workers=args.num_workers,
            cpus_per_worker=args.cpus_per_worker, gpus_per_worker=args.gpus_per_worker,
            worker_concurrency=args.worker_concurrency, load_balance=args.load_balance,
            infer_params=_params(args.infer_params), reconnect=args.reconnect,
            wait_ready_timeout=args.wait_ready_timeout,
        )
        print(f"deployed {args.model!r} at {bls.endpoint()}/{args.model}/arrow")
    elif args.command == "undeploy":
        bls.undeploy(args.model)
    elif args.command == "stat":
        print(json.dumps(bls.stat(args.model), indent=4))
    elif args.command == "workers":
        print(json.dumps(bls.workers(args.model), indent=4))
    elif args.command == "list":
        print(json.dumps(bls.list_models(), indent=4))
    elif args.command == "chat":
        params = {k: v for k, v in (("temperature", args.temperature), ("max_length", args.max_length)) if v}
        print(bls.chat(args.model, args.query, **params))
    return 0


if __name__ == "__main__":
    sys.exit(main())
