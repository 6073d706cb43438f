"""Log-probabilities from `lmkit serve` through the official `openai` client, against transformers'
log-softmax of the same checkpoint: the completions endpoint's `logprobs` (generated tokens, and the
prompt's with `echo`, as lm-evaluation-harness's `local-completions` scores a text), several prompts
in one request (streamed too), `best_of`'s ranking by them, and chat's `logprobs`/`top_logprobs`, streamed and not; and the logit adjustments
(`frequency_penalty`, `presence_penalty`, `logit_bias`) against OpenAI's formula on the same logits."""
import pathlib

import openai
import pytest
import torch
from conftest import SERVER_KEY as KEY
from transformers import AutoModelForCausalLM

IDS = [5, 17, 42, 8, 99, 3, 61, 7, 120, 33]


def client(server):
    return openai.OpenAI(base_url=server["url"], api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def reference(server):
    """transformers' log-softmax over the vocabulary at each position of `ids` (f64)."""
    run = pathlib.Path(server["model"])
    model = AutoModelForCausalLM.from_pretrained(run / (run / "latest").read_text().strip()).eval()

    def logprobs(ids):
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].double()
        return torch.log_softmax(logits, -1)

    return logprobs


def test_echoed_prompt_logprobs_equal_transformers(server, reference):
    r = client(server).completions.create(model="tiny", prompt=[IDS], max_tokens=0, echo=True, logprobs=3,
                                          temperature=0)
    ch = r.choices[0]
    lp = ch.logprobs
    assert len(lp.tokens) == len(IDS) and r.usage.completion_tokens == 0
    assert "".join(lp.tokens) == ch.text  # the prompt's text, echoed
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    ref = reference(IDS)
    for p in range(1, len(IDS)):
        assert abs(lp.token_logprobs[p] - ref[p - 1, IDS[p]].item()) < 1e-4, p
        want = torch.topk(ref[p - 1], 3).values.tolist()
        got = sorted(lp.top_logprobs[p].values(), reverse=True)
        # Two tokens of one text share an entry: compare the values present.
        assert all(min(abs(g - w) for w in want) < 1e-4 for g in got) and got[0] == pytest.approx(want[0], abs=1e-4)
    # Offsets: where the tokens' texts before end, in characters (as vLLM counts them).
    offsets = [0]
    for t in lp.tokens[:-1]:
        offsets.append(offsets[-1] + len(t))
    assert lp.text_offset == offsets


def test_generated_token_logprobs_follow_transformers_greedy_path(server, reference):
    r = client(server).completions.create(model="tiny", prompt=IDS, max_tokens=6, logprobs=2, temperature=0,
                                          extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    seq, want = list(IDS), []
    for _ in range(6):
        row = reference(seq)[-1]
        t = int(row.argmax())
        want.append((row[t].item(), torch.topk(row, 2).values.tolist()))
        seq.append(t)
    assert len(lp.token_logprobs) == 6
    for got, (w, top) in zip(lp.token_logprobs, want):
        assert got == pytest.approx(w, abs=1e-4)
    for got, (_, top) in zip(lp.top_logprobs, want):
        assert max(got.values()) == pytest.approx(top[0], abs=1e-4)
    assert "".join(lp.tokens) == r.choices[0].text
    assert lp.text_offset[0] == 0

    # The same with echo: the prompt's entries, then these; offsets past the prompt's text.
    e = client(server).completions.create(model="tiny", prompt=IDS, max_tokens=6, logprobs=2, temperature=0,
                                          echo=True, extra_body={"ignore_eos": True}).choices[0]
    prompt_text = e.text[: len(e.text) - len(r.choices[0].text)]
    assert e.text == prompt_text + r.choices[0].text
    assert e.logprobs.token_logprobs[len(IDS):] == pytest.approx(lp.token_logprobs, abs=1e-5)
    prompt_chars = sum(len(t) for t in e.logprobs.tokens[: len(IDS)])
    assert e.logprobs.text_offset[len(IDS):] == [prompt_chars + o for o in lp.text_offset]


def test_several_prompts_in_one_request(server):
    c = client(server)
    other = IDS[3:] + [11, 12]
    both = c.completions.create(model="tiny", prompt=[IDS, other], max_tokens=1, echo=True, logprobs=1,
                                temperature=0)
    assert [ch.index for ch in both.choices] == [0, 1]
    for ch, ids in zip(both.choices, [IDS, other]):
        alone = c.completions.create(model="tiny", prompt=ids, max_tokens=1, echo=True, logprobs=1,
                                     temperature=0).choices[0]
        assert ch.text == alone.text
        assert ch.logprobs.token_logprobs[1:] == pytest.approx(alone.logprobs.token_logprobs[1:], abs=1e-5)
    assert both.usage.prompt_tokens == len(IDS) + len(other)
    texts = c.completions.create(model="tiny", prompt=["the cat", "the dog"], max_tokens=3, n=2, seed=3)
    assert sorted(ch.index for ch in texts.choices) == [0, 1, 2, 3]


def test_several_prompts_streamed(server):
    """Streamed, several prompts' chunks come interleaved under one id, each choice at its index
    k·n + j; joined, each choice's text and log-probabilities are the whole answer's, and the usage
    chunk sums the prompts'."""
    c = client(server)
    other = IDS[3:] + [11, 12]
    args = dict(model="tiny", prompt=[IDS, other, IDS[:4]], max_tokens=6, n=2, temperature=0, logprobs=2, echo=True)
    whole = c.completions.create(**args)
    texts, lps, ids, usage = {}, {}, set(), None
    for chunk in c.completions.create(**args, stream=True, stream_options={"include_usage": True}):
        ids.add(chunk.id)
        if chunk.usage is not None:
            usage = chunk.usage
        for ch in chunk.choices:
            texts[ch.index] = texts.get(ch.index, "") + ch.text
            if ch.logprobs is not None:
                lps.setdefault(ch.index, []).extend(ch.logprobs.token_logprobs)
    assert len(ids) == 1
    assert sorted(texts) == list(range(6))
    for ch in whole.choices:
        assert texts[ch.index] == ch.text, ch.index
        assert [x is None for x in lps[ch.index]] == [x is None for x in ch.logprobs.token_logprobs]
        assert [x for x in lps[ch.index] if x is not None] == pytest.approx(
            [x for x in ch.logprobs.token_logprobs if x is not None], abs=1e-5)
    assert usage.prompt_tokens == whole.usage.prompt_tokens == len(IDS) + len(other) + 4
    assert usage.completion_tokens == whole.usage.completion_tokens


def test_best_of_answers_the_choices_of_the_highest_mean_logprob(server):
    """`best_of` generates that many choices and answers with the `n` whose tokens have the highest
    mean log-probability (OpenAI's "log probability per token"), best first: the same choices, with
    the same seed, as `n = best_of` gives, ranked by their own `logprobs`."""
    c = client(server)
    args = dict(model="tiny", prompt=IDS, max_tokens=6, seed=7, temperature=1.0, extra_body={"ignore_eos": True})
    every = c.completions.create(**args, n=5, logprobs=0)
    means = [sum(ch.logprobs.token_logprobs) / len(ch.logprobs.token_logprobs) for ch in every.choices]
    assert len({ch.text for ch in every.choices}) > 2, [ch.text for ch in every.choices]
    ranked = sorted(range(5), key=lambda i: -means[i])
    best = c.completions.create(**args, n=2, best_of=5)
    assert [ch.index for ch in best.choices] == [0, 1]
    assert [ch.text for ch in best.choices] == [every.choices[i].text for i in ranked[:2]], means
    assert all(ch.logprobs is None for ch in best.choices)
    # Every choice generated is counted.
    assert best.usage.completion_tokens == every.usage.completion_tokens == 30
    one = c.completions.create(**args, best_of=5, logprobs=1, echo=True)
    assert len(one.choices) == 1
    top = every.choices[ranked[0]]
    assert one.choices[0].text.endswith(top.text)
    assert one.choices[0].logprobs.token_logprobs[-6:] == pytest.approx(top.logprobs.token_logprobs, abs=1e-5)
    # Several prompts: each prompt's best, at its own index.
    two = c.completions.create(**{**args, "prompt": [IDS, IDS]}, best_of=5)
    assert [(ch.index, ch.text) for ch in two.choices] == [(0, top.text), (1, top.text)]


@pytest.mark.parametrize("endpoint,body", [
    ("completions", {"n": 3, "best_of": 2}),
    ("completions", {"best_of": 0}),
    ("completions", {"best_of": 100000}),
    ("completions", {"best_of": 2, "stream": True}),
    ("chat", {"best_of": 2}),
])
def test_bad_best_of_is_refused_naming_it(server, endpoint, body):
    c = client(server)
    with pytest.raises(openai.BadRequestError) as e:
        if endpoint == "chat":
            c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], extra_body=body)
        else:
            c.completions.create(model="tiny", prompt="the", extra_body=body)
    assert e.value.body["param"] == "best_of", e.value.body


def test_chat_logprobs_streamed_and_whole(server):
    c = client(server)
    msgs = [{"role": "user", "content": "where is the cat?"}]
    whole = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=8, temperature=0, logprobs=True,
                                      top_logprobs=2)
    content = whole.choices[0].logprobs.content
    assert content and all(len(e.top_logprobs) == 2 for e in content)
    assert all(e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob for e in content)
    assert all(e.logprob <= e.top_logprobs[0].logprob + 1e-6 for e in content)  # greedy: the best or tied
    assert b"".join(bytes(e.bytes) for e in content).decode() == whole.choices[0].message.content
    streamed = []
    for chunk in c.chat.completions.create(model="tiny", messages=msgs, max_tokens=8, temperature=0, logprobs=True,
                                           top_logprobs=2, stream=True):
        for ch in chunk.choices:
            if ch.logprobs and ch.logprobs.content:
                streamed.extend(ch.logprobs.content)
    assert [(e.token, e.bytes) for e in streamed] == [(e.token, e.bytes) for e in content]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in content], abs=1e-5)
    # Not asked for: null, as before.
    assert c.chat.completions.create(model="tiny", messages=msgs, max_tokens=2).choices[0].logprobs is None


def test_lm_evaluation_harness_loglikelihood_requests(server, reference):
    """What lm-evaluation-harness's `local-completions` model sends for `loglikelihood` (a batch of
    context + continuation token lists, echo, logprobs 1, max_tokens 1) and how it reads the answer
    (the continuation's summed log-probabilities, and whether each of its tokens was the most
    likely), against transformers."""
    greedy_cont = []
    for _ in range(2):
        greedy_cont.append(int(reference(IDS[:4] + greedy_cont)[-1].argmax()))
    pairs = [(IDS[:6], IDS[6:]), ([7, 7, 19], [4]), (IDS[2:5], [250, 251, 9]), (IDS[:4], greedy_cont)]
    out = client(server).completions.create(model="tiny", prompt=[c + t for c, t in pairs], temperature=0,
                                            max_tokens=1, logprobs=1, seed=1234, echo=True)
    for ch, (ctx, cont) in zip(sorted(out.choices, key=lambda c: c.index), pairs):
        lps = ch.logprobs.token_logprobs[len(ctx):-1]
        tops = ch.logprobs.top_logprobs[len(ctx):-1]
        ref = reference(ctx + cont)
        want = [ref[len(ctx) - 1 + k, t].item() for k, t in enumerate(cont)]
        assert sum(lps) == pytest.approx(sum(want), abs=1e-4)
        greedy = all(int(ref[len(ctx) - 1 + k].argmax()) == t for k, t in enumerate(cont))
        assert all(lp == max(top.values()) for lp, top in zip(lps, tops)) == greedy
        assert greedy == (cont == greedy_cont)


def greedy(reference, ids, steps, freq=0.0, pres=0.0, bias=None):
    """Greedy tokens from transformers' distribution adjusted as OpenAI documents: each logit less
    frequency·count + presence·[count > 0] over the tokens generated so far, plus its bias."""
    seq, out = list(ids), []
    for _ in range(steps):
        row = reference(seq)[-1].clone()
        for t in set(out):
            row[t] -= freq * out.count(t) + pres
        for t, b in (bias or {}).items():
            row[t] += b
        t = int(row.argmax())
        out.append(t)
        seq.append(t)
    return out


def test_penalties_and_logit_bias_follow_openai_s_formula(server, reference):
    run = pathlib.Path(server["model"])
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(run / (run / "latest").read_text().strip())
    c = client(server)

    def text(**kw):
        return c.completions.create(model="tiny", prompt=IDS, max_tokens=8, temperature=0,
                                    extra_body={"ignore_eos": True}, **kw).choices[0].text

    plain = greedy(reference, IDS, 8)
    assert text() == tok.decode(plain)
    want = greedy(reference, IDS, 8, freq=1.5, pres=0.5)
    assert want != plain  # the penalties change this continuation
    assert text(frequency_penalty=1.5, presence_penalty=0.5) == tok.decode(want)
    bias = {plain[0]: -100.0, 17: 3.0}
    want = greedy(reference, IDS, 8, bias=bias)
    assert want[0] != plain[0]
    assert text(logit_bias={str(t): b for t, b in bias.items()}) == tok.decode(want)
    # Log-probabilities stay the model's own.
    lp = c.completions.create(model="tiny", prompt=IDS, max_tokens=1, temperature=0, logprobs=1,
                              logit_bias={str(plain[0]): -100}).choices[0].logprobs
    second = greedy(reference, IDS, 1, bias={plain[0]: -100.0})[0]
    assert lp.token_logprobs[0] == pytest.approx(reference(IDS)[-1, second].item(), abs=1e-4)


@pytest.mark.parametrize("endpoint,body,param", [
    ("chat", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("chat", {"top_logprobs": 2}, "top_logprobs"),
    ("chat", {"logprobs": 3}, "logprobs"),
    ("completions", {"logprobs": True}, "logprobs"),
    ("completions", {"logprobs": 21}, "logprobs"),
    ("completions", {"top_logprobs": 2}, "top_logprobs"),
    ("completions", {"max_tokens": 0}, "max_tokens"),
    ("completions", {"echo": "yes"}, "echo"),
    ("completions", {"prompt": [[1, 2], [99999]]}, "prompt"),
    ("completions", {"presence_penalty": 2.5}, "presence_penalty"),
    ("chat", {"frequency_penalty": -3}, "frequency_penalty"),
    ("completions", {"logit_bias": {"99999": 1}}, "logit_bias"),
    ("chat", {"logit_bias": {"5": 101}}, "logit_bias"),
    ("completions", {"logit_bias": {"cat": 1}}, "logit_bias"),
])
def test_bad_logprobs_requests_name_their_field(server, endpoint, body, param):
    c = client(server)
    with pytest.raises(openai.BadRequestError) as e:
        if endpoint == "chat":
            c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                      extra_body=body)
        else:
            body = {"prompt": "the", **body}
            c.completions.create(model="tiny", prompt=body.pop("prompt"), extra_body=body)
    assert e.value.body["param"] == param, e.value.body
