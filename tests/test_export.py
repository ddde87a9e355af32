"""Exports round-trip: the adapter loads in PEFT with the live policy's logits, the merged model
loads in transformers with base+adapter logits, the dataset reloads with `datasets` holding exactly
the labeled a/b pairs; bad requests are clear errors that write nothing."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from click.testing import CliRunner

from odpo.app.cli import cli
from odpo.db import store
from odpo.trainer.export.exporters import ExportError, export_adapter, export_dataset, export_merged
from odpo.trainer.policy import checkpoint as ckpt
from odpo.trainer.policy.loading import load_model_and_tokenizer
from odpo.trainer.policy.lora import LoraSettings, attach_lora
from tests.db_helpers import label_all, make_pairs
from tests.model_fixtures import tiny_model_config

torch.set_num_threads(1)


def perturb(model, seed: int) -> None:
    """Non-zero LoRA weights (B included), as training would leave them."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.05)


def commit_version(db, *, policy, adapters_dir, version: int, model_spec: str, run: str = "default",
                   label_ids=(), parent: int = 0) -> str:
    """Write `policy`'s adapter as version `version` and commit its row, consuming `label_ids`."""
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-3)
    path = ckpt.write_version(model=policy, optimizer=opt, adapters_dir=adapters_dir, version=version,
                              state={"version": version, "hyperparameters": {"model": model_spec}})
    with db.sessions.begin() as s:
        store.commit_adapter_version(s, run=run, version=version, path=str(path), parent=parent or None,
                                     step=version * 2, label_steps={lid: version for lid in label_ids},
                                     metrics={"loss": 0.61, "reward_accuracy": 0.75})
    return str(path)


@pytest.fixture
def policy(tiny_model_dir, tmp_path):
    model, tokenizer = load_model_and_tokenizer(tiny_model_config(tiny_model_dir, tmp_path / "models"))
    torch.manual_seed(0)
    peft_model = attach_lora(model, LoraSettings(r=4, alpha=8, dropout=0.0))
    perturb(peft_model, 1)
    peft_model.eval()
    return peft_model, tokenizer


@pytest.fixture
def versioned(database, policy, tiny_model_dir, tmp_path):
    """v1 committed with 4 human labels trained into it; the policy holds v1's weights."""
    peft_model, tokenizer = policy
    make_pairs(database, 4)
    label_ids = label_all(database, "alice", "a")
    commit_version(database, policy=peft_model, adapters_dir=tmp_path / "adapters", version=1,
                   model_spec=str(tiny_model_dir), label_ids=label_ids)
    return peft_model, tokenizer


def logits_of(model, tokenizer, text="The cat looks at the green hill."):
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        return model(input_ids=ids).logits


def test_adapter_export_loads_in_peft_with_the_same_logits(database, versioned, tiny_model_dir, tmp_path):
    from peft import PeftModel

    peft_model, tokenizer = versioned
    out = export_adapter(database, out=tmp_path / "export" / "adapter")
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] and config["r"] == 4
    fresh, _ = load_model_and_tokenizer(tiny_model_config(tiny_model_dir, tmp_path / "models"))
    loaded = PeftModel.from_pretrained(fresh, str(out)).eval()
    assert torch.equal(logits_of(loaded, tokenizer), logits_of(peft_model, tokenizer))
    card = (out / "README.md").read_text()
    assert f"Base model: `{tiny_model_dir}`" in card and "- human: 4" in card and "reward_accuracy: 0.75" in card
    assert not list((tmp_path / "export").glob(".*tmp"))


def test_merged_export_matches_base_plus_adapter(database, versioned, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    peft_model, tokenizer = versioned
    out = export_merged(database, out=tmp_path / "merged", cache_dir=tmp_path / "models")
    merged = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert not any("lora" in name for name, _ in merged.named_parameters())
    torch.testing.assert_close(logits_of(merged, tokenizer), logits_of(peft_model, tokenizer), atol=1e-5, rtol=1e-4)
    reloaded = AutoTokenizer.from_pretrained(str(out))
    chat = [{"role": "user", "content": "hi"}]
    assert reloaded.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == \
        tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert "library_name: transformers" in (out / "README.md").read_text()


def test_export_refuses_and_writes_nothing(database, versioned, tmp_path, monkeypatch):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="not an empty directory"):
        export_adapter(database, out=busy)
    assert [p.name for p in busy.iterdir()] == ["keep.txt"]
    with pytest.raises(ExportError, match=r"no adapter version v7 in run 'default' \(versions: v1\)"):
        export_adapter(database, out=tmp_path / "x", version=7)
    with pytest.raises(ExportError, match="base model itself"):
        export_adapter(database, out=tmp_path / "x", version=0)
    with pytest.raises(ExportError, match="no adapter version yet in run 'other'"):
        export_adapter(database, out=tmp_path / "x", run="other")

    def broken_copy(*_a, **_k):
        raise OSError("disk full")

    monkeypatch.setattr(shutil, "copyfile", broken_copy)
    with pytest.raises(OSError, match="disk full"):
        export_adapter(database, out=tmp_path / "half")
    assert sorted(p.name for p in tmp_path.iterdir() if "half" in p.name) == []
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.undo()
    assert (export_adapter(database, out=empty) / "adapter_model.safetensors").is_file()


def _label(db, labeler, choice, *, source="human"):
    """Claim the next pair as `labeler` and answer it; returns (pair_id, label_id, truth) where
    truth is the (prompt, chosen, rejected) an a/b choice means, read straight from the rows."""
    from odpo.db.models import Pair, Prompt, Sample

    with db.sessions.begin() as s:
        claimed = store.claim_next_pair(s, labeler=labeler)
        label = store.record_label(s, assignment_id=claimed.assignment_id, labeler=labeler, choice=choice,
                                   source=source, confidence=0.9 if source != "human" else None)
        pair = s.get(Pair, claimed.pair_id)
        a, b = s.get(Sample, pair.sample_a_id).text, s.get(Sample, pair.sample_b_id).text
        prompt = s.get(Prompt, pair.prompt_id).text
    truth = (prompt, a, b, labeler) if choice == "a" else (prompt, b, a, labeler)
    return claimed.pair_id, label.id, truth


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_dataset_export_reloads_with_exactly_the_labeled_pairs(database, tmp_path, suffix):
    from datasets import load_dataset

    make_pairs(database, 7, labels_wanted=2)  # a person and a judge may both label a pair
    human = [_label(database, "alice", c) for c in ("a", "b", "tie", "both_bad", "skip", "a")]
    with database.sessions.begin() as s:  # an undone vote is not exported (its pair is on screen again)
        store.undo_label(s, label_id=human[-1][1], labeler="alice")
    judge = "judge:rule:shorter"
    judged = [_label(database, judge, c, source=judge) for c in ("b", "a", "a", "a", "a", "a")]
    assert [p for p, _, _ in judged] == [1, 2, 3, 4, 5, 7]
    # Alice's opinions (a, b, tie, both_bad on pairs 1-4) override the judge there; her skip does not.
    want_human = [human[0][2], human[1][2]]
    want_judge = [judged[4][2], judged[5][2]]
    out = tmp_path / f"prefs{suffix}"
    n = export_dataset(database, out=out, sources="all")
    ds = load_dataset("json" if suffix == ".jsonl" else "parquet", data_files=str(out), split="train")
    got = [(r["prompt"][0]["content"], r["chosen"][0]["content"], r["rejected"][0]["content"], r["labeler"])
           for r in ds]
    assert n == len(ds) == 4 and got == want_human + want_judge  # label order
    row = ds[0]
    assert row["prompt"][0]["role"] == "user" and row["chosen"][0]["role"] == "assistant"
    assert row["rejected"][0]["role"] == "assistant" and row["source"] == "human" and row["adapter_version"] == 0
    assert row["shown_at"] and row["answered_at"] and row["judge_confidence"] is None
    assert [r["judge_confidence"] for r in ds][2:] == [0.9, 0.9]
    assert export_dataset(database, out=tmp_path / f"human{suffix}", sources="human") == 2
    with pytest.raises(ExportError, match="already exists; use --force"):
        export_dataset(database, out=out)
    assert export_dataset(database, out=out, sources="judge", overwrite=True) == 2


def test_dataset_export_errors(database, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ExportError, match="no labeled a/b pairs"):
        export_dataset(database, out=out / "x.jsonl")
    with pytest.raises(ExportError, match=".jsonl or .parquet"):
        export_dataset(database, out=out / "x.csv")
    with pytest.raises(ExportError, match="unknown source"):
        export_dataset(database, out=out / "x.jsonl", sources="robots")
    assert not out.exists() or list(out.iterdir()) == []


def test_cli_export(common_config, database, versioned, tmp_path):
    base = ["--data-dir", str(common_config.data_dir), "--db", common_config.db_url, "export"]
    runner = CliRunner()
    ok = runner.invoke(cli, [*base, "adapter", "--version", "1", str(tmp_path / "a")])
    assert ok.exit_code == 0, ok.output
    assert (tmp_path / "a" / "adapter_config.json").is_file()
    again = runner.invoke(cli, [*base, "adapter", str(tmp_path / "a")])
    assert again.exit_code == 1 and "not an empty directory" in again.output and "Traceback" not in again.output
    missing = runner.invoke(cli, [*base, "merged", "--version", "9", str(tmp_path / "m")])
    assert missing.exit_code == 1 and "no adapter version v9" in missing.output
    data = runner.invoke(cli, [*base, "dataset", str(tmp_path / "d.jsonl"), "--source", "human"])
    assert data.exit_code == 0 and "4 preference pairs" in data.output
    assert len((tmp_path / "d.jsonl").read_text().splitlines()) == 4


def test_export_for_the_admin_tab(database, versioned, tmp_path):
    import zipfile

    from odpo.trainer.export.exporters import export_for_ui

    jsonl = export_for_ui(db=database, fmt="jsonl", out_dir=tmp_path / "ui")
    assert jsonl.name == "odpo-preferences.jsonl" and len(jsonl.read_text().splitlines()) == 4
    archive = export_for_ui(db=database, fmt="hf", out_dir=tmp_path / "ui")
    assert archive.name == "odpo-adapter-v1.zip"
    names = set(zipfile.ZipFile(archive).namelist())
    assert {"odpo-adapter-v1/adapter_config.json", "odpo-adapter-v1/adapter_model.safetensors",
            "odpo-adapter-v1/README.md"} <= names
    with pytest.raises(ExportError, match="unknown export format"):
        export_for_ui(db=database, fmt="gguf", out_dir=tmp_path / "ui")


def test_dataset_export_says_which_version_of_the_given_run_trained_each_label(database, tmp_path):
    make_pairs(database, 2)
    (_, first, _), (_, second, _) = (_label(database, "alice", "a"), _label(database, "alice", "b"))
    with database.sessions.begin() as s:  # run "exp" trained the first label into its v1; "default" nothing
        store.commit_adapter_version(s, run="exp", version=1, path="/x/v1", parent=None, step=1,
                                     label_steps={first: 1}, metrics={})
    used = {}
    for run in ("exp", "default"):
        out = tmp_path / f"{run}.jsonl"
        export_dataset(database, out=out, run=run)
        used[run] = {r["label_id"]: r["consumed_version"] for r in map(json.loads, out.read_text().splitlines())}
    assert used == {"exp": {first: 1, second: None}, "default": {first: None, second: None}}
