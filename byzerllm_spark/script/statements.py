"""Running Byzer-LLM script statements: each maps onto this library's public Python API.

=================================================  ===================================================
statement                                          runs
=================================================  ===================================================
``!byzerllm setup single;`` ``!python conf "k=v"``  the session's global conf (:data:`CONF_KEYS`)
``run command as LLM.`` where action="infer" ...``  :func:`byzerllm_spark.deploy` + the SQL function
``run command as LLM.`` where ... inputTable=...``  :func:`byzerllm_spark.sft` / :func:`~byzerllm_spark.sfft`
``load json.`path` where k="v" as t;``             ``spark.read`` (any Spark format) → temp view ``t``
``load model.`dir` as m;`` / ``load delta.`db.t```  a model directory / a (model) Delta table
``save overwrite t as delta.`db.t`;``              ``save_model_table`` when ``t`` is a model, else a write
``set name='''...''';``                            ``${name}`` in later statements
``select ... as t;``                               ``spark.sql`` → temp view ``t``
``!byzerllm model remove chat;``                   :func:`byzerllm_spark.undeploy`
=================================================  ===================================================
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable

from ..errors import ByzerLLMError, ConfigError
from . import parser as p
from .chat_cell import is_chat_cell, run_chat_cell
from .presets import PRESETS
from .results import ScriptResult, StatementResult

logger = logging.getLogger(__name__)


class ScriptWarning(UserWarning):
    """A statement was run, but part of it means nothing here (said how) or was read leniently."""


class ScriptError(ByzerLLMError):
    """A statement failed. ``completed`` holds what ran before it; ``statement`` is the one that failed."""

    def __init__(self, message: str, *, statement: p.Statement, completed: "ScriptResult") -> None:
        super().__init__(message)
        self.statement = statement
        self.completed = completed


#: Global conf keys (``!byzerllm setup "k=v"`` / ``!python conf "k=v"``) and what each does here.
#: ``resource.<name>=<amount>`` is accepted too: a custom Ray resource each worker needs.
CONF_KEYS: dict[str, str] = {
    "rayAddress": "the Ray cluster to join (bls.init(ray_address=...)): host:port, ray://host:10001 or auto",
    "num_gpus": "GPUs per worker of a deployment, or GPUs of a finetune job; fractions allowed",
    "maxConcurrency": "workers (Serve replicas) of a deployment",
    "detached": "finetune jobs run as Ray Jobs and the statement returns at once (true/false)",
    "pythonExec": "accepted; workers run this library's Python environment",
    "dataMode": "accepted; always 'model' here",
    "runIn": "accepted; the driver deploys, the executors call the models",
    "standalone": "accepted; no effect here",
    "schema": "accepted; always 'file' here",
    "OWNER": "kept in the conf handed to plugins (sys_conf)",
}
#: The values the no-effect keys have here; another value gets a warning saying so.
_NO_EFFECT = {"dataMode": "model", "runIn": "driver", "schema": "file"}

#: Byzer-LLM's built-in model types: here the built-in engines load any Hugging Face or GGUF model.
BYZER_MODEL_TYPES = frozenset({
    "chatglm", "chatglm2", "chatglm3", "moss", "bark", "whisper", "dolly", "qa", "falcon", "llama", "llama2",
    "baichuan", "baichuan2", "qwen", "internlm", "mistral", "auto",
})
#: Byzer-LLM parameters that mean nothing here: accepted with a warning that says why.
_IGNORED_PARAMS = {
    "quantizationBit": "quantisation is chosen by the engine (GGUF files are quantised; QLoRA trains in 4-bit on CUDA)",
    "quantizationBitNum": "quantisation is chosen by the engine",
    "finetuningType": "finetuning here is LoRA (QLoRA on CUDA)",
    "publicKey": "SaaS vendors are called with saas.api_key",
    "dataWaitServerReadyTimeout": "the data servers here are started and checked by the finetune call itself",
    "localDataDir": "training reads inputTable",
    "standalone": "no effect here",
}
_FINETUNE_NAMES = {"learningRate": "float.learning_rate", "maxSteps": "int.max_steps", "saveSteps": "int.save_steps"}
_FINETUNE_KEYS = frozenset({
    "action", "pretrainedModelType", "localPathPrefix", "localModelDir", "model", "modelTable", "inputTable",
    "outputTable", "detached", "keepPartitionNum", "deepspeedConfig", "name", "format", "num_workers",
    *_FINETUNE_NAMES, *_IGNORED_PARAMS,
})
_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_FORMATS = ("json", "csv", "parquet", "text", "orc", "delta", "model", "jdbc", "avro")


@dataclass
class _PendingModel:
    """A model a finetune statement is still producing (``outputTable`` of a detached job)."""

    job: Any


class ScriptSession:
    """The state scripts share: global conf, ``set`` variables, loaded models, chat histories.

    A notebook keeps one session for all its cells; :func:`run_script` makes a new one unless given one.

    Args:
        spark: the SparkSession; default the active one, else one started on first need
            (``local[*]``).
        progress: show progress bars for long work (deploy, finetune, model table save/load).
    """

    def __init__(self, spark: Any = None, *, progress: bool = True) -> None:
        self._spark = spark
        self.progress = progress
        self.conf: dict[str, str] = {}
        self.preset: str | None = None
        self.variables: dict[str, str] = {}
        self.models: dict[str, Any] = {}  # name -> model dir, model table, or _PendingModel
        self.histories: dict[str, list[dict[str, str]]] = {}
        self.chat_options: dict[str, dict[str, str]] = {}  # per model: --%chat options kept across cells
        self.selects: dict[str, StatementResult] = {}  # views still lazy, by name

    # ---- what statements need ------------------------------------------------------------------
    @property
    def spark(self) -> Any:
        if self._spark is None:
            from pyspark.sql import SparkSession

            self._spark = SparkSession.getActiveSession()
            if self._spark is None:
                os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
                os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
                from importlib import resources

                quiet = resources.files(__package__).joinpath("log4j2-quiet.properties")
                self._spark = (SparkSession.builder.master("local[*]").appName("byzerllm-script")
                               .config("spark.driver.extraJavaOptions", f"-Dlog4j2.configurationFile={quiet}")
                               .config("spark.ui.showConsoleProgress", "false")
                               .getOrCreate())
            from ..sql.functions import register_functions

            register_functions(self._spark)
        return self._spark

    def ray(self) -> None:
        """Join or start Ray and Serve once: the conf's ``rayAddress`` when set."""
        from .. import cluster

        address = self.conf.get("rayAddress")
        try:
            current = cluster.info()
        except ByzerLLMError:
            current = None
        if current is None:
            cluster.init(ray_address=address) if address else cluster.ensure_init()
        elif address and address not in (current.ray_address, "auto"):
            warnings.warn(f"rayAddress={address!r} is not used: this process is already connected to Ray at "
                          f"{current.ray_address!r} (bls.shutdown() first to switch)", ScriptWarning, stacklevel=2)
        else:
            cluster.ensure_init()

    def substitute(self, text: str, where: str) -> str:
        """``${name}`` replaced by the value of ``set name=...``."""

        def value(match: re.Match) -> str:
            name = match.group(1)
            if name not in self.variables:
                raise ConfigError(f"{where} uses ${{{name}}}, which is not set: add `set {name}='''...''';` before "
                                  f"it (set so far: {', '.join(sorted(self.variables)) or 'none'})")
            return self.variables[name]

        return _VARIABLE.sub(value, text)

    def model_dir(self, name: str, where: str) -> tuple[str | None, str | None]:
        """(model_path, model_table) of a model a script loaded or trained, waiting for a training job."""
        found = self.models.get(name)
        if found is None:
            raise ConfigError(f"{where}={name!r} is not a model of this script: load it first (load model.`/path` as "
                              f"{name};) or pass localModelDir=\"/path\" (models so far: "
                              f"{', '.join(sorted(self.models)) or 'none'})")
        if isinstance(found, _PendingModel):
            from ..finetune import job_output, wait

            wait(found.job, progress=self.progress)
            found = self.models[name] = job_output(found.job)
        if isinstance(found, tuple):  # ("table", ref)
            return None, found[1]
        return found, None

    # ---- running ---------------------------------------------------------------------------------
    def run(self, text: str) -> ScriptResult:
        """Run a script (see :func:`run_script`)."""
        if is_chat_cell(text):
            result = ScriptResult()
            try:
                result.append(run_chat_cell(self, text))
            except Exception as exc:  # noqa: BLE001 - reported like any statement's failure
                raise _failed(exc, 1, p.Statement(line=1, column=1, text=text), result) from exc
            return result
        statements = p.parse(text)
        done = ScriptResult()
        for number, statement in enumerate(statements, 1):
            started = time.monotonic()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", ScriptWarning)
                try:
                    result = _RUNNERS[type(statement)](self, statement)
                except Exception as exc:  # noqa: BLE001 - reported with the statement and what already ran
                    raise _failed(exc, number, statement, done) from exc
            notes = [str(w.message) for w in caught if issubclass(w.category, ScriptWarning)]
            for other in caught:
                if not issubclass(other.category, ScriptWarning):
                    warnings.warn_explicit(other.message, other.category, other.filename, other.lineno)
            result.warnings[:0] = notes
            for note in result.warnings:
                logger.warning("line %d: %s", statement.line, note)
            result.seconds = time.monotonic() - started
            done.append(result)
        return done


def _failed(exc: Exception, number: int, statement: p.Statement, done: ScriptResult) -> ScriptError:
    first = p.redact_text(statement.text.strip().splitlines()[0]) if statement.text.strip() else ""
    if len(first) > 80:
        first = first[:77] + "..."
    reason = str(exc)
    if not isinstance(exc, ByzerLLMError):  # Spark's messages carry the query plan: its first line says it
        reason = f"{type(exc).__name__}: {reason.strip().splitlines()[0] if reason.strip() else ''}"
    ran = (f"{len(done)} statement(s) before it ran: {'; '.join(r.summary for r in done)}" if done
           else "nothing ran before it")
    return ScriptError(f"statement {number} (line {statement.line}: {first}) failed: {reason}\n({ran})",
                       statement=statement, completed=done)


def run_script(text: str, spark: Any = None, *, session: ScriptSession | None = None,
               progress: bool = True) -> ScriptResult:
    """Run a Byzer-LLM script: its statements in order, as Byzer-LLM runs them.

    Ray and Serve are started or joined on first need (``bls.init()``, with the script's
    ``rayAddress`` when it sets one); the SparkSession is ``spark``, else the active one, else a
    ``local[*]`` session started here. ``llm_param``/``llm_prompt``/``llm_result`` are registered.

    Args:
        text: the script (str). Statements end with ``;``; see the README's "Byzer scripts and
            notebooks" section for each kind.
        spark: the SparkSession to use; default None (see above).
        session: a :class:`ScriptSession` to keep conf, variables and models across calls;
            default None: a new one.
        progress: progress bars for deploys, finetune jobs and model table saves (default True).

    Returns:
        A :class:`ScriptResult`: one :class:`StatementResult` per statement (``.tables`` maps each
        temp view made to its DataFrame).

    Raises:
        ScriptSyntaxError: the script does not parse (line, column, the line shown); nothing ran.
        ScriptError: a statement failed: the message names it and what ran before it
            (``.completed``); a deployment that failed is removed.

    Example:
        >>> result = bls.run_script('''
        ... !byzerllm setup single;
        ... run command as LLM.`` where action="infer" and pretrainedModelType="custom/auto" and udfName="chat";
        ... select chat(llm_param(map('instruction', 'hi'))) as a as t1;
        ... ''')  # doctest: +SKIP
        >>> result.tables["t1"].show()  # doctest: +SKIP
    """
    return (session or ScriptSession(spark, progress=progress)).run(text)


# ---- statements --------------------------------------------------------------------------------------
def _command(session: ScriptSession, stmt: p.Command) -> StatementResult:
    words = list(stmt.words)
    head = [w.lower() for w in words[:3]]
    if head[:2] in (["byzerllm", "setup"], ["python", "conf"]):
        return _setup(session, stmt, words[2:])
    if head[:3] == ["byzerllm", "model", "remove"] and len(words) == 4:
        return _remove(session, stmt, words[3])
    raise ConfigError(f"unknown command !{' '.join(words[:3])}: the commands are !byzerllm setup [single|sft|sfft|"
                      f"\"key=value\"], !python conf \"key=value\" and !byzerllm model remove <name>")


def _setup(session: ScriptSession, stmt: p.Command, args: list[str]) -> StatementResult:
    if not args:
        shown = dict(sorted(session.conf.items()))
        return StatementResult(stmt, "global conf: " + (", ".join(f"{k}={v}" for k, v in shown.items()) or "(empty)"),
                               value=shown)
    for arg in args:
        if arg.lower() in PRESETS:
            session.preset = arg.lower()
            session.conf.update(PRESETS[session.preset])
            continue
        key, sep, value = arg.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key:
            raise ConfigError(f"!byzerllm setup takes a preset ({', '.join(PRESETS)}) or \"key=value\", got {arg!r}")
        _check_conf(key, value)
        session.conf[key] = value
    return StatementResult(stmt, "set " + ", ".join(args), value=dict(session.conf))


def _check_conf(key: str, value: str) -> None:
    if key.startswith("resource.") and key != "resource.":
        _number(f"resource.{key[9:]}", value, float)
        return
    if key not in CONF_KEYS:
        raise ConfigError(f"unknown global conf key {key!r}: the keys are {', '.join(CONF_KEYS)} and "
                          f"resource.<name> (a custom Ray resource per worker)")
    if key == "num_gpus":
        _number(key, value, float)
    elif key == "maxConcurrency":
        _number(key, value, int)
    elif key == "pythonExec" and os.path.realpath(value) != os.path.realpath(sys.executable):
        warnings.warn(f"pythonExec={value!r} is not used: Ray workers and Spark's Python workers run this "
                      f"library's environment ({sys.executable})", ScriptWarning, stacklevel=2)
    elif key in _NO_EFFECT and value != _NO_EFFECT[key]:
        warnings.warn(f"{key}={value!r} has no effect here: {CONF_KEYS[key]}", ScriptWarning, stacklevel=2)


def _number(key: str, value: str, kind: Callable[[str], Any]) -> Any:
    try:
        number = kind(value)
    except ValueError:
        raise ConfigError(f"{key}={value!r} is not valid: use a{'n integer' if kind is int else ' number'} "
                          f"(e.g. {key}={'1' if kind is int else '0.5'})") from None
    if number < 0:
        raise ConfigError(f"{key}={value!r} is not valid: use a value >= 0")
    return number


def _remove(session: ScriptSession, stmt: p.Command, name: str) -> StatementResult:
    from ..api.deploy import undeploy

    session.ray()
    calls = re.compile(rf"\b{re.escape(name)}\s*\(", re.IGNORECASE)
    for table, result in list(session.selects.items()):
        if calls.search(result.statement.sql):  # its rows need the model: compute them before it goes
            result.value = result.value.localCheckpoint(eager=True)
            result.value.createOrReplaceTempView(table)
            del session.selects[table]
    undeploy(name)
    session.histories.pop(name, None)
    spark = session._spark or _active_spark()
    if spark is not None:
        spark.sql(f"DROP TEMPORARY FUNCTION IF EXISTS `{name}`")
    return StatementResult(stmt, f"removed model {name} and its SQL function", value=name)


def _active_spark() -> Any:
    if "pyspark" not in sys.modules:
        return None
    from pyspark.sql import SparkSession

    return SparkSession.getActiveSession()


def _run(session: ScriptSession, stmt: p.Run) -> StatementResult:
    if stmt.module.lower() != "llm":
        raise ConfigError(f"run ... as {stmt.module}.`{stmt.path}`: the module here is LLM (run command as LLM.`` where ...)")
    params = {key: session.substitute(value, key) for key, value in stmt.params.items()}
    _check_case(params)
    action = params.get("action", "").strip().lower()
    model_type = params.get("pretrainedModelType", "")
    if action not in ("", "infer", "finetune"):
        raise ConfigError(f"action={params['action']!r} is not valid: use action=\"infer\" (deploy) or "
                          f"action=\"finetune\"")
    if action == "finetune" or (not action and (model_type.startswith(("sft/", "sfft/")) or "inputTable" in params)):
        return _finetune(session, stmt, params)
    return _deploy(session, stmt, params)


def _check_case(params: dict[str, str]) -> None:
    """A key that is a known parameter in another case (``udfname``) is a typo: say which one was meant."""
    from ..config import BYZER_DEPLOY_NAMES

    known = {k.lower(): k for k in (*BYZER_DEPLOY_NAMES, *_FINETUNE_KEYS, "udfName", "apiKey")}
    for key in params:
        proper = known.get(key.lower())
        if proper is not None and proper != key:
            raise ConfigError(f"{key!r} is not a parameter: did you mean {proper!r}? (parameter names are "
                              f"case-sensitive, as in Byzer-LLM)")


def _ignored(params: dict[str, str], keys) -> None:
    for key in [k for k in keys if k in params]:
        warnings.warn(f"{key}={params.pop(key)!r} is accepted but not used: {_IGNORED_PARAMS[key]}", ScriptWarning,
                      stacklevel=3)


def _model_type(value: str) -> str:
    """Byzer-LLM's built-in types (``llama``, ``custom/llama2``...) → ``custom/auto``, with a warning."""
    from ..backends import registry

    name = value.split("/", 1)[1] if value.startswith("custom/") else value
    if name.lower() in BYZER_MODEL_TYPES and name != "auto":
        try:
            registry.plugin_module_name(value)
            plugin_found = registry.plugin_entry_points().get(name) is not None
        except ByzerLLMError:
            plugin_found = False
        if not plugin_found:
            warnings.warn(f"pretrainedModelType={value!r} is one of Byzer-LLM's built-in model types; here the "
                          f"built-in engines (transformers, llama.cpp) load any Hugging Face or GGUF model: "
                          f"deploying it as custom/auto", ScriptWarning, stacklevel=3)
            return "custom/auto"
    return value


def _deploy(session: ScriptSession, stmt: p.Run, params: dict[str, str]) -> StatementResult:
    from ..api.deploy import deploy, exists, undeploy

    params.pop("action", None)
    _ignored(params, [k for k in _IGNORED_PARAMS if k != "localDataDir"])
    if "apiKey" in params:
        params.setdefault("saas.api_key", params.pop("apiKey"))
    if "pretrainedModelType" in params:
        params["pretrainedModelType"] = _model_type(params["pretrainedModelType"])
    name = params.get("udfName")
    if not name:
        raise ConfigError("run command as LLM with action=\"infer\" needs udfName=\"<name>\": the deployed model's "
                          "name and its SQL function")
    model = params.pop("model", "command")
    if model != "command":
        path, table = session.model_dir(model, "model")
        if "localModelDir" in params:
            warnings.warn(f"model={model!r} and localModelDir are both given: localModelDir wins (as in Byzer-LLM)",
                          ScriptWarning, stacklevel=2)
        elif path is not None:
            params["localModelDir"] = path
        else:
            params["modelTable"] = table
    kwargs: dict[str, Any] = {}
    if "maxConcurrency" in session.conf and "maxConcurrency" not in params:
        kwargs["maxConcurrency"] = session.conf["maxConcurrency"]
    if "num_gpus" in session.conf and "num_gpus" not in params:
        kwargs["num_gpus"] = session.conf["num_gpus"]
    resources = {k[9:]: float(v) for k, v in session.conf.items() if k.startswith("resource.")}
    session.ray()
    spark = session.spark
    existed = exists(name)
    try:
        config = deploy(name, infer_params=params, sys_conf=dict(session.conf), spark=spark, resources=resources,
                        **kwargs)
    except BaseException:
        if not existed and exists(name):
            undeploy(name)  # nothing half-done is left behind
        raise
    backend = config.infer_backend or ""
    if not backend and config.pretrained_model_type == "custom/auto":
        from ..backends.registry import default_infer_backend

        backend = default_infer_backend()
    verb = "reconnected to" if existed else "deployed"
    return StatementResult(stmt, f"{verb} {name} ({config.pretrained_model_type}{' ' + backend if backend else ''}, "
                                 f"{config.num_workers} worker(s)); SQL function {config.udf_name or name}",
                           value=config, table=name)


def _finetune(session: ScriptSession, stmt: p.Run, params: dict[str, str]) -> StatementResult:
    from .. import finetune

    unknown = [k for k in params if k not in _FINETUNE_KEYS and not k.startswith(("sft.", "sfft."))]
    if unknown:
        raise ConfigError(f"unknown finetune parameter {unknown[0]!r}: the parameters are "
                          f"{', '.join(sorted(_FINETUNE_KEYS - set(_IGNORED_PARAMS)))} and typed keys "
                          f"sft.<type>.<name> / sfft.<type>.<name> (e.g. `sft.int.max_seq_length`=\"512\")")
    model_type = params.get("pretrainedModelType", "")
    prefix = model_type.split("/", 1)[0] if "/" in model_type else ""
    if prefix in ("sft", "sfft"):
        kind = prefix
    else:
        kind = "sfft" if session.preset == "sfft" else "sft"
        if model_type:
            warnings.warn(f"pretrainedModelType={model_type!r} is not sft/<name> or sfft/<name>: finetuning with "
                          f"{kind}" + (f" (from `!byzerllm setup {session.preset}`)" if session.preset else ""),
                          ScriptWarning, stacklevel=2)
    _ignored(params, _IGNORED_PARAMS)
    table = params.get("inputTable")
    if not table:
        raise ConfigError("finetuning needs inputTable=\"<table>\": the training data (load json.`...` as t; first)")
    spark = session.spark
    if not spark.catalog.tableExists(table):
        raise ConfigError(f"inputTable={table!r} is not a table of this Spark session: load it first, e.g. "
                          f"load json.`/data/train.jsonl` as {table};")
    model_path = params.get("localModelDir")
    model = params.get("model", "command")
    if model != "command" and model_path is None:
        model_path, model_table = session.model_dir(model, "model")
        if model_table is not None:
            from ..model_table import load_model_table

            model_path = load_model_table(model_table)
    elif model == "command" and model_path is None:
        warnings.warn("neither localModelDir nor model names a base model: training the embedded SmolLM2-135M-Instruct",
                      ScriptWarning, stacklevel=2)
    typed = {k: v for k, v in params.items() if k.startswith(f"{kind}.")}
    other = "sfft" if kind == "sft" else "sft"
    if any(k.startswith(f"{other}.") for k in params):
        raise ConfigError(f"{next(k for k in params if k.startswith(other + '.'))!r} is a {other} key, but this "
                          f"statement runs {kind}: use {kind}.<type>.<name>")
    for byzer_name, typed_name in _FINETUNE_NAMES.items():
        if byzer_name in params:
            typed.setdefault(f"{kind}.{typed_name}", params[byzer_name])
    detached = _bool("detached", params.get("detached", session.conf.get("detached", "false")))
    options: dict[str, Any] = dict(
        output=params.get("localPathPrefix"), name=params.get("name"), params=typed,
        num_gpus=_number("num_gpus", session.conf.get("num_gpus", "0"), float), detached=detached,
        keep_partition_num=_bool("keepPartitionNum", params.get("keepPartitionNum", "false")),
        sys_conf=dict(session.conf), progress=session.progress,
    )
    if model_type.startswith("custom/"):
        options["pretrained_model_type"] = model_type
    if kind == "sfft":
        if "deepspeedConfig" in params:
            options["deepspeed_config"] = params["deepspeedConfig"]
        if "num_workers" in params:
            options["num_workers"] = _number("num_workers", params["num_workers"], int)
    elif "deepspeedConfig" in params:
        raise ConfigError("deepspeedConfig is for sfft (continued pretraining): use pretrainedModelType=\"sfft/...\"")
    else:
        options["format"] = params.get("format", "auto")
    session.ray()
    job = getattr(finetune, kind)(spark.table(table), model_path, **options)
    output = params.get("outputTable")
    if output:
        session.models[output] = _PendingModel(job)
    state = "submitted (detached)" if detached else "finished"
    return StatementResult(stmt, f"{kind} job {job.job_id} {state}" + (f"; its model is {output}" if output else ""),
                           value=job, table=output)


def _bool(key: str, value: str) -> bool:
    text = str(value).strip().lower()
    if text not in ("true", "false"):
        raise ConfigError(f"{key}={value!r} is not valid: use \"true\" or \"false\"")
    return text == "true"


def _load(session: ScriptSession, stmt: p.Load) -> StatementResult:
    path = session.substitute(stmt.path, "the load path")
    options = {key: session.substitute(value, key) for key, value in stmt.params.items()}
    if stmt.format == "model":
        from ..backends._model_files import check_model_path

        local = path[7:] if path.startswith("file://") else path
        check_model_path("load model", local)
        session.models[stmt.table] = os.path.abspath(local)
        return StatementResult(stmt, f"model {stmt.table} = {local}", value=os.path.abspath(local), table=stmt.table)
    spark = session.spark
    if stmt.format == "delta":
        return _load_delta(session, stmt, path)
    if stmt.format not in _FORMATS and "." not in stmt.format:
        raise ConfigError(f"load {stmt.format}.`...`: unknown format {stmt.format!r}; the formats are "
                          f"{', '.join(_FORMATS)} (or any Spark data source name)")
    df = spark.read.format(stmt.format).options(**options).load(path)
    df.createOrReplaceTempView(stmt.table)
    return StatementResult(stmt, f"loaded {stmt.format} {path} as {stmt.table}", value=df, table=stmt.table)


def _load_delta(session: ScriptSession, stmt: p.Load, path: str) -> StatementResult:
    from ..model_table import is_model_table, read_model_table, resolve_table_uri

    spark = session.spark
    if is_model_table(path):
        session.models[stmt.table] = ("table", path)
        df = read_model_table(spark, path)
        df.createOrReplaceTempView(stmt.table)
        return StatementResult(stmt, f"loaded model table {path} as {stmt.table}", value=df, table=stmt.table)
    from deltalake import DeltaTable

    uri = resolve_table_uri(path)
    df = spark.createDataFrame(DeltaTable(uri).to_pyarrow_table())
    df.createOrReplaceTempView(stmt.table)
    return StatementResult(stmt, f"loaded delta {path} as {stmt.table}", value=df, table=stmt.table)


def _save(session: ScriptSession, stmt: p.Save) -> StatementResult:
    path = session.substitute(stmt.path, "the save path")
    if stmt.table in session.models:
        if stmt.format != "delta":
            raise ConfigError(f"{stmt.table} is a model: save it as delta.`db.table` (a model table), not "
                              f"{stmt.format}.`...`")
        if stmt.mode not in ("overwrite", "errorifexists"):
            raise ConfigError(f"save {stmt.mode} {stmt.table}: a model table save is `save overwrite` (a new "
                              f"version) or `save errorIfExists`")
        from ..model_table import save_model_table

        model_path, table = session.model_dir(stmt.table, "save")
        if model_path is None:
            from ..model_table import load_model_table

            model_path = load_model_table(table)
        version = save_model_table(model_path, path, mode="overwrite" if stmt.mode == "overwrite" else "error")
        return StatementResult(stmt, f"saved model {stmt.table} as model table {path} (version {version})",
                               value=version, table=stmt.table)
    spark = session.spark
    if not spark.catalog.tableExists(stmt.table):
        raise ConfigError(f"save {stmt.table}: no table or model of that name (load it or select ... as "
                          f"{stmt.table}; first)")
    df = spark.table(stmt.table)
    if stmt.format == "delta":
        from deltalake import write_deltalake

        from ..model_table import resolve_table_uri

        mode = {"errorifexists": "error"}.get(stmt.mode, stmt.mode)
        write_deltalake(resolve_table_uri(path), df.toArrow(), mode=mode)
    else:
        df.write.mode(stmt.mode).format(stmt.format).options(**stmt.params).save(path)
    return StatementResult(stmt, f"saved {stmt.table} as {stmt.format} {path} ({stmt.mode})", value=path,
                           table=stmt.table)


def _set(session: ScriptSession, stmt: p.Set) -> StatementResult:
    kind = stmt.params.get("type", "text").lower()
    if kind != "text" or set(stmt.params) - {"type"}:
        raise ConfigError(f"set {stmt.name}: only text values are supported here (where type=\"text\"), got "
                          f"{stmt.params}")
    session.variables[stmt.name] = session.substitute(stmt.value, f"set {stmt.name}")
    return StatementResult(stmt, f"set {stmt.name} ({len(stmt.value)} characters)", value=stmt.value)


def _select(session: ScriptSession, stmt: p.Select) -> StatementResult:
    for fix in stmt.fixes:
        warnings.warn(fix, ScriptWarning, stacklevel=2)
    sql = session.substitute(stmt.sql, "the select statement")
    spark = session.spark
    # Byzer-LLM's SQL was written for Spark 3's default typing (ANSI off): map('user_role', 'User',
    # 'temperature', 0.3) is a map of strings there, while ANSI mode casts 'User' to a double and fails.
    # The statement is analysed with ANSI off, as there; the session's setting is restored after.
    ansi = spark.conf.get("spark.sql.ansi.enabled", "false")
    spark.conf.set("spark.sql.ansi.enabled", "false")
    try:
        try:
            df = spark.sql(sql)
        except Exception as exc:  # noqa: BLE001 - only an unknown function is handled here
            name = _unresolved_function(exc)
            if name is None or not _register_deployed(session, name):
                raise
            df = spark.sql(sql)  # a model deployed earlier (another script or command): now registered
        df.createOrReplaceTempView(stmt.table)
    finally:
        spark.conf.set("spark.sql.ansi.enabled", ansi)
    result = StatementResult(stmt, f"select registered as {stmt.table} (computed when its rows are used)", value=df,
                             table=stmt.table)
    session.selects[stmt.table] = result
    return result


def _unresolved_function(exc: Exception) -> str | None:
    match = re.search(r"UNRESOLVED_ROUTINE\].*?routine `([^`]+)`", str(exc))
    return match.group(1).split(".")[-1] if match else None


def _register_deployed(session: ScriptSession, name: str) -> bool:
    """Register the SQL function of a model deployed before this script (same name); False if none is."""
    from ..api.deploy import deploy_config, exists, list_models
    from ..sql.functions import register_model_function

    session.ray()
    if not exists(name):
        deployed = list_models()
        raise ConfigError(f"{name}(...) is neither a Spark function nor a deployed model (deployed: "
                          f"{', '.join(deployed) or 'none'}); deploy it first: run command as LLM.`` where "
                          f"action=\"infer\" and udfName=\"{name}\";")
    config = deploy_config(name)
    register_model_function(session.spark, name, udf_name=config.udf_name or name)
    warnings.warn(f"{name} was deployed before this script: its SQL function is registered", ScriptWarning,
                  stacklevel=3)
    return True


def _other(session: ScriptSession, stmt: p.Other) -> StatementResult:
    raise ConfigError(f"{stmt.word!r} statements are not supported here; the statement kinds are: "
                      f"{', '.join(p.SUPPORTED_KINDS)}")


_RUNNERS: dict[type, Callable[[ScriptSession, Any], StatementResult]] = {
    p.Command: _command, p.Run: _run, p.Load: _load, p.Save: _save, p.Set: _set, p.Select: _select, p.Other: _other,
}

