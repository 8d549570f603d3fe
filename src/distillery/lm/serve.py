"""A local ``CausalLM`` served through the OpenAI **completions** and **chat completions** APIs, so a
teacher can sit behind HTTP (``remote.RemoteTeacher`` is the client of both; any OpenAI-compatible
client works too). The tokenizer is a transformers fast tokenizer (``models.load_tokenizer``) or a raw
``tokenizers.Tokenizer`` (completions only), or None (token-id prompts only).

Endpoints:

- ``POST /v1/completions`` with a JSON body:

  - ``model`` (required): the served name; another name is answered 404 ``model_not_found``.
  - ``prompt`` (required): a string, a list of strings, a list of token ids, or a list of lists of
    token ids (as OpenAI allows). Strings are encoded with the model's tokenizer.
  - ``max_tokens`` (default 16): new tokens per completion; 0 only with ``echo`` (scoring given text).
    Every completion gets exactly ``max_tokens`` tokens (``finish_reason`` is always ``"length"``):
    the end-of-text token does not stop generation.
  - ``temperature`` (default 1; 0 = greedy, ties to the lowest id), ``top_p`` (default 1), ``top_k``
    (vLLM's extension; 0 or -1 = off), ``n`` (samples per prompt, default 1).
  - ``seed`` (int): each prompt is sampled with a fresh generator seeded with it (its ``n`` samples
    share it and differ), so a prompt's completion does not depend on the other prompts of the request.
  - ``logprobs`` (int 0..``max_logprobs``, default 20, or null): legacy completions semantics: the
    log-probability of every returned token and the ``logprobs`` most likely tokens at its position
    (an empty dict when 0). null returns ``"logprobs": null``.
  - ``echo`` (bool): the prompt tokens come back before the completion, with their log-probabilities;
    the first prompt token has ``token_logprobs`` null and ``top_logprobs`` null (as OpenAI).
    ``echo=true, max_tokens=0, logprobs=k`` scores a given text.
  - ``return_tokens_as_token_ids`` (bool, vLLM's extension): tokens (and the keys of
    ``top_logprobs``) are ``"token_id:123"`` strings instead of text, so no two tokens collide.
  - ``stop``, ``user``, ``presence_penalty``, ``frequency_penalty`` and other OpenAI fields are
    accepted and ignored (``stop`` sequences do not stop generation); ``stream`` is refused.

  **Log-probabilities are those of the model's full softmax at temperature 1**, whatever
  ``temperature``, ``top_p`` and ``top_k`` the sampling used (OpenAI reports the raw model's too;
  ``generate.sample`` reports the sampling distribution's instead). ``text_offset`` holds the
  character offset of each returned token in the text prompt + completion.

- ``POST /v1/chat/completions`` with a JSON body (OpenAI's chat schema):

  - ``model`` (required), as above; ``stream`` is refused, so are ``tools``.
  - ``messages`` (required): a non-empty list of ``{"role", "content"}`` with the roles ``system``,
    ``user`` and ``assistant`` (another role is a 400 naming them) and text content (a string, or a
    list of ``{"type": "text", "text"}`` parts). The prompt is the tokenizer's chat template rendered
    with the assistant's turn opened (``add_generation_prompt``), encoded without added special
    tokens. A tokenizer without a chat template (or a raw ``tokenizers.Tokenizer``) is answered 400
    "the served model's tokenizer has no chat template".
  - ``max_completion_tokens`` or ``max_tokens`` (default: the rest of the context), ``temperature``,
    ``top_p``, ``top_k`` (vLLM's), ``n`` and ``seed`` as for completions.
  - Generation **stops** at the tokenizer's ``eos_token`` and at the end-of-turn markers of common chat
    formats that its vocabulary holds (``END_TOKENS``: ``<|im_end|>``, ``<|endoftext|>``,
    ``<|eot_id|>``, ...), unless ``ignore_eos`` (vLLM's extension) is true, and at the first ``stop``
    string (a string or a list of non-empty strings) in the decoded reply: ``finish_reason`` is then
    ``"stop"``, else ``"length"`` (``max_tokens`` reached). The reply's text is decoded without special
    tokens, the end token left out and cut before the stop string; its tokens (and log-probabilities)
    run up to and including the end token or the token that completed the stop string (as vLLM).
    Decoding is ``generate.sample``'s, so a reply is a prefix of ``sample``'s continuation of the
    rendered prompt with the same settings and seed.
  - ``logprobs`` (bool) and ``top_logprobs`` (0..``max_logprobs``; needs ``logprobs``): the answer's
    ``choices[i].logprobs.content`` lists per reply token ``{"token", "logprob", "bytes",
    "top_logprobs": [{"token", "logprob", "bytes"}, ...]}`` (full softmax at temperature 1, as
    above; ``bytes`` the UTF-8 of the token's text); ``"logprobs": null`` when not asked.
  - ``return_tokens_as_token_ids`` (bool, vLLM's extension): ``token`` is ``"token_id:123"``.

  The answer: ``choices[i] = {"index", "message": {"role": "assistant", "content"}, "logprobs",
  "finish_reason"}`` and ``usage`` (the prompt counted once, the completion tokens of all ``n``).

- ``GET /v1/models``: the one model, with ``vocab_size`` and ``max_model_len`` beside OpenAI's fields.

Authentication: a server started with an API key (``distillery serve`` reads it from the environment
variable named by ``--api-key-env``, default ``DISTILLERY_API_KEY``; unset = no key needed) answers
401 unless a request carries ``Authorization: Bearer KEY`` (compared in constant time). The key is
never logged or echoed. Errors are OpenAI-style JSON: ``{"error": {"message", "type", "param", "code"}}``.

The server (``CompletionServer``) is a ``ThreadingHTTPServer``; one lock serialises model calls. It
binds 127.0.0.1 unless told otherwise. ``CompletionServer.faults`` is a test hook (a list of fault
names, one consumed per request; not reachable over HTTP): ``"500"``, ``"429"`` or ``"429:SECONDS"``
(with ``Retry-After``), ``"sleep:SECONDS"`` (before answering), ``"truncate"`` (a 200 whose body is
cut in half and the connection closed, the Content-Length announcing the whole), ``"cut-json"`` (half
the body with a matching Content-Length: invalid JSON), ``"drop-logprobs"`` (choices without
logprobs), ``"short-logprobs"`` (one token log-probability fewer than tokens; in a chat answer, the
last token's entry without its ``logprob``). Faults apply to every POST endpoint alike.
"""

from __future__ import annotations

import argparse
import hmac
import ipaddress
import json
import math
import os
import secrets
import socket
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import DistilleryError
from .generate import draw, sample, warp
from .models import END_TOKENS, end_ids

DEFAULT_KEY_ENV = "DISTILLERY_API_KEY"
MAX_BODY = 16 << 20  # bytes of request JSON
MAX_DEPTH = 32  # nesting of the request JSON (an OpenAI request needs 3)
MAX_CHARS_PER_TOKEN = 64  # a string prompt longer than context x this is refused before it is tokenised
NEG_INF = -9999.0  # what a -inf log-probability is reported as (JSON has no infinity; vLLM does the same)
CHAT_ROLES = ("system", "user", "assistant")


class RequestError(Exception):
    """A request the server refuses: HTTP ``status`` and an OpenAI-style error object."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        """The JSON error object."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def is_loopback(host: str) -> bool:
    """True for addresses only this machine reaches (127.0.0.0/8, ::1, ``localhost``)."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host.lower() == "localhost"


# ------------------------------------------------------------------------------ request parsing


def _int(body: dict, name: str, default: int | None, lo: int | None = None, hi: int | None = None,
         nullable: bool = True) -> int | None:
    v = body.get(name, default)
    if v is None:
        if not nullable:
            raise RequestError(400, f"{name} must be an integer, got null.", param=name)
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        else:
            raise RequestError(400, f"{name} must be an integer, got {json.dumps(v)[:40]}.", param=name)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        span = f">= {lo}" if hi is None else f"between {lo} and {hi}"
        raise RequestError(400, f"{name} must be {span}, got {v}.", param=name)
    return v


def _float(body: dict, name: str, default: float) -> float:
    v = body.get(name, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise RequestError(400, f"{name} must be a finite number, got {json.dumps(v)[:40]}.", param=name)
    return float(v)


def _bool(body: dict, name: str) -> bool:
    v = body.get(name, False)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise RequestError(400, f"{name} must be true or false, got {json.dumps(v)[:40]}.", param=name)
    return v


def _is_id(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def encode(tokenizer, text: str, special: bool = True) -> list[int]:
    """The token ids of ``text`` with either kind of tokenizer (a raw ``tokenizers.Tokenizer`` answers an
    ``Encoding``, a transformers fast tokenizer a list); ``special``: add the post-processor's tokens (BOS)."""
    out = tokenizer.encode(text, add_special_tokens=special)
    return list(getattr(out, "ids", out))


def decode_batch(tokenizer, seqs: list[list[int]], skip_special_tokens: bool = False) -> list[str]:
    """The texts of several id lists with either kind of tokenizer (``decode_batch`` / ``batch_decode``)."""
    fn = getattr(tokenizer, "decode_batch", None) or tokenizer.batch_decode
    return list(fn(seqs, skip_special_tokens=skip_special_tokens))


def parse_messages(messages: Any, max_chars: int | None = None) -> list[dict]:
    """The ``messages`` of a chat request as [{role, content}] with text content (a string, or a list of
    ``{"type": "text", "text": ...}`` parts, joined); roles ``CHAT_ROLES``. More than ``max_chars``
    characters in all are refused before they are rendered and tokenised."""
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "the request has no messages; send \"messages\": a non-empty list of "
                                "{\"role\", \"content\"} objects.", param="messages")
    out, chars = [], 0
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise RequestError(400, f"messages[{i}] is not an object; send {{\"role\", \"content\"}}.", param="messages")
        role = m.get("role")
        if role not in CHAT_ROLES:
            raise RequestError(400, f"messages[{i}] has role {json.dumps(role)[:40]}; this server takes the roles "
                                    f"{', '.join(CHAT_ROLES)}.", param="messages")
        content = m.get("content")
        if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                             and isinstance(p.get("text"), str) for p in content):
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise RequestError(400, f"messages[{i}] has no text content; send \"content\": a string (or a list of "
                                    "{\"type\": \"text\", \"text\"} parts).", param="messages")
        chars += len(content)
        if max_chars is not None and chars > max_chars:
            raise RequestError(400, f"the messages hold more characters than this model's context could hold (at "
                                    f"most {max_chars}); shorten them.", param="messages")
        out.append({"role": role, "content": content})
    return out


def parse_prompts(prompt: Any, tokenizer, vocab_size: int, max_chars: int | None = None) -> list[list[int]]:
    """The token ids of every prompt of an OpenAI ``prompt`` field (str, [str], [int] or [[int]]). A string
    longer than ``max_chars`` is refused before it is tokenised (megabytes of text cost seconds to encode
    only to be refused for the context length after)."""
    if prompt is None:
        raise RequestError(400, "the request has no prompt; send \"prompt\": a string, a list of strings, "
                                "a list of token ids or a list of lists of token ids.", param="prompt")
    if isinstance(prompt, str):
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt:
        raise RequestError(400, "prompt must be a string or a non-empty list (of strings, token ids or lists of "
                                "token ids).", param="prompt")
    if all(_is_id(x) for x in prompt):
        prompt = [prompt]
    out = []
    for i, p in enumerate(prompt):
        if isinstance(p, str):
            if max_chars is not None and len(p) > max_chars:
                raise RequestError(400, f"prompt {i} has {len(p)} characters, more than this model's context could hold "
                                        f"(at most {max_chars}); shorten it.", param="prompt")
            if tokenizer is None:
                raise RequestError(400, "this server has no tokenizer; send token ids.", param="prompt")
            ids = encode(tokenizer, p)
        elif isinstance(p, list) and all(_is_id(x) for x in p):
            ids = p
        else:
            raise RequestError(400, f"prompt {i} is neither a string nor a list of token ids; do not mix the forms.",
                               param="prompt")
        if not ids:
            raise RequestError(400, f"prompt {i} has no tokens; send at least one.", param="prompt")
        bad = [x for x in ids if not 0 <= x < vocab_size]
        if bad:
            raise RequestError(400, f"prompt {i} holds token id {bad[0]}, outside the vocabulary [0, {vocab_size}).",
                               param="prompt")
        out.append(ids)
    return out


# ----------------------------------------------------------------------------------- the server


class CompletionServer:
    """Serve ``model`` (a ``CausalLM``) and its ``tokenizer`` (a transformers fast tokenizer, with a chat
    template for the chat endpoint; a raw ``tokenizers.Tokenizer``; or None for token-id prompts only)
    as ``name`` through the OpenAI completions and chat completions APIs (module docstring).

    ``api_key``: the key requests must carry (None: none needed). ``port`` 0 picks a free port
    (``start()`` returns it). ``max_logprobs`` caps ``logprobs``, ``max_n`` caps ``n``, ``max_prompts``
    the prompts of one request. ``quiet`` silences the per-request log lines (which never hold headers).
    ``faults``: the test hook of the module docstring."""

    def __init__(self, model, tokenizer, name: str, host: str = "127.0.0.1", port: int = 0, api_key: str | None = None,
                 *, max_logprobs: int = 20, max_n: int = 16, max_prompts: int = 256, quiet: bool = False):
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.host, self.port = host, int(port)
        self._key = api_key.encode("utf-8") if api_key else None
        self.max_logprobs, self.max_n, self.max_prompts, self.quiet = int(max_logprobs), int(max_n), int(max_prompts), quiet
        self.faults: list[str] = []
        self._faults_lock = threading.Lock()
        self._lock = threading.Lock()
        self._closing = False
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._pieces: dict[int, str] = {}
        self._end_ids: set[int] | None = None
        self.created = int(time.time())

    def __repr__(self) -> str:  # never the key
        return f"CompletionServer({self.name!r}, {self.host}:{self.port}, key={'yes' if self._key else 'no'})"

    @property
    def url(self) -> str:
        """The base URL clients use (``http://host:port/v1``)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/v1"

    # -- lifecycle

    def bind(self) -> int:
        """Bind the socket (not yet serving) and return the port."""
        if self._httpd is None:
            handler = type("Handler", (_Handler,), {"app": self})
            cls = _V6Server if ":" in self.host else ThreadingHTTPServer
            try:
                self._httpd = cls((self.host, self.port), handler)
            except OSError as e:
                raise DistilleryError(f"cannot listen on {self.host}:{self.port} ({e.strerror or e}); pick another "
                                      "--port (0 = any free one) or --host.") from None
            self._httpd.daemon_threads = True
            self.port = self._httpd.server_address[1]
            self._closing = False  # a stopped server may start again
        return self.port

    def start(self) -> int:
        """Serve in a background thread; returns the bound port."""
        port = self.bind()
        if self._thread is None:
            self._thread = threading.Thread(target=self._httpd.serve_forever, name=f"serve-{self.name}", daemon=True)
            self._thread.start()
        return port

    def serve_forever(self) -> None:
        """Serve in this thread until interrupted (the CLI)."""
        self.bind()
        try:
            self._httpd.serve_forever()
        finally:
            self._httpd.server_close()
            self._httpd = None
            self._close_model()

    def _close_model(self) -> None:
        with self._lock:  # waits for the model call in flight; later ones are answered 503
            self._closing = True

    def stop(self) -> None:
        """Stop serving and close the socket. The model call in flight finishes first; requests still
        in flight after it (sleeping in a fault) are answered 503 without touching the model."""
        if self._httpd is not None:
            if self._thread is not None:
                self._httpd.shutdown()
                self._thread.join()
            self._httpd.server_close()
        self._httpd = self._thread = None
        self._close_model()

    def __enter__(self) -> CompletionServer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- pieces used by the handler

    def authorized(self, header: str | None) -> bool:
        """Whether an ``Authorization`` header carries the key (always True without one)."""
        if self._key is None:
            return True
        scheme, _, token = (header or "").strip().partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode("utf-8"), self._key)

    def next_fault(self) -> str | None:
        """Pop the next injected fault, if any."""
        with self._faults_lock:
            return self.faults.pop(0) if self.faults else None

    def models(self) -> dict:
        """The ``GET /v1/models`` answer."""
        return {"object": "list", "data": [{"id": self.name, "object": "model", "created": self.created,
                                            "owned_by": "distillery", "vocab_size": int(self.model.vocab_size),
                                            "max_model_len": int(self.model.max_length)}]}

    def _piece(self, i: int) -> str:
        if i not in self._pieces:
            self._pieces[i] = self.tokenizer.decode([i], skip_special_tokens=False) if self.tokenizer is not None \
                else str(i)
        return self._pieces[i]

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False) if self.tokenizer is not None else ""

    def _check_request(self, body: Any) -> None:
        """The checks every POST body passes: a JSON object naming this model, not streamed."""
        if not isinstance(body, dict):
            raise RequestError(400, "the request body must be a JSON object.")
        if "model" not in body:
            raise RequestError(400, f"the request has no model; send \"model\": {json.dumps(self.name)}.", param="model")
        if body["model"] != self.name:
            raise RequestError(404, f"the model {json.dumps(body['model'])[:80]} does not exist; this server serves "
                                    f"{json.dumps(self.name)}.", param="model", code="model_not_found")
        if body.get("stream"):
            raise RequestError(400, "streaming is not supported; send \"stream\": false.", param="stream")

    def _sampling(self, body: dict, vocab: int) -> tuple[float, float, int, int]:
        """(temperature, top_p, top_k, n) of a request, checked (top_k -1 or 0: off)."""
        temperature = _float(body, "temperature", 1.0)
        if temperature < 0:
            raise RequestError(400, f"temperature must be >= 0 (0 = greedy), got {temperature}.", param="temperature")
        top_p = _float(body, "top_p", 1.0)
        if not 0 < top_p <= 1:
            raise RequestError(400, f"top_p must lie in (0, 1], got {top_p}.", param="top_p")
        top_k = _int(body, "top_k", 0, -1, vocab)
        return temperature, top_p, 0 if top_k == -1 else top_k, _int(body, "n", 1, 1, self.max_n)

    def complete(self, body: Any) -> dict:
        """The ``POST /v1/completions`` answer to a parsed JSON ``body`` (raises ``RequestError``)."""
        self._check_request(body)
        vocab, ctx = int(self.model.vocab_size), int(self.model.max_length)
        prompts = parse_prompts(body.get("prompt"), self.tokenizer, vocab, max_chars=ctx * MAX_CHARS_PER_TOKEN)
        echo = _bool(body, "echo")
        as_ids = _bool(body, "return_tokens_as_token_ids")
        max_tokens = _int(body, "max_tokens", 16, 0, ctx)
        if max_tokens == 0 and not echo:
            raise RequestError(400, "max_tokens must be >= 1 (0 only with echo=true, to score the prompt).",
                               param="max_tokens")
        temperature, top_p, top_k, n = self._sampling(body, vocab)
        best_of = _int(body, "best_of", None, 1, self.max_n)
        if best_of is not None and best_of != n:
            raise RequestError(400, "best_of is not supported; leave it out (or equal to n).", param="best_of")
        seed = _int(body, "seed", None, 0, 2**63 - 1)
        k = _int(body, "logprobs", None, 0, self.max_logprobs)
        stop = body.get("stop")
        if not (stop is None or isinstance(stop, str) or (isinstance(stop, list) and all(isinstance(s, str) for s in stop))):
            raise RequestError(400, "stop must be a string or a list of strings (it is accepted and ignored).",
                               param="stop")
        if len(prompts) * n > self.max_prompts:
            raise RequestError(400, f"{len(prompts)} prompts x n={n} exceed this server's {self.max_prompts} "
                                    "completions per request; send fewer prompts per request.", param="prompt")
        for i, p in enumerate(prompts):
            if len(p) + max_tokens > ctx:
                raise RequestError(400, f"prompt {i} has {len(p)} tokens and max_tokens is {max_tokens}: together they "
                                        f"exceed the model's context of {ctx} tokens; shorten the prompt or lower "
                                        "max_tokens.", param="prompt")
        choices, completion_tokens = [], 0
        for i, p in enumerate(prompts):
            rows = self._run(p, n, max_tokens, temperature, top_p, top_k, seed, k)
            for j, (ids, lps, tops) in enumerate(rows):
                choices.append(self._choice(i * n + j, p, ids, lps, tops, echo, as_ids, k))
                completion_tokens += len(ids) - len(p)
        prompt_tokens = sum(len(p) for p in prompts)
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": self.name, "choices": choices,
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens}}

    def _run(self, prompt: list[int], n: int, max_tokens: int, temperature: float, top_p: float, top_k: int,
             seed: int | None, k: int | None) -> list[tuple[list[int], list[float] | None, list | None]]:
        """n continuations of one prompt: (all ids, log-prob of each token after the first, top-k per
        position after the first as (values, ids)) under the model's full softmax at temperature 1."""
        x = torch.tensor([prompt] * n, dtype=torch.long)
        with self._lock, torch.no_grad():
            if self._closing:
                raise RequestError(503, "the server is shutting down; retry against a running one.", type="server_error")
            if max_tokens > 0:
                g = torch.Generator().manual_seed(seed if seed is not None else secrets.randbits(63))
                x = sample(self.model, x, max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, generator=g).ids
            if k is None:
                return [(row, None, None) for row in x.tolist()]
            self.model.eval()
            logp = F.log_softmax(self.model(x).float(), dim=-1)[:, :-1]  # position t predicts token t + 1
        lps = logp.gather(-1, x[:, 1:, None]).squeeze(-1)
        lps = torch.nan_to_num(lps, neginf=NEG_INF).tolist()
        if k:
            v, idx = logp.topk(min(k, logp.shape[-1]), dim=-1)
            tops = list(zip(torch.nan_to_num(v, neginf=NEG_INF).tolist(), idx.tolist()))
        else:
            tops = [None] * n
        return [(row, lp, top) for row, lp, top in zip(x.tolist(), lps, tops)]

    def _choice(self, index: int, prompt: list[int], ids: list[int], lps, tops, echo: bool, as_ids: bool,
                k: int | None) -> dict:
        full = self._decode(ids)
        head = self._decode(prompt)
        gen = ids[len(prompt):]
        text = full if echo else (full[len(head):] if full.startswith(head) else self._decode(gen))
        logprobs = None
        if k is not None:
            start = 0 if echo else len(prompt)
            tok = (lambda i: f"token_id:{i}") if as_ids else self._piece
            prefixes = decode_batch(self.tokenizer, [ids[:j] for j in range(start, len(ids))]) \
                if self.tokenizer is not None else [""] * (len(ids) - start)
            token_lps, top_lps = [], []
            for j in range(start, len(ids)):
                if j == 0:
                    token_lps.append(None)
                    top_lps.append(None)
                    continue
                token_lps.append(lps[j - 1])
                if tops is None:
                    top_lps.append({})
                else:
                    vals, idx = tops
                    top_lps.append({tok(t): v for v, t in zip(vals[j - 1], idx[j - 1])})
            logprobs = {"tokens": [tok(i) for i in ids[start:]], "token_logprobs": token_lps, "top_logprobs": top_lps,
                        "text_offset": [len(s) for s in prefixes]}
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": "length"}


    # -- chat completions

    def end_ids(self) -> set[int]:
        """The token ids that end a chat reply (``models.end_ids``: the end-of-sequence token and the end-of-turn
        markers of common chat formats, ``END_TOKENS``, that the vocabulary holds)."""
        if self._end_ids is None:
            eos = getattr(self.tokenizer, "eos_token_id", None)
            vocab = self.tokenizer.get_vocab()
            ids = end_ids(self.tokenizer) if isinstance(eos, int) else [vocab[t] for t in END_TOKENS if t in vocab]
            self._end_ids = {i for i in ids if 0 <= i < int(self.model.vocab_size)}
        return self._end_ids

    def render(self, messages: list[dict]) -> list[int]:
        """The prompt ids of a conversation: the tokenizer's chat template with the assistant's turn opened
        (``add_generation_prompt``), encoded without adding special tokens (the template writes them)."""
        tok = self.tokenizer
        if tok is None or not hasattr(tok, "apply_chat_template") or not getattr(tok, "chat_template", None):
            raise RequestError(400, "the served model's tokenizer has no chat template; save the tokenizer with one "
                                    "(tokenizer.chat_template = ..., save_pretrained) or use /v1/completions.",
                               param="messages")
        try:
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # jinja's TemplateError and whatever the template raises for these messages
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise RequestError(400, f"the chat template refused these messages ({first}).", param="messages") from None
        return encode(tok, text, special=False)

    def chat(self, body: Any) -> dict:
        """The ``POST /v1/chat/completions`` answer to a parsed JSON ``body`` (raises ``RequestError``)."""
        self._check_request(body)
        vocab, ctx = int(self.model.vocab_size), int(self.model.max_length)
        messages = parse_messages(body.get("messages"), max_chars=ctx * MAX_CHARS_PER_TOKEN)
        if body.get("tools"):
            raise RequestError(400, "tools are not supported; leave tools out.", param="tools")
        prompt = self.render(messages)
        if not prompt:
            raise RequestError(400, "the chat template rendered these messages to no tokens.", param="messages")
        bad = [x for x in prompt if not 0 <= x < vocab]
        if bad:
            raise RequestError(400, f"the rendered prompt holds token id {bad[0]}, outside the model's vocabulary "
                                    f"[0, {vocab}); the tokenizer does not belong to this model.", param="messages")
        room = ctx - len(prompt)
        if room < 1:
            raise RequestError(400, f"the rendered conversation has {len(prompt)} tokens, leaving no room in the "
                                    f"model's context of {ctx} tokens; shorten the messages.", param="messages")
        name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        max_tokens = _int(body, name, room, 1)
        if max_tokens > room:
            raise RequestError(400, f"the rendered conversation has {len(prompt)} tokens and {name} is {max_tokens}: "
                                    f"together they exceed the model's context of {ctx} tokens; shorten the messages "
                                    f"or lower {name}.", param=name)
        temperature, top_p, top_k, n = self._sampling(body, vocab)
        seed = _int(body, "seed", None, 0, 2**63 - 1)
        want_lp = _bool(body, "logprobs")
        k = _int(body, "top_logprobs", None, 0, self.max_logprobs)
        if k and not want_lp:
            raise RequestError(400, "top_logprobs needs \"logprobs\": true.", param="top_logprobs")
        stop = body.get("stop")
        stop = [stop] if isinstance(stop, str) else (stop or [])
        if not isinstance(stop, list) or not all(isinstance(x, str) and x for x in stop):
            raise RequestError(400, "stop must be a non-empty string or a list of them.", param="stop")
        as_ids = _bool(body, "return_tokens_as_token_ids")
        ends = set() if _bool(body, "ignore_eos") else self.end_ids()
        rows = self._chat_run(prompt, n, max_tokens, temperature, top_p, top_k, seed, ends, stop,
                              (k or 0) if want_lp else None)
        choices = [self._chat_choice(j, *row, as_ids, k or 0) for j, row in enumerate(rows)]
        completion_tokens = sum(len(row[0]) for row in rows)
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": self.name, "choices": choices,
                "usage": {"prompt_tokens": len(prompt), "completion_tokens": completion_tokens,
                          "total_tokens": len(prompt) + completion_tokens}}

    def _chat_run(self, prompt: list[int], n: int, max_tokens: int, temperature: float, top_p: float, top_k: int,
                  seed: int | None, ends: set[int], stop: list[str], k: int | None) -> list[tuple]:
        """n replies to one rendered prompt, each ending at an end token, a stop string or ``max_tokens``:
        (generated ids, text, finish_reason, log-prob per id or None, (values, ids) top-k per id or None).
        The decoding loop is ``generate.sample``'s (same warp, same draws from one generator over the n
        rows), so a reply is a prefix of ``sample``'s continuation; finished rows are decoded on (their
        draws keep the others' random stream) until every row has finished."""
        tok = self.tokenizer
        gen: list[list[int]] = [[] for _ in range(n)]
        texts: list[str | None] = [None] * n
        reasons: list[str | None] = [None] * n
        with self._lock, torch.no_grad():
            if self._closing:
                raise RequestError(503, "the server is shutting down; retry against a running one.", type="server_error")
            was_training = self.model.training
            self.model.eval()
            try:
                g = torch.Generator().manual_seed(seed if seed is not None else secrets.randbits(63))
                logits, cache = self.model.step(torch.tensor([prompt] * n, dtype=torch.long))
                for step in range(max_tokens):
                    log_p = warp(logits[:, -1], temperature, top_p, top_k)
                    new = log_p.argmax(-1) if temperature == 0 else draw(log_p, g)
                    for r, t in enumerate(new.tolist()):
                        if reasons[r] is not None:
                            continue
                        gen[r].append(t)
                        if t in ends:
                            reasons[r], texts[r] = "stop", tok.decode(gen[r][:-1], skip_special_tokens=True)
                        elif stop:  # the whole reply is decoded again: bytes merge into characters late
                            text = tok.decode(gen[r], skip_special_tokens=True)
                            cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
                            if cut >= 0:
                                reasons[r], texts[r] = "stop", text[:cut]
                    if all(reasons) or step == max_tokens - 1:
                        break
                    logits, cache = self.model.step(new[:, None], cache)
                out = []
                if k is not None:  # the full softmax at temperature 1 over prompt + reply, rows padded on the right
                    width = len(prompt) + max(len(ids) for ids in gen)
                    x = torch.zeros(n, width, dtype=torch.long)
                    for r, ids in enumerate(gen):
                        x[r, : len(prompt) + len(ids)] = torch.tensor(prompt + ids)
                    logp = F.log_softmax(self.model(x).float(), dim=-1)[:, len(prompt) - 1: -1]  # (n, width - P, V)
                    lps = torch.nan_to_num(logp.gather(-1, x[:, len(prompt):, None]).squeeze(-1), neginf=NEG_INF)
                    if k:
                        v, idx = logp.topk(min(k, logp.shape[-1]), dim=-1)
                        v = torch.nan_to_num(v, neginf=NEG_INF)
                    for r, ids in enumerate(gen):
                        m = len(ids)
                        top = (v[r, :m].tolist(), idx[r, :m].tolist()) if k else None
                        out.append((lps[r, :m].tolist(), top))
                else:
                    out = [(None, None)] * n
            finally:
                self.model.train(was_training)
        return [(ids, text if text is not None else tok.decode(ids, skip_special_tokens=True), reason or "length", lp, top)
                for ids, text, reason, (lp, top) in zip(gen, texts, reasons, out)]

    def _chat_choice(self, index: int, ids: list[int], text: str, reason: str, lps, tops, as_ids: bool,
                     k: int) -> dict:
        logprobs = None
        if lps is not None:
            def entry(t: int, lp: float) -> dict:
                piece = self._piece(t)
                return {"token": f"token_id:{t}" if as_ids else piece, "logprob": lp,
                        "bytes": list(piece.encode("utf-8", errors="replace"))}

            content = []
            for j, (t, lp) in enumerate(zip(ids, lps)):
                e = entry(t, lp)
                e["top_logprobs"] = [entry(i, v) for v, i in zip(*(x[j] for x in tops))] if k else []
                content.append(e)
            logprobs = {"content": content}
        return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                "finish_reason": reason}


def json_depth(body: bytes) -> int:
    """The deepest nesting of [ and { in a JSON text, strings skipped; counted before parsing (a body of
    200,000 brackets would exhaust the parser's recursion)."""
    if body.count(b"[") + body.count(b"{") <= MAX_DEPTH:
        return 0  # cannot nest deeper than the brackets it holds
    depth = deepest = 0
    in_str = escaped = False
    for c in body:
        if in_str:
            if escaped:
                escaped = False
            elif c == 0x5C:  # backslash
                escaped = True
            elif c == 0x22:  # quote
                in_str = False
        elif c == 0x22:
            in_str = True
        elif c in (0x5B, 0x7B):
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > MAX_DEPTH:
                    return deepest
        elif c in (0x5D, 0x7D):
            depth -= 1
    return deepest


class _V6Server(ThreadingHTTPServer):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    """HTTP glue; ``app`` (a ``CompletionServer``) is set on a per-server subclass."""

    app: CompletionServer
    protocol_version = "HTTP/1.1"
    timeout = 120  # seconds an idle keep-alive connection (or a stalled upload) holds its thread
    server_version = "distillery"
    sys_version = ""

    def log_message(self, format: str, *args) -> None:  # the request line and status only, never headers
        if not self.app.quiet:
            line = format % args  # the client's request line: control characters escaped, never written raw
            line = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in line)[:2000]
            sys.stderr.write(f"{self.address_string()} - {line}\n")

    def _send(self, status: int, obj: dict, headers: dict | None = None, fault: str | None = None) -> None:
        data = json.dumps(obj, allow_nan=False).encode("utf-8")
        cut = data[: len(data) // 2]
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(cut) if fault == "cut-json" else len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            if fault == "truncate":
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            self.wfile.write(cut if fault in ("truncate", "cut-json") else data)
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timed out)
            self.close_connection = True

    def _error(self, err: RequestError, headers: dict | None = None) -> None:
        self._send(err.status, err.body(), headers)

    def _read_body(self) -> bytes | None:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            self.close_connection = True
            self._error(RequestError(400, "chunked request bodies are not supported; send a Content-Length."))
            return None
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if length < 0 or length > MAX_BODY:
            self.close_connection = True
            self._error(RequestError(413 if length > MAX_BODY else 400,
                                     f"the request body must be 0..{MAX_BODY} bytes with a valid Content-Length."))
            return None
        return self.rfile.read(length) if length else b""

    def _handle(self, method: str) -> None:
        if not self.app.authorized(self.headers.get("Authorization")):  # before a byte of the body is read
            self.close_connection = True  # the unread body must not be taken for the next request
            self._error(RequestError(401, "missing or invalid API key; send the header 'Authorization: Bearer <key>' "
                                          "with the key this server was started with.", code="invalid_api_key"),
                        {"WWW-Authenticate": "Bearer"})
            return
        body = self._read_body() if method == "POST" else b""
        if body is None:
            return
        path = self.path.split("?", 1)[0].rstrip("/")
        routes = {("GET", "/v1/models"), ("POST", "/v1/completions"), ("POST", "/v1/chat/completions")}
        if (method, path) not in routes:
            status = 405 if any(p == path for _, p in routes) else 404
            self._error(RequestError(status, f"{method} {path or '/'} is not served here; use POST /v1/completions, "
                                             "POST /v1/chat/completions or GET /v1/models.", code="unknown_url"))
            return
        fault = self.app.next_fault()
        if fault and fault.startswith("sleep:"):
            time.sleep(float(fault.split(":", 1)[1]))
            fault = None
        if fault == "500":
            self._error(RequestError(500, "injected server error", type="server_error"))
            return
        if fault and fault.split(":")[0] == "429":
            wait = fault.split(":", 1)[1] if ":" in fault else "1"
            self._error(RequestError(429, "injected rate limit; retry later", type="rate_limit_error"),
                        {"Retry-After": wait})
            return
        if method == "GET":
            self._send(200, self.app.models(), fault=fault)
            return
        if json_depth(body) > MAX_DEPTH:
            self._error(RequestError(400, f"the request JSON nests deeper than {MAX_DEPTH} levels; send a flat request."))
            return
        try:
            req = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            self._error(RequestError(400, f"the request body is not valid JSON ({str(e)[:200]}); send a JSON object."))
            return
        try:
            out = self.app.chat(req) if path == "/v1/chat/completions" else self.app.complete(req)
        except RequestError as e:
            self._error(e)
            return
        except DistilleryError as e:
            self._error(RequestError(400, str(e)))
            return
        except Exception as e:  # a bug, not the client's fault: report it without killing the server
            self._error(RequestError(500, f"internal error: {type(e).__name__}: {e}", type="server_error"))
            return
        if fault == "drop-logprobs":
            for c in out["choices"]:
                c["logprobs"] = None
        elif fault == "short-logprobs":
            for c in out["choices"]:
                if c["logprobs"] and "token_logprobs" in c["logprobs"]:
                    c["logprobs"]["token_logprobs"] = c["logprobs"]["token_logprobs"][:-1]
                elif c["logprobs"]:  # chat: the last token's entry lacks its log-probability
                    c["logprobs"]["content"][-1:] = [{k: v for k, v in e.items() if k != "logprob"}
                                                     for e in c["logprobs"]["content"][-1:]]
        self._send(200, out, fault=fault)

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")


# ------------------------------------------------------------------------------------------ CLI


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``distillery serve MODEL_DIR --port P [--host H] [--name NAME] [--api-key-env VAR]``."""
    s = subparsers.add_parser("serve", help="serve a model folder through the OpenAI completions and chat "
                                            "completions APIs (a remote teacher)")
    s.add_argument("model_dir", help="model folder (save_lm / lm-train output, or a transformers folder)")
    s.add_argument("--port", type=int, default=8000, help="TCP port (0 = any free one; default 8000)")
    s.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1, this machine only; 0.0.0.0 = every interface)")
    s.add_argument("--name", default=None, help="model name clients send (default: the folder's name)")
    s.add_argument("--api-key-env", default=DEFAULT_KEY_ENV, metavar="VAR",
                   help=f"environment variable holding the API key requests must carry (default {DEFAULT_KEY_ENV}; "
                        "unset = no key needed)")
    s.add_argument("--max-logprobs", type=int, default=20, help="the most top log-probabilities per token (default 20)")
    s.add_argument("--quiet", action="store_true", help="no line per request")
    s.add_argument("--unverified", action="store_true",
                   help="serve a folder without a distillery checksum record (from elsewhere), knowingly")
    s.set_defaults(fn=run)
    return s


def run(args) -> int:
    """``distillery serve``: load the folder and serve it until interrupted."""
    from .models import load_lm

    if not 0 <= args.port <= 65535:
        raise DistilleryError(f"--port must lie in 0..65535 (0: any free port), got {args.port}.")
    if args.max_logprobs < 0:
        raise DistilleryError(f"--max-logprobs must be >= 0, got {args.max_logprobs}.")
    model, tokenizer = load_lm(args.model_dir, verify=not args.unverified)
    name = args.name or Path(args.model_dir).resolve().name
    key = os.environ.get(args.api_key_env) or None
    server = CompletionServer(model, tokenizer, name, args.host, args.port, key, max_logprobs=args.max_logprobs,
                              quiet=args.quiet)
    server.bind()
    if not is_loopback(args.host):
        print(f"warning: listening on {args.host}, reachable from other machines, over plain HTTP (put a TLS proxy in "
              "front for untrusted networks)" + ("" if key else f"; with no API key anyone can use it: set "
                                                                f"{args.api_key_env}"), file=sys.stderr)
    auth = f"requests need the key in ${args.api_key_env}" if key else f"no key needed (${args.api_key_env} is unset)"
    print(f"serving {name!r} at {server.url} ({auth}); Ctrl-C stops", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped.", file=sys.stderr)
    return 0
