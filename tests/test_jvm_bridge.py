"""The JVM bridge (issue 13): the model functions in JVM-only Spark, through real ``spark-sql``, a real
Thrift server (beeline and a plain JDBC client), and a Scala job run by ``spark-submit``, against real
Ray Serve (the echo plugin and the embedded SmolLM2). The bridge's answers are checked against the
PySpark path's on the same SQL.

Each test starts one JVM (a few queries each) to stay within CI's budget; every process a test starts is
stopped by its PID, also when the test fails.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BRIDGE = ROOT / "jvm-bridge"
JAR = BRIDGE / "target" / "byzerllm-spark-bridge.jar"
EXTENSION = "tech.byzer.llm.spark.ByzerLLMExtensions"
ECHO = "jb_echo"
#: The token of the one secured model (jb_secure): its replica was started while the cluster required it.
TOKEN = "jvm-bridge-test-token-0123456789"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("java") is None or shutil.which("jar") is None, reason="needs a JDK"),
]


def _pyspark_home() -> Path:
    import pyspark

    return Path(pyspark.__file__).parent


def _jars() -> str:
    return str(_pyspark_home() / "jars" / "*")


@pytest.fixture(scope="module")
def bridge_jar() -> Path:
    """The jar, built as scripts/setup.sh builds it (a no-op when it is up to date)."""
    import sys

    subprocess.run(["bash", str(BRIDGE / "build.sh"), sys.executable], check=True, timeout=600)
    assert JAR.is_file()
    return JAR


@pytest.fixture(scope="module")
def models(cluster):
    import byzerllm_spark as bls

    bls.deploy(ECHO, pretrained_model_type="custom/echo", num_workers=2, cpus_per_worker=0.1)
    bls.deploy("jb_chat", cpus_per_worker=0.5)  # the embedded SmolLM2
    bls.deploy("jb_minilm", infer_backend="embedding", cpus_per_worker=0.5)  # the shipped all-MiniLM-L6-v2
    # A secured model: replicas read the token's digest when they start (byzerllm_spark.auth), so only
    # this one requires it; the cluster is open again for the rest of the session.
    from byzerllm_spark import auth, transport

    auth.publish(TOKEN)
    transport.set_auth_token(TOKEN)
    try:
        bls.deploy("jb_secure", pretrained_model_type="custom/echo", cpus_per_worker=0.1)
    finally:
        auth.publish(None)
        transport.set_auth_token(None)
    yield bls.endpoint()
    transport.set_auth_token(TOKEN)
    for name in (ECHO, "jb_chat", "jb_minilm", "jb_late", "jb_kill", "jb_secure"):
        if bls.exists(name):
            bls.undeploy(name)


class Procs:
    """Processes a test started, each in a session of its own, stopped by PID at the end."""

    def __init__(self) -> None:
        self.started: list[subprocess.Popen] = []

    def popen(self, cmd, **kwargs) -> subprocess.Popen:
        proc = subprocess.Popen(cmd, start_new_session=True, **kwargs)
        self.started.append(proc)
        return proc

    def stop(self) -> None:
        for proc in self.started:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)  # the group this test made for it
                    proc.wait(20)
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    try:
                        os.killpg(proc.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    proc.wait(10)


@pytest.fixture
def procs():
    p = Procs()
    yield p
    p.stop()


@pytest.fixture
def workdir():
    """Spark's warehouse, metastore and logs go here, never into the repo."""
    path = Path(tempfile.mkdtemp(prefix="jvm-bridge-test-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _conf(endpoint: str, workdir: Path, jar: Path, extra: dict | None = None) -> list[str]:
    conf = {
        "spark.sql.extensions": EXTENSION,
        "spark.byzerllm.endpoint": endpoint,
        "spark.ui.enabled": "false",
        "spark.sql.shuffle.partitions": "2",
        "spark.sql.warehouse.dir": str(workdir / "warehouse"),
        "spark.driver.extraJavaOptions": f"-Dderby.system.home={workdir}",
        **(extra or {}),
    }
    args = ["--master", "local[2]", "--jars", str(jar)]
    for key, value in conf.items():
        args += ["--conf", f"{key}={value}"]
    return args


#: For the spark-sql runs that read no tables: no Hive metastore (Derby's start was 25 of a shell's 35 s at
#: load 20). The main file test and the Thrift server keep Spark's default Hive catalog, as users run them.
IN_MEMORY = {"spark.sql.catalogImplementation": "in-memory"}


def _env() -> dict:
    return {k: v for k, v in os.environ.items() if not k.startswith(("PYSPARK_", "SPARK_"))}


def spark_sql(endpoint: str, workdir: Path, jar: Path, sql: str, extra: dict | None = None,
              timeout: float = 300, args: tuple = ()) -> subprocess.CompletedProcess:
    script = workdir / "queries.sql"
    script.write_text(sql)
    cmd = [str(_pyspark_home() / "bin" / "spark-sql"), *_conf(endpoint, workdir, jar, extra), *args, "-S", "-f", str(script)]
    return subprocess.run(cmd, cwd=workdir, env=_env(), capture_output=True, text=True, timeout=timeout)


def _sections(stdout: str) -> dict[str, list[str]]:
    """Output lines after each `SELECT '### name'` marker."""
    out: dict[str, list[str]] = {}
    current = None
    for line in stdout.splitlines():
        if line.startswith("### "):
            current = out.setdefault(line[4:].strip(), [])
        elif current is not None and line.strip():
            current.append(line)
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- spark-sql -f: the SQL of a PySpark session, unchanged --------------------------------------------
QUERIES = f"""
SELECT '### chat';
SELECT jb_chat(llm_param(map('instruction', 'What is the capital of France?', 'temperature', '0', 'max_length', '16')));
SELECT '### rows';
SELECT id, {ECHO}(llm_param(map('instruction', concat('row-', id)))) FROM range(0, 20000, 1, 4);
SELECT '### nulls';
SELECT id, {ECHO}(CASE WHEN id % 3 = 0 THEN NULL ELSE llm_param(map('instruction', concat('n', id))) END)
FROM range(0, 9, 1, 2) ORDER BY id;
SELECT '### struct';
SELECT id, to_json({ECHO}(llm_param(map('instruction', concat('s', id), 'max_length', CASE WHEN id = 1 THEN '-5' ELSE '8' END)), false))
FROM range(0, 3, 1, 1) ORDER BY id;
SELECT '### prompt';
SELECT llm_result({ECHO}(llm_param(map('instruction', llm_prompt('hi {{0}} and {{1}}', array('Zhu', NULL)))), false));
SELECT '### generic';
SELECT llm_call('{ECHO}', 'plain text'), llm_call('{ECHO}', llm_param(map('instruction', 'x')), false).response;
SELECT '### where';
SELECT count(*) FROM range(0, 1000, 1, 2) WHERE {ECHO}(llm_param(map('instruction', CAST(id AS STRING)))) LIKE '%7';
SELECT '### count';
SELECT count({ECHO}(llm_param(map('instruction', s)))) FROM (SELECT CAST(id AS STRING) AS s FROM range(50000));
SELECT '### embed';
SELECT id, jb_minilm(CASE WHEN id = 1 THEN NULL ELSE concat('A cat sits on mat ', id) END) FROM range(0, 3, 1, 1) ORDER BY id;
SELECT typeof(jb_minilm('x')), llm_call('jb_minilm', llm_param(map('instruction', 'A cat sits on mat 0'))) = jb_minilm('A cat sits on mat 0');
SELECT '### plan';
EXPLAIN SELECT {ECHO}(llm_param(map('instruction', CAST(id AS STRING)))) FROM range(10);
SET spark.byzerllm.authToken={TOKEN};
SELECT '### secure';
SELECT jb_secure(llm_param(map('instruction', 'with the token')));
"""

PYSPARK_QUERIES = {
    "nulls": f"SELECT id, {ECHO}(CASE WHEN id % 3 = 0 THEN NULL ELSE llm_param(map('instruction', concat('n', id))) END) "
             "FROM range(0, 9, 1, 2) ORDER BY id",
    "struct": f"SELECT id, to_json({ECHO}_s(llm_param(map('instruction', concat('s', id), 'max_length', "
              "CASE WHEN id = 1 THEN '-5' ELSE '8' END)))) FROM range(0, 3, 1, 1) ORDER BY id",
    "prompt": f"SELECT llm_result({ECHO}_s(llm_param(map('instruction', llm_prompt('hi {{0}} and {{1}}', array('Zhu', NULL))))))",
}


def _pyspark_lines(rows) -> list[str]:
    return ["\t".join("NULL" if v is None else str(v) for v in row) for row in rows]


def test_spark_sql_file_same_answers_as_pyspark(models, bridge_jar, workdir, spark):
    import byzerllm_spark as bls

    result = spark_sql(models, workdir, bridge_jar, QUERIES)
    assert result.returncode == 0, result.stderr[-4000:]
    out = _sections(result.stdout)

    expected = bls.chat("jb_chat", "What is the capital of France?", temperature=0, max_length=16)
    assert out["chat"] == [expected.strip()] or out["chat"] == [expected], (out["chat"], expected)
    assert "Paris" in out["chat"][0]

    rows = [line.split("\t") for line in out["rows"]]
    assert len(rows) == 20000
    assert sorted(int(i) for i, _ in rows) == list(range(20000))  # every row once
    assert all(a == f"row-{i}" for i, a in rows)  # and its own answer

    bls.register_model_function(spark, ECHO)
    bls.register_model_function(spark, ECHO, udf_name=f"{ECHO}_s", fail_on_error=False)
    for name, sql in PYSPARK_QUERIES.items():
        assert out[name] == _pyspark_lines(spark.sql(sql).collect()), name
    assert out["nulls"][0] == "0\tNULL" and out["nulls"][1] == "1\tn1"
    # to_json leaves null fields out: row 0 answered, row 1 (max_length -5) has its error and no response.
    assert out["struct"][0].startswith('0\t{"response":"s0"') and '"error"' not in out["struct"][0]
    assert '"response"' not in out["struct"][1] and '"error":' in out["struct"][1] and "max_length" in out["struct"][1]
    assert out["prompt"] == ["hi Zhu and "]
    assert out["generic"] == ["plain text\tx"]
    assert out["where"] == [str(sum(1 for i in range(1000) if str(i).endswith("7")))]
    assert out["count"] == ["50000"]
    # Embeddings: array<float>, the vectors the Python side gets for the same texts; a null row is null.
    emb = [line.split("\t") for line in out["embed"][:3]]
    assert [i for i, _ in emb] == ["0", "1", "2"] and emb[1][1] == "NULL"
    expected = bls.embed("jb_minilm", ["A cat sits on mat 0", "A cat sits on mat 2"])
    for (_, text), vector in zip([emb[0], emb[2]], expected):
        got = [float(x) for x in text.strip("[]").split(",")]
        assert len(got) == 384 and got == pytest.approx(vector, abs=1e-6)
    assert out["embed"][3] == "array<float>\ttrue"  # llm_call on an embedding model embeds too
    plan = "\n".join(out["plan"])
    assert "BatchLLMExec" in plan  # batched by the bridge's operator, not called row by row
    assert out["secure"] == ["with the token"]


def test_errors_say_what_to_fix(models, bridge_jar, workdir):
    # hive.cli.errors.ignore: spark-sql goes on after a failed statement, so one JVM shows each error.
    result = spark_sql(models, workdir, bridge_jar,
                       "SELECT llm_call('jb_nope', llm_param(map('instruction', 'x')));\n"
                       "SELECT jb_secure(llm_param(map('instruction', 'no token')));\n"
                       "SELECT '### after';\n", extra=IN_MEMORY,
                       args=("--hiveconf", "hive.cli.errors.ignore=true"))
    assert "model 'jb_nope' is not deployed" in result.stderr and ECHO in result.stderr
    # The secured endpoint without a token: the error names the setting to give.
    assert "answered 401" in result.stderr and "spark.byzerllm.authToken" in result.stderr
    assert "BYZERLLM_AUTH_TOKEN" in result.stderr


# ---- the Thrift JDBC/ODBC server: beeline and a plain JDBC client -------------------------------------
def _wait_port(port: int, proc: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()[-4000:]
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(1)
    raise AssertionError(f"the Thrift server did not listen on {port}: {log.read_text()[-4000:]}")


def test_thrift_server_answers_beeline_and_jdbc(models, bridge_jar, workdir, procs):
    import byzerllm_spark as bls

    port = _free_port()
    log = workdir / "thrift.log"
    cmd = [str(_pyspark_home() / "bin" / "spark-submit"), *_conf(models, workdir, bridge_jar),
           "--class", "org.apache.spark.sql.hive.thriftserver.HiveThriftServer2", "spark-internal",
           "--hiveconf", f"hive.server2.thrift.port={port}", "--hiveconf", "hive.server2.thrift.bind.host=127.0.0.1"]
    with open(log, "w") as handle:
        server = procs.popen(cmd, cwd=workdir, env=_env(), stdout=handle, stderr=subprocess.STDOUT)
    _wait_port(port, server, log)
    url = f"jdbc:hive2://127.0.0.1:{port}/default"

    # A model deployed after the server started: byzerllm_refresh() reads the models again, and
    # registers this one under its udf_name.
    bls.deploy("jb_late", pretrained_model_type="custom/echo", cpus_per_worker=0.1, udf_name="late_chat",
               infer_params={"echo_prefix": "late:"})
    beeline = subprocess.run(
        [str(_pyspark_home() / "bin" / "beeline"), "-u", url, "-n", "test", "--silent=true", "--showHeader=false",
         "--outputformat=tsv2", "-e",
         f"SELECT {ECHO}(llm_param(map('instruction', 'What is the capital of France?', 'temperature', '0'))); "
         f"SELECT count(*) FROM (SELECT id, {ECHO}(llm_param(map('instruction', CAST(id AS STRING)))) AS a "
         "FROM range(0, 5000, 1, 2)) WHERE a = CAST(id AS STRING); "
         "SELECT byzerllm_refresh(); "
         "SELECT late_chat(llm_param(map('instruction', 'x'))), llm_call('jb_late', 'y');"],
        cwd=workdir, env=_env(), capture_output=True, text=True, timeout=180)
    lines = [line for line in beeline.stdout.splitlines() if line.strip()]
    assert beeline.returncode == 0, beeline.stdout[-2000:] + beeline.stderr[-3000:]
    assert lines[0] == "What is the capital of France?"
    assert lines[1] == "5000"
    assert "late_chat" in lines[2].split(",") and ECHO in lines[2].split(",")
    assert lines[3] == "late:x\tlate:y"

    classes = workdir / "jdbc"
    classes.mkdir()
    subprocess.run(["javac", "-d", str(classes), str(BRIDGE / "examples" / "JdbcQuery.java")], check=True, timeout=120)
    jdbc = subprocess.run(
        ["java", "-cp", f"{_jars()}:{classes}", "JdbcQuery", url,
         f"SELECT id, {ECHO}(llm_param(map('instruction', concat('j', id))), false).response, "
         f"llm_result({ECHO}(llm_param(map('instruction', 'r')), false)) FROM range(3) ORDER BY id"],
        cwd=workdir, capture_output=True, text=True, timeout=120)
    assert jdbc.returncode == 0, jdbc.stderr[-3000:]
    rows = [line for line in jdbc.stdout.splitlines() if line.startswith("ROW\t")]
    assert rows == [f"ROW\t{i}\tj{i}\tr" for i in range(3)]


# ---- a Scala job through spark-submit, with the DataFrame API ------------------------------------------
def test_scala_job_spark_submit(models, bridge_jar, workdir):
    classes = workdir / "job"
    classes.mkdir()
    subprocess.run(["java", "-cp", _jars(), "scala.tools.nsc.Main", "-nowarn", "-classpath",
                    f"{_jars()}:{bridge_jar}", "-d", str(classes), str(BRIDGE / "examples" / "BridgeJob.scala")],
                   check=True, timeout=300)
    job = workdir / "job.jar"
    subprocess.run(["jar", "--create", "--file", str(job), "-C", str(classes), "."], check=True, timeout=60)
    result = subprocess.run(
        [str(_pyspark_home() / "bin" / "spark-submit"), "--master", "local[2]", "--jars", str(bridge_jar),
         "--conf", "spark.ui.enabled=false", "--class", "BridgeJob", str(job), models, ECHO, "3000"],
        cwd=workdir, env=_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "BRIDGE_JOB rows=3000 wrong=0" in result.stdout
    assert "BatchLLMExec" in result.stdout


# ---- a worker killed mid-query ---------------------------------------------------------------------------
def test_worker_killed_mid_query_every_row_answered_once(models, bridge_jar, workdir, procs):
    import byzerllm_spark as bls

    name = "jb_kill"
    bls.deploy(name, pretrained_model_type="custom/echo", num_workers=2, cpus_per_worker=0.1,
               infer_params={"echo_delay_ms": "0.5"})
    victim = bls.workers(name)[0]["pid"]
    script = workdir / "kill.sql"
    script.write_text(f"SELECT id, {name}(llm_param(map('instruction', CAST(id AS STRING)))) FROM range(0, 20000, 1, 2);")
    out = workdir / "kill.out"
    with open(out, "w") as handle, open(workdir / "kill.err", "w") as err:
        proc = procs.popen([str(_pyspark_home() / "bin" / "spark-sql"),
                            *_conf(models, workdir, bridge_jar, {"spark.byzerllm.batchSize": "200",
                                                                  "spark.byzerllm.concurrency": "2", **IN_MEMORY}),
                            "-S", "-f", str(script)], cwd=workdir, env=_env(), stdout=handle, stderr=err)
    deadline = time.monotonic() + 400  # a JVM to start, on two shared cores
    while sum(bls.stat(name)["total_requests"]) < 2000:
        assert proc.poll() is None and time.monotonic() < deadline, (workdir / "kill.err").read_text()[-3000:]
        time.sleep(0.05)
    os.kill(victim, signal.SIGKILL)
    assert proc.wait(300) == 0, (workdir / "kill.err").read_text()[-3000:]
    rows = [line.split("\t") for line in out.read_text().splitlines() if line.strip()]
    assert len(rows) == 20000
    assert sorted(int(i) for i, _ in rows) == list(range(20000))
    assert all(a == i for i, a in rows)
    assert victim not in [w["pid"] for w in bls.workers(name)]
