"""`lmkit serve` through the official `openai` Python client: model list, completions and chat
completions (plain and streamed) equal to `lmkit generate`, n/seed, usage, auth and error objects."""
import openai
import pytest
from conftest import SERVER_KEY as KEY


def client(server, key=KEY):
    return openai.OpenAI(base_url=server["url"], api_key=key, max_retries=0)


def test_models_and_completions_match_lmkit_generate(server):
    c = client(server)
    assert [m.id for m in c.models.list().data] == ["tiny"]
    r = c.completions.create(model="tiny", prompt="the cat", max_tokens=10, temperature=0)
    want = server["run"]("generate", "--model", server["model"], "--prompt", "the cat", "--greedy",
                         "--max-tokens", "10")
    assert r.choices[0].text == want[:-1]  # generate ends its output with a newline
    assert r.usage.completion_tokens <= 10 and r.usage.prompt_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.choices[0].finish_reason in ("length", "stop")


def test_streamed_text_equals_the_plain_answer(server):
    c = client(server)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "where is the cat?"}]
    plain = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=12, temperature=0)
    stream = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=12, temperature=0, stream=True,
                                       stream_options={"include_usage": True})
    parts, usage, reasons = [], None, []
    for chunk in stream:
        for ch in chunk.choices:
            if ch.delta.content:
                parts.append(ch.delta.content)
            if ch.finish_reason:
                reasons.append(ch.finish_reason)
        if chunk.usage:
            usage = chunk.usage
    assert "".join(parts) == plain.choices[0].message.content
    assert plain.choices[0].message.role == "assistant"
    assert reasons == [plain.choices[0].finish_reason]
    assert usage.completion_tokens == plain.usage.completion_tokens

    parts = [ch.text for chunk in c.completions.create(model="tiny", prompt="the dog", max_tokens=8, temperature=0,
                                                      stream=True) for ch in chunk.choices]
    plain = c.completions.create(model="tiny", prompt="the dog", max_tokens=8, temperature=0)
    assert "".join(parts) == plain.choices[0].text


def test_n_and_seed(server):
    c = client(server)
    a = c.completions.create(model="tiny", prompt="the", max_tokens=6, n=3, seed=11, temperature=1.0)
    b = c.completions.create(model="tiny", prompt="the", max_tokens=6, n=3, seed=11, temperature=1.0)
    assert [x.text for x in a.choices] == [x.text for x in b.choices]
    assert sorted(x.index for x in a.choices) == [0, 1, 2]


def test_auth_and_errors(server):
    with pytest.raises(openai.AuthenticationError):
        client(server, key="wrong").models.list()
    c = client(server)
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="tiny", prompt="the", extra_body={"bogus": 1})
    assert e.value.body["param"] == "bogus"
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="tiny", prompt="the", temperature=5)
    assert "temperature" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "cat " * 400}])
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="gpt-4o", prompt="the")
    # The server keeps serving.
    assert c.completions.create(model="tiny", prompt="the", max_tokens=2).choices


def test_every_answer_is_in_the_database(server):
    import sqlite3
    c = client(server)
    r = c.completions.create(model="tiny", prompt="log check", max_tokens=3, temperature=0)
    con = sqlite3.connect(server["db"])
    row = con.execute("SELECT prompt, output, finish_reason FROM completions WHERE id = ?", (r.id,)).fetchone()
    assert row == ("log check", r.choices[0].text, r.choices[0].finish_reason)
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
