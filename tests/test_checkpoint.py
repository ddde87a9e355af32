"""Adapter version directories: atomic writes, crash leftovers, in-place loading (trainer/policy/checkpoint.py)."""
from __future__ import annotations

import json

import pytest
import torch

from odpo.trainer.policy import checkpoint as ckpt
from odpo.trainer.policy.lora import LoraSettings, attach_lora

torch.set_num_threads(1)


@pytest.fixture
def peft_model(tiny_model_and_tokenizer):
    model, _ = tiny_model_and_tokenizer
    torch.manual_seed(0)
    return attach_lora(model, LoraSettings(r=4, alpha=8, dropout=0.0))


def _lora_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def _perturb(model, seed: int) -> None:
    """Give every LoRA weight (B included) a non-zero value, as training would."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.05)


def _optimizer(model) -> torch.optim.AdamW:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    loss = sum((p ** 2).sum() for p in model.parameters() if p.requires_grad) + 1.0
    loss.backward()
    opt.step()
    return opt


def test_write_version_is_complete_and_leaves_no_tmp(peft_model, tmp_path):
    _perturb(peft_model, 1)
    opt = _optimizer(peft_model)
    path = ckpt.write_version(model=peft_model, optimizer=opt, adapters_dir=tmp_path, version=3,
                              state={"version": 3, "label_ids": [1, 2]})
    assert path == tmp_path / "v3"
    assert ckpt.is_complete_version_dir(path)
    assert not (tmp_path / "v3.tmp").exists()
    assert ckpt.read_trainer_state(path)["label_ids"] == [1, 2]
    assert ckpt.committed_dir_problem(str(path)) is None
    assert ckpt.committed_dir_problem(str(tmp_path / "v3.tmp")) is not None


def test_failed_save_never_publishes_a_version(peft_model, tmp_path, monkeypatch):
    opt = _optimizer(peft_model)

    def broken_save(*_a, **_k):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.torch, "save", broken_save)
    with pytest.raises(OSError):
        ckpt.write_version(model=peft_model, optimizer=opt, adapters_dir=tmp_path, version=1, state={})
    assert not (tmp_path / "v1").exists()
    assert not (tmp_path / "v1.tmp").exists()  # a failed write cleans up after itself (a full disk stays full)
    assert list(tmp_path.iterdir()) == []


def test_a_killed_writes_leftover_is_cleaned_on_the_next_start(tmp_path):
    (tmp_path / "v1.tmp").mkdir()  # what kill -9 in the middle of write_version leaves
    (tmp_path / "v1.tmp" / "adapter_model.safetensors").write_bytes(b"half")
    assert ckpt.clean_adapters_dir(tmp_path, committed=[]) == [tmp_path / "v1.tmp"]
    assert list(tmp_path.iterdir()) == []


def test_clean_removes_tmp_and_rowless_dirs_only(tmp_path):
    for name in ("v1", "v2", "v3", "v3.tmp", "v4.tmp", "vX", "notes"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "junk").write_text("x")
    (tmp_path / "v5").write_text("a file, not a version dir")
    removed = ckpt.clean_adapters_dir(tmp_path, committed=[1, 2])
    assert sorted(p.name for p in removed) == ["v3", "v3.tmp", "v4.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes", "v1", "v2", "v5", "vX"]


def test_write_version_replaces_an_uncommitted_dir_of_the_same_number(peft_model, tmp_path):
    stale = tmp_path / "v2"
    stale.mkdir()
    (stale / "adapter_model.safetensors").write_text("garbage from a crashed run")
    path = ckpt.write_version(model=peft_model, optimizer=_optimizer(peft_model), adapters_dir=tmp_path,
                              version=2, state={"version": 2})
    assert ckpt.is_complete_version_dir(path)
    ckpt.load_adapter_into(peft_model, path)  # the garbage file would not parse


def test_load_adapter_into_copies_in_place(peft_model, tmp_path):
    _perturb(peft_model, 1)
    opt = _optimizer(peft_model)
    saved = _lora_state(peft_model)
    path = ckpt.write_version(model=peft_model, optimizer=opt, adapters_dir=tmp_path, version=1, state={})
    _perturb(peft_model, 2)
    params_before = {n: p for n, p in peft_model.named_parameters() if "lora_" in n}
    assert not torch.equal(params_before[next(iter(saved))], saved[next(iter(saved))])
    ckpt.load_adapter_into(peft_model, path)
    for name, param in peft_model.named_parameters():
        if "lora_" in name:
            assert param is params_before[name], "parameters must keep their identity (in-place copy)"
            assert torch.equal(param, saved[name]), name


def test_load_adapter_into_rejects_a_different_rank(tiny_model_dir, peft_model, tmp_path):
    from odpo.trainer.policy.loading import load_model_and_tokenizer
    from tests.model_fixtures import tiny_model_config

    other, _ = load_model_and_tokenizer(tiny_model_config(tiny_model_dir, tmp_path / "models"))
    other = attach_lora(other, LoraSettings(r=8, alpha=16, dropout=0.0))
    ckpt.write_version(model=other, optimizer=_optimizer(other), adapters_dir=tmp_path, version=1, state={})
    with pytest.raises(ckpt.AdapterLoadError, match="does not fit"):
        ckpt.load_adapter_into(peft_model, tmp_path / "v1")
    with pytest.raises(ckpt.AdapterLoadError, match="no adapter_model"):
        ckpt.load_adapter_into(peft_model, tmp_path)


def test_read_lora_settings_round_trip(peft_model, tmp_path):
    path = ckpt.write_version(model=peft_model, optimizer=_optimizer(peft_model), adapters_dir=tmp_path,
                              version=1, state={})
    settings = ckpt.read_lora_settings(path)
    assert (settings.r, settings.alpha, settings.dropout) == (4, 8, 0.0)
    config = json.loads((path / "adapter_config.json").read_text())
    assert sorted(settings.target_modules) == sorted(config["target_modules"])


def test_optimizer_state_round_trip(peft_model, tmp_path):
    opt = _optimizer(peft_model)
    path = ckpt.write_version(model=peft_model, optimizer=opt, adapters_dir=tmp_path, version=1, state={})
    fresh = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-3)
    ckpt.load_optimizer_state(fresh, path)
    first = next(p for p in peft_model.parameters() if p.requires_grad)
    assert torch.equal(fresh.state[first]["exp_avg_sq"], opt.state[first]["exp_avg_sq"])
    assert float(fresh.state[first]["step"]) == 1.0


def test_reset_adapter_is_the_base_policy_and_seeded(peft_model):
    _perturb(peft_model, 3)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    ckpt.reset_adapter(peft_model, seed=7)
    assert ckpt.adapter_weights_norm(peft_model) == 0.0
    first_a = _lora_state(peft_model)
    with torch.no_grad():
        live = peft_model(input_ids=ids).logits
        with peft_model.disable_adapter():
            base = peft_model(input_ids=ids).logits
    assert torch.equal(live, base)
    _perturb(peft_model, 4)
    ckpt.reset_adapter(peft_model, seed=7)
    assert all(torch.equal(v, _lora_state(peft_model)[k]) for k, v in first_a.items())
