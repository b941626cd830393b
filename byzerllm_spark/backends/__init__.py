"""Backends: one module per engine. Nothing heavy is imported here."""

from .base import Backend, ChatResult
from .registry import register_infer_backend

__all__ = ["Backend", "ChatResult", "register_infer_backend"]
