"""Hugging Face transformers: any causal LM directory, or a GGUF file (dequantised on load).

Requests of one batch that share sampling settings are generated together (left padding), so a
Spark batch of rows becomes a few ``generate`` calls. CUDA is used when the worker has a GPU.
A GGUF file is dequantised once per node into the cache folder (``settings.cache_dir()``) and
loaded from that safetensors copy afterwards. ``backend.*`` keys go to ``from_pretrained`` (e.g.
``backend.torch_dtype=bfloat16``; the names of :data:`LOAD_KEYS`, checked at deploy), except
``backend.max_batch_size`` (rows per ``generate`` call, default 8). Streaming sends tokens as
``generate`` makes them (``TextIteratorStreamer``).

LoRA adapters (``deploy(lora_adapters=...)``, ``bls.add_adapter``) go over the one base model with PEFT's
multi-adapter support: the first wraps the model (``PeftModel.from_pretrained``), the others are added to
it (``load_adapter``), each loaded once. Rows are grouped by adapter as well as by sampling settings, so one
``generate`` call never mixes adapters. Before a group's calls its adapter is merged into the weights of the
layers it adapts (``W + scaling * B @ A``, written over a copy of the base weights kept once, so switching back
is exact, never an unmerge that drifts), and the calls run with PEFT's LoRA branches off
(``disable_adapter()``): measured here (SmolLM2, rank-16 adapters on q/k/v/o, CPU) PEFT's unmerged forward
answered at 0.67 of a merged model's answers/s, its ~120 extra small matmuls per token costing more than the
model's own on a 135M model; a switch costs one ``B @ A`` per adapted layer (a few ms). Adapters PEFT cannot
merge that way (DoRA and other LoRA variants, non-linear layers) run unmerged: ``set_adapter(name)``, and
``disable_adapter()`` for the base model's rows.

A request's ``response_format`` (a JSON schema) constrains decoding through llguidance: a logits
processor masks, at every step, the tokens that cannot continue a valid answer, so the answer always
parses. Why llguidance: measured here (2026-11-30, SmolLM2's 49k-token vocabulary, a two-field object
schema, one CPU core), llguidance 1.9 compiles the schema in 0.4 ms and computes a step's mask in
26 us; outlines-core 0.2 took 19.5 ms and 120 us (and needs its vocabulary built by hand without the
Hugging Face hub); lm-format-enforcer 0.11 does not import with transformers 5; xgrammar 0.2 pulls in
triton (a GPU compiler) on a CPU machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import threading
from typing import Any, AsyncIterator

from ..errors import ConfigError, ContextLengthError, RequestRefusedError
from . import _generation
from ._model_files import dequantised_dir, find_gguf, is_hf_dir
from .base import OPENAI_GENERATION_KEYS, Backend, ChatResult, error_result, prompt_messages, stop_event

#: generate() keyword arguments a request may set through ``generation.<name>``.
_GENERATE_KEYS = {
    "repetition_penalty",
    "no_repeat_ngram_size",
    "num_beams",
    "length_penalty",
    "min_new_tokens",
    "stop_strings",
    "seed",
}


#: OpenAI's sampling keys this backend applies itself (:mod:`._generation`); rows of one ``generate`` call share them.
_OPENAI_KEYS = {"stop", "presence_penalty", "frequency_penalty", "logit_bias", "logprobs", "top_logprobs"}
#: Rows with different seeds share a call: each row samples from its own generator (SeededSampler).
_GROUP_KEYS = (_GENERATE_KEYS - {"seed"}) | _OPENAI_KEYS


#: ``backend.<name>`` keys: ``from_pretrained`` arguments that make sense for a served model (transformers
#: 5's signature and the keyword arguments it documents), and this backend's ``max_batch_size``.
#: Checked on the driver without importing transformers (that import takes seconds).
LOAD_KEYS = frozenset({
    "attn_implementation", "cache_dir", "device_map", "disable_mmap", "dtype", "experts_implementation",
    "force_download", "ignore_mismatched_sizes", "key_mapping", "local_files_only", "max_memory",
    "offload_buffers", "offload_folder", "quantization_config", "revision", "subfolder", "token",
    "torch_dtype", "trust_remote_code", "use_kernels", "use_safetensors", "variant", "weights_only",
})


def _import():
    try:
        import torch
        import transformers
    except ImportError as exc:
        raise ImportError(
            "infer_backend='transformers' needs torch and transformers: pip install "
            f"'byzerllm-spark[transformers]' and torch (scripts/setup.sh installs the CPU build) ({exc})"
        ) from None
    return torch, transformers


class _Cancelled:
    """A ``generate`` stopping criterion: true once the streaming caller has gone away."""

    def __init__(self, event: threading.Event, torch) -> None:
        self.event, self.torch = event, torch

    def __call__(self, input_ids, scores, **kwargs):
        return self.torch.full((input_ids.shape[0],), self.event.is_set(), dtype=self.torch.bool, device=input_ids.device)


class _Grammar:
    """A ``generate`` logits processor: each row with a ``response_format`` gets an llguidance matcher; at
    every step the tokens its grammar forbids get -inf, and the token chosen is fed back to it. A row whose
    matcher is done (or broken) may only end. Rows without a format are left alone."""

    def __init__(self, matchers: list, eos: int, torch, vocab_size: int) -> None:
        import llguidance.torch

        self.matchers, self.eos, self.torch, self.ll = matchers, eos, torch, llguidance.torch
        self.rows = [i for i, m in enumerate(matchers) if m is not None]
        # The masks as packed int32 bits, one row per constrained row, applied in one call: 0.23 ms a step
        # for 8 rows, against 0.65 ms with numpy's unpackbits row by row (SmolLM2's 49k tokens, one core;
        # its forward pass takes 98 ms a step there, so the mask is 0.2% of a step).
        self.bitmask = llguidance.torch.allocate_token_bitmask(len(self.rows), vocab_size)
        bit = 1 << (eos % 32)
        self.eos_word, self.eos_bit = eos // 32, bit - (1 << 32) if bit >= 1 << 31 else bit
        self.started = False

    def __call__(self, input_ids, scores):
        for j, i in enumerate(self.rows):
            matcher = self.matchers[i]
            if self.started and not matcher.is_stopped():
                matcher.consume_token(int(input_ids[i, -1]))
            if matcher.is_stopped() or matcher.is_error():  # only end-of-sequence
                self.bitmask[j] = 0
                self.bitmask[j, self.eos_word] = self.eos_bit
            else:
                self.ll.fill_next_token_bitmask(matcher, self.bitmask, j)
        self.started = True
        bitmask = self.bitmask.to(scores.device)
        if len(self.rows) == scores.shape[0]:
            self.ll.apply_token_bitmask_inplace(scores, bitmask)
        else:
            masked = scores[self.rows]
            self.ll.apply_token_bitmask_inplace(masked, bitmask)
            scores[self.rows] = masked
        return scores


def _import_llguidance():
    try:
        import llguidance
        import llguidance.hf
    except ImportError as exc:
        raise ImportError(
            "response_format on infer_backend='transformers' needs llguidance: pip install "
            f"'byzerllm-spark[transformers]' ({exc})"
        ) from None
    return llguidance


def _import_peft():
    try:
        import peft
    except ImportError as exc:
        raise ImportError(
            f"lora_adapters on infer_backend='transformers' need peft: pip install 'byzerllm-spark[finetune]' ({exc})"
        ) from None
    return peft


def check_adapter_fits(model, name: str, path: str) -> None:
    """Refuse the adapter in ``path`` when its LoRA weights do not fit ``model``'s layers (an adapter trained
    on another base model), before PEFT touches the model: each ``lora_A`` / ``lora_B`` weight must name a
    linear layer of the model with the adapter's input and output sizes. Reads shapes only.

    Raises:
        ConfigError: not a PEFT adapter directory, or a layer that is missing or of another size (named).
    """
    config_file = os.path.join(path, "adapter_config.json")
    if not os.path.isfile(config_file):
        raise ConfigError(f"lora_adapters[{name!r}]={path!r} is not a PEFT adapter directory (no adapter_config.json); "
                          "pass the directory bls.job_output(job) gives for bls.sft(..., merge=False)")
    with open(config_file) as f:
        trained_on = json.load(f).get("base_model_name_or_path")
    weights = os.path.join(path, "adapter_model.safetensors")
    if not os.path.isfile(weights):
        return  # a .bin adapter: PEFT checks it while loading
    from safetensors import safe_open

    modules = dict(model.named_modules())
    with safe_open(weights, framework="pt") as f:
        for key in f.keys():
            part = ".lora_A." if ".lora_A." in key else ".lora_B." if ".lora_B." in key else None
            if part is None:
                continue
            layer = key.split(part)[0].removeprefix("base_model.model.")
            shape = tuple(f.get_slice(key).get_shape())
            module = modules.get(layer)
            size = (getattr(module, "in_features", None), getattr(module, "out_features", None))
            ok = module is not None and (shape[1] == size[0] if part == ".lora_A." else shape[0] == size[1])
            if not ok:
                have = "has no such layer" if module is None else f"has it {size[0]} -> {size[1]}"
                raise ConfigError(
                    f"lora_adapters[{name!r}]={path!r} does not fit this base model: its weight {key} "
                    f"{list(shape)} was trained for another model ({trained_on or 'base model unknown'}); this model "
                    f"{have}. Deploy the base model the adapter was trained on, or train the adapter on this one")


class TokenCounter:
    """Counts tokens with a copy of a Hugging Face tokenizer: the engine's own is in use by generation in
    another thread, and a fast tokenizer called from two threads at once fails ("Already borrowed")."""

    def __init__(self, tokenizer) -> None:
        self._source = tokenizer
        self._copy = None
        self._lock = threading.Lock()

    def __call__(self, texts: list[str]) -> list[int]:
        import copy

        with self._lock:
            if self._copy is None:
                self._copy = copy.deepcopy(self._source)
            return [len(ids) for ids in self._copy(list(texts), add_special_tokens=False)["input_ids"]]


def _seeded_sampling(req) -> bool:
    """A sampled request with a ``seed``: generated alone, so that its answer never depends on its batch."""
    return req.temperature > 0 and req.generation.get("seed") not in (None, "")


class TransformersBackend(Backend):
    name = "transformers"
    supports_lora = True

    @classmethod
    def check_config(cls, config) -> None:
        config.infer_params.check_keys(f"infer_backend={cls.name!r}", backend=LOAD_KEYS | {"max_batch_size"})

    def __init__(self, config, model_dir) -> None:
        super().__init__(config, model_dir)
        torch, transformers = _import()
        self.torch = torch
        self.transformers = transformers
        if not model_dir:
            raise ConfigError("infer_backend='transformers' needs a model directory (model_path=...)")
        options = dict(config.infer_params.backend)
        self.max_batch_size = int(options.pop("max_batch_size", 8))
        self.preferred_batch_size = self.max_batch_size * 2
        use_cuda = torch.cuda.is_available() and config.gpus_per_worker > 0
        self.device = torch.device("cuda" if use_cuda else "cpu")
        dtype = options.pop("torch_dtype", options.pop("dtype", None))
        if dtype is None:
            dtype = torch.bfloat16 if use_cuda else torch.float32
        elif isinstance(dtype, str) and dtype != "auto":
            dtype = getattr(torch, dtype)
        load_kwargs: dict[str, Any] = {"dtype": dtype, **options}
        if is_hf_dir(model_dir):
            source, gguf_kwargs = model_dir, {}
            self.model_file = model_dir
        else:
            gguf = find_gguf(model_dir)
            if gguf is None:
                raise ConfigError(
                    f"model_path={model_dir!r} is not a model: expected a directory with config.json or a .gguf file"
                )
            self.model_file = gguf
            try:
                # Dequantised once per node, then loaded memory-mapped: later starts skip the GGUF
                # dequantisation that made most of a cold start (see dequantised_dir).
                source, gguf_kwargs = dequantised_dir(gguf), {}
            except OSError:  # no writable cache folder: dequantise in memory, as transformers does
                source, gguf_kwargs = os.path.dirname(gguf), {"gguf_file": os.path.basename(gguf)}
        if not use_cuda:
            torch.set_num_threads(max(1, int(round(config.cpus_per_worker)) or 1))
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(source, **gguf_kwargs)
        self.model = transformers.AutoModelForCausalLM.from_pretrained(source, **gguf_kwargs, **load_kwargs)
        self.model.to(self.device)
        self.model.eval()
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self._lock = threading.Lock()
        self.adapters: dict[str, str] = {}  # name -> directory, loaded into self.model (then a PeftModel)
        self._lora_layers: list = []  # PEFT's LoRA layers of self.model
        self._pristine: dict = {}  # LoRA layer -> a copy of its base weight, taken before any merge
        self._merged: str | None = None  # the adapter merged into the base weights now (None: none)
        self._mergeable = True  # every LoRA layer a plain linear LoRA (no DoRA/variant): merged per group
        self._ll_tokenizer = None  # llguidance's view of the tokenizer: built on the first response_format
        self._grammars: dict[str, str] = {}
        context = getattr(self.model.config, "max_position_embeddings", None)
        self.context_length = int(context) if context else None
        # Tools where the model's chat template renders them (it reads a ``tools`` variable); elsewhere (SmolLM2's
        # template has none) a request with tools is refused, 400 naming ``tools``.
        template = getattr(self.tokenizer, "chat_template", None)
        self.supports_tools = isinstance(template, str) and "tools" in template
        self.openai_keys = frozenset(OPENAI_GENERATION_KEYS) - (set() if self.supports_tools else {"tools", "tool_choice"})

    def check_request(self, req) -> None:
        """Refuse, before any work, what this backend does not do, and malformed OpenAI sampling values
        (``stop``, penalties, ``logit_bias``, ``top_logprobs``), each naming its parameter."""
        super().check_request(req)
        _generation.stop_sequences(req.generation.get("stop"))
        _generation.penalties(req.generation, self._vocab_size())
        _generation.top_logprobs(req.generation)
        if self.supports_tools:
            _generation.tool_definitions(req.generation)

    def _vocab_size(self) -> int:
        return int(getattr(self.model.config, "vocab_size", None) or len(self.tokenizer))

    def _check_context(self, req) -> None:
        """Refuse a prompt that leaves no room for an answer in the model's context (400, never a 500)."""
        if not self.context_length:
            return
        prompt = self.prompt(req)
        if len(prompt.encode("utf-8")) < self.context_length:  # fewer bytes than tokens allowed: fits
            return
        tokens = len(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])
        if tokens >= self.context_length:
            raise ContextLengthError(tokens, self.context_length)

    # ---- LoRA adapters ------------------------------------------------------------------
    def load_adapter(self, name: str, path: str) -> None:
        peft = _import_peft()
        with self._lock:
            if name in self.adapters:
                return
            check_adapter_fits(self.model.get_base_model() if self.adapters else self.model, name, path)
            self._merge(None)  # the base weights as they were, before PEFT wraps more layers
            try:
                if not self.adapters:
                    self.model = peft.PeftModel.from_pretrained(self.model, path, adapter_name=name)
                else:
                    self.model.load_adapter(path, adapter_name=name)
            except Exception as exc:
                raise ConfigError(f"lora_adapters[{name!r}]={path!r} could not be loaded over this base model: "
                                  f"{type(exc).__name__}: {str(exc)[:500]}") from None
            self.model.to(self.device)
            self.model.eval()
            self.adapters[name] = path
            from peft.tuners.lora import Linear as LoraLinear
            from peft.tuners.lora import LoraLayer

            self._lora_layers = [m for m in self.model.modules() if isinstance(m, LoraLayer)]
            self._mergeable = all(type(m) is LoraLinear and not getattr(m, "lora_variant", None)
                                  for m in self._lora_layers)

    def _merge(self, adapter: str | None) -> None:
        """Make the adapted layers' base weights ``adapter``'s merged weights (None: the base model's own), from
        the copy of each base weight kept at the first merge: exact, however often adapters switch."""
        if adapter == self._merged:
            return
        with self.torch.no_grad():
            for layer in self._lora_layers:
                weight = layer.get_base_layer().weight
                pristine = self._pristine.get(layer)
                if pristine is None:
                    pristine = self._pristine[layer] = weight.detach().clone()
                if adapter is not None and adapter in layer.lora_A:
                    weight.copy_(pristine + layer.get_delta_weight(adapter).to(weight.dtype))
                elif self._merged is not None and self._merged in layer.lora_A:
                    weight.copy_(pristine)
        self._merged = adapter

    def _with_adapter(self, adapter: str | None):
        """The context a group's ``generate`` calls run in: its adapter active, or every adapter off (base)."""
        if not self.adapters:
            return contextlib.nullcontext()
        if self._mergeable:
            self._merge(adapter)
            return self.model.disable_adapter()  # LoRA branches off: the base layers hold the merged weights
        if adapter is None:
            return self.model.disable_adapter()
        self.model.set_adapter(adapter)
        return contextlib.nullcontext()

    # ---- prompts ------------------------------------------------------------------------
    def prompt(self, req) -> str:
        # No schema hint in the prompt: llguidance's compact JSON alone kept every answer of the tests
        # within max_length, and the hint's extra prompt tokens cost more here than on llama.cpp.
        messages = prompt_messages(req, hint=False)
        if getattr(self.tokenizer, "chat_template", None):
            tools = _generation.tool_definitions(req.generation) if getattr(self, "supports_tools", False) else None
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                                      **({"tools": tools} if tools else {}))
        # No chat template: Byzer-LLM's role names (user_role, assistant_role) build a plain transcript.
        user, assistant = req.user_role or "User", req.assistant_role or "Assistant"
        lines = [messages[0]["content"]] if messages[0]["role"] == "system" else []
        for turn in req.history:
            lines.append(f"{user if turn['role'] == 'user' else assistant}: {turn['content']}")
        lines.append(f"{user}: {req.instruction}")
        lines.append(f"{assistant}:")
        return "\n".join(lines)

    @staticmethod
    def _group_key(req) -> tuple:
        extra = tuple(sorted((k, repr(v)) for k, v in req.generation.items() if k in _GROUP_KEYS))
        extra += (("seeded", _seeded_sampling(req)),)
        sample = req.temperature > 0
        return (req.adapter or "", sample, req.temperature if sample else 0.0, req.top_p if sample else 1.0, req.top_k,
                extra)

    def _generate_kwargs(self, reqs) -> dict[str, Any]:
        """``generate()`` arguments shared by the requests of one group (seeding torch if asked)."""
        first = reqs[0]
        kwargs: dict[str, Any] = {
            "max_new_tokens": max(r.max_length for r in reqs),
            "pad_token_id": self.tokenizer.pad_token_id,
        }
        if first.temperature > 0:
            kwargs.update(do_sample=True, temperature=first.temperature, top_p=first.top_p)
            if first.top_k is not None:
                kwargs["top_k"] = first.top_k
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        seeded = _seeded_sampling(first)
        if seeded:  # each row samples from its own seeded generator (_processors); generate() just takes its token
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        for key, value in first.generation.items():
            if key == "seed":
                if not seeded:
                    self.torch.manual_seed(int(value))
            elif key == "stop_strings":
                kwargs.update(stop_strings=value, tokenizer=self.tokenizer)
            elif key in _GENERATE_KEYS:
                kwargs[key] = value
        stops = _generation.stop_sequences(first.generation.get("stop"))
        if stops:  # generation ends at them; the answer is cut before them (_result)
            given = kwargs.get("stop_strings") or []
            kwargs.update(stop_strings=[*([given] if isinstance(given, str) else given), *stops],
                          tokenizer=self.tokenizer)
        if _generation.top_logprobs(first.generation) is not None:
            kwargs.update(output_logits=True, return_dict_in_generate=True)
        return kwargs

    def _grammar(self, reqs) -> "_Grammar | None":
        """The logits processor of a group's response formats, or None when no row has one."""
        if all(r.response_format is None for r in reqs):
            return None
        llguidance = _import_llguidance()
        if self._ll_tokenizer is None:
            self._ll_tokenizer = llguidance.hf.from_tokenizer(self.tokenizer)  # ~0.5 s, once per worker
        matchers = []
        for req in reqs:
            fmt = req.response_format
            if fmt is None:
                matchers.append(None)
                continue
            grammar = self._grammars.get(fmt.key)
            if grammar is None:
                # Compact JSON: a small model given free whitespace may spend its tokens on newlines.
                grammar = llguidance.LLMatcher.grammar_from_json_schema(
                    fmt.schema, overrides={"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "})
                self._grammars[fmt.key] = grammar
            matcher = llguidance.LLMatcher(self._ll_tokenizer, grammar, log_level=0)
            if matcher.is_error():
                raise ValueError(f"response_format: llguidance cannot use this schema: {matcher.get_error()}")
            matchers.append(matcher)
        return _Grammar(matchers, self.tokenizer.eos_token_id, self.torch, self._ll_tokenizer.vocab_size)

    def _processors(self, reqs) -> dict[str, Any]:
        processors = []
        presence, frequency, bias = _generation.penalties(reqs[0].generation, self._vocab_size())
        if presence or frequency or bias:
            processors.append(_generation.PenaltyProcessor(presence, frequency, bias, self.torch))
        grammar = self._grammar(reqs)
        if grammar is not None:
            processors.append(grammar)
        first = reqs[0]
        if _seeded_sampling(first):  # last: after the grammar's mask, as generate's own warpers come after it
            t = self.transformers
            warpers = [t.TemperatureLogitsWarper(first.temperature)]
            if first.top_k is not None:
                warpers.append(t.TopKLogitsWarper(top_k=first.top_k))
            if first.top_p < 1.0:
                warpers.append(t.TopPLogitsWarper(top_p=first.top_p))
            processors.append(_generation.SeededSampler([r.generation["seed"] for r in reqs], warpers, self.torch,
                                                        self.device))
        if not processors:
            return {}
        return {"logits_processor": self.transformers.LogitsProcessorList(processors)}

    def _result(self, new_tokens: list[int], prompt_tokens: int, max_length: int, req=None,
                logits: list | None = None) -> ChatResult:
        """One answer from its generated token ids: cut at end-of-sequence or at the request's first ``stop``
        sequence, decoded, with usage (and ``logprobs`` as JSON text when asked: ``logits[j]`` is the row's raw
        logits at step ``j``)."""
        new_tokens = new_tokens[:max_length]
        eos = self.tokenizer.eos_token_id
        finish = "length"
        if eos is not None and eos in new_tokens:
            new_tokens = new_tokens[: new_tokens.index(eos)]
            finish = "stop"
        text = self.tokenizer.decode(new_tokens, skip_special_tokens=True).lstrip()
        stops = _generation.stop_sequences(req.generation.get("stop")) if req is not None else []
        if stops:
            text, stopped = _generation.cut_at_stop(text, stops)
            if stopped:  # count the tokens up to the one that completed the stop sequence
                finish = "stop"
                for n in range(1, len(new_tokens) + 1):
                    decoded = self.tokenizer.decode(new_tokens[:n], skip_special_tokens=True).lstrip()
                    if _generation.cut_at_stop(decoded, stops)[1]:
                        new_tokens = new_tokens[:n]
                        break
        metadata = {
            "prompt_tokens": str(prompt_tokens),
            "completion_tokens": str(len(new_tokens)),
            "finish_reason": finish,
        }
        if req is not None and getattr(self, "supports_tools", False) and _generation.tool_definitions(req.generation):
            text, calls = _generation.tool_calls(text)  # the template's <tool_call> blocks: OpenAI's tool_calls
            if calls:
                metadata["tool_calls"] = json.dumps(calls, ensure_ascii=False)
        k = _generation.top_logprobs(req.generation) if req is not None else None
        if k is not None and logits is not None:
            entries = _generation.token_logprobs(self.tokenizer, self.torch, logits, new_tokens, k)
            metadata["logprobs"] = json.dumps(entries, ensure_ascii=False)
        return ChatResult(response=text.strip(), metadata=metadata)

    def _generate(self, reqs, stop: threading.Event | None = None) -> list[ChatResult]:
        prompts = [self.prompt(r) for r in reqs]
        enc = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        kwargs = self._generate_kwargs(reqs)
        kwargs.update(self._processors(reqs))
        if stop is not None:  # a caller that went away stops the generation at its next token
            kwargs["stopping_criteria"] = self.transformers.StoppingCriteriaList([_Cancelled(stop, self.torch)])
        with self.torch.inference_mode(), self._with_adapter(reqs[0].adapter):
            output = self.model.generate(**enc, **kwargs)
        prompt_len = enc["input_ids"].shape[1]
        sequences, logits = getattr(output, "sequences", output), getattr(output, "logits", None)
        return [
            self._result(sequences[i, prompt_len:].tolist(), int(enc["attention_mask"][i].sum()), req.max_length,
                         req, None if logits is None else [step[i] for step in logits])
            for i, req in enumerate(reqs)
        ]

    def _run(self, requests) -> list[ChatResult]:
        results: list[ChatResult | None] = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        for i, req in enumerate(requests):
            try:
                self._check_context(req)
            except ContextLengthError as exc:
                results[i] = error_result(exc)
                continue
            groups.setdefault(self._group_key(req), []).append(i)
        stop = stop_event()
        with self._lock:
            for key, idx in groups.items():
                # Sorting by prompt length keeps padding small inside each generate call.
                idx.sort(key=lambda i: len(requests[i].instruction))
                for start in range(0, len(idx), self.max_batch_size):
                    chunk = idx[start : start + self.max_batch_size]
                    if stop.is_set():
                        answers = [ChatResult(error="cancelled: the caller went away")] * len(chunk)
                        for i, answer in zip(chunk, answers):
                            results[i] = answer
                        continue
                    try:
                        answers = self._generate([requests[i] for i in chunk], stop)
                    except Exception as exc:
                        answers = [error_result(exc)] * len(chunk)
                    for i, answer in zip(chunk, answers):
                        results[i] = answer
        return results  # type: ignore[return-value]

    async def chat_batch(self, requests) -> list[ChatResult]:
        return await asyncio.to_thread(self._run, requests)

    async def stream_chat(self, request) -> AsyncIterator[Any]:
        """Yield the answer's text as ``generate`` produces it (transformers' ``TextIteratorStreamer``,
        ``generate`` in a thread), then a ChatResult with the usage. The pieces join to exactly the
        answer :meth:`chat_batch` gives: whitespace at either end is held back, as ``.strip()`` does."""
        transformers = self.transformers
        streamer = transformers.TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        cancelled = threading.Event()
        outcome: dict[str, Any] = {}
        enc = self.tokenizer([self.prompt(request)], return_tensors="pt", add_special_tokens=False).to(self.device)

        def generate() -> None:
            try:
                with self._lock, self.torch.inference_mode(), self._with_adapter(request.adapter):
                    kwargs = self._generate_kwargs([request])
                    kwargs.update(self._processors([request]))
                    stop = transformers.StoppingCriteriaList([_Cancelled(cancelled, self.torch)])
                    outcome["output"] = self.model.generate(**enc, **kwargs, streamer=streamer, stopping_criteria=stop)
            except BaseException as exc:  # handed to the caller below
                outcome["error"] = exc
                streamer.end()

        self._check_context(request)
        worker = threading.Thread(target=generate, name="transformers-stream", daemon=True)
        worker.start()
        # Whitespace at either end and text that may begin a stop sequence are held back (TextStream).
        text = _generation.TextStream(_generation.stop_sequences(request.generation.get("stop")))
        done, stopped = object(), False
        try:
            while not stopped:
                piece = await asyncio.to_thread(next, streamer, done)
                if piece is done:
                    break
                out, stopped = text.feed(piece)
                if out:
                    yield out
            rest = "" if stopped else text.finish()
            if rest:
                yield rest
        finally:
            cancelled.set()  # a caller that went away stops the generation at its next token
            await asyncio.to_thread(worker.join)
        if "error" in outcome:
            raise outcome["error"]
        prompt_len = enc["input_ids"].shape[1]
        output = outcome["output"]
        sequences, logits = getattr(output, "sequences", output), getattr(output, "logits", None)
        result = self._result(sequences[0, prompt_len:].tolist(), prompt_len, request.max_length, request,
                              None if logits is None else [step[0] for step in logits])
        yield ChatResult(metadata=result.metadata)

    async def count_tokens(self, texts: list[str]) -> list[int]:
        if getattr(self, "_counter", None) is None:
            self._counter = TokenCounter(self.tokenizer)
        return await asyncio.to_thread(self._counter, texts)

    def info(self) -> dict[str, Any]:
        return {"backend": self.name, "model_file": self.model_file, "device": str(self.device),
                "adapters": sorted(self.adapters)}
