"""The HTTP side of the vLLM sampler backend: one OpenAI-compatible vLLM server, the four endpoints
odpo uses, and nothing else.

Endpoints (vLLM's OpenAI server, `vllm serve`):

- `GET /v1/models`: the base model and every LoRA adapter loaded at run time.
- `POST /v1/load_lora_adapter {lora_name, lora_path}` / `POST /v1/unload_lora_adapter {lora_name}`:
  runtime LoRA loading, which the server only offers with `VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`
  (and `--enable-lora`). Success is HTTP 200 with a plain-text body; loading a name twice is a 400
  "has already been loaded", unloading an unknown name a 404.
- `POST /v1/completions` with a token-id prompt (a list of ints, or a list of such lists) and
  `return_token_ids: true`: every choice then carries `prompt_token_ids` and `token_ids`, the ids
  the engine was fed and emitted (vLLM >= 0.10.2, PR #22587). Choices come prompt-major, `n` per
  prompt. Older servers ignore the unknown field; for them the ids are read from
  `logprobs.tokens` with `return_tokens_as_token_ids` (entries `"token_id:123"`), a fallback this
  client switches to by itself the first time a server answers without `token_ids`.

Errors: a transport failure (refused, reset, timeout) or an HTTP 5xx is a `VllmServerDown` (the
backend marks the server down and retries elsewhere); any other refusal is a `VllmRequestError`
with vLLM's own message (the request, e.g. an adapter the server cannot load, is at fault).
"""
from __future__ import annotations

import logging
from typing import Any, Optional, Sequence
from urllib.parse import urlparse

import httpx

from odpo.db.errors import OdpoError

log = logging.getLogger(__name__)

TOKEN_ID_PREFIX = "token_id:"  # how vLLM spells a token in logprobs with return_tokens_as_token_ids
GREEDY_EPS = 1e-5  # vLLM's _SAMPLING_EPS: a temperature below it samples greedily


class VllmError(OdpoError):
    """Something about the vLLM servers odpo samples with; the message says what."""


class VllmServerDown(VllmError):
    """The server did not answer usefully (connection, timeout, HTTP 5xx): try another one."""

    transient = True  # db/transient.py: a sampler waits it out instead of failing
    fault_what = "vLLM server"


class VllmRequestError(VllmError):
    """The server answered and refused the request (HTTP 4xx)."""

    def __init__(self, message: str, *, status: int) -> None:
        super().__init__(message)
        self.status = status


def normalize_url(url: str) -> str:
    """`http://host:8000`, `http://host:8000/` and `http://host:8000/v1` all name the same server;
    the endpoints are appended to the root."""
    text = url.strip().rstrip("/")
    parsed = urlparse(text)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise VllmError(f"--vllm-url {url!r} is not an http(s) URL like http://127.0.0.1:8000")
    return text[: -len("/v1")] if text.endswith("/v1") else text


class VllmClient:
    """One server. Thread-safe (httpx.Client is), so batches for one server may overlap."""

    def __init__(self, url: str, *, timeout_s: float = 60.0) -> None:
        self.url = normalize_url(url)
        self.legacy_ids = False  # True once the server answered without `token_ids` (vLLM < 0.10.2)
        self._http = httpx.Client(base_url=self.url, timeout=timeout_s)

    def models(self) -> list[str]:
        """Names the server serves: the base model's first, then the LoRA adapters."""
        data = self._json(self._call("GET", "/v1/models"))
        return [str(card["id"]) for card in data.get("data", [])]

    def load_lora(self, name: str, path: str) -> bool:
        """Load the adapter at `path` (a directory on the server's machine) as `name`. False when
        the server already had a LoRA of that name (versioned names never change meaning)."""
        response = self._call("POST", "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path},
                              check=False)
        if response.status_code == 400 and "already been loaded" in response.text:
            return False
        # Any refusal, 5xx included, is about the adapter (vLLM answers 500 for e.g. a rank above
        # --max-lora-rank): the server itself answered, so it is not marked down for it.
        self._check(response, what=f"loading adapter {name!r} from {path}", server_fault=False)
        return True

    def unload_lora(self, name: str) -> bool:
        """Unload `name`; False when the server did not have it (e.g. it restarted meanwhile)."""
        response = self._call("POST", "/v1/unload_lora_adapter", json={"lora_name": name}, check=False)
        if response.status_code == 404:
            return False
        self._check(response, what=f"unloading adapter {name!r}")
        return True

    def complete(self, *, model: str, prompts: Sequence[Sequence[int]], n: int,
                 sampling: dict[str, Any]) -> list[list[dict[str, Any]]]:
        """Sample `n` completions of every token-id prompt; one list of `n` choices per prompt, in
        prompt order. Each choice is vLLM's, with `token_ids` always filled in. Greedy with n > 1
        asks for one and repeats it: vLLM refuses n > 1 when greedy (HTTP 400), and greedy samples
        of one prompt are one sample anyway."""
        temperature = sampling.get("temperature")  # unset: vLLM's default, 1.0
        ask = 1 if temperature is not None and float(temperature) < GREEDY_EPS else n
        body = {"model": model, "prompt": [list(map(int, p)) for p in prompts], **sampling, "n": ask,
                "return_token_ids": True, "stream": False}
        choices = self._choices(body, expected=len(prompts) * ask)
        if any(c.get("token_ids") is None for c in choices) and not self.legacy_ids:
            log.warning("vLLM at %s returns no token_ids (older than 0.10.2?); reading them from logprobs",
                        self.url)
            self.legacy_ids = True
            choices = self._choices(body, expected=len(prompts) * n)
        for choice in choices:
            if choice.get("finish_reason") not in ("stop", "length"):  # "abort": the server is going away
                raise VllmServerDown(f"vLLM at {self.url} ended a sample with {choice.get('finish_reason')!r}")
            if choice.get("token_ids") is None:
                choice["token_ids"] = ids_from_logprobs(choice, url=self.url)
        if ask != n:
            return [[dict(choices[i]) for _ in range(n)] for i in range(len(prompts))]
        return [choices[i * n:(i + 1) * n] for i in range(len(prompts))]

    def _choices(self, body: dict[str, Any], *, expected: int) -> list[dict[str, Any]]:
        if self.legacy_ids:
            body = {**body, "logprobs": 0, "return_tokens_as_token_ids": True}
        data = self._json(self._call("POST", "/v1/completions", json=body, what=f"sampling with {body['model']!r}"))
        choices = sorted(data.get("choices", []), key=lambda c: int(c.get("index", 0)))
        if len(choices) != expected:
            raise VllmServerDown(f"vLLM at {self.url} returned {len(choices)} choices for {expected} samples")
        return choices

    def close(self) -> None:
        self._http.close()

    # --- plumbing ---------------------------------------------------------------------------

    def _call(self, method: str, path: str, *, json: Optional[dict[str, Any]] = None, check: bool = True,
              what: str = "") -> httpx.Response:
        try:
            response = self._http.request(method, path, json=json)
        except httpx.HTTPError as exc:  # refused, reset, timed out, broken reply
            raise VllmServerDown(f"vLLM at {self.url} is unreachable: {type(exc).__name__}: {exc}") from None
        if check:
            self._check(response, what=what or f"{method} {path}")
        return response

    def _check(self, response: httpx.Response, *, what: str, server_fault: bool = True) -> None:
        code = response.status_code
        if code < 400:
            return
        message = f"vLLM at {self.url} failed {what} (HTTP {code}): {error_message(response)}"
        if code >= 500 and server_fault:
            raise VllmServerDown(message)
        if code == 404 and "load_lora_adapter" in str(response.request.url):
            message += " (start vllm serve with --enable-lora and VLLM_ALLOW_RUNTIME_LORA_UPDATING=True)"
        raise VllmRequestError(message, status=code)

    def _json(self, response: httpx.Response) -> dict[str, Any]:
        try:
            data = response.json()
        except ValueError:
            raise VllmServerDown(f"vLLM at {self.url} did not answer JSON: {response.text[:200]!r}") from None
        if not isinstance(data, dict):
            raise VllmServerDown(f"vLLM at {self.url} answered {type(data).__name__}, not a JSON object")
        return data


def error_message(response: httpx.Response) -> str:
    """vLLM's error text: `{"error": {"message": …}}` (current) or `{"message": …}` (older)."""
    try:
        data = response.json()
    except ValueError:
        return response.text[:300].replace("\n", " ")
    if isinstance(data, dict):
        inner = data.get("error")
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"])
        if data.get("message"):
            return str(data["message"])
    return response.text[:300].replace("\n", " ")


def ids_from_logprobs(choice: dict[str, Any], *, url: str) -> list[int]:
    """The fallback for servers without `return_token_ids`: `logprobs.tokens` as `token_id:N`."""
    tokens = (choice.get("logprobs") or {}).get("tokens")
    if tokens is None or not all(isinstance(t, str) and t.startswith(TOKEN_ID_PREFIX) for t in tokens):
        raise VllmError(f"vLLM at {url} returned neither token_ids nor token ids in logprobs; odpo needs "
                        "the generated ids (upgrade to vLLM >= 0.10.2)")
    return [int(t[len(TOKEN_ID_PREFIX):]) for t in tokens]
