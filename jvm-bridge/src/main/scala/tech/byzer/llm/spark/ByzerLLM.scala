package tech.byzer.llm.spark

import org.apache.spark.sql.{Column, DataFrame}
import org.apache.spark.sql.functions.{call_function, lit}

/** The DataFrame API of the bridge, for Scala and Java jobs:
 *  {{{
 *  val spark = SparkSession.builder().config("spark.sql.extensions", "tech.byzer.llm.spark.ByzerLLMExtensions")
 *    .config("spark.byzerllm.endpoint", "http://127.0.0.1:8000").getOrCreate()
 *  df.select(ByzerLLM.chat(df, "chat", col("q")).as("a"))
 *  }}}
 *  Each returns a column; the calls run batched, as from SQL. */
object ByzerLLM {
  private def check(df: DataFrame): Unit =
    if (!df.sparkSession.catalog.functionExists("llm_call")) throw new IllegalStateException(
      "the session has no byzerllm functions: start it with " +
        "spark.sql.extensions=tech.byzer.llm.spark.ByzerLLMExtensions (and spark.byzerllm.endpoint)")

  /** `llm_param`: keys and columns (or values) to the request JSON. */
  def llmParam(params: (String, Any)*): Column =
    call_function("llm_param", org.apache.spark.sql.functions.map(params.flatMap { case (k, v) =>
      Seq(lit(k), (v match { case c: Column => c; case other => lit(String.valueOf(other)) }).cast("string"))
    }: _*))

  /** Ask `model` the question in column `q` (text); the answer text. */
  def chat(df: DataFrame, model: String, q: Column): Column = call(df, model, llmParam("instruction" -> q))

  /** Call `model` on the request column `params` (`llmParam(...)`); with `failOnError = false` the result
   *  is `struct<response, error, metadata>`. */
  def call(df: DataFrame, model: String, params: Column, failOnError: Boolean = true): Column = {
    check(df)
    call_function("llm_call", lit(model), params, lit(failOnError))
  }

  /** The answer text from either form of result. */
  def llmResult(result: Column): Column = call_function("llm_result", result)
}
