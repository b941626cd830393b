"""The ``/v1`` API against OpenAI's contract, per built-in backend, through real clients: the official
``openai`` client over every parameter the README's table lists (honoured, or refused with a 400 naming
it), the Responses API, LangChain's ``with_structured_output`` (both methods) and LiteLLM.

One deployment per backend for the module (the embedded SmolLM2: transformers, and llama.cpp with
``logits_all`` for logprobs and a small ``n_ctx`` so that a context overflow is cheap to provoke)."""

from __future__ import annotations

import json
import os

import pytest

pytestmark = pytest.mark.slow

BACKENDS = {
    "transformers": dict(infer_backend="transformers", cpus_per_worker=1),
    "llama_cpp": dict(infer_backend="llama_cpp", cpus_per_worker=1, infer_params={"logits_all": True, "n_ctx": 512}),
}
CONTEXT = {"transformers": 8192, "llama_cpp": 512}
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def models(cluster):
    import byzerllm_spark as bls

    names = {}
    for backend, kwargs in BACKENDS.items():
        names[backend] = f"conf_{backend}"
        bls.deploy(names[backend], **kwargs)
    yield names
    for name in names.values():
        if bls.exists(name):
            bls.undeploy(name)


@pytest.fixture(scope="module")
def client(cluster):
    import openai

    import byzerllm_spark as bls

    return openai.OpenAI(base_url=f"{bls.endpoint()}/v1", api_key="unused-on-loopback", max_retries=0)


def _vocab():
    """The embedded model's tokenizer (llama.cpp, vocabulary only: no weights loaded)."""
    from llama_cpp import Llama

    from byzerllm_spark.backends._model_files import default_model_dir, find_gguf

    return Llama(model_path=find_gguf(default_model_dir()), vocab_only=True, verbose=False)


def _refused(call, param: str, match: str | None = None):
    import openai

    with pytest.raises(openai.BadRequestError) as err:
        call()
    assert err.value.status_code == 400 and err.value.body["param"] == param, err.value.body
    if match:
        assert match in err.value.body["message"], err.value.body
    return err.value


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_chat_and_completions_parameters(models, client, backend):
    model = models[backend]
    chat = client.chat.completions.create

    plain = chat(model=model, messages=QUESTION, temperature=0, max_tokens=16)
    text = plain.choices[0].message.content
    words = text.split()
    assert len(words) >= 3, text
    # stop: the answer ends before the first stop sequence, which it does not contain
    stop = words[2]
    stopped = chat(model=model, messages=QUESTION, temperature=0, max_tokens=16, stop=[stop, "zzzq"])
    assert stopped.choices[0].message.content.strip() == text[:text.index(stop)].strip()
    assert stopped.choices[0].finish_reason == "stop"
    # null is "not set"
    same = chat(model=model, messages=QUESTION, temperature=0, max_tokens=16, stop=None, seed=None, n=None,
                logprobs=None, presence_penalty=None, tools=None, response_format=None)
    assert same.choices[0].message.content == text

    # max_completion_tokens, and usage
    short = chat(model=model, messages=QUESTION, temperature=0, max_completion_tokens=3)
    assert short.usage.completion_tokens == 3 and short.choices[0].finish_reason == "length"
    assert text.startswith(short.choices[0].message.content)

    # logprobs / top_logprobs: one entry per generated token, the chosen token among the most likely
    scored = chat(model=model, messages=QUESTION, temperature=0, max_tokens=4, logprobs=True, top_logprobs=2)
    content = scored.choices[0].logprobs.content
    assert len(content) == scored.usage.completion_tokens == 4
    assert "".join(t.token for t in content).strip() == scored.choices[0].message.content
    for token in content:
        assert token.logprob <= 0 and len(token.top_logprobs) == 2
        assert token.top_logprobs[0].logprob >= token.top_logprobs[1].logprob
        assert token.logprob == pytest.approx(token.top_logprobs[0].logprob, abs=1e-4)  # greedy: the top one
        assert bytes(token.bytes).decode("utf-8") == token.token
    completion = client.completions.create(model=model, prompt="The capital of France is", temperature=0,
                                           max_tokens=3, logprobs=2)
    lp = completion.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 3 and lp.text_offset[0] == 0

    # seed: the same sampled answer alone, batched with other prompts, and as choice 0 of n
    prompts = ["Name a color.", "Tell me a story.", "What is 2+2?"]
    sampled = dict(model=model, temperature=1.0, max_tokens=10, seed=11)
    alone = [client.completions.create(prompt=p, **sampled).choices[0].text for p in prompts]
    batched = client.completions.create(prompt=prompts, **sampled)
    assert [c.text for c in batched.choices] == alone
    two = chat(messages=[{"role": "user", "content": prompts[1]}], n=2, **sampled)
    assert [c.index for c in two.choices] == [0, 1] and two.choices[0].message.content == alone[1]
    assert two.usage.completion_tokens == sum(
        chat(messages=[{"role": "user", "content": prompts[1]}], **{**sampled, "seed": 11 + i}).usage.completion_tokens
        for i in range(2))

    # logit_bias: banning the answer's first token changes the answer's start
    vocab = _vocab()
    first = vocab.tokenize(words[0].encode(), add_bos=False, special=False)[0]
    banned = chat(model=model, messages=QUESTION, temperature=0, max_tokens=6, logit_bias={str(first): -100})
    assert not banned.choices[0].message.content.startswith(words[0])
    # presence / frequency penalties: a word the model repeats unpenalised is repeated less
    repeat = [{"role": "user", "content": "Write the word cat twenty times."}]
    free = chat(model=model, messages=repeat, temperature=0, max_tokens=24).choices[0].message.content
    penalised = chat(model=model, messages=repeat, temperature=0, max_tokens=24, frequency_penalty=2.0,
                     presence_penalty=2.0).choices[0].message.content
    assert penalised.lower().count("cat") < free.lower().count("cat"), (free, penalised)
    _refused(lambda: chat(model=model, messages=QUESTION, presence_penalty=3), "presence_penalty")

    # stream with usage: the same text as without
    chunks = list(chat(model=model, messages=QUESTION, temperature=0, max_tokens=16, stop=[stop], stream=True,
                       stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == \
        stopped.choices[0].message.content
    assert chunks[-1].usage.completion_tokens > 0 and not chunks[-1].choices

    # a conversation of only a system turn is answered
    system_only = chat(model=model, messages=[{"role": "system", "content": "Greet the user."}], temperature=0,
                       max_tokens=8)
    assert system_only.choices[0].message.content

    # a prompt longer than the context: the client's 400, on every route
    too_long = "word " * (CONTEXT[backend] + 50)
    error = _refused(lambda: chat(model=model, messages=[{"role": "user", "content": too_long}], max_tokens=4),
                     "messages", "context")
    assert error.body["code"] == "context_length_exceeded"
    _refused(lambda: list(chat(model=model, messages=[{"role": "user", "content": too_long}], stream=True)),
             "messages")
    _refused(lambda: client.completions.create(model=model, prompt=too_long, max_tokens=4), "messages")
    # tools: SmolLM2's chat template has no tools, so they are refused by name
    tool = {"type": "function", "function": {"name": "weather", "parameters": {"type": "object", "properties": {}}}}
    _refused(lambda: chat(model=model, messages=QUESTION, tools=[tool]), "tools")
    assert chat(model=model, messages=QUESTION, tools=[tool], tool_choice="none", max_tokens=2).choices


def test_models_retrieve_and_responses_api(models, client):
    import openai

    model = models["transformers"]
    assert client.models.retrieve(model).id == model
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no_such_model")

    answer = client.responses.create(model=model, input="What is the capital of France?", temperature=0,
                                     max_output_tokens=16, instructions="Answer in one sentence.")
    assert answer.status == "completed" and "Paris" in answer.output_text
    assert answer.usage.output_tokens > 0 and answer.usage.input_tokens > 5
    events = list(client.responses.create(model=model, input=[{"role": "user", "content": "What is the capital of "
                                                                "France?"}], instructions="Answer in one sentence.",
                                          temperature=0, max_output_tokens=16, stream=True))
    kinds = [e.type for e in events]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed", kinds
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == answer.output_text
    assert events[-1].response.output_text == answer.output_text
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
              "additionalProperties": False}
    structured = client.responses.create(model=model, input="The capital of France is Paris. Give the city.",
                                         temperature=0, max_output_tokens=24,
                                         text={"format": {"type": "json_schema", "name": "place", "schema": schema,
                                                          "strict": True}})
    assert set(json.loads(structured.output_text)) == {"city"}
    _refused(lambda: client.responses.create(model=model, input="x", previous_response_id="resp_1"),
             "previous_response_id")


def test_langchain_structured_output_and_litellm(models, cluster):
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel

    import byzerllm_spark as bls

    model = models["transformers"]

    class Place(BaseModel):
        city: str
        country: str

    llm = ChatOpenAI(model=model, base_url=f"{bls.endpoint()}/v1", api_key="unused-on-loopback", temperature=0,
                     max_tokens=40, max_retries=0)
    prompt = "Paris is the capital of France. Give the city and the country as JSON."
    place = llm.with_structured_output(Place, method="json_schema").invoke(prompt)
    assert isinstance(place, Place) and place.city and place.country
    as_json = llm.with_structured_output(
        {"title": "Place", "type": "object", "properties": {"city": {"type": "string"}}}, method="json_mode"
    ).invoke(prompt)
    assert isinstance(as_json, dict)

    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no download of its price list
    import litellm

    kwargs = dict(model=f"openai/{model}", api_base=f"{bls.endpoint()}/v1", api_key="unused-on-loopback",
                  messages=QUESTION, temperature=0, max_tokens=16)
    answer = litellm.completion(**kwargs)
    assert "Paris" in answer.choices[0].message.content
    streamed = "".join(c.choices[0].delta.content or "" for c in litellm.completion(stream=True, **kwargs))
    assert streamed == answer.choices[0].message.content


#: A chat template written for tools, in the Hermes / Qwen 2.5 form (the model is told to answer with
#: ``<tool_call>{"name": ..., "arguments": ...}</tool_call>``), over SmolLM2's ChatML turns.
TOOLS_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nYou may call functions. Their signatures:\n<tools>\n"
    "{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}</tools>\nTo call one, answer "
    "<tool_call>{\"name\": <name>, \"arguments\": <args>}</tool_call><|im_end|>\n{% endif %}"
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_tools_with_a_chat_template_that_renders_them(models, tmp_path):
    """A model whose chat template reads ``tools`` gets them rendered into its prompt, and its
    ``<tool_call>`` blocks come back as OpenAI's ``tool_calls``; SmolLM2's own template refuses them
    (test_chat_and_completions_parameters). Loaded in this process from the dequantised copy that the
    module's transformers deployment made (``models``)."""
    import asyncio

    from byzerllm_spark.backends import registry
    from byzerllm_spark.backends._model_files import dequantised_dir, default_model_dir, find_gguf
    from byzerllm_spark.config import DeployConfig
    from byzerllm_spark.errors import RequestRefusedError
    from byzerllm_spark.protocol.request import parse_request

    source = dequantised_dir(find_gguf(default_model_dir()))
    model_dir = tmp_path / "smollm2-tools"
    model_dir.mkdir()
    for name in os.listdir(source):
        if name != "chat_template.jinja":
            os.symlink(os.path.join(source, name), model_dir / name)
    (model_dir / "chat_template.jinja").write_text(TOOLS_TEMPLATE)
    tool = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                             "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
    request = parse_request({"messages": [{"role": "user", "content": "Weather in Paris?"}], "temperature": 0,
                             "max_tokens": 24, "generation.tools": [tool]})
    backend = registry.build(DeployConfig(model="tools", infer_backend="transformers", cpus_per_worker=1),
                             str(model_dir))
    try:
        assert backend.supports_tools
        backend.check_request(request)
        assert '"name": "get_weather"' in backend.prompt(request) and "<tool_call>" in backend.prompt(request)
        with pytest.raises(RequestRefusedError, match="tool_choice"):
            backend.check_request(parse_request({"instruction": "x", "generation.tools": [tool],
                                                 "generation.tool_choice": "required"}))
        (answer,) = asyncio.run(backend.chat_batch([request]))
        assert answer.error is None
        for call in json.loads(answer.metadata.get("tool_calls", "[]")):  # what the model chose to call, if any
            assert call["type"] == "function" and isinstance(json.loads(call["function"]["arguments"]), dict)
        # the reading of a call, as a model trained for this template writes it
        text = backend._result(backend.tokenizer.encode(
            'Checking. <tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'), 10, 64, request)
        (call,) = json.loads(text.metadata["tool_calls"])
        assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
        assert text.response == "Checking."
    finally:
        backend.close()


def test_llama_cpp_without_logits_all_refuses_logprobs_by_name():
    """llama.cpp keeps per-token logits only when deployed with ``logits_all=True``: without it, ``logprobs``
    is a 400 naming it and the fix (in this process: the engine alone, no deployment)."""
    from byzerllm_spark.backends import registry
    from byzerllm_spark.backends._model_files import default_model_dir
    from byzerllm_spark.config import DeployConfig, InferParams
    from byzerllm_spark.errors import RequestRefusedError
    from byzerllm_spark.protocol.request import parse_request

    backend = registry.build(DeployConfig(model="lp", infer_backend="llama_cpp", cpus_per_worker=1,
                                          infer_params=InferParams.parse({"n_ctx": 256})), default_model_dir())
    try:
        with pytest.raises(RequestRefusedError, match="logits_all") as err:
            backend.check_request(parse_request({"instruction": "x", "generation.logprobs": True}))
        assert err.value.param == "logprobs" and err.value.status == 400
        with pytest.raises(RequestRefusedError) as err:
            backend.check_request(parse_request({"instruction": "x", "generation.tools": [{"type": "function"}]}))
        assert err.value.param == "tools"
        backend.check_request(parse_request({"instruction": "x", "generation.stop": "\n", "generation.seed": 1}))
    finally:
        backend.close()
