"""The `openai` package's tools and structured-output API against `zagreus serve` running the
real SmolLM2 with a Nesso-style (Hermes) chat template (started by tests/clients.rs).

Usage: openai_tools.py BASE_URL. Exits non-zero on the first failed check and prints one line
per check that passed.
"""

import json
import sys

import openai

base_url = sys.argv[1]
client = openai.OpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=120)
model = client.models.list().data[0].id
USER = {"role": "user", "content": "What is the weather in Rome?"}
TOOLS = [
    {"type": "function", "function": {"name": "meteo", "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {
            "citta": {"type": "string", "maxLength": 20},
            "unita": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["citta", "unita"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "somma", "description": "Add two numbers",
        "parameters": {"type": "object", "properties": {
            "a": {"type": "integer"}, "b": {"type": "integer"}},
            "required": ["a", "b"], "additionalProperties": False}}},
]


def check(name, cond, detail=""):
    if not cond:
        print(f"FAILED: {name} {detail}", file=sys.stderr)
        sys.exit(1)
    print(f"ok: {name}")


def valid_args(name, args):
    if name == "meteo":
        return set(args) == {"citta", "unita"} and isinstance(args["citta"], str) and args["unita"] in ("celsius", "fahrenheit")
    return set(args) == {"a", "b"} and all(isinstance(args[k], int) for k in "ab")


# tool_choice required, whole answer.
r = client.chat.completions.create(model=model, messages=[USER], tools=TOOLS, tool_choice="required",
                                   parallel_tool_calls=False, temperature=0, max_tokens=80)
c = r.choices[0]
check("required: finish_reason tool_calls", c.finish_reason == "tool_calls", c)
calls = c.message.tool_calls
check("required: one call", calls is not None and len(calls) == 1, c.message)
call = calls[0]
check("required: call shape", call.type == "function" and call.id.startswith("call_") and call.function.name in ("meteo", "somma"), call)
check("required: arguments parse and validate", valid_args(call.function.name, json.loads(call.function.arguments)), call)

# A named function.
r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "What is 2 plus 3?"}], tools=TOOLS,
                                   tool_choice={"type": "function", "function": {"name": "somma"}}, temperature=0, max_tokens=80)
named = r.choices[0].message.tool_calls
check("named: that function", named and all(t.function.name == "somma" for t in named), r.choices[0].message)
check("named: arguments validate", all(valid_args("somma", json.loads(t.function.arguments)) for t in named), named)

# Streamed: the client's deltas reassembled.
ids, names, args, finish, content = {}, {}, {}, None, ""
for chunk in client.chat.completions.create(model=model, messages=[USER], tools=TOOLS, tool_choice="required",
                                            temperature=0, max_tokens=80, stream=True):
    if not chunk.choices:
        continue
    ch = chunk.choices[0]
    d = ch.delta
    content += d.content or ""
    for t in d.tool_calls or []:
        if t.index not in args:
            check("stream: first delta has id, type, name", t.id and t.type == "function" and t.function.name, t)
            ids[t.index], names[t.index], args[t.index] = t.id, t.function.name, ""
        args[t.index] += t.function.arguments or ""
    finish = ch.finish_reason or finish
check("stream: finish_reason tool_calls", finish == "tool_calls", finish)
check("stream: calls reassembled", len(args) >= 1 and all(valid_args(names[i], json.loads(args[i])) for i in args), (names, args))
check("stream: same first call as whole", names[0] == call.function.name and json.loads(args[0]) == json.loads(call.function.arguments), (names, args, call))

# The round trip: the call and its result go back; the model answers in text.
messages = [USER, c.message.model_dump(exclude_none=True),
            {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperatura": 21, "cielo": "sereno"})}]
r = client.chat.completions.create(model=model, messages=messages, tools=TOOLS, tool_choice="none", temperature=0, max_tokens=60)
answer = r.choices[0].message.content
check("round trip: a text answer using the result", answer and "21" in answer and not r.choices[0].message.tool_calls, r.choices[0].message)

# response_format with a schema, and json_object.
schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}, "country": {"type": "string", "maxLength": 30},
          "population_millions": {"type": "integer", "minimum": 0, "maximum": 100}},
          "required": ["city", "country", "population_millions"], "additionalProperties": False}
r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Tell me about Paris as JSON."}], temperature=0, max_tokens=80,
                                   response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema, "strict": True}})
v = json.loads(r.choices[0].message.content)
check("json_schema: parses and has the fields", set(v) == {"city", "country", "population_millions"} and isinstance(v["population_millions"], int), v)
r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Give me a JSON with name and age of a person."}], temperature=0,
                                   max_tokens=200, response_format={"type": "json_object"})
check("json_object: an object", r.choices[0].finish_reason == "stop" and isinstance(json.loads(r.choices[0].message.content), dict), r.choices[0])

# Errors.
try:
    client.chat.completions.create(model=model, messages=[USER], tools=TOOLS, tool_choice={"type": "function", "function": {"name": "oroscopo"}})
    check("unknown function refused", False)
except openai.BadRequestError as e:
    check("unknown function refused", e.status_code == 400 and "oroscopo" in str(e), e)
print("openai tools: all checks passed")
