"""DataFrame API of the Spark functions: ``from byzerllm_spark.functions import llm_param, llm_classify, ...``."""

from .sql.functions import (
    llm_param,
    llm_prompt,
    llm_result,
    model_function,
    register_functions,
    register_model_function,
)
from .sql.tasks import (
    llm_classify,
    llm_count_tokens,
    llm_embed,
    llm_extract,
    llm_filter,
    llm_summarize,
    llm_translate,
    register_extract_function,
    register_task_functions,
)

__all__ = sorted(
    ["llm_classify", "llm_count_tokens", "llm_embed", "llm_extract", "llm_filter", "llm_param", "llm_prompt",
     "llm_result", "llm_summarize", "llm_translate", "model_function", "register_extract_function",
     "register_functions", "register_model_function", "register_task_functions"]
)
