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
from byzerllm_spark.model_table import _format, reader

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHUNK = 64 << 10  # small chunks so small files still span several rows


def make_model_dir(path, seed: int = 0, big: int = 300_000):
    """A small checkpoint-shaped directory: a multi-chunk weight file, JSON, an empty file, a
    nested file and a symlinked file pointing inside the directory (Hugging Face snapshots' links
    into their cache repo are tested in test_hugging_face_snapshot_links_are_followed)."""
    import random

    rnd = random.Random(seed)
    os.makedirs(path / "tokenizer")
    (path / "model.safetensors").write_bytes(rnd.randbytes(big))
    (path / "config.json").write_text(f'{{"hidden_size": {64 + seed}}}')
    (path / "empty.txt").write_bytes(b"")
    (path / "tokenizer" / "vocab.txt").write_text("\n".join(f"tok{i}" for i in range(500)))
    os.symlink(os.path.join("tokenizer", "vocab.txt"), path / "linked.bin")
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
    monkeypatch.delenv("BYZERLLM_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert mt.resolve_table_uri("db.t") == str(tmp_path / "home/.byzerllm_spark/warehouse/db/t")
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


def test_spark_quoted_names_resolve_like_plain_names(tmp_path, model, wh, cache):
    plain = mt.resolve_table_uri("ai_model.smollm2", warehouse="/wh")
    assert plain == "/wh/ai_model/smollm2"
    for quoted in (
        "`ai_model`.`smollm2`", "`ai_model.smollm2`", "`ai_model`.smollm2", "ai_model.`SmolLM2`",
        " `AI_model`.`smollm2` ",
    ):
        assert mt.resolve_table_uri(quoted, warehouse="/wh") == plain, quoted
    for bad in ("`ai_model`.`smol/lm`", "`ai_model`", "`a.b.c`", "`ai_model`.`x", "`a`.`b`.`c`"):
        with pytest.raises(ConfigError, match=r"table=.*quoted table name"):
            mt.resolve_table_uri(bad, warehouse="/wh")
    # one table, whichever spelling saves and loads it
    assert mt.save_model_table(model, "`ai_model`.`q`", warehouse=wh, chunk_size=CHUNK) == 0
    assert mt.save_model_table(model, "`ai_model.q`", warehouse=wh, chunk_size=CHUNK) == 1
    assert mt.is_model_table("ai_model.q", warehouse=wh)
    assert [h["version"] for h in mt.model_table_history("ai_model.q", warehouse=wh)] == [1, 0]
    assert_same_tree(model, mt.load_model_table("`ai_model`.q", warehouse=wh, cache_dir=cache))


def test_default_folders_are_below_byzerllm_home(tmp_path, model, monkeypatch):
    for var in ("BYZERLLM_WAREHOUSE", "BYZERLLM_MODEL_CACHE"):
        monkeypatch.delenv(var, raising=False)
    home = tmp_path / "home"
    monkeypatch.setenv("BYZERLLM_HOME", str(home))
    assert mt.save_model_table(model, "ai_model.h", chunk_size=CHUNK) == 0
    assert os.path.isdir(home / "warehouse" / "ai_model" / "h" / "_delta_log")
    assert mt.load_model_table("ai_model.h").startswith(str(home / "model_cache") + os.sep)
    monkeypatch.setenv("BYZERLLM_MODEL_CACHE", str(tmp_path / "cache2"))
    assert mt.load_model_table("ai_model.h").startswith(str(tmp_path / "cache2") + os.sep)
    monkeypatch.setenv("BYZERLLM_WAREHOUSE", "s3://bucket/wh/")
    assert mt.resolve_table_uri("ai_model.h") == "s3://bucket/wh/ai_model/h"


def test_model_table_handle(tmp_path, wh, cache, monkeypatch):
    a = make_model_dir(tmp_path / "a", seed=1)
    b = make_model_dir(tmp_path / "b", seed=2, big=100_000)
    t = mt.ModelTable.for_name("`ai_model`.`Handle`", warehouse=wh)
    assert t.uri == mt.resolve_table_uri("ai_model.handle", warehouse=wh)
    assert t == mt.ModelTable.for_path(t.uri) and repr(t) == f"ModelTable({t.uri!r})"
    assert not t.exists()
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        t.version
    assert t.save(a, metadata={"step": 1}, chunk_size=CHUNK) == 0
    assert t.save(b, metadata={"step": 2}, chunk_size=CHUNK) == 1
    assert t.exists() and t.version == 1
    assert [h["metadata"] for h in t.history()] == [{"step": 2}, {"step": 1}]
    assert_same_tree(a, t.load(0, cache_dir=cache))
    latest = t.load(cache_dir=cache)
    assert latest == mt.load_model_table("ai_model.handle", warehouse=wh, cache_dir=cache)
    assert_same_tree(b, latest)
    with pytest.raises(ModelTableError, match="already exists"):
        t.save(a, mode="error")
    with pytest.raises(ConfigError, match=r"name=.*ModelTable.for_path"):
        mt.ModelTable.for_name("/data/models/x")
    monkeypatch.chdir(tmp_path)  # for_path never reads a name: this is the directory ./ai_model.x
    assert mt.ModelTable.for_path("ai_model.x").uri == str(tmp_path / "ai_model.x")


def test_docstring_examples_run(tmp_path, monkeypatch):
    import doctest
    import tempfile

    from byzerllm_spark.model_table import _open, names, table, writer

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setenv("BYZERLLM_HOME", str(tmp_path / "home"))
    for module in (names, _open, writer, table):
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert result.attempted > 0 and result.failed == 0, module.__name__


def test_top_level_exports():
    import byzerllm_spark as bls

    for name in ("ModelTable", "is_model_table", "resolve_table_uri", "save_model_table",
                 "load_model_table", "model_table_history", "read_model_table"):
        assert name in bls.__all__ and getattr(bls, name) is getattr(mt, name), name


def test_package_imports_only_errors_and_settings_without_cycles():
    """The package is a lower layer: of this library it imports only errors and settings, and
    each of its modules imports only the modules listed before it."""
    import ast
    import pathlib

    order = ["_format", "names", "_open", "writer", "reader", "history", "spark", "table",
             "__init__"]
    pkg = pathlib.Path(mt.__file__).parent
    assert sorted(p.stem for p in pkg.glob("*.py")) == sorted(order)
    for path in pkg.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                assert not any(a.name.startswith("byzerllm_spark") for a in node.names), path
            elif isinstance(node, ast.ImportFrom):
                names = [node.module] if node.module else [a.name for a in node.names]
                if node.level == 0:
                    assert not (node.module or "").startswith("byzerllm_spark"), path
                elif node.level == 2:
                    assert set(names) <= {"errors", "settings"}, (path, names)
                else:
                    assert node.level == 1, path
                    for name in names:
                        assert order.index(name) < order.index(path.stem), (path, name)


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
    assert [c for c in rows[0]] == list(_format.COLUMNS)
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

    monkeypatch.setattr(_format, "ROW_GROUP_BYTES", 2 * CHUNK)
    monkeypatch.setattr(_format, "FILE_BYTES", CHUNK)  # a file's chunks span several data files
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


@pytest.mark.parametrize("target", ["/", "outside-dir", "outside-file"])
def test_symlink_leaving_the_model_dir_is_refused(model, tmp_path, target):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("not part of the model")
    link = model / "tokenizer" / "escape"
    os.symlink({"/": "/", "outside-dir": str(outside), "outside-file": str(outside / "secret.txt")}[target], link)
    table = str(tmp_path / "escape")
    with pytest.raises(ModelTableError) as err:
        mt.save_model_table(model, table, chunk_size=CHUNK)
    message = str(err.value)
    assert "escape" in message and "outside the model directory" in message and "save again" in message
    assert not os.path.exists(table)  # refused before anything was written
    os.symlink("../../outside/secret.txt", model / "relative-escape")  # a relative link out is refused too
    os.remove(link)
    with pytest.raises(ModelTableError, match="relative-escape"):
        mt.save_model_table(model, table, chunk_size=CHUNK)


def test_hugging_face_snapshot_links_are_followed(tmp_path, cache):
    repo = tmp_path / "hub" / "models--org--tiny"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (repo / "blobs" / "f00d").write_bytes(b"weights" * 1000)
    (repo / "blobs" / "beef").write_text("{}")
    os.symlink("../../blobs/f00d", snapshot / "model.safetensors")
    os.symlink("../../blobs/beef", snapshot / "config.json")
    table = str(tmp_path / "hf")
    mt.save_model_table(snapshot, table, chunk_size=CHUNK)
    loaded = mt.load_model_table(table, cache_dir=cache)
    assert open(os.path.join(loaded, "model.safetensors"), "rb").read() == b"weights" * 1000
    assert not os.path.islink(os.path.join(loaded, "config.json"))


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

    monkeypatch.setattr(reader, "_materialise", no_reads)
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
    real = reader._materialise

    def counting(*args, **kwargs):
        calls.append(1)
        time.sleep(0.2)  # keep the lock held while the other thread arrives
        return real(*args, **kwargs)

    monkeypatch.setattr(reader, "_materialise", counting)
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
    write_deltalake(evil, pa.Table.from_pylist([row], schema=_format.arrow_schema()))
    with pytest.raises(ModelTableError, match="unsafe file path"):
        mt.load_model_table(evil, cache_dir=cache)
    assert not os.path.exists(os.path.join(cache, "escaped.txt"))
    assert cache_entries(cache) == []


KILLED_SAVE = textwrap.dedent(
    """
    import os, sys, time
    from byzerllm_spark import model_table as mt
    from byzerllm_spark.model_table import _format

    _format.ROW_GROUP_BYTES = 128 << 10  # many small row groups, so data files appear early
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


def test_delta_errors_surface_as_model_table_errors(model, tmp_path, cache):
    from deltalake.exceptions import DeltaError

    table = str(tmp_path / "broken")
    mt.save_model_table(model, table, chunk_size=CHUNK)
    mt.save_model_table(model, table, chunk_size=CHUNK)
    with open(os.path.join(table, "_delta_log", "00000000000000000001.json"), "w") as f:
        f.write("{not json\n")
    handle = mt.ModelTable.for_path(table)
    calls = {
        "load": lambda: mt.load_model_table(table, cache_dir=cache),
        "load v0": lambda: mt.load_model_table(table, version=0, cache_dir=cache),
        "history": lambda: mt.model_table_history(table),
        "save": lambda: mt.save_model_table(model, table, chunk_size=CHUNK),
        "version": lambda: handle.version,
    }
    for what, call in calls.items():
        with pytest.raises(ModelTableError) as info:
            call()
        message = str(info.value)
        assert not isinstance(info.value, DeltaError), what
        assert table in message and "failed in delta-rs" in message, (what, message)
        assert "_delta_log" in message and "<unknown>" not in message, (what, message)
    assert not mt.is_model_table(table)
    assert cache_entries(cache) == []


CONCURRENT_SAVE = textwrap.dedent(
    """
    import json, os, sys, time
    from byzerllm_spark import model_table as mt
    from byzerllm_spark.errors import ModelTableError
    from byzerllm_spark.model_table import writer

    src, table, mine, theirs = sys.argv[1:5]
    real_commit_once = writer._commit_once
    met = []

    def commit_together(*args, **kwargs):
        # Both saves found no table and wrote their data files; meet, then commit at once.
        if not met:
            met.append(1)
            open(mine, "w").close()
            deadline = time.monotonic() + 60
            while not os.path.exists(theirs):
                if time.monotonic() > deadline:
                    sys.exit("the other save never reached its commit")
                time.sleep(0.001)
        return real_commit_once(*args, **kwargs)

    writer._commit_once = commit_together
    try:
        print(json.dumps({"version": mt.save_model_table(src, table, chunk_size=64 << 10)}))
    except ModelTableError as exc:
        print(json.dumps({"error": str(exc)}))
    """
)


def test_two_processes_saving_a_new_table_at_once(tmp_path, cache):
    import json

    from deltalake import DeltaTable

    sources = [make_model_dir(tmp_path / "a", seed=1), make_model_dir(tmp_path / "b", seed=2)]
    table = str(tmp_path / "raced")
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    marks = [str(tmp_path / "a.ready"), str(tmp_path / "b.ready")]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CONCURRENT_SAVE, str(src), table, marks[i], marks[1 - i]],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        for i, src in enumerate(sources)
    ]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err.decode()
        results.append(json.loads(out.decode().strip().splitlines()[-1]))
    # Either both commit as two versions, or one is told to retry; never a raw delta-rs error.
    committed = {r["version"]: src for r, src in zip(results, sources) if "version" in r}
    for r in results:
        if "error" in r:
            assert "conflicted with a concurrent writer" in r["error"] and "retry" in r["error"]
    assert sorted(committed) == list(range(len(committed))) and committed
    assert [h["version"] for h in mt.model_table_history(table)] == sorted(committed)[::-1]
    ids = {DeltaTable(table, version=v).metadata().id for v in committed}
    assert len(ids) == 1  # one table: the loser did not create a second one over the first
    for version, src in committed.items():
        assert len(DeltaTable(table, version=version).file_uris()) == 1  # its own files only
        assert_same_tree(src, mt.load_model_table(table, version=version, cache_dir=cache))
    assert len(committed) == 2  # this library commits the loser as the next version


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
    assert df.columns == list(_format.COLUMNS)
    per_file = df.groupBy("path").agg(F.sum("length").alias("n")).collect()
    sizes = {r["path"]: r["n"] for r in per_file}
    assert sizes["model.safetensors"] == 100_000 and sizes["empty.txt"] == 0 and len(sizes) == 5
    # Spark sees the same bytes: its own sha2 of every chunk matches the recorded sha256.
    assert df.filter(F.sha2("data", 256) != F.col("sha256")).count() == 0
    rows = df.filter(F.col("path") == "model.safetensors").orderBy("chunk_index").collect()
    assert b"".join(bytes(r["data"]) for r in rows) == (b / "model.safetensors").read_bytes()

    old = mt.read_model_table(spark, "ai_model.sp", version=0, warehouse=wh)
    assert old.agg(F.sum("length")).first()[0] == tree_size(a)
    handle = mt.ModelTable.for_name("`ai_model`.`sp`", warehouse=wh)
    assert handle.to_spark(spark, version=0).agg(F.sum("length")).first()[0] == tree_size(a)
    assert handle.to_spark(spark).count() == df.count()
    with pytest.raises(ModelNotFoundError):
        mt.read_model_table(spark, "ai_model.sp", version=9, warehouse=wh)
