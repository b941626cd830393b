"""Model tables: real Delta tables in tmp_path, a real local Spark session for the Spark read."""

from __future__ import annotations

import filecmp
import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from datetime import datetime

import pytest

from byzerllm_spark import model_table as mt
from byzerllm_spark.errors import ChecksumError, ConfigError, ModelNotFoundError, ModelTableError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHUNK = 64 << 10  # small chunks so small files still span several rows


def make_model_dir(path, seed: int = 0, big: int = 300_000):
    """A small checkpoint-shaped directory: a multi-chunk weight file, JSON, an empty file, a
    nested file and a symlinked file (as in Hugging Face snapshots)."""
    import random

    rnd = random.Random(seed)
    os.makedirs(path / "tokenizer")
    (path / "model.safetensors").write_bytes(rnd.randbytes(big))
    (path / "config.json").write_text(f'{{"hidden_size": {64 + seed}}}')
    (path / "empty.txt").write_bytes(b"")
    (path / "tokenizer" / "vocab.txt").write_text("\n".join(f"tok{i}" for i in range(500)))
    blob = path.parent / f"blob-{path.name}"
    blob.write_bytes(rnd.randbytes(5000))
    os.symlink(blob, path / "linked.bin")
    return path


def tree_size(d) -> int:
    return sum(os.path.getsize(os.path.join(p, n)) for p, _, names in os.walk(d) for n in names)


def assert_same_tree(a, b) -> None:
    cmp = filecmp.dircmp(a, b)
    assert not (cmp.left_only or cmp.right_only or cmp.funny_files), (cmp.left_only, cmp.right_only)
    _, mismatch, errors = filecmp.cmpfiles(a, b, cmp.common_files, shallow=False)
    assert not mismatch and not errors, (mismatch, errors)
    for d in cmp.common_dirs:
        assert_same_tree(os.path.join(a, d), os.path.join(b, d))


@pytest.fixture
def wh(tmp_path):
    return str(tmp_path / "warehouse")


@pytest.fixture
def cache(tmp_path):
    return str(tmp_path / "cache")


@pytest.fixture
def model(tmp_path):
    return make_model_dir(tmp_path / "model")


# --------------------------------------------------------------------------------------------
# Names


def test_resolve_names_paths_and_uris(tmp_path, monkeypatch):
    assert mt.resolve_table_uri("ai_model.Llama2_300", warehouse="/wh") == "/wh/ai_model/llama2_300"
    assert mt.resolve_table_uri("`ai_model.x`", warehouse="/wh") == "/wh/ai_model/x"
    assert mt.resolve_table_uri("ai_model.x", warehouse="s3://b/wh/") == "s3://b/wh/ai_model/x"
    monkeypatch.setenv("BYZERLLM_WAREHOUSE", str(tmp_path / "envwh"))
    assert mt.resolve_table_uri("db.t") == str(tmp_path / "envwh" / "db" / "t")
    monkeypatch.delenv("BYZERLLM_WAREHOUSE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert mt.resolve_table_uri("db.t") == str(tmp_path / "home/.byzerllm/warehouse/db/t")
    assert mt.resolve_table_uri("file:///data/models/x/") == "file:///data/models/x"
    assert mt.resolve_table_uri("s3://bucket/models/x") == "s3://bucket/models/x"
    assert mt.resolve_table_uri("/data/models/x/") == "/data/models/x"
    monkeypatch.chdir(tmp_path)
    assert mt.resolve_table_uri("./db.t") == str(tmp_path / "db.t")
    assert mt.resolve_table_uri("models/x") == str(tmp_path / "models" / "x")
    for bad in ("", "   ", None, 3):
        with pytest.raises(ConfigError, match="table="):
            mt.resolve_table_uri(bad)


def test_import_is_cheap():
    code = (
        "import sys, byzerllm_spark; before = set(sys.modules); "
        "import byzerllm_spark.model_table; "
        "heavy = {m.split('.')[0] for m in set(sys.modules) - before}; "
        "heavy &= {'deltalake', 'pyarrow', 'pyspark', 'numpy'}; "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


# --------------------------------------------------------------------------------------------
# Save and load


def test_round_trip_is_byte_identical(model, wh, cache):
    assert not mt.is_model_table("ai_model.m", warehouse=wh)
    v = mt.save_model_table(
        model, "ai_model.m", warehouse=wh, chunk_size=CHUNK, metadata={"base": "tiny"}
    )
    assert v == 0
    assert mt.is_model_table("ai_model.m", warehouse=wh)
    path = mt.load_model_table("ai_model.m", warehouse=wh, cache_dir=cache)
    assert_same_tree(model, path)
    assert not os.path.islink(os.path.join(path, "linked.bin"))  # symlinks become real files


def test_chunk_rows(model, tmp_path):
    from deltalake import DeltaTable

    table = str(tmp_path / "t")
    mt.save_model_table(model, table, chunk_size=CHUNK)
    rows = DeltaTable(table).to_pyarrow_table().to_pylist()
    assert [c for c in rows[0]] == list(mt._COLUMNS)
    big = [r for r in rows if r["path"] == "model.safetensors"]
    big.sort(key=lambda r: r["chunk_index"])
    content = (model / "model.safetensors").read_bytes()
    assert len(big) == -(-len(content) // CHUNK)
    assert b"".join(r["data"] for r in big) == content
    for r in big:
        assert r["offset"] == r["chunk_index"] * CHUNK and r["length"] == len(r["data"]) <= CHUNK
        assert r["sha256"] == hashlib.sha256(r["data"]).hexdigest()
        assert r["file_size"] == len(content)
    assert [r["file_digest"] is None for r in big] == [True] * (len(big) - 1) + [False]
    hash_list = b"".join(bytes.fromhex(r["sha256"]) for r in big)
    assert big[-1]["file_digest"] == hashlib.sha256(hash_list).hexdigest()
    (empty,) = [r for r in rows if r["path"] == "empty.txt"]
    assert (empty["length"], empty["data"], empty["file_size"]) == (0, b"", 0)
    assert {r["path"] for r in rows} == {
        "config.json", "empty.txt", "linked.bin", "model.safetensors", "tokenizer/vocab.txt"
    }


def test_file_uri_table(model, tmp_path, cache):
    uri = (tmp_path / "uri_table").as_uri()
    assert mt.save_model_table(str(model), uri, chunk_size=CHUNK) == 0
    assert_same_tree(model, mt.load_model_table(uri, cache_dir=cache))


def test_many_row_groups_and_data_files(model, tmp_path, cache, monkeypatch):
    from deltalake import DeltaTable

    monkeypatch.setattr(mt, "_ROW_GROUP_BYTES", 2 * CHUNK)
    monkeypatch.setattr(mt, "_FILE_BYTES", CHUNK)  # a file's chunks span several data files
    table = str(tmp_path / "many")
    mt.save_model_table(model, table, chunk_size=CHUNK)
    assert len(DeltaTable(table).file_uris()) >= 3
    assert_same_tree(model, mt.load_model_table(table, cache_dir=cache))


def test_symlink_cycle_in_model_dir_is_not_followed(model, tmp_path, cache):
    os.symlink("..", model / "tokenizer" / "up")  # tokenizer/up -> the model dir itself
    table = str(tmp_path / "cycle")
    mt.save_model_table(model, table, chunk_size=CHUNK)
    (history,) = mt.model_table_history(table)
    assert history["files"] == 5
    os.remove(model / "tokenizer" / "up")
    assert_same_tree(model, mt.load_model_table(table, cache_dir=cache))


def test_versions_time_travel_and_history(tmp_path, wh, cache):
    a = make_model_dir(tmp_path / "a", seed=1)
    b = make_model_dir(tmp_path / "b", seed=2, big=200_000)
    (b / "adapter_config.json").write_text('{"r": 8}')
    kw = dict(warehouse=wh, chunk_size=CHUNK)
    assert mt.save_model_table(a, "ai_model.tt", metadata={"step": 1}, **kw) == 0
    assert mt.save_model_table(b, "ai_model.tt", metadata={"step": 2}, **kw) == 1

    old = mt.load_model_table("ai_model.tt", version=0, warehouse=wh, cache_dir=cache)
    assert_same_tree(a, old)
    latest = mt.load_model_table("ai_model.tt", warehouse=wh, cache_dir=cache)
    assert latest == mt.load_model_table("ai_model.tt", version=1, warehouse=wh, cache_dir=cache)
    assert_same_tree(b, latest)

    history = mt.model_table_history("ai_model.tt", warehouse=wh)
    assert [h["version"] for h in history] == [1, 0]
    assert [h["metadata"] for h in history] == [{"step": 2}, {"step": 1}]
    assert history[0]["files"] == 6 and history[1]["files"] == 5
    assert (history[0]["bytes"], history[1]["bytes"]) == (tree_size(b), tree_size(a))
    assert history[0]["chunk_size"] == CHUNK and history[0]["source"] == str(b)
    when = history[0]["timestamp"]
    assert isinstance(when, datetime) and when.tzinfo is not None


def test_mode_error_refuses_an_existing_table(model, wh):
    mt.save_model_table(model, "ai_model.once", warehouse=wh, chunk_size=CHUNK, mode="error")
    with pytest.raises(ModelTableError, match="already exists.*mode='overwrite'"):
        mt.save_model_table(model, "ai_model.once", warehouse=wh, chunk_size=CHUNK, mode="error")
    assert [h["version"] for h in mt.model_table_history("ai_model.once", warehouse=wh)] == [0]


def test_second_load_is_served_from_the_cache(model, wh, cache, monkeypatch):
    mt.save_model_table(model, "ai_model.c", warehouse=wh, chunk_size=CHUNK)
    first = mt.load_model_table("ai_model.c", warehouse=wh, cache_dir=cache)
    stamps = {n: os.stat(os.path.join(first, n)).st_mtime_ns for n in os.listdir(first)}

    def no_reads(*args, **kwargs):
        raise AssertionError("a cached version was materialised again")

    monkeypatch.setattr(mt, "_materialise", no_reads)
    t0 = time.perf_counter()
    assert mt.load_model_table("ai_model.c", version=0, warehouse=wh, cache_dir=cache) == first
    assert time.perf_counter() - t0 < 1.0
    assert {n: os.stat(os.path.join(first, n)).st_mtime_ns for n in os.listdir(first)} == stamps


def test_a_table_saved_again_after_deletion_is_not_served_stale(tmp_path, cache):
    import shutil

    a = make_model_dir(tmp_path / "a", seed=1)
    b = make_model_dir(tmp_path / "b", seed=2)
    table = str(tmp_path / "again")
    mt.save_model_table(a, table, chunk_size=CHUNK)
    first = mt.load_model_table(table, cache_dir=cache)
    shutil.rmtree(table)
    assert mt.save_model_table(b, table, chunk_size=CHUNK) == 0  # "v0" again, another table id
    second = mt.load_model_table(table, cache_dir=cache)
    assert second != first
    assert_same_tree(b, second)


def test_concurrent_loads_materialise_once(model, wh, cache, monkeypatch):
    mt.save_model_table(model, "ai_model.cc", warehouse=wh, chunk_size=CHUNK)
    calls = []
    real = mt._materialise

    def counting(*args, **kwargs):
        calls.append(1)
        time.sleep(0.2)  # keep the lock held while the other thread arrives
        return real(*args, **kwargs)

    monkeypatch.setattr(mt, "_materialise", counting)
    results = []
    def load():
        results.append(mt.load_model_table("ai_model.cc", warehouse=wh, cache_dir=cache))

    threads = [threading.Thread(target=load) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(set(results)) == 1
    assert_same_tree(model, results[0])


# --------------------------------------------------------------------------------------------
# Bad input and faults


def cache_entries(cache):
    """Everything in the cache but lock files: version directories and temporary ones."""
    if not os.path.isdir(cache):
        return []
    return [
        os.path.join(key, name)
        for key in os.listdir(cache)
        for name in os.listdir(os.path.join(cache, key))
        if not name.endswith(".lock")
    ]


def test_corrupted_chunk_raises_checksum_error_and_leaves_nothing(model, tmp_path, cache):
    from deltalake import DeltaTable

    table = str(tmp_path / "corrupt")
    mt.save_model_table(model, table, chunk_size=CHUNK)
    target = (model / "model.safetensors").read_bytes()[2 * CHUNK : 3 * CHUNK]  # chunk 2
    (parquet,) = DeltaTable(table).file_uris()
    raw = bytearray(open(parquet, "rb").read())
    at = raw.find(target)
    assert at > 0  # uncompressed PLAIN data: the chunk is stored verbatim
    raw[at + 100] ^= 0xFF
    open(parquet, "wb").write(bytes(raw))

    with pytest.raises(ChecksumError, match=r"chunk 2 of file 'model.safetensors'.*sha256"):
        mt.load_model_table(table, cache_dir=cache)
    assert cache_entries(cache) == []  # neither a version directory nor a temporary one


def test_missing_data_file_is_an_error(model, tmp_path, cache):
    from deltalake import DeltaTable

    table = str(tmp_path / "gone")
    mt.save_model_table(model, table, chunk_size=CHUNK)
    os.remove(DeltaTable(table).file_uris()[0])
    with pytest.raises(ModelTableError, match="cannot be read"):
        mt.load_model_table(table, cache_dir=cache)
    assert cache_entries(cache) == []


def test_missing_table(wh, cache, tmp_path):
    with pytest.raises(ModelNotFoundError, match=r"'ai_model.nope'.*does not exist.*save_model"):
        mt.load_model_table("ai_model.nope", warehouse=wh, cache_dir=cache)
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        mt.model_table_history("ai_model.nope", warehouse=wh)
    assert not mt.is_model_table(str(tmp_path))  # a directory, not a table


def test_missing_version(model, wh, cache):
    mt.save_model_table(model, "ai_model.v", warehouse=wh, chunk_size=CHUNK)
    with pytest.raises(ModelNotFoundError, match="has no version 5: its latest version is 0"):
        mt.load_model_table("ai_model.v", version=5, warehouse=wh, cache_dir=cache)
    for bad in (-1, "1", True, 1.0):
        with pytest.raises(ConfigError, match="version="):
            mt.load_model_table("ai_model.v", version=bad, warehouse=wh, cache_dir=cache)


def test_bad_save_arguments(model, tmp_path, wh):
    with pytest.raises(ConfigError, match=r"model_dir=.*does not exist"):
        mt.save_model_table(tmp_path / "no_such_dir", "ai_model.x", warehouse=wh)
    with pytest.raises(ConfigError, match=r"model_dir=.*not a directory"):
        mt.save_model_table(model / "config.json", "ai_model.x", warehouse=wh)
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ConfigError, match=r"model_dir=.*no files"):
        mt.save_model_table(tmp_path / "empty_dir", "ai_model.x", warehouse=wh)
    with pytest.raises(ConfigError, match="mode='append'"):
        mt.save_model_table(model, "ai_model.x", warehouse=wh, mode="append")
    with pytest.raises(ConfigError, match="chunk_size=0"):
        mt.save_model_table(model, "ai_model.x", warehouse=wh, chunk_size=0)
    with pytest.raises(ConfigError, match="chunk_size="):
        mt.save_model_table(model, "ai_model.x", warehouse=wh, chunk_size=1 << 30)
    with pytest.raises(ConfigError, match="metadata="):
        mt.save_model_table(model, "ai_model.x", warehouse=wh, metadata={"f": object()})
    assert not os.path.exists(os.path.join(wh, "ai_model", "x"))


def test_a_delta_table_that_is_not_a_model_table(model, tmp_path, cache):
    import pyarrow as pa
    from deltalake import write_deltalake

    other = str(tmp_path / "sales")
    write_deltalake(other, pa.table({"id": [1, 2]}))
    assert not mt.is_model_table(other)
    with pytest.raises(ModelTableError, match="not a model table"):
        mt.load_model_table(other, cache_dir=cache)
    with pytest.raises(ModelTableError, match="refusing to overwrite"):
        mt.save_model_table(model, other)


def test_a_table_cannot_write_outside_the_cache(tmp_path, cache):
    import pyarrow as pa
    from deltalake import write_deltalake

    evil = str(tmp_path / "evil")
    row = {
        "path": "../../escaped.txt", "chunk_index": 0, "offset": 0, "length": 2,
        "sha256": hashlib.sha256(b"hi").hexdigest(), "file_size": 2,
        "file_digest": hashlib.sha256(hashlib.sha256(b"hi").digest()).hexdigest(), "data": b"hi",
    }
    write_deltalake(evil, pa.Table.from_pylist([row], schema=mt._arrow_schema()))
    with pytest.raises(ModelTableError, match="unsafe file path"):
        mt.load_model_table(evil, cache_dir=cache)
    assert not os.path.exists(os.path.join(cache, "escaped.txt"))
    assert cache_entries(cache) == []


KILLED_SAVE = textwrap.dedent(
    """
    import os, sys, time
    from byzerllm_spark import model_table as mt

    mt._ROW_GROUP_BYTES = 128 << 10  # many small row groups, so data files appear early
    real_preadv = os.preadv

    def slow_disk(*args, **kwargs):  # a slow disk: the save takes seconds, not milliseconds
        time.sleep(0.05)
        return real_preadv(*args, **kwargs)

    os.preadv = slow_disk
    mt.save_model_table(sys.argv[1], sys.argv[2], chunk_size=64 << 10)
    print("save finished")
    """
)


def test_save_killed_halfway_keeps_the_previous_version(tmp_path, cache):
    from deltalake import DeltaTable

    a = make_model_dir(tmp_path / "a", seed=1)
    b = make_model_dir(tmp_path / "b", seed=2, big=6 << 20)  # 96 chunks of 64 KiB
    table = str(tmp_path / "table")
    mt.save_model_table(a, table, chunk_size=CHUNK)
    before = set(os.listdir(table))

    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_SAVE, str(b), table], env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        while not (set(os.listdir(table)) - before):  # the new version's first data file
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the save never started writing"
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        out, _ = proc.communicate()
    assert proc.returncode == -signal.SIGKILL and b"save finished" not in out
    assert set(os.listdir(table)) - before  # it died with data written but not committed

    assert DeltaTable(table).version() == 0
    assert [h["version"] for h in mt.model_table_history(table)] == [0]
    assert_same_tree(a, mt.load_model_table(table, cache_dir=cache))
    # the table stays writable: the next save is version 1
    assert mt.save_model_table(b, table, chunk_size=CHUNK) == 1
    assert_same_tree(b, mt.load_model_table(table, cache_dir=cache))


# --------------------------------------------------------------------------------------------
# Spark


# The session-scoped `spark` fixture of conftest.py is used: a module that stopped its own session
# would stop the one shared with every later test module (getOrCreate returns the same session).


@pytest.mark.spark
@pytest.mark.filterwarnings("ignore:PySpark does not yet fully support pandas:FutureWarning")
def test_spark_reads_the_chunk_rows(spark, tmp_path, wh):
    from pyspark.sql import functions as F

    a = make_model_dir(tmp_path / "a", seed=1)
    b = make_model_dir(tmp_path / "b", seed=2, big=100_000)
    mt.save_model_table(a, "ai_model.sp", warehouse=wh, chunk_size=CHUNK)
    mt.save_model_table(b, "ai_model.sp", warehouse=wh, chunk_size=CHUNK)

    df = mt.read_model_table(spark, "ai_model.sp", warehouse=wh)
    assert df.columns == list(mt._COLUMNS)
    per_file = df.groupBy("path").agg(F.sum("length").alias("n")).collect()
    sizes = {r["path"]: r["n"] for r in per_file}
    assert sizes["model.safetensors"] == 100_000 and sizes["empty.txt"] == 0 and len(sizes) == 5
    # Spark sees the same bytes: its own sha2 of every chunk matches the recorded sha256.
    assert df.filter(F.sha2("data", 256) != F.col("sha256")).count() == 0
    rows = df.filter(F.col("path") == "model.safetensors").orderBy("chunk_index").collect()
    assert b"".join(bytes(r["data"]) for r in rows) == (b / "model.safetensors").read_bytes()

    old = mt.read_model_table(spark, "ai_model.sp", version=0, warehouse=wh)
    assert old.agg(F.sum("length")).first()[0] == tree_size(a)
    with pytest.raises(ModelNotFoundError):
        mt.read_model_table(spark, "ai_model.sp", version=9, warehouse=wh)
