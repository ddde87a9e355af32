"""DPO losses against hand-computed values (math.log/exp, not our formula code) and against TRL."""
from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from odpo.trainer.training.losses import (
    LOSS_TYPES,
    dpo_loss,
    dpo_metrics,
    is_reference_free,
    needs_length_normalisation,
)

LOG2 = math.log(2.0)
# The losses that compare the policy with a reference; reference-free SimPO is tested in test_losses.py.
REFERENCE_LOSSES = [t for t in LOSS_TYPES if not is_reference_free(t)]


def softplus(x: float) -> float:
    """-logsigmoid(-x) = log(1 + e^x), written out by hand."""
    return math.log(1.0 + math.exp(x))


def logps(pc, pr, rc, rr, *, requires_grad=False):
    t = lambda v: torch.tensor(v, dtype=torch.float64, requires_grad=requires_grad)  # noqa: E731
    return dict(
        policy_chosen_logps=t(pc), policy_rejected_logps=t(pr), ref_chosen_logps=t(rc), ref_rejected_logps=t(rr)
    )


# One pair: logits = (-10 - -12) - (-11 - -11.5) = 2 - 0.5 = 1.5
CASE_A = logps([-10.0], [-12.0], [-11.0], [-11.5])
# One pair against the preference: logits = (-20 - -18) - (-19 - -20) = -2 - 1 = -3
CASE_B = logps([-20.0], [-18.0], [-19.0], [-20.0])


@pytest.mark.parametrize("loss_type", REFERENCE_LOSSES)
def test_policy_equal_to_reference(loss_type):
    beta = 0.25
    same = logps([-3.0, -7.5], [-4.0, -1.0], [-3.0, -7.5], [-4.0, -1.0])
    out = dpo_loss(**same, beta=beta, loss_type=loss_type)
    expected = {"sigmoid": LOG2, "robust": LOG2, "hinge": 1.0, "ipo": 1.0 / (4 * beta**2), "apo_zero": 1.0}[loss_type]
    assert out.losses.tolist() == pytest.approx([expected, expected], abs=1e-12)
    assert out.chosen_rewards.tolist() == [0.0, 0.0] and out.rejected_rewards.tolist() == [0.0, 0.0]


@pytest.mark.parametrize(
    ("case", "beta", "loss_type", "ls", "expected"),
    [
        (CASE_A, 0.1, "sigmoid", 0.0, softplus(-0.15)),
        (CASE_A, 0.1, "sigmoid", 0.2, 0.8 * softplus(-0.15) + 0.2 * softplus(0.15)),
        (CASE_A, 0.1, "robust", 0.2, (0.8 * softplus(-0.15) - 0.2 * softplus(0.15)) / 0.6),
        (CASE_A, 0.1, "hinge", 0.0, 0.85),
        (CASE_A, 0.1, "ipo", 0.0, (1.5 - 5.0) ** 2),
        (CASE_B, 0.5, "sigmoid", 0.0, softplus(1.5)),
        (CASE_B, 0.5, "robust", 0.1, (0.9 * softplus(1.5) - 0.1 * softplus(-1.5)) / 0.8),
        (CASE_B, 0.5, "hinge", 0.0, 2.5),
        (CASE_B, 0.5, "ipo", 0.0, (-3.0 - 1.0) ** 2),
        (logps([0.0], [-30.0], [0.0], [0.0]), 0.1, "hinge", 0.0, 0.0),  # margin beyond 1/beta: clipped
    ],
)
def test_hand_computed_values(case, beta, loss_type, ls, expected):
    out = dpo_loss(**case, beta=beta, loss_type=loss_type, label_smoothing=ls)
    assert out.losses.item() == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_rewards_are_beta_times_log_ratios_and_detached():
    case = logps([-10.0], [-12.0], [-11.0], [-11.5], requires_grad=True)
    out = dpo_loss(**case, beta=0.1)
    assert out.chosen_rewards.item() == pytest.approx(0.1 * 1.0)
    assert out.rejected_rewards.item() == pytest.approx(0.1 * -0.5)
    assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad
    assert out.losses.requires_grad


def test_robust_and_sigmoid_agree_without_smoothing():
    torch.manual_seed(0)
    case = {k: torch.randn(16) * 5 for k in CASE_A}
    sig = dpo_loss(**case, beta=0.3, loss_type="sigmoid").losses
    rob = dpo_loss(**case, beta=0.3, loss_type="robust").losses
    torch.testing.assert_close(rob, sig)


@pytest.mark.parametrize("loss_type", REFERENCE_LOSSES)
def test_gradient_pushes_chosen_up_and_rejected_down(loss_type):
    case = logps([-10.0], [-12.0], [-11.0], [-11.5], requires_grad=True)
    dpo_loss(**case, beta=0.1, loss_type=loss_type).losses.sum().backward()
    assert case["policy_chosen_logps"].grad.item() < 0  # raising the chosen logp lowers the loss
    assert case["policy_rejected_logps"].grad.item() > 0
    assert case["ref_chosen_logps"].grad.item() > 0  # the same formula w.r.t. the reference: mirrored


def test_sigmoid_gradient_matches_hand_derivative():
    # d/d pi_c of log(1 + exp(-beta x)) = -beta * sigmoid(-beta x), x = 1.5, beta = 0.1
    case = logps([-10.0], [-12.0], [-11.0], [-11.5], requires_grad=True)
    dpo_loss(**case, beta=0.1).losses.sum().backward()
    assert case["policy_chosen_logps"].grad.item() == pytest.approx(-0.1 / (1 + math.exp(0.15)), rel=1e-12)


def test_sigmoid_loss_falls_as_chosen_logp_rises():
    losses = [
        dpo_loss(**logps([pc], [-12.0], [-11.0], [-11.5]), beta=0.1).losses.item() for pc in (-14.0, -10.0, -6.0)
    ]
    assert losses[0] > losses[1] > losses[2]


def test_metrics_on_two_hand_pairs():
    # pair 1 = CASE_A: rewards 0.1 / -0.05 (correct); pair 2: rewards 0.0 / 0.1 (wrong), logits -1
    case = logps([-10.0, -5.0], [-12.0, -4.0], [-11.0, -5.0], [-11.5, -5.0])
    out = dpo_loss(**case, beta=0.1)
    m = dpo_metrics(out, **case)
    assert m["loss"] == pytest.approx((softplus(-0.15) + softplus(0.1)) / 2)
    assert m["reward_accuracy"] == 0.5
    assert m["reward_margin"] == pytest.approx((0.15 + -0.1) / 2)
    assert m["reward_chosen"] == pytest.approx(0.05) and m["reward_rejected"] == pytest.approx(0.025)
    assert m["logps_chosen"] == -7.5 and m["logps_rejected"] == -8.0
    assert m["ref_logps_chosen"] == -8.0 and m["ref_logps_rejected"] == -8.25
    assert m["kl"] == pytest.approx((1.0 + 0.0 + -0.5 + 1.0) / 4)
    assert all(isinstance(v, float) for v in m.values())


def test_ties_in_reward_do_not_count_as_correct():
    out = dpo_loss(**logps([-1.0], [-1.0], [-1.0], [-1.0]), beta=0.1)
    assert dpo_metrics(out, **logps([-1.0], [-1.0], [-1.0], [-1.0]))["reward_accuracy"] == 0.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(beta=0.0), "beta"),
        (dict(beta=-0.1), "beta"),
        (dict(beta=float("nan")), "beta"),
        (dict(beta=0.1, label_smoothing=0.5), "label_smoothing"),
        (dict(beta=0.1, label_smoothing=-0.01), "label_smoothing"),
        (dict(beta=0.1, loss_type="hinge", label_smoothing=0.1), "label_smoothing"),
        (dict(beta=0.1, loss_type="kto"), "unknown DPO loss_type 'kto'"),
    ],
)
def test_invalid_arguments_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        dpo_loss(**CASE_A, **kwargs)


def test_mismatched_shapes_raise():
    bad = dict(CASE_A, ref_rejected_logps=torch.zeros(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="same shape"):
        dpo_loss(**bad, beta=0.1)


def test_length_normalisation_flag():
    assert [needs_length_normalisation(t) for t in LOSS_TYPES] == [t in ("ipo", "simpo") for t in LOSS_TYPES]
    with pytest.raises(ValueError, match="unknown"):
        needs_length_normalisation("dpo")


# --- cross-check against TRL's own loss code -------------------------------------------------------
# TRL 1.16 has no standalone loss function: the maths sits inside DPOTrainer._compute_loss, which runs
# the model itself. We call that method unbound with a minimal fake trainer (reference logps
# "precomputed") and a fake model whose per-token log-probs sum to the sequence logps we choose.


def _trl_loss(*, loss_type, beta, ls, pc, pr, rc, rr, lengths):
    trl_dpo = pytest.importorskip("trl.trainer.dpo_trainer")
    batch = pc.shape[0]
    width = int(lengths.max()) + 2
    completion_mask = (torch.arange(width) >= 2).long().expand(2 * batch, width).clone()
    completion_mask &= (torch.arange(width) < 2 + lengths.unsqueeze(1)).long()  # lengths per row
    per_token = torch.zeros(2 * batch, width - 1)
    per_token[:, 0] = torch.cat([pc, pr])
    model_out = SimpleNamespace(
        log_probs=per_token,
        entropy=torch.zeros(2 * batch, width - 1),
        mean_logits=torch.zeros(2 * batch, width - 1),
        is_top1=torch.zeros(2 * batch, width - 1, dtype=torch.bool),
    )
    identity = lambda t: t  # noqa: E731
    fake = SimpleNamespace(
        model=SimpleNamespace(training=True),
        accelerator=SimpleNamespace(device=torch.device("cpu"), gather=identity, gather_for_metrics=identity),
        aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
        loss_types=[loss_type], loss_weights=[1.0], beta=beta, label_smoothing=ls, use_weighting=False,
        _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1,
    )
    inputs = {
        "input_ids": torch.ones(2 * batch, width, dtype=torch.long),
        "attention_mask": torch.ones(2 * batch, width, dtype=torch.long),
        "completion_mask": completion_mask,
        "ref_chosen_logps": rc,
        "ref_rejected_logps": rr,
    }
    loss = trl_dpo.DPOTrainer._compute_loss(fake, lambda **_: model_out, inputs, return_outputs=False)
    return loss, {k: v[-1] for k, v in fake._metrics["train"].items()}


@pytest.mark.parametrize(
    ("loss_type", "ls"),
    [("sigmoid", 0.0), ("hinge", 0.0), ("ipo", 0.0), ("robust", 0.0), ("robust", 0.1), ("robust", 0.3),
     ("apo_zero", 0.0)],
)
def test_matches_trl(loss_type, ls):
    torch.manual_seed(1)
    batch, beta = 8, 0.2
    pc, pr, rc, rr = (-torch.rand(batch) * 40 for _ in range(4))
    lengths = torch.randint(1, 20, (2 * batch,))
    trl_loss, trl_metrics = _trl_loss(
        loss_type=loss_type, beta=beta, ls=ls, pc=pc, pr=pr, rc=rc, rr=rr, lengths=lengths
    )
    ours_in = dict(policy_chosen_logps=pc, policy_rejected_logps=pr, ref_chosen_logps=rc, ref_rejected_logps=rr)
    if needs_length_normalisation(loss_type):  # TRL divides by completion lengths inside its IPO branch
        n_c, n_r = lengths[:batch].float(), lengths[batch:].float()
        ours_in = dict(policy_chosen_logps=pc / n_c, policy_rejected_logps=pr / n_r,
                       ref_chosen_logps=rc / n_c, ref_rejected_logps=rr / n_r)
    out = dpo_loss(**ours_in, beta=beta, loss_type=loss_type, label_smoothing=ls)
    assert out.losses.mean().item() == pytest.approx(trl_loss.item(), rel=1e-6, abs=1e-6)
    if loss_type != "ipo":  # TRL logs summed-logp rewards even for IPO; ours are the averaged ones
        m = dpo_metrics(out, **ours_in)
        assert m["reward_margin"] == pytest.approx(trl_metrics["rewards/margins"], rel=1e-6, abs=1e-6)
        assert m["reward_accuracy"] == trl_metrics["rewards/accuracies"]
        assert m["reward_chosen"] == pytest.approx(trl_metrics["rewards/chosen"], rel=1e-6, abs=1e-6)
        assert m["logps_rejected"] == pytest.approx(trl_metrics["logps/rejected"], rel=1e-6, abs=1e-6)


def test_trl_sigmoid_ignores_label_smoothing_ours_is_cdpo():
    """Documents the one deliberate difference: TRL 1.16 drops cDPO smoothing from 'sigmoid'."""
    torch.manual_seed(2)
    pc, pr, rc, rr = (-torch.rand(4) * 10 for _ in range(4))
    lengths = torch.full((8,), 5)
    trl_smoothed, _ = _trl_loss(loss_type="sigmoid", beta=0.5, ls=0.2, pc=pc, pr=pr, rc=rc, rr=rr, lengths=lengths)
    ours = dict(policy_chosen_logps=pc, policy_rejected_logps=pr, ref_chosen_logps=rc, ref_rejected_logps=rr)
    plain = dpo_loss(**ours, beta=0.5).losses.mean().item()
    assert trl_smoothed.item() == pytest.approx(plain, rel=1e-6)
    assert dpo_loss(**ours, beta=0.5, label_smoothing=0.2).losses.mean().item() != pytest.approx(plain, rel=1e-3)
