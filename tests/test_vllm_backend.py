"""The vLLM sampler backend (trainer/sampling/vllm_backend.py) against tests/vllm_standin.py: a local server
with vLLM's endpoints backed by the tiny Llama and real PEFT adapters, and a real SQLite database.
The stand-in runs everywhere in a second; tests/test_vllm_real.py runs the same paths against a real
`vllm serve` where `make vllm` built one, and checks the stand-in's answers against it."""
from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from odpo.db import store
from odpo.db.errors import OdpoError
from odpo.db.models import Pair, Reload
from odpo.trainer.policy.batching import build_pair_batch, prompt_token_ids
from odpo.trainer.policy.checkpoint import write_version
from odpo.trainer.policy.lora import LoraSettings, attach_lora
from odpo.trainer.sampling.generation import Generated, GenerationInterrupted, SamplingParams, generate
from odpo.trainer.sampling.hotreload import load_version_into
from odpo.trainer.sampling.vllm_backend import VllmBackend, VllmError, VllmUnavailable
from odpo.trainer.training.on_policy import training_examples
from tests.concurrency import wait_until
from tests.db_helpers import label_all, make_pairs, rows
from tests.vllm_fixtures import sampler_log_while_refused
from tests.vllm_standin import StandinVllm

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPTS = ["What does the cat think of the river?", "Write a haiku about winter.",
           "How many legs does a spider have?", "Which planet is the largest?"]
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=8)
ADAPTERS = Path("runs/default/adapters")  # rows hold paths relative to the data dir, as the trainer's do
LORA = LoraSettings(r=4, alpha=8, dropout=0.0)
STOPS = 4  # the seeded version whose greedy answers end with the eos for some PROMPTS, not for others


def write_adapter(model_dir: Path, data_dir: Path, version: int, *, lora: LoraSettings = LORA,
                  adapters: Path = ADAPTERS) -> Path:
    """A trained-looking version written the trainer's way (write_version): LoRA B is random, so
    the version samples differently from the base and from the other versions."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.random.fork_rng(devices=[]):  # lora_A's init too: the same versions on every run
        torch.manual_seed(version)
        peft_model = attach_lora(model, lora)
    gen = torch.Generator().manual_seed(version)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    optimizer = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=0.1)
    return write_version(model=peft_model, optimizer=optimizer, adapters_dir=data_dir / adapters, version=version,
                         state={"step": version})


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, tiny_model_dir) -> Path:
    root = tmp_path_factory.mktemp("vllm-data")
    for version in (1, 2, 3, STOPS):
        write_adapter(tiny_model_dir, root, version)
    return root


@pytest.fixture
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture
def servers(tiny_model_dir):
    """servers() starts one more stand-in; all are stopped after the test."""
    started: list[StandinVllm] = []

    def start(**kwargs) -> StandinVllm:
        started.append(StandinVllm(tiny_model_dir, served_name="tiny", **kwargs).start())
        return started[-1]

    yield start
    for server in started:
        server.kill()


@pytest.fixture
def backend_for(database, data_dir, tokenizer):
    made: list[VllmBackend] = []

    def make(*standins: StandinVllm, **kwargs) -> VllmBackend:
        options = {"max_staleness": 1, "retry_base_s": 0.05, "retry_max_s": 0.2, "timeout_s": 30.0, **kwargs}
        made.append(VllmBackend(db=database, urls=[s.url for s in standins], run="default", tokenizer=tokenizer,
                                base_model="tiny", base_dir=data_dir, **options))
        return made[-1]

    yield make
    for backend in made:
        backend.close()


def commit(db, version: int, parent: int) -> None:
    with db.sessions.begin() as s:
        store.commit_adapter_version(s, run="default", version=version, path=str(ADAPTERS / f"v{version}"),
                                     parent=parent or None, step=version, label_steps={}, metrics={})


def ids(outputs: list[list[Generated]]) -> list[list[tuple[int, ...]]]:
    return [[g.token_ids for g in per_prompt] for per_prompt in outputs]


def completions(server: StandinVllm) -> list[str]:
    """The model name of every completion request the server answered, in order."""
    return [detail["model"] for kind, detail in server.calls if kind == "complete"]


def test_samples_are_the_servers_ids_on_odpos_prompt_ids(servers, backend_for, tokenizer,
                                                         tiny_model_and_tokenizer):
    server = servers()
    backend = backend_for(server)
    assert backend.load_initial() == 0
    out = backend.generate(PROMPTS[:2], params=GREEDY, n_per_prompt=2)
    assert completions(server) == ["tiny"]  # version 0 samples with the base model's name
    # greedy: vLLM refuses n > 1 (HTTP 400), so one sample is asked for and repeated
    assert [detail["n"] for kind, detail in server.calls if kind == "complete"] == [1]
    model, tok = tiny_model_and_tokenizer
    for prompt, (a, b) in zip(PROMPTS[:2], out, strict=True):
        assert a.prompt_token_ids == b.prompt_token_ids == tuple(prompt_token_ids(tokenizer, prompt))
        # greedy on the same weights: exactly what odpo's own transformers sampler emits
        (local,) = generate(model, tok, [prompt], params=GREEDY)[0]
        assert a.token_ids == b.token_ids
        assert (a.token_ids, a.text, a.tokens, a.finish_reason) == (local.token_ids, local.text, local.tokens,
                                                                   local.finish_reason)
    sampled = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=8, seed=5)
    first = backend.generate(PROMPTS[:1], params=sampled, n_per_prompt=2)[0]
    again = backend.generate(PROMPTS[:1], params=sampled, n_per_prompt=2)[0]
    assert ids([first]) == ids([again])  # a seed reproduces a batch
    assert first[0].token_ids != first[1].token_ids  # sample j draws with seed + j: independent samples
    # every prompt of a seeded batch is its own request, seeded seed + i * n (no shared streams)
    both = backend.generate(PROMPTS[:2], params=sampled, n_per_prompt=2)
    alone = backend.generate(PROMPTS[1:2], params=dataclasses.replace(sampled, seed=sampled.seed + 2), n_per_prompt=2)
    assert ids(both)[0] == ids([first])[0] and ids(both)[1] == ids(alone)[0]
    for g in first:
        eos = tokenizer.eos_token_id
        kept = g.token_ids[:-1] if g.finish_reason == "stop" and g.token_ids[-1] == eos else g.token_ids
        assert g.text == tokenizer.decode(list(kept), skip_special_tokens=True) and g.tokens == len(kept)


def test_a_version_samples_exactly_what_odpos_own_sampler_does(database, servers, backend_for, data_dir,
                                                                tiny_model_and_tokenizer):
    """Greedy under a version: the stand-in (base + PEFT adapter, token-id prompt) and odpo's transformers
    sampler (the adapter copied into an attached LoRA, the sampler's hot-reload path) agree on
    every id, the eos included, and on the text and finish reason decoded from them."""
    server = servers()
    backend = backend_for(server)
    backend.load_initial()
    commit(database, STOPS, 0)
    backend.poll_once()
    params = SamplingParams(temperature=0.0, max_new_tokens=24)
    remote = backend.generate(PROMPTS, params=params)
    model, tok = tiny_model_and_tokenizer
    local_model = attach_lora(model, LORA).eval()
    load_version_into(local_model, version=STOPS, path=str(ADAPTERS / f"v{STOPS}"), base_dir=data_dir)
    local = [generate(local_model, tok, [p], params=params)[0] for p in PROMPTS]
    assert [[(g.token_ids, g.text, g.tokens, g.finish_reason) for g in r] for r in remote] == \
        [[(g.token_ids, g.text, g.tokens, g.finish_reason) for g in r] for r in local]
    assert {g.finish_reason for (g,) in remote} == {"stop", "length"}  # both ends covered
    assert all(g.token_ids[-1] == tok.eos_token_id for (g,) in remote if g.finish_reason == "stop")


def test_a_choice_becomes_a_generated_with_vllms_stop_rules(backend_for, servers, tokenizer):
    """What vLLM may answer besides odpo's own eos: a stop id it reports in stop_reason (a
    generation_config eos), an eos only it knows (stop_reason None), a cut at max_model_len."""
    backend = backend_for(servers())
    row = prompt_token_ids(tokenizer, PROMPTS[0])
    params = SamplingParams(temperature=1.0, max_new_tokens=8)
    words = tokenizer(" the cat looks at", add_special_tokens=False)["input_ids"]
    other_eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert other_eos != tokenizer.eos_token_id
    for stop_reason in (other_eos, None):
        choice = {"token_ids": words + [other_eos], "prompt_token_ids": row, "finish_reason": "stop",
                  "stop_reason": stop_reason}
        g = backend._generated(choice, row, params=params, seconds=0.5)
        assert (g.token_ids, g.tokens, g.finish_reason) == (tuple(words + [other_eos]), len(words), "stop")
        assert g.text == " the cat looks at" and g.prompt_token_ids == tuple(row) and g.seconds == 0.5
    cut = backend._generated({"token_ids": words, "finish_reason": "length", "stop_reason": None}, row,
                             params=params, seconds=0.1)
    assert cut.finish_reason == "length" and cut.token_ids == tuple(words)  # fewer than 8, still a cut
    with pytest.raises(VllmError, match="other prompt ids"):
        backend._generated({"token_ids": words, "prompt_token_ids": row[1:], "finish_reason": "length"}, row,
                           params=params, seconds=0.1)


def test_a_committed_version_is_loaded_sampled_and_stale_ones_unloaded(database, servers, backend_for, data_dir):
    server = servers()
    backend = backend_for(server)
    backend.load_initial()
    base = ids(backend.generate(PROMPTS, params=GREEDY))
    old_pairs = make_pairs(database, 2, version=0)
    commit(database, 1, 0)
    result = backend.poll_once()
    assert (result.from_version, result.to_version) == (0, 1) and backend.serving_version == 1
    assert server.adapters["default-v1"][0] == str((data_dir / ADAPTERS / "v1").resolve())  # absolute path
    v1 = ids(backend.generate(PROMPTS, params=GREEDY))
    assert completions(server)[-1] == "default-v1"
    assert v1 != base  # the adapter really changes what the server samples
    assert backend.poll_once() is None  # nothing new committed
    commit(database, 2, 1)
    backend.poll_once()
    assert {p.status for p in rows(database, Pair) if p.id in old_pairs} == {"retired"}  # v0 pairs too stale at v2
    commit(database, 3, 2)
    assert backend.poll_once().to_version == 3
    assert backend.servers[0].client.models() == ["tiny", "default-v2", "default-v3"]  # v1 left the window
    assert ("unload", "default-v1") in server.calls
    assert [r.version for r in rows(database, Reload)] == [1, 2, 3]
    assert backend.servers_state() == [{"url": server.url, "up": True, "last_error": None,
                                        "loaded": ["default-v2", "default-v3"], "next_retry_in_s": None}]


def test_start_up_loads_the_head_and_cleans_up_after_an_earlier_process(database, servers, backend_for, data_dir):
    server = servers()
    v1 = str(data_dir / ADAPTERS / "v1")
    for name in ("default-v1", "other-run-v1"):  # what an earlier worker (and another run's) left behind
        assert server.load_lora({"lora_name": name, "lora_path": v1})[0] == 200
    for version in (1, 2, 3):
        commit(database, version, version - 1)
    backend = backend_for(server)
    assert backend.load_initial() == 3 and backend.serving_version == 3
    assert [c["id"] for c in server.models()[1]["data"]] == ["tiny", "other-run-v1", "default-v3"]
    backend.generate(PROMPTS[:1], params=GREEDY)
    assert completions(server) == ["default-v3"] and rows(database, Reload) == []  # start-up is no reload


def test_a_rollback_serves_the_older_version_again(database, servers, backend_for):
    server = servers()
    backend = backend_for(server)
    backend.load_initial()
    base = ids(backend.generate(PROMPTS, params=GREEDY))
    commit(database, 1, 0)
    backend.poll_once()
    v1 = ids(backend.generate(PROMPTS, params=GREEDY))
    commit(database, 2, 1)
    backend.poll_once()
    assert ids(backend.generate(PROMPTS, params=GREEDY)) != v1
    with database.sessions.begin() as s:
        store.rollback_to(s, version=1)
    result = backend.poll_once()
    assert (result.from_version, result.to_version, backend.serving_version) == (2, 1, 1)
    assert ids(backend.generate(PROMPTS, params=GREEDY)) == v1 and completions(server)[-1] == "default-v1"
    assert backend.servers[0].client.models() == ["tiny", "default-v1"]  # v2 was rolled back for good
    with database.sessions.begin() as s:
        store.rollback_to(s, version=0)
    assert backend.poll_once().to_version == 0
    assert ids(backend.generate(PROMPTS, params=GREEDY)) == base and completions(server)[-1] == "tiny"
    assert list(server.adapters) == []  # the base needs no adapter; rolled-back versions are gone


def test_a_dead_server_is_skipped_and_gets_the_version_before_it_samples_again(database, servers, backend_for):
    a, b = servers(), servers()
    backend = backend_for(a, b)
    backend.load_initial()
    commit(database, 1, 0)
    backend.poll_once()
    assert "default-v1" in a.adapters and "default-v1" in b.adapters
    v1 = ids(backend.generate(PROMPTS, params=GREEDY))
    assert completions(a) and completions(b)  # the batch was spread over both
    b.kill()
    assert ids(backend.generate(PROMPTS, params=GREEDY)) == v1  # b's share went to a
    state = {s["url"]: s for s in backend.servers_state()}
    assert state[a.url]["up"] and not state[b.url]["up"]
    assert "unreachable" in state[b.url]["last_error"] and state[b.url]["next_retry_in_s"] is not None
    b.revive()
    assert b.adapters == {}  # a restarted vLLM has forgotten its runtime adapters
    wait_until(lambda: backend.poll_once() is None and backend.servers_state()[1]["up"], timeout=10)
    assert b.calls[-1] == ("load", "default-v1")  # loaded before any sampling on it
    answered = len(completions(b))
    for _ in range(2):  # turns rotate: b gets a share of one of two single-prompt batches at least
        assert ids(backend.generate(PROMPTS[:1], params=GREEDY)) == v1[:1]
    assert completions(b)[answered:] == ["default-v1"]


def test_a_failing_server_mid_batch_and_no_server_at_all(database, servers, backend_for):
    a, b = servers(), servers()
    backend = backend_for(a, b)
    backend.load_initial()
    expected = ids(backend.generate(PROMPTS, params=GREEDY))
    a.fail_completions = 1  # HTTP 500 on its next completion
    assert ids(backend.generate(PROMPTS, params=GREEDY)) == expected  # a's share was redone on b
    assert not backend.servers_state()[0]["up"] and backend.servers_state()[1]["up"]
    assert "HTTP 500" in backend.servers_state()[0]["last_error"]
    with pytest.raises(GenerationInterrupted):  # e.g. the worker shutting down: no waiting for replies
        backend.generate(PROMPTS, params=GREEDY, should_stop=lambda: True)
    a.kill()
    b.kill()
    with pytest.raises(VllmUnavailable) as info:
        backend.generate(PROMPTS, params=GREEDY)
    assert isinstance(info.value, OdpoError) and "no vLLM server is up" in str(info.value)


def test_an_adapter_every_server_refuses_keeps_the_old_version(database, servers, backend_for, data_dir):
    server = servers()
    backend = backend_for(server)
    backend.load_initial()
    with database.sessions.begin() as s:
        store.commit_adapter_version(s, run="default", version=1, path="runs/default/adapters/missing", parent=None,
                                     step=1, label_steps={}, metrics={})
    with pytest.raises(VllmError, match="refused adapter v1"):
        backend.poll_once()
    assert backend.serving_version == 0 and backend.servers_state()[0]["up"]  # the server is fine


def test_a_pair_sampled_with_vllm_trains_on_exactly_its_ids(database, servers, backend_for, tokenizer):
    server = servers()
    backend = backend_for(server)
    backend.load_initial()
    with database.sessions.begin() as s:
        store.add_prompts(s, prompts=[store.NewPrompt(text=PROMPTS[0])])
        (prompt,) = store.pick_prompts_for_sampling(s, n=1)
        prompt_id = prompt.id
    params = SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=8, seed=1)
    a, b = backend.generate([PROMPTS[0]], params=params, n_per_prompt=2)[0]
    with database.sessions.begin() as s:
        samples = [store.NewSample(text=g.text, tokens=g.tokens, finish_reason=g.finish_reason, params=params.as_dict(),
                                   gen_seconds=g.seconds, prompt_token_ids=g.prompt_token_ids, token_ids=g.token_ids)
                   for g in (a, b)]
        store.add_pair(s, prompt_id=prompt_id, version=0, a=samples[0], b=samples[1])
    label_all(database, "alice", choice="a")
    with database.sessions() as s:
        labels = store.unconsumed_labels(s, limit=10)
    (example,) = training_examples(database, labels)
    assert example.exact and list(example.prompt_ids) == list(a.prompt_token_ids)
    batch = build_pair_batch(tokenizer, [example])
    for row, g in enumerate((a, b)):  # chosen row, then rejected row
        n = int(batch["attention_mask"][row].sum())
        assert batch["input_ids"][row, :n].tolist() == list(g.prompt_token_ids) + list(g.token_ids)
        assert batch["completion_mask"][row, :n].tolist() == [0] * len(g.prompt_token_ids) + [1] * len(g.token_ids)


def test_an_older_vllm_without_return_token_ids_gives_the_same_ids(servers, backend_for):
    modern, legacy = servers(), servers(legacy=True)
    expected = ids(backend_for(modern).generate(PROMPTS, params=GREEDY))
    backend = backend_for(legacy)
    backend.load_initial()
    assert ids(backend.generate(PROMPTS, params=GREEDY)) == expected
    assert backend.servers[0].client.legacy_ids  # switched to logprobs with return_tokens_as_token_ids


def test_an_adapter_above_max_lora_rank_is_refused_as_vllm_does(database, servers, backend_for, data_dir,
                                                              tiny_model_dir):
    """vLLM answers HTTP 500 for a rank above --max-lora-rank; the server is fine, the adapter is not."""
    server = servers(max_lora_rank=8)
    backend = backend_for(server)
    backend.load_initial()
    write_adapter(tiny_model_dir, data_dir, 16, lora=LoraSettings(r=16, alpha=32, dropout=0.0))
    commit(database, 16, 0)
    with pytest.raises(VllmError, match="refused adapter v16.*LoRA rank 16 is greater than max_lora_rank 8"):
        backend.poll_once()
    assert backend.serving_version == 0 and backend.servers_state()[0]["up"]


def test_no_server_up_is_one_line_per_retry_without_a_traceback(database, servers, backend_for, tokenizer, caplog):
    """A server serving another model (say, a different --served-model-name) and a server that is
    gone: the sampler and the backend say so in single lines that tell when they try again."""
    wrong, gone = servers(), servers()
    wrong.name = "another-model"
    gone.kill()
    backend = backend_for(wrong, gone, retry_base_s=0.2, retry_max_s=1.0)
    records = sampler_log_while_refused(database, backend, tokenizer, caplog, seconds=3.0)
    warnings = [r.getMessage() for r in records if r.levelno >= logging.WARNING]
    assert warnings and not [r for r in records if r.exc_info], [r.getMessage() for r in records]
    assert all(re.search(r"(next try|retrying) in \d", w) and "\n" not in w for w in warnings), warnings
    assert any("--served-model-name tiny" in w for w in warnings) and any("unreachable" in w for w in warnings)
    assert any(w.startswith("sampling paused: no vLLM server is up") for w in warnings), warnings
    states = backend.servers_state()  # the dashboard's per-server lines: down, why, next try
    assert [s["up"] for s in states] == [False, False] and all(s["next_retry_in_s"] is not None for s in states)
