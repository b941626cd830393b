"""Spark SQL and DataFrame functions: :mod:`.functions` on the driver, :mod:`.udf` on the executors."""
