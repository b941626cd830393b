"""Reading a model table version from Spark: the chunk rows as a DataFrame.

With Delta configured in the session this is Spark's own Delta reader (``versionAsOf``). Without
the Delta jars (delta-spark fetches them from Maven), the version's data files are taken from the
Delta log through delta-rs and read with ``spark.read.parquet``, so it works from any session.
"""

from __future__ import annotations

import os

from ._format import COLUMNS, SPARK_DDL
from ._open import check_version, open_snapshot
from .names import TableRef, is_uri, locate

__all__ = ["read_model_table", "to_spark"]


def read_model_table(
    spark,
    table: str | os.PathLike[str],
    *,
    version: int | None = None,
    warehouse: str | os.PathLike[str] | None = None,
):
    """The chunk rows of a model table version as a Spark DataFrame.

    With Delta configured in the session (``spark.sql.extensions`` has
    ``DeltaSparkSessionExtension``) this is ``spark.read.format("delta")`` with ``versionAsOf``.
    Without the Delta jars, the version's data files are taken from the Delta log (through
    delta-rs) and read with ``spark.read.parquet``, so Byzer-LLM's ``load model.`...` as t``
    shape works from any session. On a cluster the table must be on storage the executors read.

    Args:
        spark: a ``pyspark.sql.SparkSession`` (classic or Spark Connect).
        table: ``"ai_model.llama2_300"``, a path or a URI (see ``resolve_table_uri``).
        version: the table version (int >= 0); default None: the latest.
        warehouse: root for names, as in ``resolve_table_uri``; default None.

    Returns:
        A ``pyspark.sql.DataFrame``, one row per chunk, columns ``path`` string,
        ``chunk_index`` bigint, ``offset`` bigint, ``length`` bigint, ``sha256`` string,
        ``file_size`` bigint, ``file_digest`` string (null but on a file's last chunk) and
        ``data`` binary.

    Raises:
        ModelNotFoundError: no table there, or no such version.
        ModelTableError: the location holds a Delta table that is not a model table, or
            delta-rs failed to read its log.
        ConfigError: a bad ``table``, ``version`` or ``warehouse``.

    Example:
        >>> df = read_model_table(spark, "ai_model.smollm2")  # doctest: +SKIP
        >>> df.groupBy("path").agg({"length": "sum"}).show()  # doctest: +SKIP
    """
    return to_spark(locate(table, warehouse), spark, version=version)


def to_spark(ref: TableRef, spark, *, version: int | None = None):
    """:func:`read_model_table` for a located table."""
    snap = open_snapshot(ref, check_version(version))
    if _spark_has_delta(spark):
        reader = spark.read.format("delta").option("versionAsOf", snap.version)
        return reader.load(_spark_path(ref.uri)).select(*COLUMNS)
    files = [_spark_path(f) for f in snap.file_uris()]
    if not files:
        return spark.createDataFrame([], SPARK_DDL)
    return spark.read.schema(SPARK_DDL).parquet(*files).select(*COLUMNS)


def _spark_has_delta(spark) -> bool:
    try:
        extensions = spark.conf.get("spark.sql.extensions", "") or ""
        catalog = spark.conf.get("spark.sql.catalog.spark_catalog", "") or ""
    except Exception:  # noqa: BLE001 - a conf we cannot read means no Delta configured
        return False
    return "DeltaSparkSessionExtension" in extensions or "DeltaCatalog" in catalog


def _spark_path(uri: str) -> str:
    if uri.startswith("s3://"):  # Hadoop's S3 connector is s3a://; delta-rs says s3://
        return "s3a://" + uri[len("s3://") :]
    if not is_uri(uri):  # a local path: say so, or Spark resolves it on fs.defaultFS
        from pathlib import Path

        return Path(uri).as_uri()
    return uri
