"""A teacher behind the OpenAI completions API, for real over loopback HTTP: ``CompletionServer``
serving a tiny seeded random Llama, and ``RemoteTeacher`` (completions, top-k scoring, retries,
timeouts, keys, truncated answers, the resumable request log). Faults are injected through the
server's ``faults`` hook; waits are recorded, never timed."""

from __future__ import annotations

import argparse
import json
import math
import socket
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
from distillery.lm.remote import TAIL_FLOOR, RemoteTeacher, request_key, tail_log_prob
from distillery.lm.serve import CompletionServer, add_parser, is_loopback

NAME = "tiny-teacher"
TEXTS = ["the quick brown fox jumps over the lazy dog", "a teacher distils what it knows into a student",
         "hello world, hello tokens", "logits and log-probabilities of the next token", "ünïcödé bytes too"] * 8


def make_tokenizer():
    """A byte-level BPE of about 300 tokens trained on a few strings."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXTS, trainer)
    return tok


@pytest.fixture(scope="module")
def lm():
    tok = make_tokenizer()
    model = llama("tiny", vocab_size=tok.get_vocab_size(), seed=0)
    return model, tok


@pytest.fixture(scope="module")
def _server(lm):
    model, tok = lm
    server = CompletionServer(model, tok, NAME, quiet=True)
    server.start()
    yield server
    server.stop()


@pytest.fixture()
def server(_server):
    _server.faults.clear()
    yield _server
    _server.faults.clear()


@pytest.fixture()
def client(server):
    def make(**kw):
        kw = {"backoff": 0.001, "max_backoff": 0.01, "timeout": 10.0, "api_key_env": "DISTILLERY_TEST_UNSET_KEY", **kw}
        return RemoteTeacher(server.url, NAME, **kw)

    return make


def rows(b=3, t=8, seed=0, vocab=300):
    return torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(seed))


def post(url, body, key=None, raw=None):
    """(status, JSON answer) of a POST to url."""
    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="POST", headers={"Content-Type": "application/json"})
    if key:
        req.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


# ------------------------------------------------------------------------------------ success


def test_complete_returns_the_requested_tokens_with_the_models_logprobs(lm, client):
    model, _ = lm
    c = client()
    prompts = [[5, 17, 40], [260, 3]]
    out = c.complete(prompts, 5, n=2, seed=1, top_logprobs=3)
    assert len(out) == 2 and all(len(group) == 2 for group in out)
    for p, group in zip(prompts, out):
        for comp in group:
            assert comp.prompt == p and len(comp.ids) == 5 and len(comp.logprobs) == 5 and len(comp.top) == 5
            assert all(len(d) == 3 for d in comp.top)
            assert comp.settings == {"model": NAME, "base_url": c.base_url, "max_tokens": 5, "temperature": 1.0,
                                     "top_p": 1.0, "n": 2, "seed": 1, "top_logprobs": 3}
            # log-probabilities of the full softmax at temperature 1
            ids = torch.tensor([p + comp.ids])
            with torch.no_grad():
                logp = F.log_softmax(model(ids).float(), -1)[0, len(p) - 1: -1]
            want = logp.gather(-1, torch.tensor(comp.ids)[:, None]).squeeze(-1)
            assert torch.allclose(torch.tensor(comp.logprobs), want, atol=1e-5)
            top_v, top_i = logp.topk(3, -1)
            assert [list(d) for d in comp.top] == top_i.tolist()
            assert torch.allclose(torch.tensor([list(d.values()) for d in comp.top]), top_v, atol=1e-5)
    assert c.settings["seed"] == 1 and c.network_calls == 1


def test_greedy_matches_local_greedy_decoding(lm, client):
    model, _ = lm
    prompt = rows(2, 4, seed=3)
    want = sample(model, prompt, 6, temperature=0).ids[:, 4:].tolist()
    got = client(prompts_per_request=1).complete(prompt, 6, temperature=0)
    assert [g[0].ids for g in got] == want


def test_seeded_sampling_is_reproducible_and_matches_local_sampling(lm, client):
    model, _ = lm
    c = client()
    prompts = [[1, 2, 3, 4], [9, 8]]
    a = c.complete(prompts, 8, temperature=1.0, seed=7)
    b = c.complete(list(reversed(prompts)), 8, temperature=1.0, seed=7)  # a prompt's sample ignores the others
    assert [g[0].ids for g in a] == [g[0].ids for g in reversed(b)]
    for p, g in zip(prompts, a):
        local = sample(model, torch.tensor([p]), 8, generator=torch.Generator().manual_seed(7)).ids[0, len(p):]
        assert g[0].ids == local.tolist()
    other = c.complete(prompts, 8, temperature=1.0, seed=8)
    assert [g[0].ids for g in other] != [g[0].ids for g in a]


def test_score_gives_the_local_top_k_and_tail_at_every_position(lm, client):
    model, _ = lm
    x = rows(3, 8, seed=1, vocab=model.vocab_size)
    c = client(prompts_per_request=2)  # 3 rows: 2 requests; vocab_size asked from GET /models
    t = c.score(x, 5)
    assert t.log_probs.shape == (3, 8, 5) and t.indices.shape == (3, 8, 5) and t.tail.shape == (3, 8)
    assert t.num_classes == model.vocab_size and t.temperature == 1.0
    with torch.no_grad():
        logp = F.log_softmax(model(x).float(), -1)  # position t: the distribution over token t + 1
    v, i = logp.topk(5, -1)
    assert torch.equal(t.indices, i)
    assert torch.allclose(t.log_probs, v, atol=1e-5)
    want_tail = torch.log(1 - v.double().exp().sum(-1)).float()
    assert torch.allclose(t.tail, want_tail, atol=1e-5)
    assert c.network_calls == 3 and c.log_hits == 0
    assert t.flat().log_probs.shape == (24, 5)


def test_tail_is_stable_and_clamped():
    lp = torch.tensor([[math.log(0.5), math.log(0.5 - 1e-12)], [-20.0, -21.0], [0.0, -1.0]], dtype=torch.float64)
    tail = tail_log_prob(lp)
    assert abs(tail[0].item() - math.log(1e-12)) < 1e-3
    assert abs(tail[1].item() - math.log1p(-(math.exp(-20) + math.exp(-21)))) < 1e-12
    assert tail[2].item() == pytest.approx(TAIL_FLOOR)  # mass above 1 (rounding): the floor, not NaN
    assert torch.isfinite(tail).all()


# ------------------------------------------------------------------------------------ retries


def test_a_5xx_is_retried(server, client):
    server.faults[:] = ["500"]
    c = client(max_retries=2)
    out = c.complete([[1, 2]], 3, temperature=0)
    assert len(out[0][0].ids) == 3 and c.network_calls == 2 and c.retries == 1


def test_a_429_is_retried_after_its_retry_after(server, client):
    server.faults[:] = ["429:3"]
    c = client(max_retries=2, max_backoff=10)
    waits = []
    c._sleep = waits.append
    out = c.complete([[1, 2]], 2, temperature=0)
    assert len(out[0][0].ids) == 2 and c.network_calls == 2
    assert waits == [3.0]


def test_a_5xx_beyond_max_retries_names_the_cause_and_url(server, client):
    server.faults[:] = ["500"] * 3
    c = client(max_retries=2)
    with pytest.raises(DistilleryError, match="after 3 attempts") as e:
        c.complete([[1, 2]], 2, temperature=0)
    assert "HTTP 500" in str(e.value) and server.url in str(e.value) and c.network_calls == 3


def test_a_timeout_fails_without_retries_and_succeeds_with_them(server, client):
    server.faults[:] = ["sleep:2"]
    c = client(timeout=0.5, max_retries=0)
    with pytest.raises(DistilleryError, match="timed out") as e:
        c.complete([[1, 2]], 2, temperature=0)
    assert "timeout" in str(e.value) and c.network_calls == 1
    server.faults[:] = ["sleep:3"]
    c = client(timeout=1.0, max_retries=1)
    assert len(c.complete([[1, 2]], 2, temperature=0)[0][0].ids) == 2 and c.network_calls == 2


@pytest.mark.parametrize("fault", ["truncate", "cut-json", "drop-logprobs", "short-logprobs"])
def test_a_truncated_or_malformed_answer_is_retried_then_refused(server, client, fault):
    server.faults[:] = [fault]
    c = client(max_retries=1, vocab_size=300)
    assert c.score(rows(1, 4), 3).log_probs.shape == (1, 4, 3) and c.network_calls == 2
    server.faults[:] = [fault]
    c = client(max_retries=0)
    with pytest.raises(DistilleryError, match="truncated"):
        c.complete([[1, 2]], 2, temperature=0)
    assert c.network_calls == 1


def test_a_connection_error_is_retried_then_named(client):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    c = RemoteTeacher(f"http://127.0.0.1:{port}/v1", NAME, max_retries=1, backoff=0.001, vocab_size=300)
    with pytest.raises(DistilleryError, match="cannot connect") as e:
        c.score(rows(1, 3), 2)
    assert "after 2 attempts" in str(e.value) and c.network_calls == 2


def test_client_errors_are_not_retried(server, client):
    c = client(max_retries=3, vocab_size=300)
    with pytest.raises(DistilleryError, match="HTTP 400") as e:
        c.score(rows(1, 3), 25)  # more than the server's 20 top log-probabilities
    assert "logprobs" in str(e.value) and c.network_calls == 1 and c.retries == 0
    c = RemoteTeacher(server.url, "no-such-model", max_retries=3, backoff=0.001, vocab_size=300)
    with pytest.raises(DistilleryError, match="404") as e:
        c.score(rows(1, 3), 2)
    assert "no-such-model" in str(e.value) and c.network_calls == 1


def test_backoff_grows_with_jitter_up_to_the_cap(client):
    c = client(backoff=0.5, max_backoff=3.0)
    for attempt in range(6):
        d = c._delay(attempt, None)
        assert 0.5 * min(3.0, 0.5 * 2**attempt) <= d <= min(3.0, 0.5 * 2**attempt)
    assert c._delay(0, 2.0) == 2.0 and c._delay(0, 100.0) == 3.0


def test_requests_per_second_spaces_requests(client):
    c = client(requests_per_second=10)
    now, waits = [0.0], []
    c._clock = lambda: now[0]

    def sleep(s):
        waits.append(round(s, 9))
        now[0] += s

    c._sleep = sleep
    c.prompts_per_request = 1
    c.complete([[1], [2], [3]], 1, temperature=0)
    assert c.network_calls == 3 and waits == [0.1, 0.1]


# ------------------------------------------------------------------------------------ keys


def test_a_wrong_key_is_a_401_naming_the_variable_never_the_key(lm, monkeypatch):
    model, tok = lm
    right, wrong = "sk-test-correct-horse-0123", "sk-test-wrong-battery-4567"
    with CompletionServer(model, tok, NAME, api_key=right, quiet=True) as keyed:
        monkeypatch.setenv("TEST_TEACHER_KEY", wrong)
        c = RemoteTeacher(keyed.url, NAME, api_key_env="TEST_TEACHER_KEY", max_retries=3, backoff=0.001, vocab_size=300)
        with pytest.raises(DistilleryError) as e:
            c.score(rows(1, 3), 2)
        msg = str(e.value)
        assert "401" in msg and "TEST_TEACHER_KEY" in msg and wrong not in msg and right not in msg
        assert c.network_calls == 1 and c.retries == 0
        status, body = post(keyed.url + "/completions", {"model": NAME, "prompt": [1]}, key=wrong)
        assert status == 401 and body["error"]["type"] and wrong not in json.dumps(body)
        monkeypatch.delenv("TEST_TEACHER_KEY")
        with pytest.raises(DistilleryError, match="TEST_TEACHER_KEY is not set"):
            c.score(rows(1, 3), 2)
        monkeypatch.setenv("TEST_TEACHER_KEY", right)
        assert c.score(rows(1, 3), 2).log_probs.shape == (1, 3, 2)
        assert right not in repr(c) and right not in repr(keyed)


# ------------------------------------------------------------------------------------ request log


def test_the_request_log_answers_a_rerun_without_network_calls(server, client, tmp_path, monkeypatch):
    monkeypatch.setenv("DISTILLERY_TEST_LOG_KEY", "sk-never-in-the-log-99")  # the keyless server ignores it
    log = tmp_path / "requests.jsonl"
    x = rows(3, 6, seed=2)
    first = client(log=log, prompts_per_request=2, vocab_size=300, api_key_env="DISTILLERY_TEST_LOG_KEY")
    a = first.score(x, 4)
    assert first.network_calls == 2 and first.log_hits == 0
    text = log.read_text()
    assert len(text.splitlines()) == 2 and "sk-never-in-the-log-99" not in text
    body = {"model": NAME, "prompt": x[:2].tolist(), "max_tokens": 1, "temperature": 0, "logprobs": 4, "echo": True,
            "return_tokens_as_token_ids": True, "ignore_eos": True}
    assert json.loads(text.splitlines()[0])["key"] == request_key("/completions", body)

    again = client(log=log, prompts_per_request=2, vocab_size=300)
    b = again.score(x, 4)
    assert again.network_calls == 0 and again.log_hits == 2
    assert torch.equal(a.log_probs, b.log_probs) and torch.equal(a.indices, b.indices)

    with open(log, "ab") as f:  # a crash mid-append
        f.write(b'{"key": "abc", "respo')
    torn = client(log=log, prompts_per_request=2, vocab_size=300)
    assert torn.torn_lines == 1 and log.read_text() == text  # cut away
    assert torch.equal(torn.score(x, 4).log_probs, a.log_probs) and torn.network_calls == 0
    torn.score(rows(1, 6, seed=5), 4)  # a new request is appended after the good lines
    assert torn.network_calls == 1 and len(log.read_text().splitlines()) == 3


def test_random_requests_replay_in_order_from_the_log(server, client, tmp_path):
    log = tmp_path / "sampled.jsonl"
    a = client(log=log)
    first = [a.complete([[4, 5]], 6)[0][0].ids for _ in range(2)]  # no seed: two paid samples
    assert a.network_calls == 2
    b = client(log=log)
    assert [b.complete([[4, 5]], 6)[0][0].ids for _ in range(2)] == first and b.network_calls == 0
    b.complete([[4, 5]], 6)
    assert b.network_calls == 1 and b.log_hits == 2


def test_a_corrupted_log_line_is_refused(tmp_path, client):
    log = tmp_path / "bad.jsonl"
    log.write_text('{"key": "a", "response": {}}\nnot json\n{"key": "b", "response": {}}\n')
    with pytest.raises(DistilleryError, match="line 2"):
        client(log=log)


# ------------------------------------------------------------------------------------ server


def test_server_defaults_to_loopback_and_lists_its_model(server, lm):
    assert server.host == "127.0.0.1" and is_loopback(server.host) and not is_loopback("0.0.0.0")
    with urllib.request.urlopen(server.url + "/models", timeout=10) as r:
        listed = json.loads(r.read())
    assert [m["id"] for m in listed["data"]] == [NAME] and listed["data"][0]["vocab_size"] == lm[0].vocab_size


@pytest.mark.parametrize(("body", "status", "words"), [
    ({"model": NAME}, 400, "no prompt"),
    ({"model": NAME, "prompt": []}, 400, "non-empty"),
    ({"model": NAME, "prompt": [1, "a"]}, 400, "token ids"),
    ({"model": NAME, "prompt": [[1, 99999]]}, 400, "outside the vocabulary"),
    ({"model": NAME, "prompt": [1], "max_tokens": 0}, 400, "echo"),
    ({"model": NAME, "prompt": [1], "logprobs": 21}, 400, "logprobs"),
    ({"model": NAME, "prompt": [1], "temperature": "hot"}, 400, "temperature"),
    ({"model": NAME, "prompt": [1], "n": True}, 400, "n must be an integer"),
    ({"model": NAME, "prompt": [1] * 510, "max_tokens": 16}, 400, "context of 512"),
    ({"model": NAME, "prompt": [1], "stream": True}, 400, "streaming"),
    ({"prompt": [1]}, 400, "no model"),
    ({"model": "other", "prompt": [1]}, 404, "does not exist"),
    ({"model": NAME, "prompt": [1], "seed": 2**70}, 400, "seed must be between"),
    ({"model": NAME, "prompt": [1], "max_tokens": 10**30}, 400, "max_tokens must be between"),
    ({"model": NAME, "prompt": [1], "top_k": 2**80}, 400, "top_k must be between"),
    ({"model": NAME, "prompt": "x" * 100_000}, 400, "characters"),
])
def test_server_refuses_bad_requests_clearly(server, body, status, words):
    got, answer = post(server.url + "/completions", body)
    assert got == status and words in answer["error"]["message"] and answer["error"]["type"]


def test_server_refuses_invalid_json(server):
    status, answer = post(server.url + "/completions", None, raw=b"{not json")
    assert status == 400 and "not valid JSON" in answer["error"]["message"]


def test_deeply_nested_json_is_refused_before_parsing(server):
    for raw in (b"[" * 200_000 + b"]" * 200_000, b'{"a":' * 5_000 + b"1" + b"}" * 5_000):
        status, answer = post(server.url + "/completions", None, raw=raw)
        assert status == 400 and "nests deeper" in answer["error"]["message"]
    status, _ = post(server.url + "/completions", {"model": NAME, "prompt": [1], "stop": ["[[[[" * 50]})
    assert status == 200  # brackets inside strings are not nesting


def test_the_key_is_checked_before_the_body_is_read(lm):
    model, tok = lm
    with CompletionServer(model, tok, NAME, api_key="sk-right", quiet=True) as keyed:
        host, port = keyed.host, keyed.port
        with socket.create_connection((host, port), timeout=10) as sock:  # announces 1 GB, sends none of it
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000\r\n\r\n")
            head = sock.recv(4096).decode("latin-1")
        assert head.startswith("HTTP/1.1 401")


def test_control_characters_in_the_request_line_are_escaped_in_the_log(lm, capfd):
    model, tok = lm
    with CompletionServer(model, tok, NAME, quiet=False) as loud, \
            socket.create_connection((loud.host, loud.port), timeout=10) as sock:
        sock.sendall(b"GET /v1/models\x1b[31mred HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        sock.recv(4096)
    err = capfd.readouterr().err
    assert "\x1b" not in err and "\\x1b" in err


def test_server_echo_scores_text_prompts_openai_style(server, lm):
    _, tok = lm
    text = "hello world"
    status, out = post(server.url + "/completions", {"model": NAME, "prompt": text, "max_tokens": 0, "echo": True,
                                                     "logprobs": 2})
    assert status == 200 and out["object"] == "text_completion"
    choice = out["choices"][0]
    ids = tok.encode(text).ids
    lp = choice["logprobs"]
    assert choice["text"] == text and choice["finish_reason"] == "length"
    assert len(lp["tokens"]) == len(ids) and "".join(lp["tokens"]) == text
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert all(isinstance(v, float) for v in lp["token_logprobs"][1:]) and all(len(d) == 2 for d in lp["top_logprobs"][1:])
    assert lp["text_offset"][0] == 0 and lp["text_offset"] == sorted(lp["text_offset"])
    assert out["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 0, "total_tokens": len(ids)}


def test_client_refuses_text_tokens(server, client, monkeypatch):
    real = server.complete
    monkeypatch.setattr(server, "complete", lambda body: real({**body, "return_tokens_as_token_ids": False}))
    c = client(max_retries=3, vocab_size=300)
    with pytest.raises(DistilleryError, match="return_tokens_as_token_ids"):
        c.score(rows(1, 3), 2)
    assert c.network_calls == 1


def test_serve_subcommand_parses():
    p = argparse.ArgumentParser()
    add_parser(p.add_subparsers(dest="command"))
    args = p.parse_args(["serve", "some/folder", "--port", "0"])
    assert args.model_dir == "some/folder" and args.port == 0 and args.host == "127.0.0.1"
    assert args.api_key_env == "DISTILLERY_API_KEY" and args.name is None and callable(args.fn)


def test_serve_command_reads_the_key_from_the_environment_and_never_prints_it(lm, tmp_path, monkeypatch, capsys):
    from distillery.lm import serve
    from distillery.lm.models import save_lm

    model, tok = lm
    folder = save_lm(model, tok, tmp_path / "my-teacher")
    seen = {}

    def fake_serve_forever(self):  # instead of blocking: record the server, then "Ctrl-C"
        seen["server"] = self
        self.stop()  # close the socket run() bound
        raise KeyboardInterrupt

    monkeypatch.setattr(serve.CompletionServer, "serve_forever", fake_serve_forever)
    monkeypatch.setenv("MY_SERVE_KEY", "sk-serve-secret-777")
    p = argparse.ArgumentParser()
    add_parser(p.add_subparsers(dest="command"))
    args = p.parse_args(["serve", str(folder), "--port", "0", "--api-key-env", "MY_SERVE_KEY", "--quiet"])
    assert args.fn(args) == 0
    server = seen["server"]
    assert server.name == "my-teacher" and server.host == "127.0.0.1"
    assert server.authorized("Bearer sk-serve-secret-777") and not server.authorized("Bearer nope")
    assert not server.authorized(None)
    out = capsys.readouterr()
    assert "MY_SERVE_KEY" in out.out and "sk-serve-secret-777" not in out.out + out.err


def test_remote_teacher_drives_topk_kd_and_sequence_level_data(client, lm, tmp_path):
    from distillery.config import TrainConfig
    from distillery.lm import distill as D
    from distillery.lm.corpus import TokenData
    from distillery.lm.remote import RemoteTopKTeacher
    from distillery.losses.tokens import token_loss

    model, tok = lm
    v = tok.get_vocab_size()
    teacher = client(log=tmp_path / "requests.jsonl")
    data = TokenData.from_blocks(rows(6, 9, seed=4, vocab=v), v, "toy")
    batch = data.batch(torch.arange(3))
    from distillery.losses.sparse import TopK

    sparse = RemoteTopKTeacher(teacher, 20)(batch)["logits"]
    with torch.no_grad():
        logp = F.log_softmax(model(batch["x"]), -1)
    vals, idx = logp.topk(20, dim=-1)
    local = TopK(vals, idx, logp.scatter(-1, idx, float("-inf")).logsumexp(-1), v)
    s_logits = torch.randn(3, 8, v, generator=torch.Generator().manual_seed(0))
    want = token_loss("kd", s_logits, local, mask=batch["mask"], temperature=1.0)
    got = token_loss("kd", s_logits, sparse, mask=batch["mask"], temperature=1.0)
    assert torch.allclose(got, want, atol=1e-4)
    student = llama("tiny", vocab_size=v, seed=5)
    cfg = TrainConfig(epochs=2, batch_size=3, lr=1e-3, log_every=1000)
    before = teacher.network_calls
    D.distil(student, RemoteTopKTeacher(teacher, 8), data, cfg, progress=False)
    calls = teacher.network_calls
    assert calls - before <= len(data)  # two epochs in other batches: each row paid for once
    D.distil(llama("tiny", vocab_size=v, seed=5), RemoteTopKTeacher(teacher, 8), data, cfg, progress=False)
    assert teacher.network_calls == calls  # every answer came from the request log
    seq = D.remote_texts(teacher, data.x[:2, :3], 5, samples=2, seed=1)
    assert seq.x.shape == (4, 7) and (seq.y[:, :2] == -100).all() and seq.settings["n"] == 2
    local = sample(model, data.x[:1, :3].repeat(2, 1), 5, generator=torch.Generator().manual_seed(1))
    assert seq.x[0, 3:].tolist() == local.ids[0, 3:7].tolist()
