"""bench_vllm's baseline, run by the vLLM environment's interpreter (it has vLLM, not byzerllm_spark):
vLLM's offline ``LLM.chat`` (``LLM.generate`` with the model's chat template, as the server applies it) on
the prompts of a JSON spec read from stdin; prints one JSON line with the seconds of the generate call
alone (the engine's load is not timed), the CPU seconds this process and its engine processes spent in it,
the answers and their completion tokens. With ``row_adapters`` in the spec (a LoRA adapter directory or null
per prompt; the engine arguments then turn LoRA on), each prompt is answered through its adapter (bench_lora)."""

from __future__ import annotations

import json
import sys
import time


def _cpu() -> dict[str, float]:
    """CPU seconds (user + system) so far: this process (the LLM front end) and its children (the engine core)."""
    import psutil

    me = psutil.Process()
    out = {"vLLM offline front end (LLM.chat)": sum(me.cpu_times()[:2])}
    for child in me.children(recursive=True):
        try:
            name = " ".join(child.cmdline()) + child.name()
            part = ("vLLM engine core (scheduler)" if "EngineCore" in name else
                    "vLLM model worker (forward passes)" if "VLLM" in name else "other")
            out[part] = out.get(part, 0.0) + sum(child.cpu_times()[:2])
        except psutil.Error:
            pass
    return out


def main() -> None:
    spec = json.load(sys.stdin)
    from vllm import LLM, SamplingParams

    llm = LLM(model=spec["model"], **spec["engine_args"])
    params = SamplingParams(**spec["sampling"])
    conversations = [[{"role": "user", "content": p}] for p in spec["prompts"]]
    lora = None
    if spec.get("row_adapters"):
        from vllm.lora.request import LoRARequest

        ids = {path: i + 1 for i, path in enumerate(sorted({p for p in spec["row_adapters"] if p}))}
        lora = [LoRARequest(f"adapter{ids[p]}", ids[p], p) if p else None for p in spec["row_adapters"]]
    llm.chat(conversations[:2], params, use_tqdm=False, lora_request=lora[:2] if lora else None)  # warm
    cpu_before = _cpu()
    start = time.perf_counter()
    outputs = llm.chat(conversations, params, use_tqdm=False, lora_request=lora)
    seconds = time.perf_counter() - start
    cpu = {part: round(seconds_ - cpu_before.get(part, 0.0), 2) for part, seconds_ in _cpu().items()}
    answers = [o.outputs[0].text for o in outputs]
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    print("RESULT " + json.dumps({"seconds": seconds, "answers": answers, "completion_tokens": tokens,
                                  "cpu_seconds": cpu}), flush=True)


if __name__ == "__main__":
    main()
