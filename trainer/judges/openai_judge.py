"""`openai:<model>@<base_url>`: any OpenAI-compatible chat-completions endpoint as judge.

Works with vLLM, Ollama, llama.cpp's server, LM Studio and hosted APIs. The base URL is the part
before /chat/completions (usually ending in /v1); without "@<base_url>" it comes from
ODPO_JUDGE_BASE_URL or OPENAI_BASE_URL, else https://api.openai.com/v1. The key is read from
ODPO_JUDGE_API_KEY, then OPENAI_API_KEY (local servers need none).

Each ordering is one request asking for a single token with `logprobs`: P(A) vs P(B) from the top
log-probs when the server offers them, otherwise the letter the reply starts with. A server that
rejects `logprobs` is asked again without, once, and never again for this judge. Connection
errors, timeouts, 429 and 5xx are retried with exponential backoff; then a JudgeUnreachableError.
"""
from __future__ import annotations

import logging
import math
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional, Sequence

import httpx

from odpo.trainer.judges import JudgeError, JudgeOptions, JudgeUnreachableError
from odpo.trainer.judges.pairwise import BothOrdersJudge, fill_template, load_template

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://api.openai.com/v1"
KEY_ENVS = ("ODPO_JUDGE_API_KEY", "OPENAI_API_KEY")
BASE_URL_ENVS = ("ODPO_JUDGE_BASE_URL", "OPENAI_BASE_URL")
_SPEC_RE = re.compile(r"^(?P<model>.+?)@(?P<url>https?://\S+)$")
_ANSWER_RE = re.compile(r"^[\s*_\"'(\[#]*(?:(?:the\s+)?(?:better\s+)?(?:response|answer)(?:\s+is)?\s*:?\s*)?"
                        r"([AB])(?=\s*$|\s*\n|\s*[.,:;!)*\]-]|\s+(?:is|was)\b)", re.IGNORECASE)
_RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


def parse_openai_spec(rest: str) -> tuple[str, str]:
    """'model@http://host:port/v1' -> (model, base URL without a trailing /chat/completions)."""
    match = _SPEC_RE.match(rest)
    if match:
        model, url = match.group("model"), match.group("url")
    else:
        model = rest
        url = next((os.environ[e] for e in BASE_URL_ENVS if os.environ.get(e)), DEFAULT_BASE_URL)
    url = url.rstrip("/").removesuffix("/chat/completions")
    if not model.strip() or "@" in model:
        raise JudgeError(f"bad openai judge spec 'openai:{rest}': expected openai:<model>@<base_url>, "
                         "e.g. openai:qwen2.5:7b@http://127.0.0.1:11434/v1")
    return model.strip(), url


def p_first_from_response(data: dict[str, Any]) -> Optional[float]:
    """P("A") / (P("A") + P("B")) from a chat-completions reply; None when it holds no answer."""
    try:
        choice = data["choices"][0]
    except (KeyError, IndexError, TypeError):
        raise JudgeError(f"judge endpoint sent an unexpected reply: {str(data)[:200]}") from None
    content = ((choice.get("logprobs") or {}).get("content") or [])
    if content:
        first = content[0]
        top = first.get("top_logprobs") or [{"token": first.get("token", ""), "logprob": first.get("logprob")}]
        p = _p_from_top(top)
        if p is not None:
            return p
    text = (choice.get("message") or {}).get("content") or choice.get("text") or ""
    match = _ANSWER_RE.match(text)
    if not match:
        return None
    return 1.0 if match.group(1).upper() == "A" else 0.0


def _p_from_top(top: list[dict[str, Any]]) -> Optional[float]:
    probs = [(str(e.get("token", "")).strip(), math.exp(float(e["logprob"])))
             for e in top if e.get("logprob") is not None]
    p_a = sum(p for tok, p in probs if tok == "A")
    p_b = sum(p for tok, p in probs if tok == "B")
    if not probs or p_a + p_b == 0:
        return None
    # A letter missing from the top list has at most the smallest listed probability, and at most
    # what the listed ones leave over: use that bound rather than zero.
    missing = max(min(min(p for _, p in probs), 1.0 - sum(p for _, p in probs)), 1e-9)
    p_a, p_b = p_a or missing, p_b or missing
    return p_a / (p_a + p_b)


def api_key_from_env() -> Optional[str]:
    return next((os.environ[e] for e in KEY_ENVS if os.environ.get(e)), None)


class OpenAIJudge(BothOrdersJudge):
    """Pairwise judging through /chat/completions, both orders, concurrent requests."""

    order_free = True

    def __init__(self, *, model: str, base_url: str, spec: str, options: Optional[JudgeOptions] = None,
                 api_key: Optional[str] = None) -> None:
        self.model, self.base_url, self.spec = model, base_url, spec
        self.options = options or JudgeOptions()
        self.template = load_template(self.options.template)
        self.use_logprobs = True
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(timeout=self.options.timeout_s, headers=headers)

    @classmethod
    def from_spec(cls, rest: str, *, spec: str, options: JudgeOptions) -> "OpenAIJudge":
        model, base_url = parse_openai_spec(rest)
        return cls(model=model, base_url=base_url, spec=spec, options=options, api_key=api_key_from_env())

    def score_first(self, prompts: Sequence[str], firsts: Sequence[str],
                    seconds: Sequence[str]) -> list[Optional[float]]:
        texts = [fill_template(self.template, prompt=p, first=f, second=s,
                               max_chars=self.options.max_response_chars)
                 for p, f, s in zip(prompts, firsts, seconds, strict=True)]
        if not texts:
            return []
        with ThreadPoolExecutor(max_workers=min(self.options.concurrency, len(texts))) as pool:
            return list(pool.map(self.ask, texts))

    def ask(self, text: str) -> Optional[float]:
        """One ordering: P(first better) from the endpoint."""
        payload: dict[str, Any] = {"model": self.model, "messages": [{"role": "user", "content": text}],
                                   "temperature": 0, "max_tokens": 1 if self.use_logprobs else 8}
        if self.use_logprobs:
            payload.update(logprobs=True, top_logprobs=self.options.top_logprobs)
        response = self._post(payload)
        if response.status_code in (400, 422) and self.use_logprobs and "logprob" in response.text.lower():
            log.info("judge %s: the endpoint does not offer logprobs; judging from the reply text", self.spec)
            self.use_logprobs = False
            return self.ask(text)
        self._raise_for_status(response)
        try:
            data = response.json()
        except ValueError:
            raise JudgeError(f"judge endpoint {self.url} did not answer JSON: {response.text[:200]!r}") from None
        return p_first_from_response(data)

    @property
    def url(self) -> str:
        return f"{self.base_url}/chat/completions"

    def _post(self, payload: dict[str, Any]) -> httpx.Response:
        """POST with retries on connection trouble, timeouts, 429 and 5xx (exponential backoff)."""
        attempts = self.options.retries + 1
        for attempt in range(attempts):
            last = attempt == attempts - 1
            try:
                response = self.client.post(self.url, json=payload)
            except httpx.HTTPError as exc:  # connect/read timeouts, refused connections, broken replies
                if last:
                    raise JudgeUnreachableError(f"judge endpoint {self.url} is unreachable after {attempts} "
                                                f"attempt(s): {type(exc).__name__}: {exc}") from None
                self._sleep(attempt, None)
                continue
            if response.status_code not in _RETRY_STATUS or last:
                return response
            self._sleep(attempt, response.headers.get("retry-after"))
        raise AssertionError("unreachable")

    def _sleep(self, attempt: int, retry_after: Optional[str]) -> None:
        delay = min(self.options.backoff_s * 2 ** attempt, 10.0)
        if retry_after and retry_after.replace(".", "", 1).isdigit():
            delay = min(float(retry_after), 30.0)
        log.debug("judge %s: retrying in %.1fs", self.spec, delay)
        time.sleep(delay)

    def _raise_for_status(self, response: httpx.Response) -> None:
        code = response.status_code
        if code < 400:
            return
        body = response.text[:200].replace("\n", " ")
        if code in (401, 403):
            raise JudgeError(f"judge endpoint {self.url} refused the request (HTTP {code}); set "
                             f"{' or '.join(KEY_ENVS)} to a valid key")
        if code == 404:
            raise JudgeError(f"judge endpoint {self.url} answered HTTP 404: check the base URL (usually "
                             f"ending in /v1) and the model name {self.model!r}: {body}")
        if code in _RETRY_STATUS:
            raise JudgeUnreachableError(f"judge endpoint {self.url} kept failing (HTTP {code}): {body}")
        raise JudgeError(f"judge endpoint {self.url} answered HTTP {code}: {body}")

    def close(self) -> None:
        self.client.close()
