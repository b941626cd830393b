"""Byzer-LLM scripts run as written: every code block of Byzer-LLM's docs (the Chinese source documents
beside this repo, ../shared/seeds) with its paths changed, through ``bls.run_script`` and ``byzerllm run``;
malformed scripts; the notebook in ``examples/`` executed by a real Jupyter kernel.

The paths the docs use (/home/byzerllm/models/..., /my8t/...) become the embedded SmolLM2 and temporary
folders, ``num_gpus`` becomes 0, the Ray address becomes the test cluster's. Nothing else changes.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import byzerllm_spark as bls
from byzerllm_spark.script import ScriptError, ScriptSession, ScriptSyntaxError, parse, run_script
from byzerllm_spark.script.chat_cell import is_chat_cell, parse_chat_cell

ROOT = Path(__file__).resolve().parents[1]
SEEDS = ROOT.parent / "shared" / "seeds"
QUESTION = "What is the capital of France?"


def _doc(prefix: str) -> str:
    found = sorted(SEEDS.glob(f"{prefix}_*.txt"))
    if not found:
        pytest.skip(f"Byzer-LLM's documents are not beside the repo ({SEEDS})")
    return found[0].read_text(encoding="utf-8")


def blocks(prefix: str) -> list[str]:
    """The ```sql code blocks of one document, in order."""
    return re.findall(r"```sql\n(.*?)```", _doc(prefix), re.S)


# ---- parsing: no Spark, no Ray -------------------------------------------------------------------------
@pytest.mark.parametrize("prefix", ["000", "001", "003"])
def test_every_block_of_the_docs_parses(prefix):
    found = blocks(prefix)
    assert found
    for block in found:
        if is_chat_cell(block):
            options, question, _ = parse_chat_cell(block)
            assert options["model"] == "llama2_chat" and options["output"] == "q1" and question == "推荐一部电影"
            continue
        statements = parse(block)
        assert statements and all(s.kind in ("command", "run", "load", "save", "select", "set") for s in statements)


def test_statements_parse_into_their_parts():
    run, load, save, select, setv = parse(
        "run command as LLM.`` where \nand `sft.int.max_seq_length`=\"512\" and udfName='chat' -- a comment\n;"
        "load json.`file:///d/x.jsonl` where inferSchema=\"true\" as sft_data;"
        "save overwrite llama2_300 as delta.`ai_model.llama2_300`;"
        "/* block\ncomment */ select concat('a;b', \"c\") as x from t as t1;"
        "set ds='''{\"k\": \"v;\"}''';"
    )
    assert (run.table, run.module, run.path) == ("command", "LLM", "")
    assert run.params == {"sft.int.max_seq_length": "512", "udfName": "chat"}
    assert (load.format, load.path, load.params, load.table) == ("json", "file:///d/x.jsonl", {"inferSchema": "true"}, "sft_data")
    assert (save.mode, save.table, save.format, save.path) == ("overwrite", "llama2_300", "delta", "ai_model.llama2_300")
    assert select.sql == "select concat('a;b', \"c\") as x from t" and select.table == "t1"
    assert setv.value == '{"k": "v;"}'


def test_full_width_punctuation_and_a_trailing_comma_are_read_leniently_and_said():
    (select,) = parse("select f(map('a', 'b，c'，'d', 1,)) as x as t;")
    assert select.sql == "select f(map('a', 'b，c','d', 1)) as x"  # inside a string it stays
    assert len(select.fixes) == 2


@pytest.mark.parametrize("script, where, message", [
    ("select 'abc as t;", (1, 8), "unclosed quote"),
    ("!byzerllm setup single;\nselect 1 as a as t", (2, 19), "missing ';'"),
    ("!byzerllm setup single\nrun command as LLM.`` where action=\"infer\";", (2, 1), "expected ';' before 'run'"),
    ("select 1;", (1, 9), "ends with 'as <table>'"),
    ("run command as LLM.`` where a=\"1\" and a=\"2\";", (1, 39), "given twice"),
    ("load json.`/x` as;", (1, 18), "expected a name"),
    ("!byzerllm setup single\nselect 1 as a as t;", (2, 1), "expected ';' before 'select'"),
    ("select 1 as a as t\nselect 2 as b as u;", (1, 19), "missing ';' after 'as t'"),
    ("set ds='''{\"a\": 1};", (1, 8), "unclosed quote '''"),
    ("/* a comment\nselect 1 as a as t;", (1, 1), "unclosed comment"),
])
def test_a_script_that_does_not_parse_names_line_and_column_and_shows_the_line(script, where, message):
    with pytest.raises(ScriptSyntaxError, match=message) as info:
        parse(script)
    assert (info.value.line, info.value.column) == where
    assert script.splitlines()[where[0] - 1] in str(info.value)


def test_unknown_statements_keys_and_modules_are_refused_with_the_valid_ones():
    session = ScriptSession(spark=object())  # never reached: each fails before Spark or Ray
    with pytest.raises(ScriptError, match=r"'insert' statements are not supported.*select") as info:
        session.run("!byzerllm setup single;\ninsert into t values (1);")
    assert [r.summary for r in info.value.completed] == ["set single"]  # what ran before is reported
    assert "statement 2 (line 2" in str(info.value)
    with pytest.raises(ScriptError, match=r"unknown global conf key 'num_gpu'.*num_gpus"):
        session.run('!byzerllm setup "num_gpu=1";')
    with pytest.raises(ScriptError, match=r"num_gpus='a lot' is not valid"):
        session.run('!python conf "num_gpus=a lot";')
    with pytest.raises(ScriptError, match=r"the module here is LLM"):
        session.run("run command as Train.`` where a=\"1\";")
    with pytest.raises(ScriptError, match=r"unknown finetune parameter 'learnRate'.*learningRate"):
        session.run('run command as LLM.`` where pretrainedModelType="sft/llama2" and learnRate="1e-4";')
    with pytest.raises(ScriptError, match=r"unknown command !byzerllm model list"):
        session.run("!byzerllm model list;")
    with pytest.raises(ScriptError, match=r"\$\{ds_config\}, which is not set"):
        session.run("set a='''${ds_config}''';")
    with pytest.raises(ScriptError, match=r"unknown chat cell option --%modle.*--%model"):
        session.run("--%chat\n--%modle=chat\nhi")
    with pytest.raises(ScriptError, match=r"'udfname' is not a parameter: did you mean 'udfName'"):
        session.run('run command as LLM.`` where action="infer" and udfname="chat";')


def test_setup_presets_and_conf_are_kept_and_shown():
    session = ScriptSession(spark=object())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a ScriptWarning reaches the caller only through the results
        result = session.run('!byzerllm setup sft;\n!byzerllm setup "num_gpus=0.4";\n'
                             '!python conf "runIn=executor";\n!byzerllm setup "resource.master=0.01";\n!byzerllm setup;')
    assert session.conf["detached"] == "true" and session.conf["num_gpus"] == "0.4"
    assert "runIn='executor' has no effect here" in result[2].warnings[0]
    shown = result[-1].value
    assert shown["resource.master"] == "0.01" and shown["standalone"] == "true" and "num_gpus=0.4" in result[-1].summary


# ---- running: real Spark, Ray Serve, SmolLM2 -------------------------------------------------------------
@pytest.fixture(scope="module")
def paths(tmp_path_factory, cluster):
    from byzerllm_spark.backends._model_files import default_model_dir

    tmp = tmp_path_factory.mktemp("byzer")
    data = tmp / "dummy_data.jsonl"
    rows = [{"instruction": f"What is {a} plus {b}?", "input": "", "output": f"{a} plus {b} is {a + b}.", "history": []}
            for a in range(3) for b in range(3)]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    return {"model": default_model_dir(), "tmp": tmp, "data": data, "ray": bls.cluster.info().ray_address}


def localise(block: str, paths: dict, extra: dict | None = None) -> str:
    """The docs' paths → local ones, num_gpus → 0, the Ray address → the test cluster's. Nothing else."""
    text = block
    for old, new in (extra or {}).items():
        text = text.replace(old, new)
    text = re.sub(r'localModelDir="/home/byzerllm/models/(Llama-2-7b-chat-hf|openbuddy[^"]*)"',
                  f'localModelDir="{paths["model"]}"', text)
    text = re.sub(r'localModelDir="/my8t/[^"]*"', f'localModelDir="{paths["model"]}"', text)
    text = text.replace("load model.`/home/byzerllm/models/Llama-2-7b-chat-hf`", f"load model.`{paths['model']}`")
    text = re.sub(r'localPathPrefix="[^"]*"', f'localPathPrefix="{paths["tmp"] / "jobs"}"', text)
    text = text.replace("file:///home/winubuntu/projects/Firefly/data/dummy_data.jsonl", f"file://{paths['data']}")
    text = re.sub(r'"num_gpus=[0-9.]+"', '"num_gpus=0"', text)
    return text.replace("127.0.0.1:10001", paths["ray"])


def _answers(df) -> list[str]:
    return [row[0] for row in df.collect()]


@pytest.mark.slow
def test_doc_000_deploys_queries_and_removes(spark, paths):
    """The 000 document: global conf with !python conf, the same with !byzerllm setup, then model remove."""
    first, second, remove = blocks("000")
    ask = f"select chat(llm_param(map('instruction', '{QUESTION}', 'temperature', '0'))) as a as t1;"
    result = run_script(localise(first, paths) + ask, spark=spark)
    notes = [w for r in result for w in r.warnings]
    assert any("pythonExec" in w for w in notes) and any("'chatglm' is one of Byzer-LLM's built-in" in w for w in notes)
    assert "Paris" in _answers(result.tables["t1"])[0]
    assert bls.deploy_config("chat").udf_name == "chat"
    run_script(localise(remove, paths), spark=spark)
    assert not bls.exists("chat")
    # the second block, through the command line, joining this test's Ray (its rayAddress: none, so the conf)
    script = paths["tmp"] / "deploy.byzer"
    script.write_text(f'!python conf "rayAddress={paths["ray"]}";\n' + localise(second, paths) + ask)
    try:
        out = _byzerllm("run", str(script))
        assert "deployed chat" in out.stdout and "Paris" in out.stdout, out
        assert ": set single" in out.stdout and "own Ray" not in out.stderr  # it joined the test's Ray
        assert bls.exists("chat")  # the deployment outlives the command: it is in the shared Serve
    finally:
        run_script(localise(remove, paths), spark=spark)


def _byzerllm(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    out = subprocess.run([os.path.join(os.path.dirname(sys.executable), "byzerllm"), *args], input=stdin,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


@pytest.mark.slow
def test_doc_001_plugin_call_with_llm_prompt_and_generation_keys(spark, paths):
    """The 001 document's deploy (llama, reconnect) and its SQL call: llm_prompt, generation.image, the
    full-width comma and trailing comma the document has; then the echo plugin shows what reached it."""
    deploy_block, select_block = blocks("001")[0], blocks("001")[1]
    result = run_script(localise(deploy_block, paths) + select_block, spark=spark)
    try:
        assert any("full-width" in w for w in result[-1].warnings)
        answer = _answers(result.tables["q1"])[0]
        assert isinstance(answer, str) and answer.strip()
        # the same blocks through `byzerllm run`, on a plugin (Byzer-LLM's contract) that answers with the
        # instruction it got: the filled llm_prompt
        echo = deploy_block.replace('pretrainedModelType="llama"', 'pretrainedModelType="custom/echo"')
        script = paths["tmp"] / "plugin.byzer"
        script.write_text(f'!python conf "rayAddress={paths["ray"]}";\n'
                          + localise(echo.replace("llama_13b_chat", "echo_chat"), paths)
                          + select_block.replace("llama_13b_chat(", "echo_chat(").replace("as q1", "as q2"))
        out = _byzerllm("run", str(script))
        assert "请记住我的名字：祝威廉" in out.stdout and "full-width" in out.stderr, out
    finally:
        for name in ("llama_13b_chat", "echo_chat"):
            if bls.exists(name):
                bls.undeploy(name)


@pytest.mark.slow
def test_doc_003_load_finetune_save_deploy_and_chat(spark, paths):
    """The 003 document end to end: load json, sft (detached), load model + sft with model=, save as a
    Delta model table, deploy the finetuned model (resource.master), the --%chat cell with its history."""
    load, sft, from_table, deploy_ft = blocks("003")[:4]
    chat_cell = blocks("003")[4]
    session = ScriptSession(spark)
    first = session.run(localise(load, paths) + localise(sft, paths))
    assert first.tables["sft_data"].count() == 9
    job = first[-1].value
    assert first[-1].table == "llama2_300" and session.conf["detached"] == "true"
    bls.wait(job, progress=False)
    assert bls.job_status(job)["status"] == "SUCCEEDED"
    # load model + sft with model= + save as delta; "s/baichuan" is read as sft (the preset) with a warning
    table = paths["tmp"] / "warehouse" / "llama2_300"
    second = session.run(localise(from_table, paths, {"ai_model.llama2_300": str(table)}))
    assert any("'s/baichuan' is not sft/<name>" in w for w in second[2].warnings)
    assert second[-1].value == 0 and bls.is_model_table(str(table))
    final = bls.job_output(second[2].value)
    deploy_block = localise(deploy_ft, paths)
    deploy_block = re.sub(r'localModelDir="/home/byzerllm/models/sft/jobs/[^"]*"', f'localModelDir="{final}"',
                          deploy_block)
    try:
        third = session.run(deploy_block)
        assert bls.deploy_config("llama2_chat").resources == {"master": 0.01}
        answer = session.run(chat_cell)[0].value
        assert isinstance(answer, str) and answer.strip()
        assert session.spark.table("q1").collect()[0].answer == answer
        session.run("--%chat\n--%model=llama2_chat\n--%output=q2\n\n再推荐一部")
        assert len(session.histories["llama2_chat"]) == 4  # the second question went with the first turn
        assert third[-1].summary.startswith("deployed llama2_chat")
    finally:
        session.run("!byzerllm model remove llama2_chat;")


@pytest.mark.slow
def test_doc_001_sfft_block_trains_with_its_deepspeed_config(spark, paths):
    pytest.importorskip("deepspeed")
    sfft = blocks("001")[3]
    assert "sfft/llama2" in sfft
    # the document sets ds_config and finalTrainData elsewhere: here, before its block
    prelude = ("set ds_config='''{\"train_batch_size\": 1, \"train_micro_batch_size_per_gpu\": 1, "
               "\"optimizer\": {\"type\": \"AdamW\", \"params\": {\"lr\": 1e-4, \"torch_adam\": true}}, "
               "\"zero_optimization\": {\"stage\": 1}}''';\n"
               "select concat('Line ', id, ' of a tiny corpus about the river Tallow.') as text "
               "from range(8) as finalTrainData;\n")
    session = ScriptSession(spark)
    result = session.run(prelude + localise(sfft, paths))
    job = result[-1].value
    bls.wait(job, progress=False)
    status = bls.job_status(job)
    assert status["status"] == "SUCCEEDED" and status["kind"] == "sfft", status


@pytest.mark.slow
def test_a_failed_deploy_is_removed_and_reported_with_what_ran(spark, paths):
    script = ('!byzerllm setup single;\nrun command as LLM.`` where action="infer" and pretrainedModelType="custom/echo" '
              'and udfName="doomed" and echo_init_seconds="30" and modelWaitServerReadyTimeout="3";')
    with pytest.raises(ScriptError, match=r"(?s)statement 2 \(line 2.*removed.*before it ran: set single") as info:
        run_script(script, spark=spark)
    assert len(info.value.completed) == 1
    assert not bls.exists("doomed")
    with pytest.raises(ScriptError, match=r"n_ctxx"):  # an unknown module parameter: the engine's valid ones
        run_script('run command as LLM.`` where action="infer" and inferBackend="llama_cpp" and n_ctxx="10" '
                   'and udfName="typo";', spark=spark)
    assert not bls.exists("typo")


@pytest.mark.slow
def test_byzerllm_run_reports_a_syntax_error_with_its_place(tmp_path):
    script = tmp_path / "bad.byzer"
    script.write_text('!byzerllm setup single;\nselect "unclosed as t;\n')
    out = subprocess.run([os.path.join(os.path.dirname(sys.executable), "byzerllm"), "run", str(script)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    assert "line 2, column 8: unclosed quote" in out.stderr and 'select "unclosed as t;' in out.stderr


@pytest.mark.slow
def test_the_example_notebook_runs_in_a_real_kernel(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    notebook = nbformat.read(ROOT / "examples" / "byzer_notebook.ipynb", as_version=4)
    monkeypatch.setenv("BYZERLLM_HOME", str(tmp_path / "home"))  # the kernel's own library folder and cluster
    client = nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    outputs = {i: "".join(o.get("text", "") + json.dumps(o.get("data", {})) for o in cell.get("outputs", []))
               for i, cell in enumerate(notebook.cells)}
    text = "\n".join(outputs.values())
    assert "deployed chat" in text and "Paris" in text
    # SmolLM2 greedy: asked alone it answers "blue"; with the first cell's turn as history, "teal"
    follow_up = max(i for i, c in enumerate(notebook.cells) if "What is my favourite colour" in c.source)
    assert "teal" in outputs[follow_up].lower()
    assert "teal" in outputs[follow_up + 1].lower() and "next_answer" in outputs[follow_up + 1]  # the SQL cell


@pytest.mark.slow
def test_rows_of_a_select_survive_removing_its_model_and_earlier_deployments_are_callable(spark, paths):
    session = ScriptSession(spark)
    result = session.run(
        'run command as LLM.`` where action="infer" and pretrainedModelType="custom/echo" and udfName="gone";\n'
        "select gone(llm_param(map('instruction', concat('row ', id)))) as a from range(3) as t;\n"
        "!byzerllm model remove gone;"
    )
    assert not bls.exists("gone")
    assert sorted(_answers(spark.table("t"))) == ["row 0", "row 1", "row 2"]  # computed before the model went
    assert sorted(_answers(result.tables["t"])) == ["row 0", "row 1", "row 2"]
    # a model deployed before the script (another command, a notebook): its SQL function is registered
    bls.deploy("earlier", pretrained_model_type="custom/echo", cpus_per_worker=0.1)
    try:
        result = run_script("select earlier(llm_param(map('instruction', 'x'))) as a as t;", spark=spark)
        assert _answers(result.tables["t"]) == ["x"]
        assert any("deployed before this script" in w for w in result[0].warnings)
        with pytest.raises(ScriptError, match=r"nosuch\(\.\.\.\) is neither a Spark function nor a deployed model"):
            run_script("select nosuch(1) as a as t;", spark=spark)
    finally:
        bls.undeploy("earlier")


def test_secrets_in_a_script_never_reach_reprs_or_errors():
    script = ('run command as LLM.`` where pretrainedModelType="sft/x" and `saas.api_key`="sk-SECRET-1" '
              "and apiKey='sk-SECRET-2' and bad=\"1\";")
    (statement,) = parse(script)
    assert "SECRET" not in repr(statement)
    with pytest.raises(ScriptError) as info:
        ScriptSession(spark=object()).run(script)
    assert "SECRET" not in str(info.value) and "saas.api_key`=\"*" in str(info.value)
    with pytest.raises(ScriptSyntaxError) as info:
        parse('run command as LLM.`` where apiKey="sk-SECRET-3" and = ;')
    assert "SECRET" not in str(info.value)
