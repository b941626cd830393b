"""Task functions (``llm_classify``, ``llm_extract``, ``llm_summarize``, ``llm_translate``, ``llm_filter``,
``llm_count_tokens``, ``llm_embed``) in SQL and the DataFrame API, on SmolLM2 (llama.cpp) and all-MiniLM-L6-v2.

What is checked is the contract, not the model's judgement: types, labels from the list, summaries within
``max_words``, booleans that work in ``WHERE``, counts equal to the tokenizer's, fixed-length vectors, nulls and
order, and the errors for bad arguments and for the wrong kind of model. Row counts are small (CI's budget).
"""

from __future__ import annotations

import pytest

from byzerllm_spark.errors import ConfigError
from byzerllm_spark.sql.tasks import TASK_NAMES, TASKS, build_request, cut_words, kind_error

LABELS = ["positive", "negative", "neutral"]
TEXTS = ["I love this phone, the battery lasts two days.", None, "The meeting is on Tuesday at 10 in Paris."]


# ---- requests and checks (no cluster) ------------------------------------------------------------------------
def test_requests_constrain_the_answer_and_bad_arguments_name_the_fix():
    classify = build_request("llm_classify", "t", ["a", "b", "a"], {})
    assert classify["response_format"]["json_schema"]["schema"] == {"enum": ["a", "b"]}  # duplicates dropped
    assert classify["temperature"] == 0.0 and classify["max_length"] == 5
    extract = build_request("llm_extract", "t", ["city", "year"], {"max_length": 40})
    assert extract["response_format"]["json_schema"]["schema"]["required"] == ["city", "year"]
    assert extract["max_length"] == 40  # the caller's max_length wins
    assert build_request("llm_filter", "t", "c", {})["response_format"]["json_schema"]["schema"] == {"type": "boolean"}
    assert build_request("llm_summarize", "t", 10, {})["max_length"] == 36
    assert "into French" in build_request("llm_translate", "t", "French", {})["system_msg"]
    for task, arg, words in [("llm_classify", [], "llm_classify labels=[]"),
                             ("llm_classify", ["a", None], "every label is a non-empty string"),
                             ("llm_extract", ["a", "a"], "llm_extract fields=['a', 'a']"),
                             ("llm_summarize", 0, "llm_summarize max_words=0"),
                             ("llm_summarize", 2.5, "whole number"),
                             ("llm_translate", " ", "llm_translate to_lang=' '"),
                             ("llm_filter", "", "llm_filter condition=''")]:
        with pytest.raises(ConfigError, match="is not valid") as err:
            build_request(task, "t", arg, {})
        assert words in str(err.value)
    assert cut_words("a  b\nc d e", 3) == "a  b\nc" and cut_words("a b", 5) == "a b"


def test_wrong_model_kind_names_the_model_and_what_to_use():
    chat_info, embed_info = {"backend": "llama_cpp", "embedding": False}, {"backend": "embedding", "embedding": True}
    why = kind_error(TASKS["llm_classify"], "minilm", embed_info)
    assert "llm_classify cannot use model 'minilm'" in why and "embedding model" in why and "llm_embed" in why
    why = kind_error(TASKS["llm_embed"], "smol", chat_info)
    assert "llm_embed cannot use model 'smol'" in why and "infer_backend='embedding'" in why
    assert kind_error(TASKS["llm_count_tokens"], "smol", chat_info) is None
    assert kind_error(TASKS["llm_count_tokens"], "minilm", embed_info) is None


# ---- SmolLM2 and MiniLM ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def models(cluster):
    import byzerllm_spark as bls

    bls.deploy("task_smol", infer_backend="llama_cpp", cpus_per_worker=0.9)
    bls.deploy("task_minilm", infer_backend="embedding", cpus_per_worker=0.5)
    yield {"chat": "task_smol", "embedding": "task_minilm"}
    for name in ("task_smol", "task_minilm"):
        bls.undeploy(name)


@pytest.fixture(scope="module")
def texts(spark, models):
    import byzerllm_spark as bls

    bls.register_functions(spark)
    df = spark.createDataFrame([(i, t) for i, t in enumerate(TEXTS)], "id int, txt string")
    df.createOrReplaceTempView("task_texts")
    return df


def test_sql_task_functions_types_and_validity(spark, texts):
    import byzerllm_spark as bls

    with bls.track(spark) as cost:
        rows = spark.sql("""
            SELECT id, txt,
                   llm_classify('task_smol', txt, array('positive', 'negative', 'neutral')) AS label,
                   llm_summarize('task_smol', txt, 6) AS summary,
                   llm_filter('task_smol', txt, 'the text mentions a city') AS city,
                   llm_count_tokens('task_smol', txt) AS tokens,
                   llm_extract('task_smol', txt, array('place')) AS facts
            FROM task_texts""").collect()  # no ORDER BY: Spark's range sampling would run every function twice
    assert [r.id for r in rows] == [0, 1, 2]  # input order kept
    answered = [r for r in rows if r.txt is not None]
    assert all(r.label in LABELS for r in answered), rows
    assert all(isinstance(r.summary, str) and r.summary.strip() and len(r.summary.split()) <= 6 for r in answered), rows
    assert all(isinstance(r.city, bool) for r in answered), rows
    assert all(set(r.facts) == {"place"} and all(isinstance(v, str) for v in r.facts.values())
               for r in answered), rows
    # what the query cost, per model: 5 functions x 2 rows sent (nulls are never sent), tokens generated
    assert cost.by_model["task_smol"].rows == 10 and cost.by_model["task_smol"].completion_tokens > 0
    null = rows[1]
    assert (null.label, null.summary, null.city, null.tokens, null.facts) == (None,) * 5  # null in, null out

    # the count is the model's own tokenizer's: the same GGUF vocabulary, loaded here
    from llama_cpp import Llama

    from byzerllm_spark.backends._model_files import default_model_dir, find_gguf

    vocab = Llama(model_path=find_gguf(default_model_dir()), vocab_only=True, verbose=False)
    assert [r.tokens for r in answered] == [len(vocab.tokenize(r.txt.encode(), add_bos=False, special=False))
                                            for r in answered]

    # llm_filter in WHERE: the rows kept are those whose verdict is true
    kept = {r.id for r in spark.sql("SELECT id FROM task_texts WHERE llm_filter('task_smol', txt, "
                                    "'the text mentions a city')").collect()}
    assert kept == {r.id for r in answered if r.city}
    types = spark.sql("SELECT llm_classify('task_smol', txt, array('a')) AS c, llm_filter('task_smol', txt, 'x') AS f, "
                      "llm_count_tokens('task_smol', txt) AS n, llm_extract('task_smol', txt, array('a')) AS e, "
                      "llm_embed('task_minilm', txt) AS v FROM task_texts").schema
    assert [f.dataType.simpleString() for f in types] == ["string", "boolean", "int", "map<string,string>",
                                                          "array<float>"]


def test_dataframe_forms_extract_translate_embed_count(spark, texts):
    from pyspark.sql import functions as F

    from byzerllm_spark.functions import llm_count_tokens, llm_embed, llm_extract, llm_translate

    df = texts.select(
        "id",
        llm_extract("task_smol", F.col("txt"), ["place"]).alias("fields"),
        llm_translate("task_smol", "txt", "French", max_length=24).alias("fr"),
        llm_embed("task_minilm", "txt").alias("vec"),
        llm_count_tokens("task_minilm", "txt").alias("n"),
    )
    assert df.schema["fields"].dataType.simpleString() == "struct<place:string>"
    rows = df.collect()
    assert [r.id for r in rows] == [0, 1, 2]
    for r in rows:
        if r.id == 1:
            assert (r.fields, r.fr, r.vec, r.n) == (None,) * 4
            continue
        assert isinstance(r.fields.place, str) and len(r.fields.place) <= 60
        assert isinstance(r.fr, str) and r.fr.strip()
        assert len(r.vec) == 384 and all(isinstance(x, float) for x in r.vec)
        assert isinstance(r.n, int) and r.n > 3


def test_per_row_errors_and_typed_sql_extraction(spark, texts):
    from pyspark.sql import functions as F

    import byzerllm_spark as bls

    from byzerllm_spark.functions import llm_classify

    labels = spark.createDataFrame([("good", ["positive", "negative"]), ("bad", []), ("none", None)],
                                   "txt string, labels array<string>")
    rows = labels.select(llm_classify("task_smol", "txt", F.col("labels"), fail_on_error=False).alias("r")).collect()
    good, bad, none = (row.r for row in rows)
    assert good.error is None and good.value in ("positive", "negative") and good.response.strip('"') == good.value
    assert bad.value is None and "llm_classify labels=[] is not valid" in bad.error
    assert none is None
    with pytest.raises(Exception, match="llm_classify labels=\\[\\] is not valid"):  # fail_on_error=True
        labels.select(llm_classify("task_smol", "txt", F.col("labels"))).collect()
    with pytest.raises(ConfigError, match="llm_classify labels='labels' is not valid: pass a list of labels"):
        llm_classify("task_smol", "txt", "labels")

    # in SQL: registered again with fail_on_error=False, every task function returns the struct
    assert bls.register_task_functions(spark, fail_on_error=False) == list(TASK_NAMES)
    try:
        kinds = spark.sql("SELECT llm_filter('task_smol', txt, 'x') AS f, llm_embed('task_minilm', txt) AS v "
                          "FROM task_texts").schema
        assert [f.dataType.simpleString() for f in kinds] == [
            "struct<response:string,error:string,metadata:map<string,string>,value:boolean>",
            "struct<response:string,error:string,metadata:map<string,string>,value:array<float>>"]
    finally:
        bls.register_task_functions(spark)

    bls.register_extract_function(spark, "task_extract_day", "struct<day:string, hour:int>")
    row = spark.sql("SELECT task_extract_day('task_smol', txt) AS r FROM task_texts WHERE id = 2").first()
    assert isinstance(row.r.day, str) and len(row.r.day) <= 60 and isinstance(row.r.hour, int)
    with pytest.raises(ConfigError, match="return_type='string' is not valid: llm_extract returns a struct"):
        bls.register_extract_function(spark, "task_bad", "string")


def test_wrong_model_kind_is_a_clear_error(spark, texts):
    from byzerllm_spark.functions import llm_classify, llm_embed

    with pytest.raises(ConfigError, match="llm_classify cannot use model 'task_minilm': it is an embedding model"):
        llm_classify("task_minilm", "txt", LABELS)
    with pytest.raises(ConfigError, match="llm_embed cannot use model 'task_smol': it is a chat model"):
        llm_embed("task_smol", "txt")
    # in SQL the model is a value, checked on the executors
    with pytest.raises(Exception, match="llm_embed cannot use model 'task_smol'.*infer_backend='embedding'"):
        spark.sql("SELECT llm_embed('task_smol', txt) FROM task_texts").collect()
    with pytest.raises(Exception, match="llm_summarize cannot use model 'task_minilm'.*llm_embed"):
        spark.sql("SELECT llm_summarize('task_minilm', txt, 5) FROM task_texts").collect()


def test_a_model_without_a_tokenizer_says_so():
    """The echo plugin has no tokenizer: its count says so, naming what to add (the worker's tokenize route puts
    this message on each row, prefixed with the model's name)."""
    import asyncio

    from byzerllm_spark.backends import echo
    from byzerllm_spark.backends.plugin import PluginBackend
    from byzerllm_spark.config import DeployConfig

    backend = PluginBackend(DeployConfig(model="m", pretrained_model_type="custom/echo", cpus_per_worker=0.001),
                            None, echo)
    with pytest.raises(NotImplementedError, match="has no tokenizer to count with.*count_tokens"):
        asyncio.run(backend.count_tokens(["hello"]))


def test_saas_counts_with_tiktoken_or_says_why():
    """A saas model counts with tiktoken where it knows the model and can load its encoding (downloaded on first
    use: offline, as here, the error says so and names TIKTOKEN_CACHE_DIR)."""
    import asyncio

    import tiktoken

    from byzerllm_spark.backends.saas import SaasBackend
    from byzerllm_spark.config import DeployConfig, InferParams

    def backend(model: str) -> SaasBackend:
        params = InferParams.parse({"saas.base_url": "http://127.0.0.1:9/v1", "saas.model": model})
        return SaasBackend(DeployConfig(model="m", pretrained_model_type="saas/openai", cpus_per_worker=0.001,
                                        infer_params=params), None)

    try:
        expected = [len(tiktoken.encoding_for_model("gpt-4o-mini").encode("hello world"))]
    except Exception:
        expected = None
    if expected is None:
        with pytest.raises(NotImplementedError, match="tiktoken cannot load encoding 'o200k_base' of saas/openai "
                                                      "model 'gpt-4o-mini'.*TIKTOKEN_CACHE_DIR"):
            asyncio.run(backend("gpt-4o-mini").count_tokens(["hello world"]))
    else:
        assert asyncio.run(backend("gpt-4o-mini").count_tokens(["hello world"])) == expected
    with pytest.raises(NotImplementedError, match="tiktoken does not know the tokenizer of saas/openai model 'my-llm'"):
        asyncio.run(backend("my-llm").count_tokens(["hello world"]))
