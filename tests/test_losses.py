"""SimPO and APO-zero: the published formulas by hand, TRL as an independent reference, and SimPO's
promise of no reference pass, from `odpo train --loss simpo` down to the model's forward calls.

SimPO (Meng et al. 2024, Eq. 6):  -log sigmoid(beta/|y_w| log pi(y_w|x) - beta/|y_l| log pi(y_l|x) - gamma)
APO-zero (D'Oosterlinck et al. 2024, Eq. 7, plus 1):  1 - sigmoid(beta r_w) + sigmoid(beta r_l),
with r = log pi(y|x) - log ref(y|x) of whole sequences.
"""
from __future__ import annotations

import math
import random
import warnings
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner
from sqlalchemy import select

from odpo.db.models import TrainStep
from odpo.trainer.policy import checkpoint as ckpt
from odpo.trainer.policy.batching import PairExample, build_pair_batch, concatenated_forward
from odpo.trainer.policy.lora import LoraSettings, attach_lora
from odpo.trainer.training.losses import (
    LOSS_TYPES,
    SIMPO_DEFAULT_GAMMA,
    default_beta,
    dpo_loss,
    dpo_metrics,
    is_reference_free,
    needs_length_normalisation,
)
from odpo.trainer.training.step import dpo_step, make_optimizer
from odpo.trainer.training.train_config import TrainConfig, TrainConfigError
from tests.db_helpers import label_all, make_pairs

torch.set_num_threads(1)

EXAMPLES = [
    PairExample(prompt="Where is the cat?", chosen="The cat waits near the green hill.",
                rejected="A small robot opens the open window and talks about a quiet morning."),
    PairExample(prompt="Say something.", chosen="The river runs across the blue sky.",
                rejected="Every student remembers the last page of the long question."),
]


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def neg_logsigmoid(x: float) -> float:
    """-log sigmoid(x) = log(1 + e^-x), written out by hand."""
    return math.log1p(math.exp(-x))


def _random_logps(seed: int, n: int = 64, scale: float = 6.0) -> list[list[float]]:
    rng = random.Random(seed)
    return [[-rng.random() * scale for _ in range(n)] for _ in range(4)]


def _t(values: list[float], *, grad: bool = False) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64, requires_grad=grad)


# --- the formulas ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("beta", "gamma"), [(2.0, 1.0), (2.5, 0.3), (10.0, 5.0), (0.7, 0.0)])
def test_simpo_is_eq6_on_random_average_logps(beta, gamma):
    pc, pr, _, _ = _random_logps(seed=int(beta * 10 + gamma * 100))
    out = dpo_loss(policy_chosen_logps=_t(pc), policy_rejected_logps=_t(pr), beta=beta, loss_type="simpo",
                   simpo_gamma=gamma)
    expected = [neg_logsigmoid(beta * c - beta * r - gamma) for c, r in zip(pc, pr, strict=True)]
    torch.testing.assert_close(out.losses, _t(expected), rtol=1e-12, atol=1e-12)
    # The reward is the length-normalised log-prob scaled by beta: no reference anywhere.
    torch.testing.assert_close(out.chosen_rewards, beta * _t(pc), rtol=0, atol=0)
    torch.testing.assert_close(out.rejected_rewards, beta * _t(pr), rtol=0, atol=0)


def test_simpo_hand_values_and_defaults():
    assert (default_beta("simpo"), SIMPO_DEFAULT_GAMMA) == (2.0, 1.0)  # gamma/beta = 0.5, the authors' start
    assert default_beta("sigmoid") == 0.1
    # beta * (-1.0 - -1.5) - gamma = 2 * 0.5 - 1 = 0: exactly log 2
    at_margin = dpo_loss(policy_chosen_logps=_t([-1.0]), policy_rejected_logps=_t([-1.5]), beta=2.0, loss_type="simpo")
    assert at_margin.losses.item() == pytest.approx(math.log(2.0), rel=1e-15)
    # equal average log-probs still cost something: the margin gamma is not met
    tied = dpo_loss(policy_chosen_logps=_t([-2.0]), policy_rejected_logps=_t([-2.0]), beta=2.0, loss_type="simpo",
                    simpo_gamma=1.0)
    assert tied.losses.item() == pytest.approx(math.log(1 + math.e), rel=1e-15)


def test_simpo_gradient_matches_hand_derivative():
    # d/d pc of -log sigmoid(beta (pc - pr) - gamma) = -beta * sigmoid(-(beta (pc - pr) - gamma))
    pc, pr = _t([-1.2], grad=True), _t([-2.0], grad=True)
    dpo_loss(policy_chosen_logps=pc, policy_rejected_logps=pr, beta=2.5, loss_type="simpo",
             simpo_gamma=0.4).losses.sum().backward()
    z = 2.5 * (-1.2 + 2.0) - 0.4
    assert pc.grad.item() == pytest.approx(-2.5 * sigmoid(-z), rel=1e-12)
    assert pr.grad.item() == pytest.approx(2.5 * sigmoid(-z), rel=1e-12)


@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
def test_apo_zero_is_eq7_on_random_logps(beta):
    pc, pr, rc, rr = _random_logps(seed=int(beta * 10), scale=40.0)
    out = dpo_loss(policy_chosen_logps=_t(pc), policy_rejected_logps=_t(pr), ref_chosen_logps=_t(rc),
                   ref_rejected_logps=_t(rr), beta=beta, loss_type="apo_zero")
    expected = [1 - sigmoid(beta * (c - c0)) + sigmoid(beta * (r - r0))
                for c, r, c0, r0 in zip(pc, pr, rc, rr, strict=True)]
    torch.testing.assert_close(out.losses, _t(expected), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.chosen_rewards, beta * (_t(pc) - _t(rc)), rtol=1e-15, atol=0)


def test_apo_zero_hand_value_and_anchored_gradient():
    # r_w = 2, r_l = -2, beta = 0.5: 1 - sigmoid(1) + sigmoid(-1) = 2 sigmoid(-1) = 2 / (1 + e)
    case = dict(policy_chosen_logps=_t([-8.0], grad=True), policy_rejected_logps=_t([-12.0], grad=True),
                ref_chosen_logps=_t([-10.0]), ref_rejected_logps=_t([-10.0]))
    out = dpo_loss(**case, beta=0.5, loss_type="apo_zero")
    assert out.losses.item() == pytest.approx(2 / (1 + math.e), rel=1e-15)
    out.losses.sum().backward()
    # Anchored: each completion's gradient depends on its own log-ratio only (DPO's would couple them).
    s = sigmoid(1.0)
    assert case["policy_chosen_logps"].grad.item() == pytest.approx(-0.5 * s * (1 - s), rel=1e-12)
    assert case["policy_rejected_logps"].grad.item() == pytest.approx(0.5 * s * (1 - s), rel=1e-12)


def test_reference_free_and_length_normalised_flags():
    assert [t for t in LOSS_TYPES if is_reference_free(t)] == ["simpo"]
    assert needs_length_normalisation("simpo") and not needs_length_normalisation("apo_zero")


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(loss_type="simpo", ref_chosen_logps=_t([-1.0]), ref_rejected_logps=_t([-1.0])), "reference-free"),
    (dict(loss_type="sigmoid"), "needs both reference logps"),
    (dict(loss_type="apo_zero", ref_chosen_logps=_t([-1.0])), "needs both reference logps"),
    (dict(loss_type="simpo", simpo_gamma=-0.1), "simpo_gamma"),
    (dict(loss_type="simpo", simpo_gamma=float("nan")), "simpo_gamma"),
    (dict(loss_type="simpo", label_smoothing=0.1), "label_smoothing"),
])
def test_invalid_combinations_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        dpo_loss(policy_chosen_logps=_t([-1.0]), policy_rejected_logps=_t([-2.0]), beta=2.0, **kwargs)


def test_reference_free_metrics_claim_nothing_about_a_reference():
    pc, pr = _t([-1.0, -3.0]), _t([-2.0, -1.0])
    out = dpo_loss(policy_chosen_logps=pc, policy_rejected_logps=pr, beta=2.0, loss_type="simpo")
    m = dpo_metrics(out, policy_chosen_logps=pc, policy_rejected_logps=pr)
    assert "ref_logps_chosen" not in m and "ref_logps_rejected" not in m
    assert m["reference_free"] == 1.0 and m["kl"] == 0.0  # the train_steps.kl column is NOT NULL
    assert m["reward_accuracy"] == 0.5 and m["reward_margin"] == pytest.approx((2.0 - 4.0) / 2)
    assert m["loss"] == pytest.approx((neg_logsigmoid(2.0 - 1.0) + neg_logsigmoid(-4.0 - 1.0)) / 2, rel=1e-12)


# --- TRL as an independent reference ------------------------------------------------------------------
# TRL's SimPO lives in CPOTrainer (loss_type="simpo"); its cpo_loss reads only a few attributes, so we
# call it unbound on a stand-in trainer. APO-zero is checked against TRL's DPOTrainer in test_dpo.py.


def _trl_cpo():
    warnings.filterwarnings("ignore", message=".*trl.experimental.*")
    return pytest.importorskip("trl.experimental.cpo.cpo_trainer").CPOTrainer


@pytest.mark.parametrize(("beta", "gamma"), [(2.0, 1.0), (2.5, 1.4), (10.0, 3.0)])
def test_simpo_matches_trl_cpo_trainer(beta, gamma):
    cpo = _trl_cpo()
    torch.manual_seed(3)
    pc, pr = -torch.rand(16) * 4, -torch.rand(16) * 4  # average log-probs, as TRL feeds SimPO
    fake = SimpleNamespace(alpha=0.0, beta=beta, loss_type="simpo", simpo_gamma=gamma, label_smoothing=0.0,
                           accelerator=SimpleNamespace(device=torch.device("cpu")))
    trl_losses, trl_chosen, trl_rejected = cpo.cpo_loss(fake, pc, pr)
    out = dpo_loss(policy_chosen_logps=pc, policy_rejected_logps=pr, beta=beta, loss_type="simpo", simpo_gamma=gamma)
    torch.testing.assert_close(out.losses, trl_losses, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.chosen_rewards, trl_chosen)
    torch.testing.assert_close(out.rejected_rewards, trl_rejected)


def test_average_logps_are_trls_length_normalisation(tiny_model_and_tokenizer):
    """SimPO's 1/|y| log pi(y|x): our per-token mean over the completion equals TRL's
    get_batch_logps(average_log_prob=True) on the same logits, prompt tokens labelled -100."""
    cpo = _trl_cpo()
    model, tokenizer = tiny_model_and_tokenizer
    batch = build_pair_batch(tokenizer, EXAMPLES)
    with torch.no_grad():
        ours = torch.cat(concatenated_forward(model, batch, average=True))
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    theirs = cpo.get_batch_logps(logits.float(), labels, average_log_prob=True)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    lengths = batch["completion_mask"].sum(dim=1)
    assert len(set(lengths.tolist())) > 1  # the rows really differ in length, so the division matters


# --- no reference pass, in a real step -----------------------------------------------------------------


@pytest.fixture
def tiny_peft(tiny_model_and_tokenizer):
    model, tokenizer = tiny_model_and_tokenizer
    torch.manual_seed(0)
    return attach_lora(model, LoraSettings(r=4, alpha=8, dropout=0.0)), tokenizer


def _cfg(tiny_model_dir, **overrides) -> TrainConfig:
    base = dict(model=str(tiny_model_dir), device="cpu", dtype="fp32", batch_size=2, lr=1e-2, passes=1,  # one update
                lora=LoraSettings(r=4, alpha=8, dropout=0.0))
    return TrainConfig(**{**base, **overrides})


def _count_forwards(model) -> list[bool]:
    """One entry per forward of the base transformer: was the adapter enabled?"""
    calls: list[bool] = []
    layer = next(m for n, m in model.named_modules() if n.endswith("q_proj"))
    model.get_base_model().register_forward_hook(lambda *_: calls.append(not layer.disable_adapters))
    return calls


def _refuse_reference(model, monkeypatch) -> None:
    def refuse():
        raise AssertionError("disable_adapter() called: a reference forward was built")
    monkeypatch.setattr(model, "disable_adapter", refuse)


# A pass of the model is one forward in the concatenated layout; with a shared prompt, three: the
# prompts' common prefix (EXAMPLES' prompts share their chat-template start), the prompts, the answers.
PASS_CALLS = [pytest.param(False, 1, id="concatenated"), pytest.param(True, 3, id="shared-prompt")]


@pytest.mark.parametrize("shared, calls_per_pass", PASS_CALLS)
def test_simpo_step_runs_no_reference_forward(tiny_peft, tiny_model_dir, monkeypatch, shared, calls_per_pass):
    model, tokenizer = tiny_peft
    cfg = _cfg(tiny_model_dir, loss_type="simpo", simpo_gamma=0.5, shared_prompt=shared)
    batch = build_pair_batch(tokenizer, EXAMPLES)
    with torch.no_grad():  # dropout is 0, so eval-mode logps are the step's logps
        avg_c, avg_r = concatenated_forward(model, batch, average=True)
    calls = _count_forwards(model)
    _refuse_reference(model, monkeypatch)
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    metrics = dpo_step(model=model, tokenizer=tokenizer, optimizer=make_optimizer(model, cfg), examples=EXAMPLES,
                       cfg=cfg)
    assert calls == [True] * calls_per_pass  # one pass, the policy's, with the adapter on
    expected = sum(neg_logsigmoid(2.0 * (c - r) - 0.5) for c, r in zip(avg_c.tolist(), avg_r.tolist(), strict=True))
    assert metrics["loss"] == pytest.approx(expected / 2, rel=1e-5)
    assert metrics["reference_free"] == 1.0 and metrics["logps_chosen"] == pytest.approx(avg_c.mean().item(), rel=1e-5)
    assert any(not torch.equal(a, b) for a, b in zip(before, params, strict=True))


@pytest.mark.parametrize("shared, calls_per_pass", PASS_CALLS)
def test_the_counter_sees_the_reference_pass_of_dpo(tiny_peft, tiny_model_dir, monkeypatch, shared, calls_per_pass):
    """The control for the test above: the same probes catch sigmoid DPO's reference forward."""
    model, tokenizer = tiny_peft
    cfg = _cfg(tiny_model_dir, loss_type="sigmoid", shared_prompt=shared)
    calls = _count_forwards(model)
    dpo_step(model=model, tokenizer=tokenizer, optimizer=make_optimizer(model, cfg), examples=EXAMPLES, cfg=cfg)
    assert calls == [False] * calls_per_pass + [True] * calls_per_pass  # reference (adapter off), then policy
    _refuse_reference(model, monkeypatch)
    with pytest.raises(AssertionError, match="reference forward"):
        dpo_step(model=model, tokenizer=tokenizer, optimizer=make_optimizer(model, cfg), examples=EXAMPLES, cfg=cfg)


def test_simpo_grad_accum_gives_the_same_update(tiny_model_dir, tmp_path):
    from odpo.trainer.policy.loading import load_model_and_tokenizer
    from tests.model_fixtures import tiny_model_config

    results = []
    for accum in (1, 2):
        model, tokenizer = load_model_and_tokenizer(tiny_model_config(tiny_model_dir, tmp_path / "models"))
        torch.manual_seed(0)
        model = attach_lora(model, LoraSettings(r=4, alpha=8, dropout=0.0))
        cfg = _cfg(tiny_model_dir, loss_type="simpo", grad_accum=accum, max_grad_norm=None)
        params = [p for p in model.parameters() if p.requires_grad]
        before = [p.detach().clone() for p in params]
        sgd = torch.optim.SGD(params, lr=1.0)  # the update is minus the gradient: compare gradients, not Adam's
        metrics = dpo_step(model=model, tokenizer=tokenizer, optimizer=sgd, examples=EXAMPLES, cfg=cfg)
        results.append((metrics["loss"], [b - p.detach() for b, p in zip(before, params, strict=True)]))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-6)
    assert any(g.abs().max() > 0 for g in results[0][1])
    for a, b in zip(results[0][1], results[1][1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


# --- the option, from the command line into the step ----------------------------------------------------


def test_train_config_resolves_loss_defaults():
    assert TrainConfig().beta == 0.1 and TrainConfig().simpo_gamma is None
    simpo = TrainConfig(loss_type="simpo")
    assert (simpo.beta, simpo.simpo_gamma) == (2.0, 1.0)
    assert simpo.hyperparameters()["simpo_gamma"] == 1.0
    assert TrainConfig(loss_type="simpo", beta=2.5, simpo_gamma=0.0).loss_options() == {"simpo_gamma": 0.0}
    # a run that does not use SimPO keeps exactly the hyperparameter keys (and hash) it had before
    assert "simpo_gamma" not in TrainConfig(loss_type="apo_zero").hyperparameters()
    with pytest.raises(TrainConfigError, match="simpo_gamma only applies to the simpo loss"):
        TrainConfig(loss_type="sigmoid", simpo_gamma=0.5)
    with pytest.raises(TrainConfigError, match="simpo_gamma must be >= 0"):
        TrainConfig(loss_type="simpo", simpo_gamma=-1.0)


def _train_args(common_config, tiny_model_dir, *extra: str) -> list[str]:
    return ["--data-dir", str(common_config.data_dir), "--db", common_config.db_url, "train",
            "--model", str(tiny_model_dir), "--device", "cpu", "--dtype", "fp32", "--batch-size", "2",
            "--poll-seconds", "0.05", "--lora-r", "4", "--threads", "1", *extra]


def test_cli_train_loss_simpo_reaches_the_step_without_a_reference(common_config, tiny_model_dir, monkeypatch):
    from peft import PeftModel

    from odpo.app.cli import cli
    from odpo.trainer.training import loop as train_loop

    db = common_config.open_db()
    try:
        make_pairs(db, 4)
        label_all(db, "alice", "a")
    finally:
        db.close()
    seen: list[TrainConfig] = []
    real_step = train_loop.dpo_step

    def spy(**kwargs):
        seen.append(kwargs["cfg"])
        return real_step(**kwargs)

    def refuse(self):
        raise AssertionError("disable_adapter() called: a reference forward was built")

    monkeypatch.setattr(train_loop, "dpo_step", spy)
    monkeypatch.setattr(PeftModel, "disable_adapter", refuse)
    args = _train_args(common_config, tiny_model_dir, "--loss", "simpo", "--simpo-gamma", "0.7", "--max-steps", "2")
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "trained 2 step(s)" in result.output
    assert [(c.loss_type, c.beta, c.simpo_gamma) for c in seen] == [("simpo", 2.0, 0.7)] * 2
    state = ckpt.read_trainer_state(common_config.adapters_dir() / "v2")
    assert state["hyperparameters"]["loss_type"] == "simpo" and state["hyperparameters"]["simpo_gamma"] == 0.7
    db = common_config.open_db()
    try:
        with db.sessions() as s:
            steps = list(s.scalars(select(TrainStep)))
    finally:
        db.close()
    assert len(steps) == 2 and all(st.metrics["reference_free"] == 1.0 for st in steps)


def test_cli_simpo_gamma_without_simpo_is_one_line(common_config, tiny_model_dir):
    from odpo.app.cli import cli

    result = CliRunner().invoke(cli, _train_args(common_config, tiny_model_dir, "--simpo-gamma", "0.5"))
    assert result.exit_code != 0
    assert "simpo_gamma only applies to the simpo loss" in result.output
    assert "Traceback" not in result.output
