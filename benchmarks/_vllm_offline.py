"""bench_vllm's baseline, run by the vLLM environment's interpreter (it has vLLM, not byzerllm_spark):
vLLM's offline ``LLM.chat`` (``LLM.generate`` with the model's chat template, as the server applies it) on
the prompts of a JSON spec read from stdin; prints one JSON line with the seconds of the generate call
alone (the engine's load is not timed), the answers and their completion tokens."""

from __future__ import annotations

import json
import sys
import time


def main() -> None:
    spec = json.load(sys.stdin)
    from vllm import LLM, SamplingParams

    llm = LLM(model=spec["model"], **spec["engine_args"])
    params = SamplingParams(**spec["sampling"])
    conversations = [[{"role": "user", "content": p}] for p in spec["prompts"]]
    llm.chat(conversations[:2], params, use_tqdm=False)  # warm, as the deployment is before its timing
    start = time.perf_counter()
    outputs = llm.chat(conversations, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    answers = [o.outputs[0].text for o in outputs]
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    print("RESULT " + json.dumps({"seconds": seconds, "answers": answers, "completion_tokens": tokens}), flush=True)


if __name__ == "__main__":
    main()
