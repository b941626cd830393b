"""Quickstart: deploy the embedded SmolLM2-135M-Instruct into a local Ray Serve and ask it.

Run: .venv/bin/python examples/quickstart.py
"""

import json

import byzerllm_spark as bls

bls.init()  # embedded local Ray + Serve on 127.0.0.1
bls.deploy("chat", num_workers=2, cpus_per_worker=0.5)  # no model_path: the embedded SmolLM2
print(bls.chat("chat", "What is the capital of France?", temperature=0, max_length=32))
print(json.dumps(bls.stat("chat"), indent=2))
print(bls.list_models(), bls.exists("chat"))
bls.undeploy("chat")
bls.shutdown()
