"""The OpenAI chat-completions endpoint of ``CompletionServer`` and ``RemoteTeacher.chat``, for real over
loopback HTTP: a tiny seeded random Llama behind a ChatML byte-level BPE tokenizer (transformers fast
tokenizer). Replies are checked against ``generate.sample`` on the rendered template's ids; faults are
injected through the server's ``faults`` hook; waits are recorded, never timed."""

from __future__ import annotations

import copy
import json
import urllib.error
import urllib.request

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers", reason="the lm extra (transformers) is not installed")
pytest.importorskip("tokenizers", reason="the lm extra (tokenizers) is not installed")

from distillery.errors import DistilleryError
from distillery.lm.generate import sample
from distillery.lm.models import llama
from distillery.lm.remote import ChatFailure, RemoteTeacher, request_key
from distillery.lm.serve import CompletionServer

NAME = "tiny-chat-teacher"
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TEXTS = ["the quick brown fox jumps over the lazy dog", "a teacher distils what it knows into a student",
         "hello world, hello tokens", "you are a helpful assistant", "what is the next token?"] * 8
HELLO = [{"role": "system", "content": "you are a helpful assistant"}, {"role": "user", "content": "hello world"}]
CONVS = [HELLO, [{"role": "user", "content": "the quick brown fox"}],
         [{"role": "user", "content": "a teacher"}, {"role": "assistant", "content": "distils"},
          {"role": "user", "content": "what is the next token?"}],
         [{"role": "user", "content": "hello tokens"}], [{"role": "user", "content": "lazy dog"}]]


def make_raw_tokenizer():
    """A byte-level BPE of about 300 tokens with ChatML's special tokens (a raw ``tokenizers.Tokenizer``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXTS, trainer)
    return tok


def make_tokenizer(chat_template: str | None = CHATML):
    import transformers

    return transformers.PreTrainedTokenizerFast(tokenizer_object=make_raw_tokenizer(), eos_token="<|im_end|>",
                                                pad_token="<|endoftext|>", chat_template=chat_template)


@pytest.fixture(scope="module")
def lm():
    tok = make_tokenizer()
    return llama("tiny", vocab_size=len(tok), seed=0), tok


@pytest.fixture(scope="module")
def _server(lm):
    model, tok = lm
    with CompletionServer(model, tok, NAME, quiet=True) as server:
        yield server


@pytest.fixture()
def server(_server):
    _server.faults.clear()
    yield _server
    _server.faults.clear()


@pytest.fixture()
def client(server):
    def make(url=None, **kw):
        kw = {"backoff": 0.001, "max_backoff": 0.01, "timeout": 10.0, "api_key_env": "DISTILLERY_TEST_UNSET_KEY", **kw}
        return RemoteTeacher(url or server.url, NAME, **kw)

    return make


def rendered(tok, messages) -> list[int]:
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tok.encode(text, add_special_tokens=False)


def ends(tok) -> set[int]:
    return {tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")}


def local_replies(model, tok, messages, max_tokens, n=1, seed=None, temperature=0.0):
    """What the server should answer: ``sample``'s continuation of the rendered prompt, cut after the
    first end token, as (ids, finish_reason)."""
    p = rendered(tok, messages)
    g = None if seed is None else torch.Generator().manual_seed(seed)
    gen = sample(model, torch.tensor([p] * n), max_tokens, temperature=temperature, generator=g).ids[:, len(p):]
    out = []
    for row in gen.tolist():
        stop = next((j for j, t in enumerate(row) if t in ends(tok)), None)
        out.append((row, "length") if stop is None else (row[: stop + 1], "stop"))
    return out


def post(url, body):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


# ------------------------------------------------------------------------------------ success


def test_chat_round_trip_is_greedy_decoding_of_the_rendered_template_with_the_models_logprobs(lm, client):
    model, tok = lm
    c = client()
    [[reply]] = c.chat([HELLO], 10, temperature=0, top_logprobs=3)
    [(want, reason)] = local_replies(model, tok, HELLO, 10)
    assert reply.ids == want and reply.finish_reason == reason and reply.messages == HELLO
    body = want[:-1] if reason == "stop" else want
    assert reply.text == tok.decode(body, skip_special_tokens=True)
    assert reply.tokens == [f"token_id:{i}" for i in want]
    p = rendered(tok, HELLO)
    with torch.no_grad():
        logp = F.log_softmax(model(torch.tensor([p + want])).float(), -1)[0, len(p) - 1: -1]  # full softmax, T = 1
    assert torch.allclose(torch.tensor(reply.logprobs), logp.gather(-1, torch.tensor(want)[:, None]).squeeze(-1),
                          atol=1e-5)
    v, i = logp.topk(3, -1)
    assert [list(d) for d in reply.top] == i.tolist()
    assert torch.allclose(torch.tensor([list(d.values()) for d in reply.top]), v, atol=1e-5)
    assert reply.settings == {"model": NAME, "base_url": c.base_url, "max_tokens": 10, "temperature": 0.0,
                              "top_p": 1.0, "n": 1, "seed": None, "logprobs": True, "top_logprobs": 3, "stop": []}
    assert c.network_calls == 1


def test_without_logprobs_only_the_text_comes_back(lm, client):
    model, tok = lm
    [[reply]] = client().chat([HELLO], 6, temperature=0)
    [(want, reason)] = local_replies(model, tok, HELLO, 6)
    assert reply.text == tok.decode(want[:-1] if reason == "stop" else want, skip_special_tokens=True)
    assert reply.ids is None and reply.logprobs is None and reply.top is None and reply.tokens is None


def test_n_seeded_samples_match_local_sampling(lm, client):
    model, tok = lm
    [replies] = client().chat([CONVS[1]], 8, temperature=1.0, n=3, seed=11, logprobs=True)
    want = local_replies(model, tok, CONVS[1], 8, n=3, seed=11, temperature=1.0)
    assert [(r.ids, r.finish_reason) for r in replies] == want
    assert len({tuple(r.ids) for r in replies}) > 1  # the n samples differ


def test_concurrency_gives_the_same_replies_in_input_order(client):
    kw = {"temperature": 1.0, "seed": 3, "n": 2, "top_logprobs": 2}
    one = client().chat(CONVS, 6, concurrency=1, **kw)
    c = client()
    four = c.chat(CONVS, 6, concurrency=4, **kw)
    assert [[(r.ids, r.text, r.logprobs) for r in g] for g in four] == [[(r.ids, r.text, r.logprobs) for r in g]
                                                                          for g in one]
    assert [g[0].messages for g in four] == CONVS and c.network_calls == len(CONVS)


def test_stop_strings_end_the_reply_before_them(lm, client):
    _, tok = lm
    c = client()
    [[full]] = c.chat([HELLO], 16, temperature=0, logprobs=True)
    text = full.text  # random weights: bytes that are not all characters; cut at two printable ASCII ones
    at = next((i for i in range(2, len(text) - 1) if text[i: i + 2].isascii() and text[i: i + 2].isprintable()), None)
    assert at is not None, f"no printable pair in the greedy reply {text!r} to stop at"
    stop = text[at: at + 2]
    at = text.find(stop)
    [[cut]] = c.chat([HELLO], 16, temperature=0, logprobs=True, stop=[stop, "never-seen-xyz"])
    assert cut.finish_reason == "stop" and cut.text == text[:at]
    # the tokens run up to the one that completed the stop string, a prefix of the full reply
    assert cut.ids == full.ids[: len(cut.ids)] and stop in tok.decode(cut.ids) and stop not in tok.decode(cut.ids[:-1])
    [[same]] = c.chat([HELLO], 16, temperature=0, stop=stop)  # a single string works too
    assert same.text == cut.text


def test_the_end_of_turn_token_ends_the_reply(lm):
    model, tok = lm
    [(greedy, _)] = local_replies(model, tok, HELLO, 6)
    assert len(greedy) >= 4 and not set(greedy[:4]) & ends(tok)
    eot = copy.deepcopy(tok)
    eot.eos_token = tok.convert_ids_to_tokens(greedy[3])  # the 4th greedy token now ends a turn
    with CompletionServer(model, eot, NAME, quiet=True) as server:
        c = RemoteTeacher(server.url, NAME, backoff=0.001, api_key_env="DISTILLERY_TEST_UNSET_KEY")
        [[reply]] = c.chat([HELLO], 6, temperature=0, logprobs=True)
        status, raw = post(server.url + "/chat/completions", {"model": NAME, "messages": HELLO, "max_tokens": 6,
                                                              "temperature": 0, "ignore_eos": True})
    stop = greedy.index(greedy[3])
    assert reply.ids == greedy[: stop + 1] and reply.finish_reason == "stop"
    assert reply.text == tok.decode(greedy[:stop], skip_special_tokens=True)  # the end token is left out
    assert status == 200 and raw["choices"][0]["finish_reason"] == "length"  # vLLM's ignore_eos
    assert raw["usage"]["completion_tokens"] == 6


def test_server_answers_openai_chat_schema(server, lm):
    _, tok = lm
    status, out = post(server.url + "/chat/completions", {
        "model": NAME, "messages": [{"role": "user", "content": [{"type": "text", "text": "hello "},
                                                                 {"type": "text", "text": "world"}]}],
        "max_completion_tokens": 4, "max_tokens": 99, "temperature": 0, "n": 2, "logprobs": True, "top_logprobs": 2})
    assert status == 200 and out["object"] == "chat.completion" and out["id"].startswith("chatcmpl-")
    assert [c["index"] for c in out["choices"]] == [0, 1]
    prompt = rendered(tok, [{"role": "user", "content": "hello world"}])
    lengths = [len(c["logprobs"]["content"]) for c in out["choices"]]
    assert max(lengths) <= 4  # max_completion_tokens wins over max_tokens
    assert out["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": sum(lengths),
                            "total_tokens": len(prompt) + sum(lengths)}
    c = out["choices"][0]
    assert c["message"]["role"] == "assistant" and isinstance(c["message"]["content"], str)
    entry = c["logprobs"]["content"][0]
    assert set(entry) == {"token", "logprob", "bytes", "top_logprobs"} and len(entry["top_logprobs"]) == 2
    assert entry["bytes"] == list(entry["token"].encode("utf-8", errors="replace"))  # text tokens by default
    assert set(entry["top_logprobs"][0]) == {"token", "logprob", "bytes"}
    status, out = post(server.url + "/chat/completions", {"model": NAME, "messages": HELLO, "max_tokens": 2})
    assert status == 200 and out["choices"][0]["logprobs"] is None


@pytest.mark.parametrize(("body", "words"), [
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "role \"wizard\""),
    ({"messages": []}, "no messages"),
    ({"messages": [{"role": "user"}]}, "no text content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "no text content"),
    ({"messages": HELLO, "top_logprobs": 2}, "needs \"logprobs\": true"),
    ({"messages": HELLO, "logprobs": True, "top_logprobs": 21}, "top_logprobs must be between"),
    ({"messages": HELLO, "stop": ["ok", ""]}, "stop must be"),
    ({"messages": HELLO, "max_tokens": 600}, "context of 512"),
    ({"messages": HELLO, "stream": True}, "streaming"),
    ({"messages": HELLO, "tools": [{"type": "function"}]}, "tools"),
    ({"messages": [{"role": "user", "content": "x" * 40_000}]}, "characters"),
])
def test_server_refuses_bad_chat_requests_clearly(server, body, words):
    status, answer = post(server.url + "/chat/completions", {"model": NAME, **body})
    assert status == 400 and words in answer["error"]["message"] and answer["error"]["type"]


def test_a_tokenizer_without_a_chat_template_is_refused(lm):
    model, _ = lm
    for tok in (make_tokenizer(chat_template=None), make_raw_tokenizer()):
        with CompletionServer(model, tok, NAME, quiet=True) as server:
            status, answer = post(server.url + "/chat/completions", {"model": NAME, "messages": HELLO})
            assert status == 400 and "tokenizer has no chat template" in answer["error"]["message"]
            c = RemoteTeacher(server.url, NAME, max_retries=3, backoff=0.001, api_key_env="DISTILLERY_TEST_UNSET_KEY")
            with pytest.raises(DistilleryError, match="tokenizer has no chat template") as e:
                c.chat([HELLO], 2)
            assert "\n" not in str(e.value) and c.network_calls == 1  # a 400 is not retried
            status, out = post(server.url + "/completions", {"model": NAME, "prompt": "hello world", "max_tokens": 2,
                                                             "echo": True, "logprobs": 1})
            assert status == 200 and out["choices"][0]["text"].startswith("hello world")  # both tokenizer kinds


# ------------------------------------------------------------------------------------ failures


def test_a_500_and_a_429_are_retried(server, client):
    server.faults[:] = ["500", "429:2"]
    c = client(max_retries=3, max_backoff=10)
    waits = []
    c._sleep = waits.append
    [[reply]] = c.chat([HELLO], 3, temperature=0)
    assert isinstance(reply.text, str) and c.network_calls == 3 and c.retries == 2
    assert waits[1] == 2.0  # Retry-After honoured


def test_a_request_failing_after_its_retries_raises_after_the_others_are_logged(server, client, tmp_path):
    log = tmp_path / "chat.jsonl"
    server.faults[:] = ["500", "500"]  # the first conversation's two attempts
    c = client(max_retries=1, log=log)
    with pytest.raises(DistilleryError, match="1 of 3 chat requests failed") as e:
        c.chat(CONVS[:3], 3, temperature=0)
    msg = str(e.value)
    assert "conversation 0" in msg and "HTTP 500" in msg and "rerun" in msg and "\n" not in msg
    assert c.network_calls == 4 and len(log.read_text().splitlines()) == 2
    again = client(max_retries=1, log=log)
    out = again.chat(CONVS[:3], 3, temperature=0)
    assert all(len(g) == 1 for g in out) and again.network_calls == 1 and again.log_hits == 2


def test_on_error_skip_leaves_none_and_records_the_failure(server, client):
    server.faults[:] = ["500", "500", "500"]
    c = client(max_retries=2)
    out = c.chat(CONVS[:2], 3, temperature=0, on_error="skip")
    assert out[0] is None and len(out[1]) == 1
    assert c.failures == [ChatFailure(0, CONVS[0], c.failures[0].error)] and "HTTP 500" in c.failures[0].error
    c.chat(CONVS[:1], 3, temperature=0, on_error="skip")  # kept across calls until the caller clears them
    assert len(c.failures) == 1


def test_a_server_without_logprobs_is_named_when_top_k_is_asked(server, client):
    server.faults[:] = ["drop-logprobs"] * 10
    c = client(max_retries=3)
    with pytest.raises(DistilleryError, match="does not return log-probabilities") as e:
        c.chat(CONVS * 2, 3, temperature=0, top_logprobs=2, on_error="skip", concurrency=2)
    assert "without logprobs" in str(e.value) and "--max-logprobs" in str(e.value) and "\n" not in str(e.value)
    # not retried, not a per-request failure, and the queued requests are not sent: at most the two in flight
    assert c.network_calls <= 2 and c.retries == 0 and c.failures == []


def test_a_malformed_chat_answer_is_retried(server, client):
    server.faults[:] = ["short-logprobs"]
    c = client(max_retries=1)
    [[reply]] = c.chat([HELLO], 3, temperature=0, logprobs=True)
    assert len(reply.logprobs) == len(reply.ids) and c.network_calls == 2


def test_client_checks_conversations_before_any_request(client):
    c = client()
    for bad, words in [([[{"role": "wizard", "content": "hi"}]], "role 'wizard'"),
                       ([], "non-empty list of conversations"),
                       ([[]], "conversation 0 must be a non-empty"),
                       ([[{"role": "user"}]], "has no content"),
                       (HELLO, "wrap a single conversation")]:
        with pytest.raises(DistilleryError, match=words):
            c.chat(bad, 3)
    with pytest.raises(DistilleryError, match="on_error"):
        c.chat([HELLO], 3, on_error="ignore")
    with pytest.raises(DistilleryError, match="concurrency"):
        c.chat([HELLO], 3, concurrency=0)
    assert c.network_calls == 0


# ------------------------------------------------------------------------------------ request log


def test_the_request_log_answers_a_concurrent_rerun_without_network_calls(server, client, tmp_path, monkeypatch):
    monkeypatch.setenv("DISTILLERY_TEST_CHAT_KEY", "sk-chat-never-in-the-log-42")  # the keyless server ignores it
    log = tmp_path / "chat.jsonl"
    first = client(log=log, api_key_env="DISTILLERY_TEST_CHAT_KEY")
    a = first.chat(CONVS, 5, seed=1, top_logprobs=2, concurrency=3)
    text = log.read_text()
    assert first.network_calls == len(CONVS) and len(text.splitlines()) == len(CONVS)
    assert "sk-chat-never-in-the-log-42" not in text
    body = {"model": NAME, "messages": CONVS[0], "max_tokens": 5, "temperature": 1.0, "top_p": 1.0, "n": 1, "seed": 1,
            "logprobs": True, "top_logprobs": 2, "return_tokens_as_token_ids": True}
    assert request_key("/chat/completions", body) in {json.loads(line)["key"] for line in text.splitlines()}
    again = client(log=log)
    b = again.chat(CONVS, 5, seed=1, top_logprobs=2, concurrency=3)
    assert again.network_calls == 0 and again.log_hits == len(CONVS)
    assert [[(r.ids, r.text, r.top) for r in g] for g in b] == [[(r.ids, r.text, r.top) for r in g] for g in a]


def test_random_chat_requests_replay_from_the_log_under_threads(server, client, tmp_path):
    log = tmp_path / "random.jsonl"
    a = client(log=log)
    first = a.chat([HELLO] * 4, 6, logprobs=True, concurrency=4)  # no seed: four paid samples of one request
    assert a.network_calls == 4 and len(log.read_text().splitlines()) == 4
    b = client(log=log)
    again = b.chat([HELLO] * 4, 6, logprobs=True, concurrency=4)
    assert b.network_calls == 0 and b.log_hits == 4
    assert sorted(g[0].ids for g in again) == sorted(g[0].ids for g in first)  # the same answers, each once
    b.chat([HELLO], 6, logprobs=True)
    assert b.network_calls == 1
