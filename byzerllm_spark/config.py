"""Configuration, parsed once at the edge.

Byzer passes everything as string maps (``infer_params``, ``!byzerllm setup`` keys, ``sft.int.x``).
This module turns those maps into frozen, picklable dataclasses and rejects bad keys with a message
that names the key, the bad value and the accepted form.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Collection, Mapping

from .errors import ConfigError, bad_value

#: Value types accepted in typed keys such as ``sft.int.max_seq_length``.
TYPED_KEY_TYPES = ("int", "float", "bool", "str", "list", "dict")
#: Prefixes whose keys must carry a type: ``<prefix>.<type>.<name>``.
TYPED_PREFIXES = ("sft", "sfft")
LOAD_BALANCE_STRATEGIES = ("lru", "round_robin")
#: Serve autoscaling settings of a model deployed with ``max_workers`` (the user's ``autoscaling_config``
#: wins): a worker is added after 5 s of every slot taken (Serve's default of 30 s is long next to a batch
#: job's minutes) and removed after 60 s with less work than the others can take (Serve: 600 s).
AUTOSCALING_DEFAULTS = {"upscale_delay_s": 5.0, "downscale_delay_s": 60.0}
SECRET_KEYS = frozenset({"api_key", "apikey", "api_secret", "secret_key", "token", "password", "headers"})
REDACTED = "******"

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}
_MODEL_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_\-]{0,63}$")
#: A LoRA adapter's name: no ':' (an OpenAI client names one as ``model="<deployment>:<adapter>"``).
_ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")
#: ``max_loras`` when not given: the most LoRA adapters one worker holds (vLLM's engine argument of that name
#: bounds the adapters of one batch; here it bounds those registered on a deployment, which is stricter).
DEFAULT_MAX_LORAS = 8

#: Byzer-LLM's names for ``deploy()`` arguments (the keys of its ``run command as LLM.`` statement
#: and of its Python API) -> this library's names, with the type their string values parse to.
BYZER_DEPLOY_NAMES: dict[str, tuple[str, str]] = {
    "pretrainedModelType": ("pretrained_model_type", "str"),
    "inferBackend": ("infer_backend", "str"),
    "modelPath": ("model_path", "str"),
    "localModelDir": ("model_path", "str"),
    "modelTable": ("model_table", "str"),
    "udfName": ("udf_name", "str"),
    "localPathPrefix": ("local_path_prefix", "str"),
    "modelWaitServerReadyTimeout": ("wait_ready_timeout", "float"),
    "reconnect": ("reconnect", "bool"),
    "maxConcurrency": ("num_workers", "int"),
    "num_gpus": ("gpus_per_worker", "float"),
}
#: Byzer-LLM keys that ``deploy()`` accepts and needs nothing from (``action="infer"`` is the only
#: action a deployment has; finetuning is ``bls.sft`` / ``bls.sfft``).
BYZER_IGNORED_NAMES = frozenset({"action"})

def check_adapter_name(name: Any, param: str = "adapter name") -> str:
    """``name`` if it can name a LoRA adapter (1-64 letters, digits, ``_ . -``, no ``:``), else ConfigError."""
    if not isinstance(name, str) or not _ADAPTER_NAME.match(name):
        raise ConfigError(bad_value(param, name, "use 1-64 letters, digits, '_', '.' or '-' (no ':'), e.g. 'facts'"))
    return name


def parse_lora_adapters(value: Any, param: str = "lora_adapters") -> dict[str, str]:
    """``deploy(lora_adapters=...)`` as ``{name: adapter directory}``.

    Accepts a dict, or Byzer-LLM's string form ``"facts=/path/a,tone=/path/b"`` (the CLI's
    ``--lora_adapters`` and a Byzer script's ``loraAdapters`` key). None or empty: no adapters.

    Raises:
        ConfigError: a malformed pair, a bad name, a path that is not a string, or a name given twice.

    Example:
        >>> parse_lora_adapters("facts=/tmp/a, tone=/tmp/b")
        {'facts': '/tmp/a', 'tone': '/tmp/b'}
    """
    if value is None or value == "" or value == {}:
        return {}
    pairs: list[tuple[Any, Any]]
    if isinstance(value, str):
        pairs = []
        for item in value.split(","):
            if not item.strip():
                continue
            name, sep, path = item.strip().partition("=")
            if not sep or not name.strip() or not path.strip():
                raise ConfigError(bad_value(param, value, "pass NAME=PATH pairs separated by ',', "
                                            "e.g. 'facts=/models/facts_adapter,tone=/models/tone_adapter'"))
            pairs.append((name.strip(), path.strip()))
    elif isinstance(value, Mapping):
        pairs = list(value.items())
    else:
        raise ConfigError(bad_value(param, value, "pass a dict {name: adapter directory} or 'name=/path,...'"))
    out: dict[str, str] = {}
    for name, path in pairs:
        check_adapter_name(name, f"{param} name")
        if not isinstance(path, str) or not path:
            raise ConfigError(bad_value(f"{param}[{name!r}]", path, "pass the adapter's directory as a string"))
        if name in out:
            raise ConfigError(bad_value(param, value, f"adapter {name!r} is named twice: give each adapter one name"))
        out[name] = path
    return out


def is_secret_key(key: str) -> bool:
    """True for keys whose values must never be shown (``saas.api_key`` and friends)."""
    return key.rsplit(".", 1)[-1].lower() in SECRET_KEYS


def redact(params: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``params`` safe to print: secret values replaced by ``******``."""
    return {k: (REDACTED if is_secret_key(k) else v) for k, v in params.items()}


def coerce_value(value: Any) -> Any:
    """Best-effort typing of an untyped string value: bool, int, float, JSON list/dict, else str."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        pass
    if text[:1] in "[{":
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return value
    return value


def parse_typed(key: str, type_name: str, value: Any) -> Any:
    """Convert ``value`` to ``type_name`` (one of :data:`TYPED_KEY_TYPES`) or raise ConfigError."""
    form = {
        "int": "an integer such as '512'",
        "float": "a number such as '2e-4'",
        "bool": "'true' or 'false'",
        "str": "any string",
        "list": "a JSON list such as '[\"a\", \"b\"]'",
        "dict": "a JSON object such as '{\"k\": 1}'",
    }[type_name]
    try:
        if type_name == "str":
            return str(value)
        if type_name == "int":
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, int):
                return value
            return int(str(value).strip())
        if type_name == "float":
            if isinstance(value, bool):
                raise ValueError
            return float(str(value).strip()) if not isinstance(value, (int, float)) else float(value)
        if type_name == "bool":
            if isinstance(value, bool):
                return value
            low = str(value).strip().lower()
            if low in _TRUE:
                return True
            if low in _FALSE:
                return False
            raise ValueError
        parsed = json.loads(value) if isinstance(value, str) else value
        expected = list if type_name == "list" else dict
        if not isinstance(parsed, expected):
            raise ValueError
        return parsed
    except (ValueError, TypeError, json.JSONDecodeError):
        raise ConfigError(bad_value(key, value, f"a '{type_name}' key takes {form}")) from None


def parse_typed_params(params: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """Parse ``<prefix>.<type>.<name>`` keys into ``{name: typed value}``.

    Keys without the prefix are ignored (they belong to other layers). A key with the prefix but a
    missing or unknown type fails, naming the accepted types.

    Example:
        >>> parse_typed_params({"sft.int.max_seq_length": "512"}, "sft")
        {'max_seq_length': 512}
    """
    out: dict[str, Any] = {}
    for key, value in params.items():
        if not key.startswith(prefix + "."):
            continue
        type_name, name = split_typed_key(key, prefix)
        out[name] = parse_typed(key, type_name, value)
    return out


def split_typed_key(key: str, prefix: str) -> tuple[str, str]:
    """``'sft.int.max_seq_length'`` → ``('int', 'max_seq_length')``, or ConfigError naming the form."""
    parts = key.split(".", 2)
    if len(parts) != 3 or parts[1] not in TYPED_KEY_TYPES or not parts[2]:
        raise ConfigError(
            f"{key!r} is not a valid typed key: use '{prefix}.<type>.<name>' with <type> one of "
            f"{', '.join(TYPED_KEY_TYPES)} (for example '{prefix}.int.max_seq_length')"
        )
    return parts[1], parts[2]


def byzer_deploy_args(
    given: Mapping[str, Any],
    defaults: Mapping[str, Any],
    byzer_kwargs: Mapping[str, Any],
    infer_params: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """``deploy()`` arguments given under Byzer-LLM's names, as this library's names.

    Byzer-LLM's names (:data:`BYZER_DEPLOY_NAMES`) are accepted as keyword arguments of ``deploy()``
    and inside ``infer_params`` (where Byzer-LLM's SQL puts every key of ``run command as LLM``).
    ``modelTable="command"`` means "no model table", as in Byzer-LLM.

    Args:
        given: ``deploy()``'s own arguments as called; those that differ from ``defaults`` count as set.
        defaults: ``deploy()``'s keyword defaults (``deploy.__kwdefaults__``).
        byzer_kwargs: the other keyword arguments given to ``deploy()``.
        infer_params: the ``infer_params`` map.

    Returns:
        ``{snake_case name: value}`` for every Byzer-LLM name found.

    Raises:
        ConfigError: an argument that is no name of either kind (with the closest valid one), a
            value that does not parse, or one setting given twice with different values (naming both).

    Example:
        >>> byzer_deploy_args({}, {}, {"udfName": "chat"}, {"modelWaitServerReadyTimeout": "300"})
        {'udf_name': 'chat', 'wait_ready_timeout': 300.0}
    """
    unknown = [key for key in byzer_kwargs if key not in BYZER_DEPLOY_NAMES]
    if unknown:
        import difflib

        names = sorted({"model", *defaults, *BYZER_DEPLOY_NAMES})
        close = difflib.get_close_matches(unknown[0], names, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(f"deploy() has no argument {unknown[0]!r}: {hint}valid arguments: {', '.join(names)}")
    params = infer_params or {}
    for key in BYZER_IGNORED_NAMES & set(params):
        if str(params[key]).strip().lower() != "infer":
            raise ConfigError(bad_value(
                f"infer_params[{key!r}]", params[key],
                "deploy() serves models (action='infer'); finetune with bls.sft(...) or bls.sfft(...)",
            ))
    explicit = {name: value for name, value in given.items() if value != defaults.get(name)}
    sources = [(key, key, value) for key, value in byzer_kwargs.items()]
    sources += [(f"infer_params[{key!r}]", key, value) for key, value in params.items() if key in BYZER_DEPLOY_NAMES]
    found: dict[str, tuple[str, Any]] = {}  # snake_case name -> (where it was given, value)
    for where, key, value in sources:
        name, kind = BYZER_DEPLOY_NAMES[key]
        if isinstance(value, str) or kind == "bool":
            value = parse_typed(where, kind, value)
        if name == "model_table" and value == "command":
            value = None  # Byzer-LLM's "no model table" (its docs: localModelDir with modelTable="command")
        for other, seen in ((name, explicit.get(name, value)), found.get(name, (where, value))):
            if seen != value:
                raise ConfigError(
                    f"{where}={value!r} and {other}={seen!r} disagree: they are one setting ({key} is "
                    f"Byzer-LLM's name for {name}); pass one of them"
                )
        found[name] = (where, value)
    return {name: value for name, (_, value) in found.items()}


@dataclass(frozen=True)
class InferParams:
    """``infer_params`` split by prefix, as Byzer-LLM's ``byzerllm deploy --infer_params`` takes them.

    Attributes:
        saas: ``saas.*`` keys, prefix stripped, values as given (vendor client settings).
        backend: ``backend.*`` keys, prefix stripped, values coerced: passed through to the engine.
        generation: ``generation.*`` / ``gen.*`` keys, stripped: default generation kwargs.
        plain: other keys, coerced (llama.cpp parameters such as ``n_ctx``, or plugin settings);
            Byzer-LLM's deploy names (``udfName``...) are not here: ``deploy()`` takes them.
        raw: the original string map, given unchanged to plugins' ``init_model`` (as Byzer-LLM does).
    """

    saas: dict[str, Any] = field(default_factory=dict)
    backend: dict[str, Any] = field(default_factory=dict)
    generation: dict[str, Any] = field(default_factory=dict)
    plain: dict[str, Any] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, params: Mapping[str, Any] | None) -> "InferParams":
        if params is None:
            return cls()
        if not isinstance(params, Mapping):
            raise ConfigError(bad_value("infer_params", type(params).__name__, "pass a dict of str to str"))
        saas: dict[str, Any] = {}
        backend: dict[str, Any] = {}
        generation: dict[str, Any] = {}
        plain: dict[str, Any] = {}
        for key, value in params.items():
            if not isinstance(key, str) or not key:
                raise ConfigError(bad_value("infer_params key", key, "keys are non-empty strings"))
            head, _, rest = key.partition(".")
            if key in BYZER_DEPLOY_NAMES or key in BYZER_IGNORED_NAMES:
                continue  # deploy() arguments under Byzer-LLM's names: see byzer_deploy_args
            if head in TYPED_PREFIXES:
                continue  # training keys; parsed by the finetune layer
            if head == "saas" and rest:
                saas[rest] = value
            elif head == "backend" and rest:
                name, typed = _typed_or_coerced(key, rest, value)
                backend[name] = typed
            elif head in ("generation", "gen") and rest:
                generation[rest] = coerce_value(value)
            elif head in ("saas", "backend", "generation", "gen"):
                raise ConfigError(f"{key!r} has no name after its prefix: use '{head}.<name>'")
            else:
                plain[key] = coerce_value(value)
        for key in params:
            if key.startswith(TYPED_PREFIXES):
                parse_typed_params(params, key.split(".", 1)[0])
        return cls(saas=saas, backend=backend, generation=generation, plain=plain, raw=dict(params))

    def check_keys(
        self, engine: str, *, backend: Collection[str] = (), plain: Collection[str] = (), saas: bool = False
    ) -> None:
        """Refuse keys that ``engine`` would not use, before any worker starts.

        Args:
            engine: what the keys are for, as the message names it (``infer_backend='transformers'``).
            backend: the ``backend.<name>`` names the engine takes.
            plain: the un-prefixed names it takes (llama.cpp's own ``Llama(...)`` arguments, which it
                also takes as ``backend.<name>``).
            saas: whether ``saas.*`` keys are for it.

        Raises:
            ConfigError: one paragraph naming the first unknown key and listing the valid ones.
        """
        unknown = [f"backend.{k}" for k in self.backend if k not in backend]
        unknown += [k for k in self.plain if k not in plain]
        unknown += [] if saas else [f"saas.{k}" for k in self.saas]
        if not unknown:
            return
        names = ", ".join(sorted({*backend, *plain}))
        if plain:  # llama.cpp: the same names, plain or prefixed
            engine_keys = f"{names} (plain, or as backend.<name>)"
        else:
            engine_keys = f"backend.<name> for {names}" if backend else ""
        valid = [engine_keys, "saas.<name>" if saas else "",
                 "generation.<name> / gen.<name> (default generation values)",
                 "sft.<type>.<name> / sfft.<type>.<name> (finetuning)",
                 f"Byzer-LLM's deploy names ({', '.join(BYZER_DEPLOY_NAMES)})"]
        first = unknown[0]
        what = f"configures saas/<vendor> types, not {engine}" if first.startswith("saas.") else f"is not used by {engine}"
        others = f" (nor {', '.join(repr(k) for k in unknown[1:])})" if unknown[1:] else ""
        raise ConfigError(f"infer_params key {first!r} {what}{others}. Valid keys: {'; '.join(v for v in valid if v)}.")

    def __repr__(self) -> str:
        return (
            f"InferParams(saas={redact(self.saas)!r}, backend={self.backend!r}, "
            f"generation={self.generation!r}, plain={redact(self.plain)!r})"
        )


def _typed_or_coerced(key: str, rest: str, value: Any) -> tuple[str, Any]:
    """``backend.int.n_ctx`` → ('n_ctx', typed); ``backend.n_ctx`` → ('n_ctx', coerced)."""
    parts = rest.split(".", 1)
    if len(parts) == 2 and parts[0] in TYPED_KEY_TYPES:
        return parts[1], parse_typed(key, parts[0], value)
    return rest, coerce_value(value)


#: ``cache=`` modes: ``deterministic`` caches requests whose answer is fixed (temperature 0, a
#: ``generation.seed``, or ``generation.do_sample=false``); ``always`` caches every request.
CACHE_MODES = ("deterministic", "always")
#: Store URI schemes: Redis (or Valkey, or any server speaking its protocol) for a cluster, a
#: directory (diskcache, SQLite-backed) for one node.
CACHE_SCHEMES = ("redis://", "rediss://", "unix://", "diskcache://")
_CACHE_FIX = ("pass True (answers of deterministic requests, kept on each worker's node), 'always' (every "
              "request), a store URI ('redis://host:6379/0' for a cluster, 'diskcache:///abs/dir' for one "
              "node), or {'store': uri, 'mode': 'always'}; False or None turns it off")


@dataclass(frozen=True)
class CacheSpec:
    """A response cache, parsed from ``deploy(cache=...)`` or ``register_model_function(cache=...)``.

    Attributes:
        mode: ``deterministic`` (default) or ``always`` (:data:`CACHE_MODES`).
        store: a store URI (``redis://...``, ``rediss://...``, ``unix://...``, ``diskcache:///dir``),
            or None: a diskcache folder on each worker's node (``<home>/response_cache``).
    """

    mode: str = "deterministic"
    store: str | None = None

    @classmethod
    def parse(cls, value: Any, param: str = "cache") -> "CacheSpec | None":
        """``value`` as a CacheSpec, or None when it turns the cache off.

        Raises:
            ConfigError: naming ``param``, the value (a store password shown as ``******``) and the fix.

        Example:
            >>> CacheSpec.parse("redis://cache.internal:6379/0")
            CacheSpec(mode='deterministic', store='redis://cache.internal:6379/0')
        """
        if value is None or value is False:
            return None
        if value is True:
            return cls()
        if isinstance(value, CacheSpec):
            return value
        if isinstance(value, Mapping):
            unknown = sorted(set(value) - {"store", "mode"})
            if unknown:
                raise ConfigError(f"{param} has no key {unknown[0]!r}: use 'store' and 'mode'; {_CACHE_FIX}")
            mode = value.get("mode") or "deterministic"
            if mode not in CACHE_MODES:
                raise ConfigError(bad_value(f"{param}['mode']", mode, f"use one of {', '.join(CACHE_MODES)}"))
            store = value.get("store")
            return cls(mode=mode, store=None if store in (None, True) else cls._store(store, f"{param}['store']"))
        if not isinstance(value, str):
            raise ConfigError(bad_value(param, value, _CACHE_FIX))
        text = value.strip()
        low = text.lower()
        if low in _FALSE or low in ("none", ""):
            return None
        if low in _TRUE:
            return cls()
        if low in CACHE_MODES:
            return cls(mode=low)
        return cls(store=cls._store(text, param))

    @staticmethod
    def _store(value: Any, param: str) -> str:
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(bad_value(param, value, _CACHE_FIX))
        text = value.strip()
        if text.startswith("/"):
            text = "diskcache://" + text
        if not text.lower().startswith(CACHE_SCHEMES):
            raise ConfigError(bad_value(param, redact_uri(text), _CACHE_FIX))
        if text.lower().startswith("diskcache://") and not text[len("diskcache://"):].startswith("/"):
            raise ConfigError(bad_value(param, text, "a diskcache store takes an absolute folder, "
                                                     "e.g. 'diskcache:///var/cache/byzerllm'"))
        return text

    def header(self) -> str:
        """This spec as the value of the Arrow route's cache header (``settings.CACHE_HEADER``)."""
        return json.dumps({"mode": self.mode, "store": self.store})

    def __repr__(self) -> str:
        return f"CacheSpec(mode={self.mode!r}, store={redact_uri(self.store) if self.store else None!r})"


def redact_uri(uri: str) -> str:
    """``uri`` with the password of its ``user:password@`` part as ``******`` (store URIs in messages)."""
    return re.sub(r"(//[^/@:]*:)[^@/]*@", lambda m: m.group(1) + REDACTED + "@", uri)


@dataclass(frozen=True)
class DeployConfig:
    """Everything a worker needs to build its backend. Pickled into each Serve replica."""

    model: str
    pretrained_model_type: str = "custom/auto"
    infer_backend: str | None = None
    model_path: str | None = None
    model_table: str | None = None
    num_workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    worker_concurrency: int = 1
    infer_params: InferParams = field(default_factory=InferParams)
    load_balance: str = "lru"
    udf_name: str | None = None
    sys_conf: dict[str, Any] = field(default_factory=dict)
    local_path_prefix: str | None = None
    resources: dict[str, float] = field(default_factory=dict)
    #: The response cache (``deploy(cache=...)``), None: off.
    cache: CacheSpec | None = None
    #: Autoscaling bounds (``deploy(min_workers=, max_workers=)``); None: a fixed ``num_workers``.
    min_workers: int | None = None
    max_workers: int | None = None
    #: Serve ``AutoscalingConfig`` keys over :data:`AUTOSCALING_DEFAULTS` (``deploy(autoscaling_config=)``).
    autoscaling_config: dict[str, Any] = field(default_factory=dict)
    #: LoRA adapters every worker loads over the base model, ``{name: adapter directory}``
    #: (``deploy(lora_adapters=...)``); a row picks one with its ``adapter`` key.
    lora_adapters: dict[str, str] = field(default_factory=dict)
    #: The most adapters the deployment holds (those of ``lora_adapters`` and ``add_adapter`` together).
    max_loras: int = DEFAULT_MAX_LORAS

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not _MODEL_NAME.match(self.model):
            raise ConfigError(
                bad_value("model", self.model, "use 1-64 letters, digits, '_' or '-', starting with a letter")
            )
        _check_number("num_workers", self.num_workers, minimum=1, integer=True)
        _check_number("worker_concurrency", self.worker_concurrency, minimum=1, integer=True)
        _check_number("cpus_per_worker", self.cpus_per_worker, minimum=0.0)
        _check_number("gpus_per_worker", self.gpus_per_worker, minimum=0.0)
        self._check_autoscaling()
        if not isinstance(self.resources, dict):
            raise ConfigError(bad_value("resources", self.resources, "pass a dict of resource name to amount"))
        for name, amount in self.resources.items():
            if not isinstance(name, str) or not name or name in ("CPU", "GPU"):
                raise ConfigError(bad_value("resources key", name, "name a custom Ray resource; CPU and GPU are "
                                            "cpus_per_worker and gpus_per_worker"))
            _check_number(f"resources[{name!r}]", amount, minimum=0.0)
        if self.load_balance not in LOAD_BALANCE_STRATEGIES:
            raise ConfigError(
                bad_value("load_balance", self.load_balance, f"use one of {', '.join(LOAD_BALANCE_STRATEGIES)}")
            )
        if not isinstance(self.pretrained_model_type, str) or not self.pretrained_model_type:
            raise ConfigError(bad_value("pretrained_model_type", self.pretrained_model_type, "e.g. 'custom/auto'"))
        if self.model_path is not None and self.model_table is not None:
            raise ConfigError(
                "pass model_path or model_table, not both (Byzer-LLM lets localModelDir win; here, be explicit)"
            )
        if self.udf_name is not None and not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", self.udf_name):
            raise ConfigError(bad_value("udf_name", self.udf_name, "use a SQL identifier: letters, digits and '_'"))
        _check_number("max_loras", self.max_loras, minimum=1, integer=True)
        object.__setattr__(self, "lora_adapters", parse_lora_adapters(self.lora_adapters))
        if len(self.lora_adapters) > self.max_loras:
            raise ConfigError(bad_value("lora_adapters", sorted(self.lora_adapters), f"this is {len(self.lora_adapters)} "
                                        f"adapters but max_loras={self.max_loras}: raise max_loras or deploy fewer"))

    def _check_autoscaling(self) -> None:
        if self.min_workers is None and self.max_workers is None:
            if self.autoscaling_config:
                raise ConfigError(bad_value("autoscaling_config", self.autoscaling_config,
                                            "it tunes autoscaling: pass max_workers= (and min_workers=) too"))
            return
        if self.max_workers is None:
            raise ConfigError(bad_value("min_workers", self.min_workers, "autoscaling needs an upper bound: pass "
                                        "max_workers= too, e.g. min_workers=1, max_workers=4"))
        _check_number("max_workers", self.max_workers, minimum=1, integer=True)
        if self.min_workers is not None:
            _check_number("min_workers", self.min_workers, minimum=0, integer=True)
            if self.min_workers > self.max_workers:
                raise ConfigError(bad_value("min_workers", self.min_workers,
                                            f"use at most max_workers={self.max_workers}"))
        if self.num_workers != 1:
            raise ConfigError(bad_value("num_workers", self.num_workers, "pass a fixed num_workers or "
                                        "min_workers/max_workers (autoscaling), not both"))
        if not isinstance(self.autoscaling_config, dict):
            raise ConfigError(bad_value("autoscaling_config", self.autoscaling_config,
                                        "pass a dict of Ray Serve AutoscalingConfig keys, e.g. {'downscale_delay_s': 300}"))
        owned = {"min_replicas", "max_replicas", "initial_replicas"} & set(self.autoscaling_config)
        if owned:
            raise ConfigError(bad_value("autoscaling_config", sorted(owned), "set them with min_workers= and "
                                        "max_workers= (workers start at min_workers)"))

    @property
    def autoscaling(self) -> bool:
        """True when Serve scales the workers between ``min_workers`` and ``max_workers``."""
        return self.max_workers is not None

    @property
    def initial_workers(self) -> int:
        """Workers started by ``deploy``: ``min_workers`` (default 1) when autoscaling, else ``num_workers``."""
        if self.autoscaling:
            return 1 if self.min_workers is None else self.min_workers
        return self.num_workers

    @property
    def most_workers(self) -> int:
        """The most workers this model can have: ``max_workers`` when autoscaling, else ``num_workers``."""
        return self.max_workers if self.autoscaling else self.num_workers

    def serve_autoscaling_config(self) -> dict[str, Any] | None:
        """Serve's ``autoscaling_config`` for this model, or None for a fixed ``num_workers``.

        Each worker's target is ``worker_concurrency`` requests in flight (its slots), so Serve adds a
        worker when the slots of all are taken and requests queue; :data:`AUTOSCALING_DEFAULTS` under
        the user's ``autoscaling_config`` keys.
        """
        if not self.autoscaling:
            return None
        return {**AUTOSCALING_DEFAULTS, "target_ongoing_requests": self.worker_concurrency,
                **self.autoscaling_config, "min_replicas": self.initial_workers,
                "initial_replicas": self.initial_workers, "max_replicas": self.max_workers}

    @property
    def is_saas(self) -> bool:
        return self.pretrained_model_type.startswith("saas/")

    def __repr__(self) -> str:
        return (
            f"DeployConfig(model={self.model!r}, pretrained_model_type={self.pretrained_model_type!r}, "
            f"infer_backend={self.infer_backend!r}, model_path={self.model_path!r}, "
            f"model_table={self.model_table!r}, num_workers={self.num_workers}, "
            f"cpus_per_worker={self.cpus_per_worker}, gpus_per_worker={self.gpus_per_worker}, "
            + (f"min_workers={self.initial_workers}, max_workers={self.max_workers}, " if self.autoscaling else "")
            + f"worker_concurrency={self.worker_concurrency}, load_balance={self.load_balance!r}, "
            f"infer_params={self.infer_params!r}"
            + (f", cache={self.cache!r}" if self.cache else "")
            + (f", lora_adapters={self.lora_adapters!r}, max_loras={self.max_loras}" if self.lora_adapters else "")
            + ")"
        )


def _check_number(name: str, value: Any, *, minimum: float, integer: bool = False) -> None:
    ok_types = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, ok_types) or value < minimum:
        kind = "an integer" if integer else "a number"
        raise ConfigError(bad_value(name, value, f"use {kind} >= {minimum:g}"))
