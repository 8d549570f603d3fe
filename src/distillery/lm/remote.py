"""A teacher behind an OpenAI-compatible completions or chat-completions API (``distillery serve``,
vLLM, ...), using only the standard library.

``RemoteTeacher(base_url, model)`` (``base_url`` as OpenAI clients take it, e.g.
``http://127.0.0.1:8000/v1``) offers:

- ``complete(prompts, max_tokens, temperature=, top_p=, n=, seed=, top_logprobs=)``: sampled
  continuations of token-id prompts (sequence-level KD), as ``Completion`` objects holding the token
  ids, their log-probabilities, the top-k per position when asked, and the sampling settings.
- ``score(rows (B, T), top_k)``: the teacher's top-k log-probabilities at every position (top-k KD)
  as a ``TopK`` of shape (B, T, k) (``.flat()`` gives (B*T, k) rows): position t holds the
  distribution over token t + 1; the last position, the distribution after the whole row, comes from
  one generated token (``echo=true, max_tokens=1, logprobs=k``), so a row may have at most the
  model's context minus one tokens. The tail bucket is log(1 - sum of the top-k probabilities).
- ``chat(conversations, max_tokens, temperature=, top_p=, n=, seed=, logprobs=, top_logprobs=, stop=,
  concurrency=, on_error=, token_ids=)``: ``n`` assistant replies per conversation (lists of
  ``{"role", "content"}`` messages; roles system / user / assistant, checked before any request) through
  ``POST /chat/completions``, one request per conversation, ``concurrency`` of them in flight (a thread
  pool), the results in input order as ``ChatCompletion`` objects: the text, ``finish_reason``, and with
  logprobs asked the tokens, their log-probabilities, the top-k per token, and the token ids when the
  server returns ``"token_id:N"`` tokens. A server that answers without logprobs when they were asked is
  an error naming the fix (no retries: it is what the server does, not a glitch). A request that still
  fails after its retries is never silently dropped: the others finish (and are logged), then the call
  raises naming how many failed and the first reason, or with ``on_error="skip"`` leaves None in their
  slots and appends a ``ChatFailure`` to ``failures``. A wrong key, URL or model stops the call at once.

For completions and scoring, token ids travel as ``"token_id:N"`` strings (``return_tokens_as_token_ids``,
vLLM's extension); a server answering with text tokens is refused, as text tokens can collide and need
re-tokenising. A chat reply's text is the data, so there text tokens are accepted (``ids`` is then None).

The API key is read from the environment variable ``api_key_env`` (default ``DISTILLERY_API_KEY``)
at every request, never taken as an argument, and never logged, written to the request log or put
into an error message. Redirects are not followed (the key would travel to another address).

Transient failures are retried up to ``max_retries`` times with exponential backoff and jitter
(``backoff * 2**attempt`` times a factor in [0.5, 1], at most ``max_backoff`` seconds): HTTP 5xx,
408 and 429 (``Retry-After`` / ``retry-after-ms`` honoured up to ``max_backoff``), timeouts
(``timeout`` seconds per connect and per read), connection errors, and truncated or malformed
answers (cut bodies, invalid JSON, missing choices or logprobs, fewer log-probabilities than
tokens). 400, 401, 403, 404 and other client errors are not retried. ``requests_per_second`` spaces
the requests out on the client side.

``log``: a resumable request log (JSONL). Each successful answer is appended as one line
``{"key": sha256 of the canonical request (endpoint + body, sorted keys, no auth), "response": ...}``
with flush + fsync. On start it is read back (a torn last line from a crash is dropped and cut from
the file); a request whose key is there is answered from it, without a network call, so a crashed
run that is rerun pays for no request twice. A deterministic request (temperature 0 or a seed) is
answered by its logged answer every time; a random one by the logged answers in order, then by
the network (the i-th identical random request of a run gets the i-th logged answer). The server's
host is not part of the key (a moved server still hits), the model name is. ``network_calls``
(HTTP attempts), ``log_hits`` and ``retries`` count what happened. Only the key and line offsets
are kept in memory. One log belongs to one process at a time; within it, one lock guards the appends,
the index of the log, the counters and the throttle, so ``chat``'s threads share one client (identical
random requests in flight together take their answers' ordinals in the order they were sent; being
identical, which gets which does not matter).
"""

from __future__ import annotations

import email.utils
import hashlib
import http.client
import json
import math
import os
import random
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import DistilleryError
from ..losses.sparse import TopK
from .serve import CHAT_ROLES, DEFAULT_KEY_ENV, is_loopback

TAIL_FLOOR = math.log(1e-30)
"""The smallest tail log-probability reported (top-k mass rounding to 1 would give log 0)."""


@dataclass
class Completion:
    """One sampled continuation of one prompt."""

    prompt: list[int]
    ids: list[int]
    """The generated token ids."""
    logprobs: list[float]
    """The teacher's log-probability of each generated token (``distillery serve``: its full softmax at
    temperature 1, not the sampling distribution)."""
    top: list[dict[int, float]] | None
    """Per generated token, the ``top_logprobs`` most likely tokens {id: log-probability}; None when not asked."""
    finish_reason: str | None
    text: str
    settings: dict = field(default_factory=dict)
    """The sampling settings (model, base_url, max_tokens, temperature, top_p, n, seed, top_logprobs)."""


@dataclass
class ChatCompletion:
    """One sampled assistant reply to one conversation."""

    messages: list[dict]
    """The conversation it answers ({role, content} dicts)."""
    text: str
    """The reply (``message.content``)."""
    finish_reason: str | None
    """``"stop"`` (an end-of-turn token or a stop string) or ``"length"`` (``max_tokens`` reached)."""
    ids: list[int] | None
    """The reply's token ids when the server returned ``"token_id:N"`` tokens (``return_tokens_as_token_ids``
    with logprobs asked), else None."""
    tokens: list[str] | None
    """The reply's tokens as the server wrote them; None when logprobs were not asked."""
    logprobs: list[float] | None
    """The teacher's log-probability of each reply token; None when not asked."""
    top: list[dict[int | str, float]] | None
    """Per reply token, the ``top_logprobs`` most likely tokens {id (or token text when the server returns
    no ids): log-probability}; None when not asked."""
    settings: dict = field(default_factory=dict)
    """The sampling settings (model, base_url, max_tokens, temperature, top_p, n, seed, logprobs,
    top_logprobs, stop)."""


@dataclass
class ChatFailure:
    """A chat request that failed after its retries, kept by ``chat(on_error="skip")`` in ``failures``."""

    index: int
    """The conversation's position in the ``chat`` call that failed it."""
    messages: list[dict]
    error: str
    """The one-line reason."""


class _Fatal(DistilleryError):
    """A failure no other request would escape (wrong key, URL or model; a server without logprobs):
    ``chat`` stops at once instead of counting it as one failed request."""


class _Transient(Exception):
    """A failure worth retrying: ``cause`` for the message, ``kind`` for the fix, ``retry_after`` seconds."""

    def __init__(self, cause: str, kind: str, retry_after: float | None = None):
        super().__init__(cause)
        self.cause, self.kind, self.retry_after = cause, kind, retry_after


class _Malformed(Exception):
    """An answer that parsed as HTTP but is not a complete completions answer (retried as transient)."""


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None  # urllib then raises HTTPError with the 3xx status


_FIXES = {
    "timeout": "raise timeout= or max_retries=, or check that the server is up and not overloaded",
    "server": "the server is failing or rate-limiting: retry later, raise max_retries= / max_backoff=, "
              "or lower requests_per_second=",
    "connection": "check base_url and that the server is running and reachable",
    "truncated": "the server or a proxy cut or garbled the answer: retry later or raise max_retries= (a server "
                 "that never answers with complete logprobs cannot serve as this teacher)",
}


def request_key(path: str, body: dict) -> str:
    """sha256 of the canonical JSON of a request (endpoint path + body, sorted keys; no auth)."""
    canon = json.dumps({"path": path, "body": body}, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canon.encode("utf-8")).hexdigest()


def tail_log_prob(top_log_probs: Tensor) -> Tensor:
    """(..., k) top-k log-probabilities -> (...,) log(1 - sum of their probabilities), computed stably
    (log(-expm1(s)) near s = 0, log1p(-exp(s)) below -log 2, in float64) and clamped to ``TAIL_FLOOR``."""
    s = top_log_probs.double().logsumexp(-1).clamp(max=0.0)
    near = s > -math.log(2.0)
    tail = torch.where(near, torch.log(-torch.expm1(s.clamp(max=-1e-300))), torch.log1p(-torch.exp(s)))
    return tail.nan_to_num(TAIL_FLOOR, neginf=TAIL_FLOOR).clamp(min=TAIL_FLOOR).float()


def _retry_after(headers) -> float | None:
    if headers is None:
        return None
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    v = headers.get("Retry-After")
    if not v:
        return None
    try:
        return max(0.0, float(v))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(v)
        return max(0.0, when.timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def _finite_lp(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v > 1e-3:
        raise _Malformed(f"a log-probability is {json.dumps(v)[:30]}, not a finite number <= 0")
    return float(v)


def _id_of(token: str) -> int | None:
    """N of a ``"token_id:N"`` token, else None."""
    if token.startswith("token_id:"):
        try:
            return int(token[len("token_id:"):])
        except ValueError:
            return None
    return None


class RemoteTeacher:
    """A teacher language model reached over an OpenAI-compatible completions API (module docstring).

    ``base_url``: e.g. ``http://127.0.0.1:8000/v1`` (``/completions`` and ``/models`` are appended).
    ``model``: the served model name. ``prompts_per_request``: prompts sent in one request.
    ``vocab_size``: the teacher's vocabulary (``TopK.num_classes``); None asks ``GET /models``
    (``distillery serve`` lists it; other servers may not, then pass it)."""

    def __init__(self, base_url: str, model: str, *, api_key_env: str = DEFAULT_KEY_ENV, timeout: float = 30.0,
                 max_retries: int = 5, backoff: float = 0.5, max_backoff: float = 30.0,
                 requests_per_second: float | None = None, log: str | os.PathLike | None = None,
                 prompts_per_request: int = 8, vocab_size: int | None = None):
        parts = urllib.parse.urlsplit(str(base_url))
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise DistilleryError(f"base_url {str(base_url)!r} is not an http(s) URL; pass e.g. http://127.0.0.1:8000/v1.")
        if not timeout > 0:
            raise DistilleryError(f"timeout must be > 0 seconds, got {timeout!r}.")
        if isinstance(max_retries, bool) or int(max_retries) != max_retries or max_retries < 0:
            raise DistilleryError(f"max_retries must be an integer >= 0, got {max_retries!r}.")
        if backoff < 0 or max_backoff < 0:
            raise DistilleryError(f"backoff and max_backoff must be >= 0 seconds, got {backoff!r} and {max_backoff!r}.")
        if requests_per_second is not None and not requests_per_second > 0:
            raise DistilleryError(f"requests_per_second must be > 0 (or None = no limit), got {requests_per_second!r}.")
        if int(prompts_per_request) < 1:
            raise DistilleryError(f"prompts_per_request must be >= 1, got {prompts_per_request!r}.")
        self.base_url = str(base_url).rstrip("/")
        self.model = str(model)
        self.api_key_env = str(api_key_env)
        self.timeout, self.max_retries = float(timeout), int(max_retries)
        self.backoff, self.max_backoff = float(backoff), float(max_backoff)
        self.requests_per_second = requests_per_second
        self.prompts_per_request = int(prompts_per_request)
        self.vocab_size = None if vocab_size is None else int(vocab_size)
        self.network_calls = 0
        self.log_hits = 0
        self.retries = 0
        self.settings: dict = {}
        self._rng = random.Random()
        self._lock = threading.Lock()  # counters, throttle slots, log appends and the log's index
        self.failures: list[ChatFailure] = []
        self._sleep = time.sleep  # replaced by tests to record the waits
        self._clock = time.monotonic
        self._next_at = 0.0
        proxies = urllib.request.ProxyHandler({}) if is_loopback(parts.hostname) else urllib.request.ProxyHandler()
        self._opener = urllib.request.build_opener(proxies, _NoRedirect())
        if parts.scheme == "http" and not is_loopback(parts.hostname) and os.environ.get(self.api_key_env):
            warnings.warn(f"{self.base_url} is plain HTTP to another machine: the key in ${self.api_key_env} travels "
                          "unencrypted; use https:// where the network is not trusted.", stacklevel=2)
        self.log = None if log is None else Path(log)
        self.torn_lines = 0
        self._logged: dict[str, list[int]] = {}  # key -> byte offsets of its lines in the log
        self._used: dict[str, int] = {}
        if self.log is not None:
            self._load_log()

    def __repr__(self) -> str:
        return f"RemoteTeacher({self.base_url!r}, {self.model!r}, api_key_env={self.api_key_env!r})"

    # ------------------------------------------------------------------------- request log

    def _load_log(self) -> None:
        """Index the log (key -> offsets of its lines); cut a torn last line; refuse a corrupted one."""
        path = self.log
        if not path.exists():
            return
        keep = 0
        with open(path, "rb") as f:
            for number, line in enumerate(iter(f.readline, b""), 1):
                if not line.endswith(b"\n"):  # the last line, torn by a crash mid-append
                    self.torn_lines = 1
                    break
                at, keep = keep, keep + len(line)
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                    key = rec["key"]
                    if not isinstance(key, str) or not isinstance(rec["response"], dict):
                        raise ValueError("key must be a string and response an object")
                except (ValueError, KeyError, TypeError) as e:
                    raise DistilleryError(f"the request log {str(path)!r} is corrupted at line {number} ({e}); delete "
                                          "that line (its request is then paid again) or pass another log=.") from None
                self._logged.setdefault(key, []).append(at)
        if self.torn_lines:
            with open(path, "r+b") as f:
                f.truncate(keep)
                f.flush()
                os.fsync(f.fileno())

    def _read_logged(self, at: int) -> dict | None:
        try:
            with open(self.log, "rb") as f:
                f.seek(at)
                return json.loads(f.readline())["response"]
        except (OSError, ValueError, KeyError, TypeError):
            return None  # the file changed under us: ask the network again

    def _append(self, key: str, response: dict) -> None:
        if self.log is None:
            return
        self.log.parent.mkdir(parents=True, exist_ok=True)
        line = (json.dumps({"key": key, "response": response}, separators=(",", ":")) + "\n").encode("utf-8")
        with self._lock, open(self.log, "ab") as f:  # one whole line at a time, its offset indexed with it
            at = f.tell()
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
            self._logged.setdefault(key, []).append(at)

    # ------------------------------------------------------------------------------- HTTP

    def _throttle(self) -> None:
        if not self.requests_per_second:
            return
        with self._lock:  # each thread takes the next free slot, then waits for it outside the lock
            now = self._clock()
            at = max(now, self._next_at)
            self._next_at = at + 1.0 / self.requests_per_second
        if at > now:
            self._sleep(at - now)

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        d = min(self.max_backoff, self.backoff * 2 ** attempt) * (0.5 + 0.5 * self._rng.random())
        if retry_after is not None:
            d = max(d, retry_after)
        return min(d, self.max_backoff)

    def _scrub(self, text: str) -> str:
        key = os.environ.get(self.api_key_env)
        return text.replace(key, "***") if key else text

    def _http(self, method: str, url: str, body: dict | None) -> dict:
        """One HTTP attempt -> the JSON object answered; raises _Transient, _Malformed or DistilleryError."""
        data = None if body is None else json.dumps(body).encode("utf-8")
        req = urllib.request.Request(url, data=data, method=method, headers={
            "Content-Type": "application/json", "Accept": "application/json", "User-Agent": "distillery"})
        key = os.environ.get(self.api_key_env)
        if key:
            req.add_unredirected_header("Authorization", f"Bearer {key}")
        try:
            with self._opener.open(req, timeout=self.timeout) as r:
                raw = r.read()
        except urllib.error.HTTPError as e:
            raise self._http_error(e, url) from None
        except TimeoutError:
            raise _Transient(f"timed out after {self.timeout:g} s (timeout={self.timeout:g})", "timeout") from None
        except urllib.error.URLError as e:
            if isinstance(e.reason, TimeoutError):
                raise _Transient(f"timed out after {self.timeout:g} s while connecting", "timeout") from None
            raise _Transient(f"cannot connect ({e.reason})", "connection") from None
        except http.client.IncompleteRead as e:
            raise _Transient(f"truncated response (read {len(e.partial)} bytes, {e.expected} more were announced)",
                             "truncated") from None
        except (http.client.HTTPException, OSError) as e:
            raise _Transient(f"connection error ({type(e).__name__}: {e})", "connection") from None
        try:
            obj = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise _Malformed(f"the body is not valid JSON ({e})") from None
        if not isinstance(obj, dict):
            raise _Malformed("the body is not a JSON object")
        return obj

    def _http_error(self, e: urllib.error.HTTPError, url: str) -> Exception:
        code = e.code
        try:
            detail = json.loads(e.read().decode("utf-8"))["error"]["message"]
        except Exception:
            detail = e.reason
        detail = self._scrub(str(detail))[:300]
        var = self.api_key_env
        if code in (408, 429) or code >= 500:
            return _Transient(f"HTTP {code} ({detail})", "server", _retry_after(e.headers))
        if 300 <= code < 400:
            return _Fatal(f"the API at {url} redirected (HTTP {code}) to {e.headers.get('Location')!r}; set "
                                   "base_url to the final address (redirects are not followed, so the key stays put).")
        if code == 401:
            if not os.environ.get(var):
                return _Fatal(f"the API at {url} needs an API key (HTTP 401: {detail}) and ${var} is not set; "
                                       f"set {var} to the key.")
            return _Fatal(f"the API at {url} rejected the key in ${var} (HTTP 401: {detail}); set {var} to a "
                                   "valid key.")
        if code == 403:
            return _Fatal(f"the API at {url} refused the request (HTTP 403: {detail}); the key in ${var} "
                                   f"lacks access to model {self.model!r}: use a key that has it.")
        if code == 404:
            return _Fatal(f"the API at {url} answered 404 ({detail}); check base_url (it usually ends in /v1) "
                                   f"and the model name {self.model!r} (GET {self.base_url}/models lists them).")
        return DistilleryError(f"the API at {url} rejected the request (HTTP {code}: {detail}); fix the request "
                               "(prompt length, top_k / logprobs within the server's limit, settings) and retry.")

    def _call(self, method: str, path: str, body: dict | None, parse) -> tuple[dict, Any]:
        """The answer (raw, parsed) to a request, retried as the module docstring says."""
        url = self.base_url + path
        last: _Transient | None = None
        for attempt in range(self.max_retries + 1):
            if attempt:
                with self._lock:
                    self.retries += 1
                self._sleep(self._delay(attempt - 1, last.retry_after))
            self._throttle()
            with self._lock:
                self.network_calls += 1
            try:
                raw = self._http(method, url, body)
                return raw, parse(raw)
            except _Transient as e:
                last = e
            except _Malformed as e:
                last = _Transient(f"truncated or malformed response ({e})", "truncated")
        tries = self.max_retries + 1
        raise DistilleryError(f"{method} {url} failed after {tries} attempt{'s' if tries > 1 else ''}; last cause: "
                              f"{last.cause}. Fix: {_FIXES[last.kind]}.")

    def _post(self, path: str, body: dict, parse) -> Any:
        """POST through the request log: a logged answer is parsed instead of calling the network."""
        key = request_key(path, body)
        reusable = body.get("temperature") == 0 or body.get("seed") is not None
        with self._lock:  # a random request reserves its ordinal (the i-th identical one gets the i-th answer)
            logged = list(self._logged.get(key, ()))
            i = 0 if reusable else self._used.get(key, 0)
            if not reusable:
                self._used[key] = i + 1
        if i < len(logged):
            logged_answer = self._read_logged(logged[i])
            try:
                out = None if logged_answer is None else parse(logged_answer)
            except _Malformed:
                out = None  # an unusable old entry: ask again
            if out is not None:
                with self._lock:
                    self.log_hits += 1
                return out
        raw, out = self._call("POST", path, body, parse)
        self._append(key, raw)
        if not reusable:
            with self._lock:
                self._used[key] = max(self._used.get(key, 0), len(self._logged.get(key, ())))
        return out

    # ---------------------------------------------------------------------------- parsing

    def _token_id(self, tok: Any) -> int:
        if isinstance(tok, str) and tok.startswith("token_id:"):
            try:
                return int(tok[len("token_id:"):])
            except ValueError:
                raise _Malformed(f"token {tok[:40]!r} is not token_id:<integer>") from None
        raise DistilleryError(f"the API at {self.base_url} returned tokens as text ({json.dumps(tok)[:40]}), not token "
                              "ids; distillery needs ids: use a server that supports return_tokens_as_token_ids "
                              "(`distillery serve`, vLLM).")

    def _top(self, d: Any, k: int) -> tuple[list[float], list[int]]:
        if not isinstance(d, dict) or len(d) < k:
            have = len(d) if isinstance(d, dict) else 0
            raise _Malformed(f"a position has {have} top log-probabilities, fewer than the {k} asked")
        pairs = sorted(((_finite_lp(v), self._token_id(t)) for t, v in d.items()), key=lambda p: (-p[0], p[1]))[:k]
        return [p[0] for p in pairs], [p[1] for p in pairs]

    def _choices(self, resp: dict, expected: int) -> list[dict]:
        choices = resp.get("choices")
        if not isinstance(choices, list) or not all(isinstance(c, dict) for c in choices):
            raise _Malformed("no list of choices")
        if len(choices) != expected:
            raise _Malformed(f"{len(choices)} choices for {expected} asked")
        try:
            choices = sorted(choices, key=lambda c: int(c["index"]))
        except (KeyError, TypeError, ValueError):
            raise _Malformed("a choice has no integer index") from None
        if [int(c["index"]) for c in choices] != list(range(expected)):
            raise _Malformed("the choice indices are not 0..n-1")
        return choices

    @staticmethod
    def _logprobs(choice: dict) -> tuple[list, list, list | None]:
        lp = choice.get("logprobs")
        if not isinstance(lp, dict):
            raise _Malformed("a choice has no logprobs")
        tokens, token_lps, top = lp.get("tokens"), lp.get("token_logprobs"), lp.get("top_logprobs")
        if not isinstance(tokens, list) or not isinstance(token_lps, list):
            raise _Malformed("a choice's logprobs have no tokens or token_logprobs")
        if len(token_lps) != len(tokens):
            raise _Malformed(f"{len(token_lps)} log-probabilities for {len(tokens)} tokens")
        if top is not None and (not isinstance(top, list) or len(top) != len(tokens)):
            raise _Malformed(f"{len(top) if isinstance(top, list) else 0} top_logprobs entries for {len(tokens)} tokens")
        return tokens, token_lps, top

    # ---------------------------------------------------------------------------- the API

    def models(self) -> list[dict]:
        """The models the server lists (``GET /models``)."""

        def parse(resp: dict) -> list[dict]:
            data = resp.get("data")
            if not isinstance(data, list) or not all(isinstance(m, dict) for m in data):
                raise _Malformed("no list of models under 'data'")
            return data

        return self._call("GET", "/models", None, parse)[1]

    def _vocab(self) -> int:
        if self.vocab_size is None:
            listed = self.models()
            entry = next((m for m in listed if m.get("id") == self.model), None)
            if entry is None:
                names = ", ".join(repr(m.get("id")) for m in listed)
                raise DistilleryError(f"the API at {self.base_url} does not serve model {self.model!r} (it lists "
                                      f"{names or 'none'}); pass one of those as model.")
            v = entry.get("vocab_size")
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise DistilleryError(f"the API at {self.base_url} does not say the vocabulary size of {self.model!r}; "
                                      "pass vocab_size= (the teacher tokenizer's get_vocab_size()).")
            self.vocab_size = v
        return self.vocab_size

    @staticmethod
    def _check_prompts(prompts: Any) -> list[list[int]]:
        if isinstance(prompts, Tensor):
            if prompts.dim() != 2:
                raise DistilleryError(f"prompts must be (B, P) token ids, got shape {tuple(prompts.shape)}.")
            prompts = prompts.tolist()
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise DistilleryError("prompts must be a non-empty list of token-id lists.")
        out = []
        for i, p in enumerate(prompts):
            p = list(p)
            if not p or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in p):
                raise DistilleryError(f"prompt {i} must be a non-empty list of token ids (ints >= 0).")
            out.append(p)
        return out

    def complete(self, prompts: list[list[int]], max_tokens: int, *, temperature: float = 1.0, top_p: float = 1.0,
                 n: int = 1, seed: int | None = None, top_logprobs: int = 0) -> list[list[Completion]]:
        """``n`` continuations of ``max_tokens`` tokens for every prompt: ``result[i][j]`` is sample j of
        prompt i. ``top_logprobs`` > 0 also returns that many most likely tokens per position.
        ``self.settings`` (and every ``Completion.settings``) records the sampling settings."""
        prompts = self._check_prompts(prompts)
        if isinstance(max_tokens, bool) or int(max_tokens) != max_tokens or max_tokens < 1:
            raise DistilleryError(f"max_tokens must be an integer >= 1, got {max_tokens!r}.")
        if int(n) != n or n < 1:
            raise DistilleryError(f"n must be an integer >= 1, got {n!r}.")
        if int(top_logprobs) != top_logprobs or top_logprobs < 0:
            raise DistilleryError(f"top_logprobs must be an integer >= 0, got {top_logprobs!r}.")
        if not temperature >= 0 or not 0 < top_p <= 1:
            raise DistilleryError(f"temperature must be >= 0 and top_p in (0, 1], got {temperature!r} and {top_p!r}.")
        max_tokens, n, k = int(max_tokens), int(n), int(top_logprobs)
        settings = {"model": self.model, "base_url": self.base_url, "max_tokens": max_tokens,
                    "temperature": float(temperature), "top_p": float(top_p), "n": n, "seed": seed, "top_logprobs": k}
        self.settings = settings
        out: list[list[Completion]] = []
        for s in range(0, len(prompts), self.prompts_per_request):
            chunk = prompts[s: s + self.prompts_per_request]
            body = {"model": self.model, "prompt": chunk, "max_tokens": max_tokens, "temperature": float(temperature),
                    "top_p": float(top_p), "n": n, "logprobs": k, "return_tokens_as_token_ids": True,
                    "ignore_eos": True}  # vLLM's extension: every sample gets max_tokens tokens
            if seed is not None:
                body["seed"] = int(seed)

            def parse(resp: dict, chunk=chunk) -> list[list[Completion]]:
                choices = self._choices(resp, len(chunk) * n)
                groups: list[list[Completion]] = [[] for _ in chunk]
                for c in choices:
                    tokens, token_lps, top = self._logprobs(c)
                    ids = [self._token_id(t) for t in tokens]
                    if len(ids) > max_tokens:
                        raise _Malformed(f"{len(ids)} tokens for max_tokens={max_tokens}")
                    if c.get("finish_reason") == "length" and len(ids) < max_tokens:
                        raise _Malformed(f"{len(ids)} tokens for max_tokens={max_tokens} with finish_reason length")
                    tops = None
                    if k:
                        if top is None:
                            raise _Malformed("no top_logprobs")
                        tops = []
                        for d in top:
                            lps, tok_ids = self._top(d, k)
                            tops.append(dict(zip(tok_ids, lps)))
                    i = int(c["index"]) // n
                    text = c.get("text") if isinstance(c.get("text"), str) else ""
                    groups[i].append(Completion(chunk[i], ids, [_finite_lp(v) for v in token_lps], tops,
                                                c.get("finish_reason"), text, dict(settings)))
                return groups

            out.extend(self._post("/completions", body, parse))
        return out

    def score(self, rows: Tensor, top_k: int, *, rows_per_request: int | None = None) -> TopK:
        """The teacher's ``top_k`` most likely next tokens at every position of ``rows`` (B, T):
        a ``TopK`` with log_probs and indices (B, T, k) and tail (B, T) (module docstring), at
        temperature 1, ``num_classes`` the teacher's vocabulary. ``.flat()`` gives (B*T, k) rows.
        ``rows_per_request`` (default ``prompts_per_request``) rows go in one request; with 1, every
        row is its own entry of the request log, whatever batch it comes in."""
        if not isinstance(rows, Tensor) or rows.dim() != 2 or rows.shape[1] < 1 or rows.is_floating_point():
            shape = tuple(rows.shape) if isinstance(rows, Tensor) else type(rows).__name__
            raise DistilleryError(f"rows must be a (B, T) integer tensor of token ids with T >= 1, got {shape}.")
        if isinstance(top_k, bool) or int(top_k) != top_k or top_k < 1:
            raise DistilleryError(f"top_k must be an integer >= 1, got {top_k!r}.")
        k = int(top_k)
        vocab = self._vocab()
        if k > vocab:
            raise DistilleryError(f"top_k={k} exceeds the teacher's vocabulary of {vocab} tokens; lower it.")
        b, t = rows.shape
        values = torch.empty(b, t, k, dtype=torch.float64)
        indices = torch.empty(b, t, k, dtype=torch.long)
        listed = rows.tolist()
        per = int(rows_per_request or self.prompts_per_request)
        for s in range(0, b, per):
            chunk = listed[s: s + per]
            body = {"model": self.model, "prompt": chunk, "max_tokens": 1, "temperature": 0, "logprobs": k,
                    "echo": True, "return_tokens_as_token_ids": True, "ignore_eos": True}

            def parse(resp: dict, chunk=chunk) -> tuple[list, list]:
                vs, ix = [], []
                for row, c in zip(chunk, self._choices(resp, len(chunk))):
                    tokens, _, top = self._logprobs(c)
                    if len(tokens) != t + 1:
                        raise _Malformed(f"{len(tokens)} tokens for {t} echoed + 1 generated")
                    if top is None:
                        raise _Malformed("no top_logprobs")
                    ids = [self._token_id(x) for x in tokens[:t]]
                    if ids != row:
                        at = next(j for j, (u, w) in enumerate(zip(ids, row)) if u != w)
                        raise DistilleryError(f"the API at {self.base_url} echoed token {ids[at]} at position {at} where "
                                              f"{row[at]} was sent; the server re-tokenises prompts: use one that "
                                              "takes token ids as they are (`distillery serve`, vLLM).")
                    pos = [self._top(d, k) for d in top[1:]]
                    if any(i >= vocab for _, idx in pos for i in idx):
                        raise DistilleryError(f"the API at {self.base_url} returned a token id >= vocab_size={vocab}; "
                                              "pass the teacher's real vocabulary size as vocab_size=.")
                    vs.append([p[0] for p in pos])
                    ix.append([p[1] for p in pos])
                return vs, ix

            vs, ix = self._post("/completions", body, parse)
            values[s: s + len(chunk)] = torch.tensor(vs, dtype=torch.float64)
            indices[s: s + len(chunk)] = torch.tensor(ix, dtype=torch.long)
        return TopK(values.float(), indices, tail_log_prob(values), vocab, 1.0)

    # ------------------------------------------------------------------------------- chat

    @staticmethod
    def _check_conversations(conversations: Any) -> list[list[dict]]:
        if isinstance(conversations, (list, tuple)) and conversations and isinstance(conversations[0], dict):
            raise DistilleryError("conversations must be a list of conversations, each a list of messages; wrap a "
                                  "single conversation in a list: chat([messages], ...).")
        if not isinstance(conversations, (list, tuple)) or not conversations:
            raise DistilleryError("conversations must be a non-empty list of conversations (lists of "
                                  "{'role', 'content'} messages).")
        out = []
        for i, conv in enumerate(conversations):
            if not isinstance(conv, (list, tuple)) or not conv:
                raise DistilleryError(f"conversation {i} must be a non-empty list of {{'role', 'content'}} messages.")
            msgs = []
            for j, m in enumerate(conv):
                if not isinstance(m, dict):
                    raise DistilleryError(f"conversation {i}, message {j} is a {type(m).__name__}, not a "
                                          "{'role', 'content'} dict.")
                role, content = m.get("role"), m.get("content")
                if role not in CHAT_ROLES:
                    raise DistilleryError(f"conversation {i}, message {j} has role {role!r}; use one of "
                                          f"{', '.join(CHAT_ROLES)}.")
                if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                                     and isinstance(p.get("text"), str) for p in content):
                    content = "".join(p["text"] for p in content)
                if not isinstance(content, str):
                    raise DistilleryError(f"conversation {i}, message {j} has no content; give 'content' as a string.")
                msgs.append({"role": role, "content": content})
            out.append(msgs)
        return out

    def _chat_parse(self, resp: dict, messages: list[dict], n: int, max_tokens: int, want_lp: bool, k: int,
                    settings: dict) -> list[ChatCompletion]:
        out = []
        for c in self._choices(resp, n):
            msg = c.get("message")
            if not isinstance(msg, dict) or not isinstance(msg.get("content"), str):
                raise _Malformed("a choice has no message content")
            finish = c.get("finish_reason")
            ids = tokens = lps = tops = None
            if want_lp:
                lp = c.get("logprobs")
                content = lp.get("content") if isinstance(lp, dict) else None
                if content is None:
                    asked = f"top_logprobs={k}" if k else "logprobs"
                    raise _Fatal(f"the API at {self.base_url} answered a chat completion without logprobs though "
                                 f"{asked} was asked: the server does not return log-probabilities; call chat() "
                                 "without logprobs / top_logprobs, or enable them on the server (vLLM: "
                                 f"--max-logprobs >= {max(k, 1)}).")
                if not isinstance(content, list) or not all(isinstance(e, dict) for e in content):
                    raise _Malformed("logprobs.content is not a list of objects")
                if len(content) > max_tokens:
                    raise _Malformed(f"{len(content)} tokens for max_tokens={max_tokens}")
                if finish == "length" and len(content) < max_tokens:
                    raise _Malformed(f"{len(content)} tokens for max_tokens={max_tokens} with finish_reason length")
                tokens, lps, tops = [], [], ([] if k else None)
                for e in content:
                    if not isinstance(e.get("token"), str):
                        raise _Malformed("a logprobs entry has no token")
                    tokens.append(e["token"])
                    lps.append(_finite_lp(e.get("logprob")))
                    if k:
                        top = e.get("top_logprobs")
                        if not isinstance(top, list) or len(top) < k or not all(
                                isinstance(d, dict) and isinstance(d.get("token"), str) for d in top):
                            have = len(top) if isinstance(top, list) else 0
                            raise _Malformed(f"a position has {have} top log-probabilities, fewer than the {k} asked")
                        pairs = sorted(((_finite_lp(d.get("logprob")), d["token"]) for d in top), key=lambda p: -p[0])
                        tops.append({t: v for v, t in pairs[:k]})
                as_ids = [_id_of(t) for t in tokens]
                if all(i is not None for i in as_ids):
                    ids = as_ids
                    if tops is not None:
                        tops = [{_id_of(t) if _id_of(t) is not None else t: v for t, v in d.items()} for d in tops]
            out.append(ChatCompletion(messages, msg["content"], finish, ids, tokens, lps, tops, dict(settings)))
        return out

    def chat(self, conversations: list[list[dict]], max_tokens: int, *, temperature: float = 1.0, top_p: float = 1.0,
             n: int = 1, seed: int | None = None, logprobs: bool = False, top_logprobs: int = 0,
             stop: str | list[str] | None = None, concurrency: int = 1, on_error: str = "raise",
             token_ids: bool = True) -> list[list[ChatCompletion] | None]:
        """``n`` assistant replies of at most ``max_tokens`` tokens to every conversation (a list of
        {role, content} messages, roles system / user / assistant) through ``POST /chat/completions``, one
        request per conversation: ``result[i][j]`` is reply j to conversation i, in input order.

        ``logprobs`` returns each reply token's log-probability (and its id, with ``token_ids``);
        ``top_logprobs`` > 0 also the that many most likely tokens per position (it implies ``logprobs``).
        A server that answers without them is an error naming the fix. ``stop``: strings that end a reply.
        ``token_ids`` sends ``return_tokens_as_token_ids`` (``distillery serve``, vLLM); turn it off for a
        server that refuses unknown fields. ``concurrency`` requests are in flight at once (threads).

        A request that still fails after its retries is never silently dropped: the others run to the
        end (and into the request log, so a rerun pays only for the failed ones); then ``on_error="raise"``
        raises one ``DistilleryError`` naming how many failed and the first reason, and ``"skip"`` puts
        None in their slots and appends a ``ChatFailure`` to ``self.failures`` (kept across calls, for the
        caller to log). A failure every request would share (key, URL, model, no logprobs) raises at once."""
        convs = self._check_conversations(conversations)
        if isinstance(max_tokens, bool) or int(max_tokens) != max_tokens or max_tokens < 1:
            raise DistilleryError(f"max_tokens must be an integer >= 1, got {max_tokens!r}.")
        if isinstance(n, bool) or int(n) != n or n < 1:
            raise DistilleryError(f"n must be an integer >= 1, got {n!r}.")
        if isinstance(top_logprobs, bool) or int(top_logprobs) != top_logprobs or top_logprobs < 0:
            raise DistilleryError(f"top_logprobs must be an integer >= 0, got {top_logprobs!r}.")
        if not temperature >= 0 or not 0 < top_p <= 1:
            raise DistilleryError(f"temperature must be >= 0 and top_p in (0, 1], got {temperature!r} and {top_p!r}.")
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if not all(isinstance(x, str) and x for x in stops):
            raise DistilleryError(f"stop must be a non-empty string or a list of them, got {stop!r}.")
        if isinstance(concurrency, bool) or int(concurrency) != concurrency or concurrency < 1:
            raise DistilleryError(f"concurrency must be an integer >= 1, got {concurrency!r}.")
        if on_error not in ("raise", "skip"):
            raise DistilleryError(f"on_error must be 'raise' or 'skip', got {on_error!r}.")
        max_tokens, n, k = int(max_tokens), int(n), int(top_logprobs)
        want_lp = bool(logprobs) or k > 0
        settings = {"model": self.model, "base_url": self.base_url, "max_tokens": max_tokens,
                    "temperature": float(temperature), "top_p": float(top_p), "n": n, "seed": seed,
                    "logprobs": want_lp, "top_logprobs": k, "stop": stops}
        self.settings = settings
        abort = threading.Event()  # set by a fatal failure: the requests not yet sent are not sent

        def one(messages: list[dict]) -> list[ChatCompletion] | None:
            if abort.is_set():
                return None
            body = {"model": self.model, "messages": messages, "max_tokens": max_tokens,
                    "temperature": float(temperature), "top_p": float(top_p), "n": n}
            if seed is not None:
                body["seed"] = int(seed)
            if want_lp:
                body["logprobs"] = True
                if k:
                    body["top_logprobs"] = k
            if stops:
                body["stop"] = stops
            if token_ids:
                body["return_tokens_as_token_ids"] = True
            try:
                return self._post("/chat/completions", body,
                                  lambda resp: self._chat_parse(resp, messages, n, max_tokens, want_lp, k, settings))
            except _Fatal:
                abort.set()
                raise

        results: list[list[ChatCompletion] | None] = [None] * len(convs)
        errors: dict[int, DistilleryError] = {}
        if concurrency == 1:
            for i, messages in enumerate(convs):
                try:
                    results[i] = one(messages)
                except _Fatal:
                    raise
                except DistilleryError as e:
                    errors[i] = e
        else:
            with ThreadPoolExecutor(max_workers=min(int(concurrency), len(convs)),
                                    thread_name_prefix="distillery-chat") as pool:
                futures = {pool.submit(one, messages): i for i, messages in enumerate(convs)}
                try:
                    for f in as_completed(futures):
                        try:
                            results[futures[f]] = f.result()
                        except DistilleryError as e:
                            if isinstance(e, _Fatal):
                                raise
                            errors[futures[f]] = e
                except BaseException:
                    abort.set()
                    for f in futures:  # the queued ones; those in flight finish (and are logged) first
                        f.cancel()
                    raise
        if errors:
            first = min(errors)
            reason = " ".join(str(errors[first]).split())
            if on_error == "skip":
                self.failures.extend(ChatFailure(i, convs[i], " ".join(str(errors[i]).split())) for i in sorted(errors))
            else:
                kept = ("the others are in the request log, so a rerun pays only for the failed ones" if self.log
                        else "pass log= so a rerun pays only for the failed ones, or on_error='skip' to keep the others")
                raise DistilleryError(f"{len(errors)} of {len(convs)} chat requests failed ({kept}); the first, "
                                      f"conversation {first}: {reason}")
        return results


class RemoteTopKTeacher:
    """The teacher protocol over a ``RemoteTeacher``: ``teacher(batch)`` is ``{"logits": TopK}``, the
    remote model's ``top_k`` log-probabilities at every position of ``batch["x"]`` (``score``), which
    ``kd`` reads sparsely (``distill.distil(student, RemoteTopKTeacher(remote, 32), data, ...)``).
    Each row is scored in its own request (deterministic: temperature 0 for the extra token), so with
    a request log a row is paid for once: every epoch after the first is answered from the log,
    whatever the batches it is shuffled into."""

    def __init__(self, remote: RemoteTeacher, top_k: int):
        self.remote, self.top_k = remote, int(top_k)

    def __call__(self, batch: dict[str, Tensor], taps=()) -> dict[str, Any]:
        if [t for t in taps if t != "logits"]:
            raise DistilleryError("a remote teacher answers with log-probabilities only; feature terms need a local model.")
        return {"logits": self.remote.score(batch["x"], self.top_k, rows_per_request=1)}
