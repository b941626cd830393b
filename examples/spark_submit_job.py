"""A spark-submit job: deploy a model into Ray, ask it from Spark SQL over a few rows, print the answers.

Submit it from the environment byzerllm-spark is installed in, activated or not:

    .venv/bin/byzerllm submit examples/spark_submit_job.py                    # the echo plugin, seconds
    .venv/bin/byzerllm submit examples/spark_submit_job.py --model smollm2    # the embedded SmolLM2
    .venv/bin/byzerllm submit --master "local[2]" examples/spark_submit_job.py

``byzerllm submit`` runs the spark-submit of the installed pyspark with SPARK_HOME pointing at it and
PYSPARK_PYTHON at this environment's Python, so the job's executors find pyarrow and byzerllm-spark.

The job joins the local cluster of ``byzerllm start`` when one runs on this machine (its model then
stays deployed for other drivers only until the job undeploys it) and otherwise starts an embedded
Ray that ends with the job.
"""

import argparse

from pyspark.sql import SparkSession

import byzerllm_spark as bls

QUESTIONS = ["What is the capital of France?", "Name a primary colour.", "What is 2 + 2?"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("echo", "smollm2"), default="echo",
                        help="echo: the echo plugin (custom/echo, no model to load); smollm2: the embedded SmolLM2")
    parser.add_argument("--name", default="job_chat", help="name of the deployment (default: job_chat)")
    args = parser.parse_args()

    spark = SparkSession.builder.appName("byzerllm-spark-submit-job").getOrCreate()
    spark.sparkContext.setLogLevel("WARN")
    bls.init()
    try:
        if args.model == "echo":
            bls.deploy(args.name, pretrained_model_type="custom/echo", cpus_per_worker=0.1,
                       infer_params={"echo_prefix": "echo: "}, udf_name="chat", spark=spark)
        else:
            bls.deploy(args.name, cpus_per_worker=0.5, udf_name="chat", spark=spark)
        try:
            spark.createDataFrame([(q,) for q in QUESTIONS], "q string").createOrReplaceTempView("questions")
            rows = spark.sql(
                "SELECT q, chat(llm_param(map('instruction', q, 'temperature', '0', 'max_length', '32'))) AS answer "
                "FROM questions"
            ).collect()
            for row in rows:
                print(f"{row.q} -> {row.answer}")
        finally:
            bls.undeploy(args.name)
    finally:
        bls.shutdown()
        spark.stop()

if __name__ == "__main__":
    main()
