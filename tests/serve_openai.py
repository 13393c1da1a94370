"""Drives `pipeline serve` with the official OpenAI Python client (tests/serve_cli.rs runs it).

Usage: python serve_openai.py BASE_URL MODEL

Exits non-zero (an AssertionError or the client's exception) when the server answers anything
the client does not accept or the answers disagree; prints one JSON line with the texts the
Rust side compares with our own generation.
"""

import json
import sys

import openai

base_url, model = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=600)

# The served model is the stage.
models = client.models.list()
assert [m.id for m in models.data] == [model], models
assert client.models.retrieve(model).id == model

messages = [{"role": "user", "content": "Write a Python function that adds two numbers."}]

# Chat, whole: greedy.
chat = client.chat.completions.create(
    model=model, messages=messages, temperature=0, max_tokens=32, seed=7
)
assert chat.object == "chat.completion", chat
assert len(chat.choices) == 1
choice = chat.choices[0]
assert choice.message.role == "assistant"
assert choice.finish_reason in ("stop", "length"), choice
chat_text = choice.message.content
assert chat_text, chat
usage = chat.usage
assert usage.prompt_tokens > 0 and usage.completion_tokens > 0
assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens

# Chat, streamed: the same text, piece by piece, the same usage.
stream = client.chat.completions.create(
    model=model,
    messages=messages,
    temperature=0,
    max_tokens=32,
    seed=7,
    stream=True,
    stream_options={"include_usage": True},
)
pieces, finish, streamed_usage, chunks = [], None, None, 0
for chunk in stream:
    chunks += 1
    assert chunk.object == "chat.completion.chunk", chunk
    if chunk.usage is not None:
        streamed_usage = chunk.usage
    for c in chunk.choices:
        assert c.index == 0
        if c.delta.content:
            pieces.append(c.delta.content)
        if c.finish_reason is not None:
            finish = c.finish_reason
streamed_text = "".join(pieces)
assert streamed_text == chat_text, (streamed_text, chat_text)
assert len(pieces) > 1, "the text came in one piece: not streamed"
assert finish == choice.finish_reason, (finish, choice.finish_reason)
assert streamed_usage is not None and streamed_usage.completion_tokens == usage.completion_tokens

# Completions: a raw prompt.
prompt = "def fibonacci(n):"
completion = client.completions.create(model=model, prompt=prompt, temperature=0, max_tokens=40)
assert completion.object == "text_completion", completion
completion_text = completion.choices[0].text
assert completion_text, completion

# A stop sequence cuts the text before its first occurrence (one from the middle of the
# greedy text, so it is sure to occur), whole and streamed.
middle = len(completion_text) // 2
stop = completion_text[middle : middle + 3]
want = completion_text[: completion_text.find(stop)]
stopped = client.completions.create(
    model=model, prompt=prompt, temperature=0, max_tokens=40, stop=[stop, "never here"]
)
assert stopped.choices[0].text == want, (stopped.choices[0].text, want, stop)
assert stopped.choices[0].finish_reason == "stop"
streamed = client.completions.create(
    model=model, prompt=prompt, temperature=0, max_tokens=40, stop=stop, stream=True
)
pieces, finish = [], None
for chunk in streamed:
    for c in chunk.choices:
        pieces.append(c.text)
        finish = c.finish_reason or finish
assert "".join(pieces) == want, ("".join(pieces), want)
assert finish == "stop"

# Several prompts, several samples each: choice i * n + j is sample j of prompt i.
multi = client.completions.create(
    model=model, prompt=["def add(a, b):", "import os\n"], n=2, temperature=0.8, seed=3, max_tokens=6
)
assert sorted(c.index for c in multi.choices) == [0, 1, 2, 3], multi
again = client.completions.create(
    model=model, prompt=["def add(a, b):", "import os\n"], n=2, temperature=0.8, seed=3, max_tokens=6
)
assert [c.text for c in again.choices] == [c.text for c in multi.choices], "a seed reproduces"

# Errors the client maps to its exceptions.
try:
    client.chat.completions.create(model=model, messages=messages, temperature=-1)
    raise AssertionError("temperature -1 was accepted")
except openai.BadRequestError as e:
    assert e.status_code == 400
    assert e.body["param"] == "temperature", e.body
try:
    client.chat.completions.create(model="no-such-model", messages=messages, max_tokens=2)
    raise AssertionError("an unknown model was accepted")
except openai.NotFoundError as e:
    assert e.status_code == 404
    assert e.body["code"] == "model_not_found", e.body
try:
    client.completions.create(model=model, prompt="x", max_tokens=2, logprobs=2)
    raise AssertionError("logprobs was accepted")
except openai.BadRequestError as e:
    assert e.body["param"] == "logprobs", e.body

print(json.dumps({"chat": chat_text, "completion": completion_text}))
