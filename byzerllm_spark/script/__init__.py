"""Byzer-LLM scripts: ``!byzerllm setup`` / ``run command as LLM`` statements run as written."""
