"""DataFrame API of the Spark functions: ``from byzerllm_spark.functions import llm_param, ...``."""

from .sql.functions import (
    llm_param,
    llm_prompt,
    llm_result,
    model_function,
    register_functions,
    register_model_function,
)

__all__ = sorted(
    ["llm_param", "llm_prompt", "llm_result", "model_function", "register_functions", "register_model_function"]
)
