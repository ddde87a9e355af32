"""QLoRA (--load-in-4bit) on CPU, end to end on the tiny model: the base loads as bitsandbytes NF4,
a DPO step trains only the adapter, a version trained in 4-bit hot-swaps (and rolls back) into a
4-bit sampler exactly as a fresh load of it, and the exports round-trip (the merge goes into the
full-precision weights). The compute dtype is fp32 here so every number is exact on every CPU."""
from __future__ import annotations

import threading

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed, so the 4-bit (QLoRA) path "
                                                 "cannot run; `pip install bitsandbytes` to test it")

from odpo.db import store  # noqa: E402 - after the skip: without bitsandbytes nothing below matters
from odpo.trainer.export.exporters import export_adapter, export_merged  # noqa: E402
from odpo.trainer.policy import loading as models  # noqa: E402
from odpo.trainer.policy.batching import PairExample  # noqa: E402
from odpo.trainer.policy.loading import ModelConfig, QLoRAUnavailableError, load_model_and_tokenizer  # noqa: E402
from odpo.trainer.policy.lora import LoraSettings, attach_lora  # noqa: E402
from odpo.trainer.sampling.hotreload import ReloadWatcher  # noqa: E402
from odpo.trainer.training.loop import DPOTrainer  # noqa: E402
from odpo.trainer.training.step import dpo_step, make_optimizer  # noqa: E402
from odpo.trainer.training.train_config import TrainConfig  # noqa: E402
from tests.db_helpers import label_all, make_pairs  # noqa: E402
from tests.model_fixtures import tiny_model_config  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LORA = LoraSettings(r=4, alpha=8, dropout=0.0)
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
EXAMPLES = [
    PairExample(prompt="Where is the cat?", chosen="The cat waits near the green hill.",
                rejected="A small robot opens the open window and talks about a quiet morning."),
    PairExample(prompt="Say something.", chosen="The river runs across the blue sky.",
                rejected="Every student remembers the last page of the long question."),
]


def four_bit(model_dir, cache_dir) -> ModelConfig:
    return ModelConfig(spec=str(model_dir), cache_dir=cache_dir, device="cpu", dtype="fp32", load_in_4bit=True)


def logits(model, tokenizer, text: str = "The cat looks at the green hill.") -> torch.Tensor:
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        return model(input_ids=ids).logits


def frozen_state(model) -> dict[str, torch.Tensor]:
    """Every non-LoRA tensor, the packed NF4 bytes and their block scales included."""
    out = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    for name, module in model.named_modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is not None:
            out[f"{name}.absmax"] = state.absmax.clone()
    return out


# --- loading -------------------------------------------------------------------------------------


def test_every_linear_but_lm_head_loads_as_nf4_on_cpu(tiny_model_dir, tmp_path):
    full, _ = load_model_and_tokenizer(tiny_model_config(tiny_model_dir, tmp_path))
    model, tokenizer = load_model_and_tokenizer(four_bit(tiny_model_dir, tmp_path))
    for layer in model.model.layers:
        for name in LINEARS:
            linear = getattr(layer.self_attn, name, None) or getattr(layer.mlp, name)
            assert isinstance(linear, bnb.nn.Linear4bit), name
            state = linear.weight.quant_state
            assert (state.quant_type, state.nested, linear.compute_dtype) == ("nf4", True, torch.float32)
    assert not isinstance(model.lm_head, bnb.nn.Linear4bit)
    assert model.model.embed_tokens.weight.dtype == torch.float32  # unquantized weights keep the device dtype

    def nbytes(m) -> int:
        return sum(p.numel() * p.element_size() for p in m.parameters())

    assert nbytes(model) < 0.6 * nbytes(full)
    # NF4 is an approximation of the same network: close to the fp32 logits, not equal to them
    approx, exact = logits(model, tokenizer).flatten(), logits(full, tokenizer).flatten()
    assert not torch.equal(approx, exact) and torch.cosine_similarity(approx, exact, dim=0) > 0.95
    out = model.generate(**tokenizer(["The cat"], return_tensors="pt"), max_new_tokens=4, do_sample=False)
    assert out.shape[1] > 2


def test_a_4bit_load_lets_go_of_the_full_precision_checkpoint(tiny_model_dir, tmp_path):
    """Quantizing reads the whole fp32 file through a memory map; an unquantized weight left as a
    view into it would keep all those pages resident (1.1 GiB RSS instead of 0.6 on the default model)."""
    import gc
    import shutil
    from pathlib import Path

    maps = Path("/proc/self/maps")
    if not maps.is_file():
        pytest.skip("no /proc/self/maps to read mappings from")
    own = shutil.copytree(tiny_model_dir, tmp_path / "own-copy")  # a path no other test maps
    full, _ = load_model_and_tokenizer(tiny_model_config(own, tmp_path))
    gc.collect()
    assert str(own / "model.safetensors") in maps.read_text()  # fp32: the mapping is the storage
    del full
    model, tokenizer = load_model_and_tokenizer(four_bit(own, tmp_path))
    gc.collect()
    assert str(own / "model.safetensors") not in maps.read_text()
    assert logits(model, tokenizer).isfinite().all()


def test_copying_weights_out_of_the_checkpoint_keeps_tied_ones_tied():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    before = model.lm_head.weight.data_ptr()
    models.own_unquantized_weights(model)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr() != before


@pytest.mark.parametrize("native, dtype, expected", [(True, "auto", torch.bfloat16), (False, "auto", torch.float32),
                                                     (True, "fp32", torch.float32), (False, "bf16", torch.bfloat16)])
def test_compute_dtype_follows_the_device(monkeypatch, native, dtype, expected):
    monkeypatch.setattr(models, "cpu_has_native_bf16", lambda *_a: native)
    assert models.four_bit_compute_dtype(torch.device("cpu"), dtype) is expected


def test_where_bitsandbytes_cannot_run_4bit_the_error_names_its_version(tiny_model_dir, tmp_path, monkeypatch):
    def no_kernel(*_a, **_k):
        raise NotImplementedError("no kernel registered for device cpu\nsecond line")

    monkeypatch.setattr(bnb.functional, "quantize_4bit", no_kernel)
    with pytest.raises(QLoRAUnavailableError) as caught:
        load_model_and_tokenizer(four_bit(tiny_model_dir, tmp_path))
    message = str(caught.value)
    assert f"bitsandbytes {bnb.__version__} cannot run 4-bit NF4 on cpu (no kernel registered" in message
    assert "\n" not in message and "drop --load-in-4bit" in message
    assert isinstance(caught.value, ValueError)  # callers' `except ValueError` one-liners still apply

    monkeypatch.setitem(__import__("sys").modules, "bitsandbytes", None)  # what an absent package looks like
    with pytest.raises(QLoRAUnavailableError, match="needs the bitsandbytes package, which is not installed"):
        load_model_and_tokenizer(four_bit(tiny_model_dir, tmp_path))


# --- training ------------------------------------------------------------------------------------


def test_a_4bit_dpo_step_changes_only_adapter_weights_and_lowers_the_loss(tiny_model_dir, tmp_path):
    model, tokenizer = load_model_and_tokenizer(four_bit(tiny_model_dir, tmp_path))
    torch.manual_seed(0)
    peft_model = attach_lora(model, LORA)
    cfg = TrainConfig(model=str(tiny_model_dir), device="cpu", dtype="fp32", batch_size=4, lr=1e-3, lora=LORA,
                      load_in_4bit=True)
    frozen = frozen_state(peft_model)
    lora_before = {n: p.detach().clone() for n, p in peft_model.named_parameters() if "lora_" in n}
    optimizer = make_optimizer(peft_model, cfg)
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == \
        {id(p) for n, p in peft_model.named_parameters() if "lora_" in n}
    history = [dpo_step(model=peft_model, tokenizer=tokenizer, optimizer=optimizer, examples=EXAMPLES, cfg=cfg)
               for _ in range(5)]
    after = frozen_state(peft_model)
    assert all(torch.equal(after[name], value) for name, value in frozen.items())
    assert all(not torch.equal(p, lora_before[n]) for n, p in peft_model.named_parameters() if "lora_B" in n)
    losses = [m["loss"] for m in history]
    assert losses[0] == pytest.approx(0.6931, abs=1e-4)  # log 2: policy == reference at v0
    assert all(b < a for a, b in zip(losses, losses[1:], strict=False)), losses
    assert history[-1]["reward_accuracy"] == 1.0


# --- the loop: trainer, hot reload, rollback, exports ---------------------------------------------


@pytest.fixture
def trained_4bit(database, tiny_model_dir, tmp_path):
    """A --load-in-4bit trainer that committed v1 and v2, each on 4 labeled pairs."""
    cfg = TrainConfig(model=str(tiny_model_dir), device="cpu", dtype="fp32", batch_size=4, lr=5e-3, lora=LORA,
                      load_in_4bit=True, poll_seconds=0.02, exit_when_idle=0.0)
    trainer = DPOTrainer(cfg, db=database, adapters_dir=tmp_path / "runs" / "default" / "adapters",
                         model_cache_dir=tmp_path / "models")
    trainer.start()
    for version in (1, 2):
        make_pairs(database, 4, version=version - 1)
        label_all(database, "alice", "a" if version == 1 else "b")
        assert trainer.train_available() and trainer.version == version
    yield trainer
    trainer.close()


def committed_path(database, version: int):
    with database.sessions() as s:
        return store.get_adapter(s, version=version, run="default").path


def fresh_4bit_policy(model_dir, cache_dir, adapter_path):
    from peft import PeftModel

    base, tokenizer = load_model_and_tokenizer(four_bit(model_dir, cache_dir))
    return PeftModel.from_pretrained(base, str(adapter_path)).eval(), tokenizer


def test_a_version_trained_in_4bit_hot_swaps_into_a_4bit_sampler_like_a_fresh_load(
        database, trained_4bit, tiny_model_dir, tmp_path):
    from odpo.trainer.sampling.generation import SamplingParams
    from odpo.trainer.sampling.sampler import Sampler, SamplerSettings

    assert trained_4bit.model.base_model.model.is_loaded_in_4bit
    base, tokenizer = load_model_and_tokenizer(four_bit(tiny_model_dir, tmp_path))
    served = attach_lora(base, LORA).eval()
    base_logits = logits(served, tokenizer)
    sampler = Sampler(db=database, model=served, tokenizer=tokenizer, settings=SamplerSettings(
        queue_size=2, prompts_per_batch=2, poll_s=0.05, params=SamplingParams(max_new_tokens=4, seed=0)))
    expected = {v: logits(fresh_4bit_policy(tiny_model_dir, tmp_path, committed_path(database, v))[0], tokenizer)
                for v in (1, 2)}
    assert not torch.equal(expected[1], expected[2]) and not torch.equal(expected[1], base_logits)

    result = sampler.watcher.poll_once()
    assert (result.from_version, result.to_version) == (0, 2)
    assert torch.equal(logits(served, tokenizer), expected[2])
    assert torch.equal(logits(served, tokenizer), logits(trained_4bit.model, tokenizer))  # trainer == sampler
    assert sampler.step() == 2  # sampling on the 4-bit base, stamped with the version it serves
    with database.sessions.begin() as s:
        store.rollback_to(s, version=1)
    assert sampler.watcher.poll_once().to_version == 1
    assert torch.equal(logits(served, tokenizer), expected[1])
    with database.sessions.begin() as s:
        store.rollback_to(s, version=0)
    sampler.watcher.poll_once()
    assert torch.equal(logits(served, tokenizer), base_logits)


def test_a_4bit_watcher_swaps_in_place_without_touching_the_nf4_base(database, trained_4bit, tiny_model_dir, tmp_path):
    base, tokenizer = load_model_and_tokenizer(four_bit(tiny_model_dir, tmp_path))
    served = attach_lora(base, LORA).eval()
    frozen = frozen_state(served)
    watcher = ReloadWatcher(db=database, peft_model=served, lock=threading.Lock())
    assert watcher.load_initial() == 2
    after = frozen_state(served)
    assert all(torch.equal(after[n], v) for n, v in frozen.items() if "lora_" not in n)


def test_exports_of_a_4bit_version_round_trip(database, trained_4bit, tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    live, tokenizer = trained_4bit.model.eval(), trained_4bit.tokenizer
    out = export_adapter(database, out=tmp_path / "adapter", version=2)
    on_4bit, _ = fresh_4bit_policy(tiny_model_dir, tmp_path, out)
    assert torch.equal(logits(on_4bit, tokenizer), logits(live, tokenizer))
    full_base, _ = load_model_and_tokenizer(tiny_model_config(tiny_model_dir, tmp_path))
    base_logits = logits(full_base, tokenizer)
    on_full = PeftModel.from_pretrained(full_base, str(out)).eval()
    trained = {n.replace(".default", ""): p for n, p in live.named_parameters() if "lora_" in n}
    assert all(torch.equal(p, trained[n.replace(".default", "")])
               for n, p in on_full.named_parameters() if "lora_" in n)
    on_full_logits = logits(on_full, tokenizer)
    assert not torch.allclose(on_full_logits, base_logits)

    merged_dir = export_merged(database, out=tmp_path / "merged", version=2, cache_dir=tmp_path / "models")
    merged = AutoModelForCausalLM.from_pretrained(str(merged_dir)).eval()
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in merged.modules())
    torch.testing.assert_close(logits(merged, tokenizer), on_full_logits, atol=1e-5, rtol=1e-4)
    # merged into the original fp32 weights, not into dequantized NF4 ones
    q_live = live.base_model.model.model.layers[0].self_attn.q_proj
    delta = q_live.get_delta_weight("default")
    fp32_w = load_model_and_tokenizer(tiny_model_config(tiny_model_dir, tmp_path))[0].model.layers[0].self_attn.q_proj
    nf4_w = bnb.functional.dequantize_4bit(q_live.base_layer.weight.data, q_live.base_layer.weight.quant_state)
    merged_w = merged.model.layers[0].self_attn.q_proj.weight
    torch.testing.assert_close(merged_w, fp32_w.weight + delta, atol=1e-6, rtol=0)
    assert (merged_w - (nf4_w + delta)).abs().max() > 1e-3
    assert "full-precision (fp32) weights" in (merged_dir / "README.md").read_text()


# --- judges and eval on a 4-bit model ---------------------------------------------------------------


def test_the_hf_judge_runs_on_a_4bit_model(tiny_model_dir, tmp_path):
    from odpo.trainer.judges import JudgeOptions, load_judge

    judge = load_judge(f"hf:{tiny_model_dir}", JudgeOptions(cache_dir=tmp_path, device="cpu", dtype="fp32",
                                                            load_in_4bit=True, abstain_threshold=1.0))
    assert isinstance(judge.model.model.layers[0].mlp.down_proj, bnb.nn.Linear4bit)
    verdicts = judge.judge(["Where is the cat?"] * 2, ["The cat waits.", "A robot."], ["A robot.", "The cat waits."])
    assert [v.choice != "abstain" for v in verdicts] == [True, True]
    assert verdicts[0].p_a == pytest.approx(1 - verdicts[1].p_a, abs=1e-5)  # both orders, the same model
    judge.close()


def test_odpo_eval_runs_on_a_4bit_base(common_config, database, trained_4bit, monkeypatch):
    import json

    from click.testing import CliRunner

    from odpo.app.cli import cli

    loaded = []

    def spy(cfg):
        model, tokenizer = load_model_and_tokenizer(cfg)
        loaded.append((cfg.load_in_4bit, isinstance(model.model.layers[0].mlp.up_proj, bnb.nn.Linear4bit)))
        return model, tokenizer

    monkeypatch.setattr(models, "load_model_and_tokenizer", spy)
    with database.sessions.begin() as s:
        store.add_prompts(s, prompts=[store.NewPrompt(text=f"held out {i}", held_out=True) for i in range(3)])
    args = ["--data-dir", str(common_config.data_dir), "--db", common_config.db_url, "eval", "--a", "v2",
            "--b", "base", "--judge", "rule:shorter", "--n", "3", "--max-new-tokens", "4", "--device", "cpu",
            "--dtype", "fp32", "--load-in-4bit", "--json"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output[result.output.index('{"eval_id"'):])
    assert (summary["a"], summary["b"], summary["n"] + summary["abstained"]) == (2, 0, 3)
    assert loaded == [(True, True)]


# --- benchmarks: 4-bit beside full precision ------------------------------------------------------


def bench_ctx(common_config, tiny_model_dir, tmp_path):
    from odpo.bench.common import BenchContext

    return BenchContext(common=common_config, quick=True, model=str(tiny_model_dir), device="cpu", dtype="fp32",
                        out_dir=tmp_path / "results")


def test_train_step_bench_runs_a_4bit_side_and_reports_it_beside_full_precision(common_config, tiny_model_dir,
                                                                               tmp_path):
    from odpo.bench import train_step
    from odpo.bench.common import BenchResult
    from odpo.trainer.judges import load_judge

    side = train_step.OdpoSide(bench_ctx(common_config, tiny_model_dir, tmp_path), judge=load_judge("rule:shorter"),
                               batch=2, tokens=4, lr=1e-3, adapters_dir=tmp_path / "adapters", load_in_4bit=True)
    assert side.policy.model.base_model.model.is_loaded_in_4bit and side.cfg.load_in_4bit
    row = side.round(["Where is the cat?", "Say something."])
    assert row["pairs"] == 2.0 and row["loss"] == pytest.approx(0.6931, abs=1e-3) and row["dpo_step"] > 0

    full = [{"generate": 2.0, "judge": 0.0, "dpo_step": 1.0, "write_version": 0.5, "swap": 0.5}] * 2
    four = [{"generate": 3.0, "judge": 0.0, "dpo_step": 1.5, "write_version": 0.5, "swap": 0.5, "loss": 0.6}] * 2
    result = BenchResult(bench="train-step", quick=True)
    train_step.fill(result, odpo_rounds=full, trl_steps=[], batch=4)
    train_step.fill_4bit(result, full=full, four_bit=four, batch=4)
    m = result.metrics
    assert m["odpo_4bit_over_full_dpo_step"] == 1.5 and m["odpo_4bit_seconds_per_pair"] == 1.375
    assert m["odpo_4bit_over_full_per_pair"] == pytest.approx(1.375) and m["odpo_4bit_losses"] == [0.6, 0.6]
    assert ["odpo DPO step p50 (s): 4-bit NF4 vs full precision", "1.5 vs 1 = 1.5x"] in result.rows


def test_memory_bench_labels_each_mode_and_keeps_both(tmp_path):
    from odpo.bench import memory
    from odpo.bench.common import BenchResult, validate_result

    result = BenchResult(bench="memory", quick=True)
    for mode, train_kib in (("full", 4096 * 1024), ("4bit", 3072 * 1024)):
        tree = memory.TreeSampler(0)
        tree.peak_kib, tree.peak_total_kib, tree.samples = {"serve": 1024 * 1024, "train": train_kib}, train_kib, 3
        tree.last_kib = {"serve": 512 * 1024}
        memory.fill(result, tree, seconds=1.0, finished=True, code=0, tail="", mode=mode)
    assert result.metrics["train_peak_rss_mib"] == 4096.0
    assert result.metrics["load_in_4bit"]["train_peak_rss_mib"] == 3072.0
    assert ["peak RSS train (full precision)", "4,096 MiB"] in result.rows
    assert ["peak RSS train (4-bit NF4)", "3,072 MiB"] in result.rows
    assert ["RSS serve when last seen, after sampling (4-bit NF4)", "512 MiB"] in result.rows
    result.machine = {"cpu_model": "x", "cores": 2, "device": "cpu", "versions": {}}
    assert validate_result(result.to_dict()) == [] and result.status == "ok"


def test_learn_bench_runs_both_arms_on_a_4bit_base(common_config, tiny_model_dir, tmp_path, monkeypatch):
    from odpo.bench import learn

    loaded = []

    def spy(cfg):
        loaded.append(cfg.load_in_4bit)
        return load_model_and_tokenizer(cfg)

    monkeypatch.setattr(models, "load_model_and_tokenizer", spy)
    result = learn.run(bench_ctx(common_config, tiny_model_dir, tmp_path), rules=("rule:shorter",), budget=8,
                       modes=("online", "offline"), batch_size=4, max_new_tokens=4, eval_n=2, lr=1e-2,
                       load_in_4bit=True)
    assert loaded == [True] * 4  # sampler and trainer of both arms, each on its own 4-bit base
    assert result.params["load_in_4bit"] is True and "4-bit NF4" in result.notes[-1]
    for arm in result.metrics["arms"]:
        assert arm["labels_used"] == 8


def test_the_bench_and_product_commands_take_the_4bit_flags():
    from odpo.app.cli.eval import eval_cmd
    from odpo.app.cli.judge import judge
    from odpo.app.cli.serve import serve, up
    from odpo.app.cli.train import train
    from odpo.bench.cli import bench

    def flags(command) -> set[str]:
        return {opt for p in command.params for opt in p.opts}

    for command in (serve, up, train, eval_cmd, *(bench.commands[n] for n in ("memory", "train-step", "learn"))):
        assert "--load-in-4bit" in flags(command), command.name
    assert "--judge-load-in-4bit" in flags(judge) and "--judge-load-in-4bit" in flags(eval_cmd)


def test_odpo_up_passes_load_in_4bit_to_the_sampler_and_train():
    from odpo.app.cli.serve import up, up_children

    options = up.make_context("up", ["--load-in-4bit", "--model", "m"]).params
    serve_child, sample_child, train_child = up_children(options)
    assert "--load-in-4bit" in sample_child.args and "--load-in-4bit" in train_child.args
    assert "--load-in-4bit" not in serve_child.args  # serve holds no model
    inline = up.make_context("up", ["--load-in-4bit", "--inline-sampler"]).params
    serve_child, train_child = up_children(inline)
    assert "--load-in-4bit" in serve_child.args and "--load-in-4bit" in train_child.args


def test_memory_bench_files_a_child_under_its_role_once_it_has_exec_d(monkeypatch):
    """A trainer sampled between fork and exec shows `up`'s argv; its peak must not stay filed
    under "up" (that hid the train row of a 4-bit vs full-precision comparison)."""
    from odpo.bench import memory

    argv = {1: ["odpo", "up"], 2: ["odpo", "up"]}
    monkeypatch.setattr(memory, "_argv", lambda pid: argv[pid])
    tree = memory.TreeSampler(1)
    assert (tree._role(1), tree._role(2)) == ("up", "up")
    argv[2] = ["odpo", "--data-dir", "d", "train", "--load-in-4bit"]
    assert (tree._role(1), tree._role(2)) == ("up", "train")
    argv[2] = ["odpo", "up"]  # a pid's role, once real, is kept
    assert tree._role(2) == "train"
    status = {1: {"VmRSS": 100, "VmHWM": 120}, 2: {}}  # pid 2 exited between listing and reading
    monkeypatch.setattr(memory, "descendants", lambda root: [1, 2])
    monkeypatch.setattr(memory, "read_status_kib", lambda pid: status[pid])
    monkeypatch.setattr(memory, "gpu_memory_by_pid", dict)
    tree.sample()
    assert tree.peak_kib == {"up": 120} and tree.last_kib == {"up": 100}
