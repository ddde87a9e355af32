"""Multi-turn prompts: a prompt is a final user message plus the earlier turns of its conversation.

One representation end to end: rendering (chat template or plain transcript), the prompt key,
`odpo import dataset` and `odpo prompts import` of conversations (bad rows one line each), the
sampler continuing the conversation, the judge reading it, training batches of imported rows
holding the whole context, and `odpo export dataset` writing it back in TRL's conversational
format so that an import of the export gives the same conversation."""
from __future__ import annotations

import copy
import hashlib
import json

import pytest
from click.testing import CliRunner
from sqlalchemy import select
from transformers import AutoTokenizer

from odpo.app.services.dataset_import import DatasetFileError, import_dataset
from odpo.app.services.label_text import conversation_html
from odpo.app.services.labeling import LabelService
from odpo.app.services.prompt_files import PromptFileError, dedupe, held_out_split, parse_prompt_bytes
from odpo.app.ui.shared import pair_outputs
from odpo.db import store
from odpo.db.models import Prompt, Sample
from odpo.db.store.prompts import split_conversation
from odpo.trainer.evaluation.win_rate import eval_prompts
from odpo.trainer.export.exporters import dataset_rows, export_dataset
from odpo.trainer.judges import Verdict
from odpo.trainer.judges.worker import JudgeWorkerConfig, WorkerStats, judge_batch
from odpo.trainer.policy.batching import build_pair_batch, encode_prompt, prompt_token_ids, render_prompt, transcript
from odpo.trainer.training.on_policy import training_examples
from tests.db_helpers import sample

HISTORY = [
    {"role": "user", "content": "I want to visit Lisbon in May. Is that a good time?"},
    {"role": "assistant", "content": "Yes: May is warm and dry, with fewer crowds than summer."},
    {"role": "user", "content": "What should I pack?"},
    {"role": "assistant", "content": "Light layers, comfortable shoes for the hills, and a rain jacket."},
]
FINAL = "Which neighbourhood should I stay in?"
CONVERSATION = [*HISTORY, {"role": "user", "content": FINAL}]
THREE_TURN_ROW = {"prompt": CONVERSATION,
                  "chosen": [{"role": "assistant", "content": "Alfama or Baixa: central and walkable."}],
                  "rejected": [{"role": "assistant", "content": "Pack a rain jacket."}]}


@pytest.fixture(scope="module")
def chat_tokenizer(tiny_model_dir):
    """The tiny model's tokenizer: a real BPE with a ChatML template."""
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert tok.chat_template
    return tok


@pytest.fixture(scope="module")
def raw_tokenizer(chat_tokenizer):
    raw = copy.deepcopy(chat_tokenizer)
    raw.chat_template = None
    return raw


def write_jsonl(path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def add_conversation(db, messages=CONVERSATION, **kwargs) -> int:
    context, text = split_conversation(messages)
    with db.sessions.begin() as s:
        store.add_prompts(s, prompts=[store.NewPrompt(text=text, context=tuple(context), **kwargs)])
        return s.scalar(select(Prompt.id).where(Prompt.text_hash == store.prompt_hash(text, context)))


# --- rendering --------------------------------------------------------------------------------

def test_a_conversation_renders_through_the_chat_template_with_every_turn(chat_tokenizer):
    expected = chat_tokenizer.apply_chat_template(CONVERSATION, add_generation_prompt=True, tokenize=False)
    rendered = render_prompt(chat_tokenizer, CONVERSATION)
    assert rendered == expected
    assert all(m["content"] in rendered for m in CONVERSATION)
    assert rendered.endswith("<|im_start|>assistant\n")
    # a string stays one user turn, byte for byte as before conversations existed
    single = chat_tokenizer.apply_chat_template([{"role": "user", "content": FINAL}], add_generation_prompt=True,
                                                tokenize=False)
    assert render_prompt(chat_tokenizer, FINAL) == single
    ids = encode_prompt(chat_tokenizer, CONVERSATION)
    assert ids == chat_tokenizer(expected, add_special_tokens=False)["input_ids"]
    assert prompt_token_ids(chat_tokenizer, CONVERSATION, max_tokens=5) == ids[-5:]


def test_without_a_template_a_conversation_is_a_plain_transcript(raw_tokenizer):
    assert render_prompt(raw_tokenizer, FINAL) == FINAL
    assert render_prompt(raw_tokenizer, [{"role": "user", "content": FINAL}]) == FINAL
    lines = [f"{'User' if m['role'] == 'user' else 'Assistant'}: {m['content']}" for m in CONVERSATION]
    assert render_prompt(raw_tokenizer, CONVERSATION) == "\n\n".join(lines) + "\n\nAssistant:"
    assert transcript(CONVERSATION) == "\n\n".join(lines)
    assert encode_prompt(raw_tokenizer, CONVERSATION) == raw_tokenizer(render_prompt(raw_tokenizer, CONVERSATION))[
        "input_ids"]
    with pytest.raises(ValueError, match="must end with a user message"):
        render_prompt(raw_tokenizer, HISTORY)


# --- the prompt key and the conversation's shape ------------------------------------------------

def test_the_prompt_key_covers_the_earlier_turns(database):
    plain = hashlib.sha256(" ".join(FINAL.split()).casefold().encode()).hexdigest()
    assert store.prompt_hash(FINAL) == store.prompt_hash(FINAL, []) == plain  # single-turn keys unchanged
    other = [HISTORY[0], {"role": "assistant", "content": "No, go in October."}]
    assert store.prompt_hash(FINAL, HISTORY) not in (plain, store.prompt_hash(FINAL, other))
    shouty = [{**m, "content": "  " + m["content"].upper()} for m in HISTORY]
    assert store.prompt_hash(FINAL.upper(), shouty) == store.prompt_hash(FINAL, HISTORY)  # normalised like text
    new = [store.NewPrompt(text=FINAL), store.NewPrompt(text=FINAL, context=tuple(HISTORY)),
           store.NewPrompt(text=FINAL, context=tuple(other)),
           store.NewPrompt(text=FINAL.upper(), context=tuple(shouty))]
    with database.sessions.begin() as s:
        result = store.add_prompts(s, prompts=new)
    assert (result.added, result.duplicates) == (3, 1)
    with database.sessions() as s:
        rows = list(s.scalars(select(Prompt).order_by(Prompt.id)))
    assert [r.context for r in rows] == [None, HISTORY, other]
    assert rows[0].conditioning() == FINAL and rows[1].conditioning() == CONVERSATION == rows[1].messages()


@pytest.mark.parametrize("messages, problem", [
    (HISTORY, "must end with a user message"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "must alternate"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}, {"role": "user", "content": "c"}],
     "must alternate"),
    ([{"role": "tool", "content": "a"}, {"role": "user", "content": "b"}], "unknown role 'tool'"),
    ([{"role": "user", "content": 3}], "text 'content'"),
    ([], "non-empty list"),
])
def test_a_conversation_odpo_cannot_continue_is_refused(messages, problem):
    with pytest.raises(ValueError, match=problem):
        split_conversation(messages)


def test_a_system_message_may_open_the_conversation():
    context, text = split_conversation([{"role": "system", "content": "Be brief."}, *CONVERSATION])
    assert text == FINAL and context == [{"role": "system", "content": "Be brief."}, *HISTORY]


# --- import ---------------------------------------------------------------------------------------

def test_import_dataset_keeps_the_earlier_turns(database, tmp_path):
    implicit = {"chosen": [*CONVERSATION, {"role": "assistant", "content": "Alfama."}],
                "rejected": [*CONVERSATION, {"role": "assistant", "content": "Porto."}]}
    path = write_jsonl(tmp_path / "chat.jsonl", [THREE_TURN_ROW, implicit])
    report = import_dataset(database, path=path)
    assert (report.pairs, report.prompts_added, report.prompts_reused) == (2, 1, 0)  # one conversation, twice
    with database.sessions() as s:
        prompts = list(s.scalars(select(Prompt)))
    assert [(p.text, p.context) for p in prompts] == [(FINAL, HISTORY)]


def test_bad_conversation_rows_get_one_line_each(database, common_config, tmp_path):
    user, bot = (lambda c: {"role": "user", "content": c}), (lambda c: {"role": "assistant", "content": c})
    answer = {"chosen": [bot("a")], "rejected": [bot("b")]}
    bad = [THREE_TURN_ROW,
           {"prompt": [user("hi"), bot("hello")], **answer},
           {"prompt": [user("hi"), {"role": "narrator", "content": "x"}, user("again")], **answer},
           {"chosen": [user("hi"), user("again"), bot("a")], "rejected": [user("hi"), user("again"), bot("b")]}]
    path = write_jsonl(tmp_path / "bad.jsonl", bad)
    with pytest.raises(DatasetFileError, match="3 bad row") as err:
        import_dataset(database, path=path)
    assert err.value.problems == [
        "bad.jsonl:2: 'prompt': a conversation must end with a user message, got roles ['user', 'assistant']",
        "bad.jsonl:3: 'prompt': message 2: unknown role 'narrator'; expected one of system, user, assistant",
        "bad.jsonl:4: the shared messages of 'chosen' and 'rejected': after an optional first system message, user "
        "and assistant turns must alternate starting with a user turn, got roles ['user', 'user']"]
    from odpo.app.cli import cli

    config = ["--data-dir", str(common_config.data_dir), "--db", common_config.db_url]
    result = CliRunner().invoke(cli, [*config, "import", "dataset", path])
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "bad.jsonl:2: 'prompt': a conversation must end with a user message" in result.output


def test_prompt_files_read_messages_as_a_conversation():
    answered = {"messages": [*CONVERSATION, {"role": "assistant", "content": "Alfama."}], "tags": ["trip"]}
    data = "\n".join(json.dumps(o) for o in (answered, {"messages": CONVERSATION}, {"prompt": FINAL})).encode()
    records = parse_prompt_bytes(data, name="chat.jsonl", suffix=".jsonl")
    assert [(r.text, r.context_messages, r.tags) for r in records] == [
        (FINAL, tuple(HISTORY), ("trip",)), (FINAL, tuple(HISTORY), ()), (FINAL, (), ())]
    unique, duplicates = dedupe(records)
    assert duplicates == 1 and [r.context for r in unique] == [records[0].context, ()]
    assert records[0].key == store.prompt_hash(FINAL, HISTORY)
    in_split = [held_out_split(FINAL, 0.5, [{"role": "user", "content": f"question {i}"}]) for i in range(40)]
    assert any(in_split) and not all(in_split)  # the earlier turns decide the split, not the last line only
    bad = json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}).encode()
    with pytest.raises(PromptFileError) as err:
        parse_prompt_bytes(b'{"prompt": "ok"}\n' + bad, name="bad.jsonl", suffix=".jsonl")
    assert str(err.value).startswith("bad.jsonl, line 2: 'messages': after an optional first system message")
    assert "\n" not in str(err.value)


# --- sampling, judging, training ----------------------------------------------------------------

def test_the_sampler_continues_the_conversation(database, tiny_model_and_tokenizer, one_torch_thread):
    from tests.test_sampler import make_sampler

    model, tok = tiny_model_and_tokenizer
    add_conversation(database)
    sampler = make_sampler(database, model, tok, queue_size=1, prompts_per_batch=1)
    assert sampler.step() == 1
    with database.sessions() as s:
        stored = list(s.scalars(select(Sample)))
    expected = prompt_token_ids(tok, CONVERSATION, max_tokens=sampler.settings.params.max_prompt_tokens)
    assert len(stored) == 2 and all(row.prompt_token_ids == expected for row in stored)
    fed = tok.decode(stored[0].prompt_token_ids)
    assert all(m["content"] in fed for m in HISTORY) and fed.rstrip().endswith("assistant")


def test_held_out_conversations_are_evaluated_with_their_context(database):
    prompt_id = add_conversation(database, held_out=True)
    assert eval_prompts(database, n=2) == [(prompt_id, CONVERSATION)] * 2


class RecordingJudge:
    """Prefers a; remembers the requests it was shown."""

    spec, order_free = "py:tests.recording", True

    def __init__(self) -> None:
        self.prompts: list[str] = []

    def judge(self, prompts, responses_a, responses_b):
        self.prompts += list(prompts)
        return [Verdict("a") for _ in prompts]

    def close(self) -> None:
        pass


def test_a_judge_reads_the_earlier_turns(database):
    prompt_id = add_conversation(database)
    with database.sessions.begin() as s:
        store.add_pair(s, prompt_id=prompt_id, version=0, a=sample("Alfama."), b=sample("Porto."))
    judge = RecordingJudge()
    n = judge_batch(database, judge, config=JudgeWorkerConfig(), stats=WorkerStats(), labeler="judge:rec", limit=4)
    assert n == 1 and judge.prompts == [transcript(CONVERSATION)]
    assert all(m["content"] in judge.prompts[0] for m in CONVERSATION)


def test_a_training_batch_of_an_imported_conversation_holds_the_whole_context(database, chat_tokenizer, tmp_path):
    import_dataset(database, path=write_jsonl(tmp_path / "chat.jsonl", [THREE_TURN_ROW]))
    with database.sessions() as s:
        labels = store.trainable_labels(s, run="default", sources="dataset")
    examples = training_examples(database, labels)
    assert len(examples) == 1 and not examples[0].exact  # imported: re-tokenised from the prompt
    batch = build_pair_batch(chat_tokenizer, examples, max_prompt_tokens=1024)
    row = batch["input_ids"][0][(batch["attention_mask"][0] == 1) & (batch["completion_mask"][0] == 0)].tolist()
    assert row == encode_prompt(chat_tokenizer, CONVERSATION)
    assert all(m["content"] in chat_tokenizer.decode(row) for m in HISTORY)


# --- export and the page ------------------------------------------------------------------------

def test_export_writes_the_whole_conversation_and_imports_back(database, tmp_path):
    prompt_id = add_conversation(database)
    with database.sessions.begin() as s:
        store.add_prompts(s, prompts=[store.NewPrompt(text="Say hi.")])
        single = s.scalar(select(Prompt.id).where(Prompt.text == "Say hi."))
        store.add_pair(s, prompt_id=prompt_id, version=0, a=sample("Porto."), b=sample("Alfama."))
        store.add_pair(s, prompt_id=single, version=0, a=sample("Hi!"), b=sample("Bye."))
    for choice in ("b", "a"):
        with database.sessions.begin() as s:
            claimed = store.claim_next_pair(s, labeler="ann")
            store.record_label(s, assignment_id=claimed.assignment_id, labeler="ann", choice=choice)
    rows = dataset_rows(database)
    assert [(r["prompt"], r["chosen"], r["rejected"]) for r in rows] == [
        (CONVERSATION, [{"role": "assistant", "content": "Alfama."}], [{"role": "assistant", "content": "Porto."}]),
        ([{"role": "user", "content": "Say hi."}], [{"role": "assistant", "content": "Hi!"}],
         [{"role": "assistant", "content": "Bye."}])]
    out = tmp_path / "prefs.jsonl"
    assert export_dataset(database, out=out) == 2
    report = import_dataset(database, path=out, name="back")
    assert (report.pairs, report.prompts_added, report.prompts_reused) == (2, 0, 2)  # the same prompts
    with database.sessions() as s:
        back = store.trainable_labels(s, run="default", sources="dataset")
    assert [(lb.prompt, lb.chosen, lb.rejected) for lb in back] == [(CONVERSATION, "Alfama.", "Porto."),
                                                                   ("Say hi.", "Hi!", "Bye.")]


def test_the_label_page_shows_the_earlier_turns_collapsed_and_escaped(database, common_config):
    from odpo.app.config import ServeConfig

    tricky = [{"role": "user", "content": "Is <b>this</b> bold?\n\nTwo & more"},
              {"role": "assistant", "content": "No."}]
    prompt_id = add_conversation(database, [*tricky, {"role": "user", "content": FINAL}])
    with database.sessions.begin() as s:
        store.add_pair(s, prompt_id=prompt_id, version=2, a=sample("Alfama."), b=sample("Porto."))
    view = LabelService(db=database, config=ServeConfig()).current_pair(labeler="ann")
    assert view.prompt == FINAL and view.context == tricky and view.to_dict()["context"] == tricky
    html = conversation_html(view.context)
    assert html.startswith('<details class="odpo-context"><summary>Earlier conversation (2 turns)</summary>')
    assert "Is &lt;b&gt;this&lt;/b&gt; bold?<br><br>Two &amp; more" in html and "<b>" not in html
    assert "\n" not in html  # one line of markup, whatever the turns hold
    prompt_html, left, right = pair_outputs(view)  # the pair's header, the history, then the question
    head, history, question = prompt_html.partition(html)
    assert "pair" in head and history == html and question == f"<p>{FINAL}</p>\n" and (left, right) in (
        ("<p>Alfama.</p>\n", "<p>Porto.</p>\n"), ("<p>Porto.</p>\n", "<p>Alfama.</p>\n"))
    assert conversation_html(None) == "" and "<details" not in pair_outputs(
        view.__class__(**{**view.to_dict(), "context": None}))[0]
