"""The official `openai` package against `zagreus serve` (started by tests/clients.rs).

Usage: openai_client.py BASE_URL API_KEY. Exits non-zero on the first failed check and prints
one line per check that passed.
"""

import sys

import openai

base_url, key = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=120)
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def check(name, cond, detail=""):
    if not cond:
        print(f"FAILED: {name} {detail}", file=sys.stderr)
        sys.exit(1)
    print(f"ok: {name}")


models = client.models.list()
check("models.list", len(models.data) == 1 and models.data[0].id, models)
model = models.data[0].id

# Chat, whole.
chat = client.chat.completions.create(model=model, messages=QUESTION, temperature=0, max_tokens=24)
answer = chat.choices[0].message.content
check("chat answers", "Paris" in answer, answer)
check("chat role", chat.choices[0].message.role == "assistant")
check("chat finish_reason", chat.choices[0].finish_reason in ("stop", "length"), chat)
u = chat.usage
check("chat usage", u.prompt_tokens > 0 and u.completion_tokens > 0 and u.total_tokens == u.prompt_tokens + u.completion_tokens, u)

# Chat, streamed, with the usage chunk.
pieces, usage, finish, roles = [], None, None, []
for c in client.chat.completions.create(
    model=model, messages=QUESTION, temperature=0, max_tokens=24, stream=True, stream_options={"include_usage": True}
):
    if c.usage is not None:
        usage = c.usage
    for ch in c.choices:
        if ch.delta.role:
            roles.append(ch.delta.role)
        if ch.delta.content:
            pieces.append(ch.delta.content)
        if ch.finish_reason:
            finish = ch.finish_reason
check("chat stream text", "".join(pieces) == answer, pieces)
check("chat stream role first", roles == ["assistant"], roles)
check("chat stream finish", finish == chat.choices[0].finish_reason, finish)
check("chat stream include_usage", usage is not None and usage.total_tokens == u.total_tokens, usage)

# A stop string that spans tokens, while streaming: never sent, the text stops before it.
at = answer.index("apital")
stop = answer[at : at + 9]
pieces = []
for c in client.chat.completions.create(
    model=model, messages=QUESTION, temperature=0, max_tokens=24, stream=True, stop=[stop]
):
    for ch in c.choices:
        if ch.delta.content:
            pieces.append(ch.delta.content)
        if ch.finish_reason:
            finish = ch.finish_reason
check("stop string while streaming", "".join(pieces) == answer[:at] and finish == "stop", (pieces, finish))

# Chat logprobs.
lp = client.chat.completions.create(
    model=model, messages=QUESTION, temperature=0, max_tokens=5, logprobs=True, top_logprobs=2
)
content = lp.choices[0].logprobs.content
check("chat logprobs", len(content) >= 1 and all(len(t.top_logprobs) == 2 for t in content), content)
check("chat logprobs greedy", all(t.logprob >= t.top_logprobs[0].logprob - 1e-5 for t in content), content)

# Completions, whole and streamed, with logprobs.
comp = client.completions.create(model=model, prompt="Once upon a time", max_tokens=8, temperature=0, logprobs=2)
text = comp.choices[0].text
l = comp.choices[0].logprobs
check("completion text", len(text) > 0, comp)
check("completion logprobs", len(l.tokens) == len(l.token_logprobs) == len(l.top_logprobs) == len(l.text_offset), l)
streamed = "".join(
    ch.text
    for c in client.completions.create(model=model, prompt="Once upon a time", max_tokens=8, temperature=0, stream=True)
    for ch in c.choices
)
check("completion stream", streamed == text, (streamed, text))

# n choices and seeds: the same seed gives the same choices.
a = client.completions.create(model=model, prompt="My favourite animal is", max_tokens=6, temperature=1.0, n=3, seed=11)
b = client.completions.create(model=model, prompt="My favourite animal is", max_tokens=6, temperature=1.0, n=3, seed=11)
check("n choices", [c.index for c in a.choices] == [0, 1, 2], a)
check("seeds", [c.text for c in a.choices] == [c.text for c in b.choices], (a, b))
chat_n = client.chat.completions.create(model=model, messages=QUESTION, max_tokens=4, n=2, seed=3)
check("chat n", len(chat_n.choices) == 2, chat_n)

# Errors come back as the client's exceptions.
try:
    client.chat.completions.create(model=model, messages=QUESTION, top_p=1.5)
    check("bad value refused", False)
except openai.BadRequestError as e:
    check("bad value refused", e.status_code == 400 and "top_p" in str(e), e)
try:
    openai.OpenAI(base_url=base_url, api_key="wrong", max_retries=0).models.list()
    check("wrong key refused", False)
except openai.AuthenticationError as e:
    check("wrong key refused", e.status_code == 401, e)
print("openai client: all checks passed")
