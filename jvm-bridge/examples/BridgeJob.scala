// A Scala job that calls a deployed model through the bridge's DataFrame API (see README, "JVM").
//   spark-submit --jars jvm-bridge/target/byzerllm-spark-bridge.jar --class BridgeJob job.jar <endpoint> <model> <rows>
import org.apache.spark.sql.SparkSession
import org.apache.spark.sql.functions.col

import tech.byzer.llm.spark.ByzerLLM

object BridgeJob {
  def main(args: Array[String]): Unit = {
    val Array(endpoint, model, rows) = args
    val spark = SparkSession.builder()
      .config("spark.sql.extensions", "tech.byzer.llm.spark.ByzerLLMExtensions")
      .config("spark.byzerllm.endpoint", endpoint)
      .getOrCreate()
    val df = spark.range(rows.toLong).selectExpr("id", "concat('job-', id) AS q")
    val answered = df.select(col("id"), ByzerLLM.chat(df, model, col("q")).as("a"),
      ByzerLLM.call(df, model, ByzerLLM.llmParam("instruction" -> col("q")), failOnError = false).as("s"))
    val wrong = answered.where("a IS NULL OR a != concat('job-', id) OR s.response != a OR s.error IS NOT NULL").count()
    println(s"BRIDGE_JOB rows=${answered.count()} wrong=$wrong")
    // The physical plan before adaptive execution: the calls run in the bridge's batch operator.
    println(s"BRIDGE_JOB plan=${answered.queryExecution.sparkPlan.collect { case p => p.nodeName }.mkString(",")}")
    spark.stop()
  }
}
