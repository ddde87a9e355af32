"""Judges: both-orders debiasing, rules, plugins, the hf:/rm: judges on the tiny model, and the
openai: judge against a real local OpenAI-compatible server backed by the tiny model."""
from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import pytest
import torch

from odpo.trainer.judges import JudgeError, JudgeOptions, JudgeUnreachableError, Verdict, judge_labeler_name, load_judge
from odpo.trainer.judges.hf import HFJudge
from odpo.trainer.judges.openai_judge import p_first_from_response, parse_openai_spec
from odpo.trainer.judges.pairwise import combine_orders, fill_template, judge_both_orders, load_template
from odpo.trainer.judges.plugin import PluginError
from odpo.trainer.policy.loading import load_model_and_tokenizer
from tests.model_fixtures import tiny_model_config

PROMPTS = ["The cat looks at the green hill.", "My teacher writes to her best friend.", "The river opens?"]
LONG = ["The cat runs across the green hill and looks at a quiet morning.", "A small robot answers.",
        "The old man remembers the last page of the long question."]
SHORT = ["The cat.", "A small robot answers the long question and follows the train.", "Paris."]


# --- verdicts and both-orders combination -----------------------------------------------------

def test_verdict_validates_and_swaps():
    with pytest.raises(ValueError):
        Verdict("maybe")
    v = Verdict("a", confidence=1.7, p_a=0.8)
    assert v.confidence == 1.0
    s = v.swapped()
    assert s.choice == "b" and s.p_a == pytest.approx(0.2)
    assert Verdict("tie").swapped().choice == "tie"


def test_position_biased_scorer_abstains_instead_of_preferring():
    """A scorer that always says 'the first one' (whatever it is) must not produce a preference."""
    always_first = lambda prompts, firsts, seconds: [0.97] * len(prompts)  # noqa: E731
    verdicts = judge_both_orders(always_first, PROMPTS, LONG, SHORT, abstain_threshold=0.5, tie_margin=0.05)
    assert [v.choice for v in verdicts] == ["abstain"] * 3
    assert all("orders disagree" in v.reason for v in verdicts)
    mildly_biased = lambda prompts, firsts, seconds: [0.6] * len(prompts)  # noqa: E731
    verdicts = judge_both_orders(mildly_biased, PROMPTS, LONG, SHORT, abstain_threshold=0.5, tie_margin=0.05)
    assert [v.choice for v in verdicts] == ["tie"] * 3


def test_content_scorer_wins_in_both_orders_plus_a_bias():
    """Prefers the shorter response, with a +0.2 position bias on top: still decides by content."""
    def scorer(prompts, firsts, seconds):
        return [min(0.95, (0.7 if len(f) < len(s) else 0.3) + 0.2) for f, s in zip(firsts, seconds, strict=True)]

    verdicts = judge_both_orders(scorer, PROMPTS, LONG, SHORT, abstain_threshold=0.5, tie_margin=0.05)
    assert [v.choice for v in verdicts] == ["b", "a", "b"]
    assert all(v.confidence == pytest.approx(0.7) for v in verdicts)


def test_combine_orders_cases():
    assert combine_orders(None, 0.2, abstain_threshold=0.5, tie_margin=0.05).choice == "abstain"
    v = combine_orders(0.9, 0.2, abstain_threshold=0.5, tie_margin=0.05)  # a-first 0.9, b-first says a 0.8
    assert v.choice == "a" and v.p_a == pytest.approx(0.85)


def test_template_fill_is_single_pass_and_validates(tmp_path):
    text = fill_template("{prompt}|{response_a}|{response_b}", prompt="p", first="{response_b}", second="x",
                         max_chars=100)
    assert text == "p|{response_b}|x"
    assert fill_template("{response_a}", prompt="", first="abcdef", second="", max_chars=3) == "abc [...]"
    assert "{response_b}" in load_template()
    bad = tmp_path / "t.txt"
    bad.write_text("only {prompt} and {response_a}")
    with pytest.raises(JudgeError, match="response_b"):
        load_template(bad)
    with pytest.raises(JudgeError, match="cannot read"):
        load_template(tmp_path / "missing.txt")


# --- specs, rules, plugins ----------------------------------------------------------------------

@pytest.mark.parametrize("spec", ["", "nope", "foo:bar", "rule:", "rule:nonsense", "rule:regex:(",
                                  "rule:length:x", "rule:say_the_early:x", "hf:/no/such/model/dir", "rm:/no/such/dir",
                                  "openai:@http://x", "py:nomodule_xyz:fn", "py:tests.rules:missing",
                                  "py:tests.rules:NOT_CALLABLE", "py:tests.rules"])
def test_bad_specs_are_clear_errors(spec):
    with pytest.raises(JudgeError) as info:
        load_judge(spec)
    assert str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("name, expected", [
    ("shorter", ["b", "a", "b"]), ("longer", ["a", "b", "a"]),
    ("contains:robot", ["tie", "tie", "tie"]), ("contains:quiet", ["a", "tie", "tie"]),
    ("avoid:quiet", ["b", "tie", "tie"]), ("regex:^Paris", ["tie", "tie", "b"]),
    ("length:3", ["b", "a", "b"]),
])
def test_rules(name, expected):
    judge = load_judge(f"rule:{name}")
    assert judge.order_free and judge.spec == f"rule:{name}"
    assert [v.choice for v in judge.judge(PROMPTS, LONG, SHORT)] == expected
    assert [v.choice for v in judge.judge(PROMPTS, SHORT, LONG)] == [Verdict(c).swapped().choice for c in expected]
    assert judge.judge(["p"], [" "], [""])[0].choice == "both_bad"


def _both_orders(judge, a: str, b: str) -> tuple[str, str]:
    """(verdict on a vs b, verdict on b vs a swapped back): equal for an order-free rule."""
    first = judge.judge(["p"], [a], [b])[0].choice
    second = judge.judge(["p"], [b], [a])[0].swapped().choice
    return first, second


@pytest.mark.parametrize("a, b, expected", [
    ("The cat sat.", "A cat sat on the mat.", "a"),          # "the" at 0 vs 14
    ("Cats sleep a lot.", "I like the sun.", "b"),          # never saying it loses
    ("THE END", "so the end", "a"),                        # case-insensitive
    ("There is a cat.", "Look at the cat.", "b"),          # a word, not a prefix of "There"
    ("the end", "the start", "tie"),                       # same position
    ("Cats.", "Dogs.", "tie"),                             # neither says it
    ("", "  ", "both_bad"),
])
def test_say_the_early_rule(a, b, expected):
    judge = load_judge("rule:say_the_early")
    assert judge.order_free and judge.spec == "rule:say_the_early"
    assert _both_orders(judge, a, b) == (expected, expected)


@pytest.mark.parametrize("a, b, expected", [
    ("The sky is blue today.", "The sky is", "a"),         # finished beats cut off, even if longer
    ('He said "stop."', 'He said "stop', "a"),             # a sentence end inside closing quotes
    ("Yes.", "Yes, it is.", "a"),                          # both finished: the shorter wins
    ("It was a long and", "It was", "b"),                  # both cut off: the shorter wins
    ("Yes.  \n", "Yes, it is!", "a"),                     # surrounding whitespace ignored
    ("Yes.", "No!!", "tie"),                               # same kind, same length
    ("", "\n", "both_bad"),
])
def test_finished_and_short_rule(a, b, expected):
    judge = load_judge("rule:finished_and_short")
    assert judge.order_free and judge.spec == "rule:finished_and_short"
    assert _both_orders(judge, a, b) == (expected, expected)


@pytest.mark.parametrize("spec, name", [("py:app.bench.rules:say_the_early", "say_the_early"),
                                        ("py:odpo.app.bench.rules:finished_and_short", "finished_and_short")])
def test_old_bench_rule_specs_name_the_rule_judge(spec, name):
    """The bench's labeler rules were py: plugins; their old specs now fail with the new name."""
    with pytest.raises(PluginError) as info:
        load_judge(spec)
    message = str(info.value)
    assert "\n" not in message and f"use rule:{name})" in message
    assert load_judge(f"rule:{name}").spec == f"rule:{name}"


def test_random_rule_is_reproducible_and_order_free():
    judge = load_judge("rule:random:7")
    first = [v.choice for v in judge.judge(PROMPTS * 4, LONG * 4, SHORT * 4)]
    swapped = [v.choice for v in judge.judge(PROMPTS * 4, SHORT * 4, LONG * 4)]
    assert first == [v.choice for v in load_judge("rule:random:7").judge(PROMPTS * 4, LONG * 4, SHORT * 4)]
    assert swapped == [{"a": "b", "b": "a"}[c] for c in first]


def test_plugin_forms():
    judge = load_judge("py:tests.rules:prefer_shorter")
    assert judge.order_free is True
    assert [v.choice for v in judge.judge(PROMPTS, LONG, SHORT)] == ["b", "a", "b"]
    prob = load_judge("py:tests.rules:prefer_longer_probability")
    verdicts = prob.judge(PROMPTS, LONG, SHORT)
    assert prob.order_free is False
    assert [v.choice for v in verdicts] == ["a", "b", "a"]
    assert 0.5 < verdicts[0].confidence <= 1.0 and verdicts[0].p_a > 0.5


def test_plugin_errors_are_contained_per_pair():
    judge = load_judge("py:tests.rules:boom_on_question")
    verdicts = judge.judge(PROMPTS, LONG, SHORT)
    assert [v.choice for v in verdicts] == ["b", "a", "abstain"]
    assert "ValueError: cannot judge questions" in verdicts[2].reason
    garbage = load_judge("py:tests.rules:garbage").judge(PROMPTS[:1], LONG[:1], SHORT[:1])[0]
    assert garbage.choice == "abstain" and "expected a/b/tie" in garbage.reason


def test_plugin_that_always_fails_stops_with_a_clear_error():
    judge = load_judge("py:tests.rules:boom", JudgeOptions(max_consecutive_errors=5))
    assert [v.choice for v in judge.judge(PROMPTS, LONG, SHORT)] == ["abstain"] * 3
    with pytest.raises(PluginError, match="failed on 5 pairs in a row; last: plugin raised RuntimeError"):
        judge.judge(PROMPTS, LONG, SHORT)


def test_labeler_name_fits_the_column():
    assert judge_labeler_name("rule:shorter") == "judge:rule:shorter"
    long_name = judge_labeler_name("openai:m@http://" + "x" * 300)
    assert len(long_name) == 200 and long_name != judge_labeler_name("openai:m@http://" + "y" * 300)


# --- hf: judge ----------------------------------------------------------------------------------

class FirstLetterLM(torch.nn.Module):
    """A fake causal LM whose next token is always 'A' (p ~ 0.95 vs 'B'): pure position bias."""

    def __init__(self, vocab: int, id_a: int, id_b: int) -> None:
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.vocab, self.id_a, self.id_b = vocab, id_a, id_b

    def forward(self, input_ids, attention_mask=None, logits_to_keep=0, use_cache=False):
        logits = torch.zeros(input_ids.shape[0], 1, self.vocab)
        logits[:, :, self.id_a] = 3.0
        return SimpleNamespace(logits=logits)


def test_hf_judge_with_first_letter_lm_abstains(tiny_model_and_tokenizer):
    _, tokenizer = tiny_model_and_tokenizer
    ids_a = tokenizer.encode("A", add_special_tokens=False)
    ids_b = tokenizer.encode("B", add_special_tokens=False)
    judge = HFJudge(FirstLetterLM(len(tokenizer), ids_a[0], ids_b[0]), tokenizer, spec="hf:fake")
    assert all(p > 0.9 for p in judge.score_first(PROMPTS, LONG, SHORT))
    verdicts = judge.judge(PROMPTS, LONG, SHORT)
    assert [v.choice for v in verdicts] == ["abstain"] * 3


def test_hf_judge_on_tiny_model_is_order_free_and_batch_exact(tiny_model_dir, tmp_path):
    judge = load_judge(f"hf:{tiny_model_dir}", JudgeOptions(cache_dir=tmp_path, device="cpu", dtype="fp32",
                                                            batch_size=4))
    scores = judge.score_first(PROMPTS * 2, LONG + SHORT, SHORT + LONG)
    rows = zip(PROMPTS * 2, LONG + SHORT, SHORT + LONG, strict=True)
    alone = [judge.score_first([p], [f], [s])[0] for p, f, s in rows]
    assert scores == pytest.approx(alone, abs=1e-5)  # left padding and length-sorted chunks change nothing
    forward = judge.judge(PROMPTS, LONG, SHORT)
    backward = judge.judge(PROMPTS, SHORT, LONG)
    for f, b in zip(forward, backward, strict=True):
        assert f.p_a == pytest.approx(1.0 - b.p_a, abs=1e-6)
        assert f.swapped().choice == b.choice


# --- rm: judge ----------------------------------------------------------------------------------

def test_reward_model_judge(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    config = LlamaConfig.from_pretrained(tiny_model_dir, num_labels=1)
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(config)
    model.save_pretrained(tmp_path / "rm")
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(tmp_path / "rm")
    judge = load_judge(f"rm:{tmp_path / 'rm'}", JudgeOptions(device="cpu", dtype="fp32", tie_margin=0.0))
    r_long = judge.rewards(PROMPTS, LONG)
    r_short = judge.rewards(PROMPTS, SHORT)
    assert judge.rewards(PROMPTS[:1], LONG[:1])[0] == pytest.approx(r_long[0], abs=1e-5)  # padding-free
    verdicts = judge.judge(PROMPTS, LONG, SHORT)
    for v, rl, rs in zip(verdicts, r_long, r_short, strict=True):
        assert v.choice == ("a" if rl > rs else "b")
        assert v.p_a == pytest.approx(1 / (1 + torch.exp(torch.tensor(rs - rl)).item()), abs=1e-5)


# --- openai: judge against a local server running the tiny model --------------------------------

class TinyOpenAIServer:
    """/v1/chat/completions on 127.0.0.1, answering from a real (tiny) model: the next-token
    distribution gives top_logprobs, its argmax the reply text. Modes simulate real servers."""

    def __init__(self, model, tokenizer, *, mode: str = "ok", fail_first: int = 0) -> None:
        self.model, self.tokenizer, self.mode, self.fail_first = model, tokenizer, mode, fail_first
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                status, reply = server.answer(self.path, body, self.headers.get("Authorization"))
                data = json.dumps(reply).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()

    def answer(self, path, body, auth):
        with self.lock:
            self.requests.append({"path": path, "body": body, "auth": auth})
            count = len(self.requests)
        if path != "/v1/chat/completions":
            return 404, {"error": {"message": "not found"}}
        if self.mode == "slow":
            time.sleep(1.0)
        if count <= self.fail_first:
            return 503, {"error": {"message": "overloaded"}}
        if self.mode == "auth" and auth != "Bearer right-key":
            return 401, {"error": {"message": "bad key"}}
        if self.mode == "no_logprobs" and body.get("logprobs"):
            return 400, {"error": {"message": "logprobs is not supported by this server"}}
        return 200, self.complete(body)

    def complete(self, body):
        text = self.tokenizer.apply_chat_template(body["messages"], add_generation_prompt=True, tokenize=False)
        ids = self.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with self.lock, torch.inference_mode():
            logps = torch.log_softmax(self.model(input_ids=ids).logits[0, -1].float(), dim=-1)
        best = int(logps.argmax())
        choice = {"index": 0, "finish_reason": "length",
                  "message": {"role": "assistant", "content": self.tokenizer.decode([best])}}
        if body.get("logprobs"):
            k = min(int(body.get("top_logprobs", 0)), logps.shape[0])
            values, indices = logps.topk(k)
            top = [{"token": self.tokenizer.decode([int(i)]), "logprob": float(v)}
                   for v, i in zip(values, indices, strict=True)]
            choice["logprobs"] = {"content": [{"token": self.tokenizer.decode([best]),
                                               "logprob": float(logps[best]), "top_logprobs": top}]}
        return {"id": "x", "object": "chat.completion", "model": body["model"], "choices": [choice]}


@pytest.fixture
def tiny_lm(tiny_model_dir, tmp_path):
    return load_model_and_tokenizer(tiny_model_config(tiny_model_dir, tmp_path / "models"))


def test_openai_judge_matches_the_model_it_talks_to(tiny_lm, monkeypatch):
    model, tokenizer = tiny_lm
    monkeypatch.setenv("ODPO_JUDGE_API_KEY", "sekret")
    options = JudgeOptions(top_logprobs=len(tokenizer), concurrency=4)
    with TinyOpenAIServer(model, tokenizer) as server:
        judge = load_judge(f"openai:tiny-judge@{server.url}", options)
        scores = judge.score_first(PROMPTS, LONG, SHORT)
        verdicts = judge.judge(PROMPTS, LONG, SHORT)
        judge.close()
    local = HFJudge(model, tokenizer, spec="hf:tiny", options=options)
    assert scores == pytest.approx(local.score_first(PROMPTS, LONG, SHORT), abs=1e-4)
    assert [v.p_a for v in verdicts] == pytest.approx([v.p_a for v in local.judge(PROMPTS, LONG, SHORT)], abs=1e-4)
    assert len(server.requests) == 3 + 2 * 3  # one per ordering
    assert all(r["auth"] == "Bearer sekret" and r["body"]["model"] == "tiny-judge" for r in server.requests)
    assert all(r["body"]["logprobs"] is True and r["body"]["max_tokens"] == 1 for r in server.requests)
    texts = [r["body"]["messages"][0]["content"] for r in server.requests]
    for p, a, b in zip(PROMPTS, LONG, SHORT, strict=True):  # each pair asked a-first and b-first
        assert sum(p in t and t.index(a) < t.index(b) for t in texts if a in t and b in t) == 2
        assert sum(p in t and t.index(b) < t.index(a) for t in texts if a in t and b in t) == 1


def test_openai_judge_without_logprobs_falls_back_to_text(tiny_lm):
    model, tokenizer = tiny_lm
    with TinyOpenAIServer(model, tokenizer, mode="no_logprobs") as server:
        judge = load_judge(f"openai:m@{server.url}", JudgeOptions(concurrency=1))
        verdicts = judge.judge(PROMPTS[:2], LONG[:2], SHORT[:2])
    assert server.requests[0]["body"].get("logprobs") is True
    assert all("logprobs" not in r["body"] for r in server.requests[1:])
    assert len(server.requests) == 1 + 4
    # The tiny random model does not answer with a letter: the judge abstains, it does not guess.
    assert [v.choice for v in verdicts] == ["abstain", "abstain"]


def test_openai_judge_retries_then_succeeds(tiny_lm):
    model, tokenizer = tiny_lm
    with TinyOpenAIServer(model, tokenizer, fail_first=2) as server:
        judge = load_judge(f"openai:m@{server.url}", JudgeOptions(concurrency=1, backoff_s=0.01, retries=3))
        assert len(judge.judge(PROMPTS[:1], LONG[:1], SHORT[:1])) == 1
    assert len(server.requests) == 2 + 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_openai_judge_unreachable_timeout_and_auth_errors(tiny_lm, monkeypatch):
    fast = JudgeOptions(retries=1, backoff_s=0.01, timeout_s=0.3, concurrency=1)
    judge = load_judge(f"openai:m@http://127.0.0.1:{_free_port()}/v1", fast)
    with pytest.raises(JudgeUnreachableError, match="unreachable after 2 attempt"):
        judge.judge(PROMPTS[:1], LONG[:1], SHORT[:1])
    model, tokenizer = tiny_lm
    with TinyOpenAIServer(model, tokenizer, mode="slow") as server:
        with pytest.raises(JudgeUnreachableError, match="ReadTimeout"):
            load_judge(f"openai:m@{server.url}", fast).judge(PROMPTS[:1], LONG[:1], SHORT[:1])
    monkeypatch.delenv("ODPO_JUDGE_API_KEY", raising=False)
    monkeypatch.setenv("OPENAI_API_KEY", "wrong")
    with TinyOpenAIServer(model, tokenizer, mode="auth") as server:
        with pytest.raises(JudgeError, match="HTTP 401.*OPENAI_API_KEY"):
            load_judge(f"openai:m@{server.url}", fast).judge(PROMPTS[:1], LONG[:1], SHORT[:1])
        monkeypatch.setenv("OPENAI_API_KEY", "right-key")
        patient = JudgeOptions(retries=1, backoff_s=0.01, timeout_s=60, concurrency=1)  # runs the model: no race
        assert len(load_judge(f"openai:m@{server.url}/", patient).judge(PROMPTS[:1], LONG[:1], SHORT[:1])) == 1


def test_openai_spec_and_reply_parsing(monkeypatch):
    assert parse_openai_spec("llama3.1:8b@http://h:11434/v1/") == ("llama3.1:8b", "http://h:11434/v1")
    assert parse_openai_spec("m@https://x/v1/chat/completions") == ("m", "https://x/v1")
    monkeypatch.setenv("ODPO_JUDGE_BASE_URL", "http://local/v1")
    assert parse_openai_spec("gpt-4o-mini") == ("gpt-4o-mini", "http://local/v1")
    reply = lambda text, lp=None: {"choices": [{"message": {"content": text}, "logprobs": lp}]}  # noqa: E731
    assert p_first_from_response(reply("B")) == 0.0
    assert p_first_from_response(reply("**Response A** is better")) == 1.0
    assert p_first_from_response(reply("A good answer would be B")) is None
    top = {"content": [{"token": "A", "logprob": -0.2, "top_logprobs": [
        {"token": "A", "logprob": -0.2}, {"token": " B", "logprob": -2.0}, {"token": "The", "logprob": -3.0}]}]}
    p_a, p_b = 2.718281828 ** -0.2, 2.718281828 ** -2.0
    assert p_first_from_response(reply("A", top)) == pytest.approx(p_a / (p_a + p_b), abs=1e-6)
    only_a = {"content": [{"token": "A", "logprob": -0.1, "top_logprobs": []}]}
    assert 0.9 < p_first_from_response(reply("A", only_a)) < 1.0


@pytest.mark.default_model
def test_hf_judge_on_the_default_model(default_model):
    """SmolLM2-135M as judge: exact order symmetry, and its strong first-position habit is turned
    into abstentions rather than a preference."""
    model, tokenizer = default_model
    judge = HFJudge(model, tokenizer, spec="hf:smollm2-135m")
    prompts = ["What is the capital of France?", "What is 2 + 2?"]
    good, bad = ["The capital of France is Paris.", "2 + 2 = 4."], ["Bananas are yellow.", "2 + 2 = 5."]
    firsts = judge.score_first(prompts * 2, good + bad, bad + good)
    forward, backward = judge.judge(prompts, good, bad), judge.judge(prompts, bad, good)
    for f, b in zip(forward, backward, strict=True):
        assert f.p_a == pytest.approx(1.0 - b.p_a, abs=1e-4) and f.swapped().choice == b.choice
    assert all(p > 0.8 for p in firsts)  # it answers "A" whatever A is (measured 0.90-0.97) ...
    assert {v.choice for v in forward} <= {"abstain", "tie"}  # ... so no preference may come out
