"""DPO losses and the training metrics derived from them.

Everything here works on *sequence* log-probabilities (one number per completion), so it is pure
tensor maths with no model in sight: `trainer.batching` turns text into those numbers.

Notation (as in TRL's DPO documentation and `trl.trainer.dpo_trainer`)::

    logits = (pi_chosen - pi_rejected) - (ref_chosen - ref_rejected)

    sigmoid  -(1-ls) * logsigmoid(beta*logits) - ls * logsigmoid(-beta*logits)
    robust   (-(1-ls) * logsigmoid(beta*logits) + ls * logsigmoid(-beta*logits)) / (1 - 2*ls)
    hinge    relu(1 - beta*logits)
    ipo      (logits - 1/(2*beta))**2

    rewards  beta * (pi - ref), detached: the implicit reward of each completion.

Two conventions worth knowing:

* ``label_smoothing`` (ls) on the sigmoid loss is conservative DPO (cDPO, Mitchell 2023): the
  label is assumed flipped with probability ls. TRL 1.16 no longer applies ls to "sigmoid" (only to
  "robust" and "exo_pair"), so with ls > 0 our sigmoid loss is the cDPO formula of TRL < 1.0.
  At ls = 0, which is our default, both agree exactly. Robust DPO (Chowdhury et al. 2024) instead
  de-biases the loss for flipped labels; it equals sigmoid at ls = 0.
* IPO is defined on log-likelihoods of whole sequences, but summed log-probs make its squared loss
  grow with completion length, so TRL divides each log-ratio by the completion's token count (the
  IPO authors confirmed their results use that form). Dividing the log-*ratio* by the count is the
  same as using *average* per-token log-probs for both policy and reference, which is what we do:
  the caller asks ``needs_length_normalisation(loss_type)`` and, when true, passes average logps
  (``sequence_logps(..., average=True)``). The loss function itself stays length-agnostic.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")

# Loss types whose formulas expect per-token *average* log-probs rather than sums (see module doc).
_LENGTH_NORMALISED = frozenset({"ipo"})


@dataclass
class DPOLossOutput:
    """Per-pair results; reduce ``losses`` with ``.mean()`` for the optimisation step."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


def needs_length_normalisation(loss_type: str) -> bool:
    """True when ``loss_type`` must be fed average (not summed) per-token log-probs."""
    _check_loss_type(loss_type)
    return loss_type in _LENGTH_NORMALISED


def _check_loss_type(loss_type: str) -> None:
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; expected one of {', '.join(LOSS_TYPES)}")


def _check_args(beta: float, loss_type: str, label_smoothing: float, logps: list[torch.Tensor]) -> None:
    """Fail early with a message a user can act on, instead of NaNs three steps later."""
    _check_loss_type(loss_type)
    if not beta > 0:  # also rejects NaN
        raise ValueError(f"beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must lie in [0, 0.5), got {label_smoothing}")
    if label_smoothing and loss_type not in ("sigmoid", "robust"):
        raise ValueError(f"label_smoothing is only defined for 'sigmoid' and 'robust', not {loss_type!r}")
    shapes = {tuple(t.shape) for t in logps}
    if len(shapes) != 1 or len(next(iter(shapes))) != 1:
        raise ValueError(f"the four logps tensors must be 1-D with the same shape, got {sorted(shapes)}")


def _pair_losses(logits: torch.Tensor, *, beta: float, loss_type: str, ls: float) -> torch.Tensor:
    """The per-pair loss for one of LOSS_TYPES, on the DPO logits (a difference of log-ratios)."""
    if loss_type == "sigmoid":
        return -(1 - ls) * F.logsigmoid(beta * logits) - ls * F.logsigmoid(-beta * logits)
    if loss_type == "robust":
        return (-(1 - ls) * F.logsigmoid(beta * logits) + ls * F.logsigmoid(-beta * logits)) / (1 - 2 * ls)
    if loss_type == "hinge":
        return torch.relu(1 - beta * logits)
    # ipo; beta plays the role of the regulariser tau in the IPO paper (Eq. 17).
    return (logits - 1 / (2 * beta)) ** 2


def dpo_loss(
    *,
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> DPOLossOutput:
    """DPO-family loss for a batch of preference pairs, one value per pair.

    All four inputs are 1-D tensors of sequence log-probs, one entry per pair; the reference ones
    should carry no gradient (they come from the adapter-disabled model under ``no_grad``).
    """
    logps = [policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps]
    _check_args(beta, loss_type, label_smoothing, logps)
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    logits = chosen_logratios - rejected_logratios
    losses = _pair_losses(logits, beta=beta, loss_type=loss_type, ls=label_smoothing)
    return DPOLossOutput(
        losses=losses,
        chosen_rewards=beta * chosen_logratios.detach(),
        rejected_rewards=beta * rejected_logratios.detach(),
    )


def dpo_metrics(
    out: DPOLossOutput,
    *,
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
) -> dict[str, float]:
    """Plain floats for the ``train_steps`` row and the dashboard.

    ``kl`` is a *sequence-level* estimate of KL(policy || reference): the mean over all chosen and
    rejected completions of log pi(y|x) - log ref(y|x). It is an unbiased Monte-Carlo estimate only
    when the completions are sampled from the current policy; with online pairs they come from a
    recent adapter version, so treat it as a drift indicator, not an exact divergence. Logps are
    whatever the caller passed (sums, or per-token averages for length-normalised losses).
    """
    with torch.no_grad():
        margins = out.chosen_rewards - out.rejected_rewards
        policy = torch.cat([policy_chosen_logps, policy_rejected_logps]).detach()
        ref = torch.cat([ref_chosen_logps, ref_rejected_logps]).detach()
        metrics = {
            "loss": out.losses.detach().mean(),
            "reward_accuracy": (out.chosen_rewards > out.rejected_rewards).float().mean(),
            "reward_margin": margins.mean(),
            "reward_chosen": out.chosen_rewards.mean(),
            "reward_rejected": out.rejected_rewards.mean(),
            "logps_chosen": policy_chosen_logps.detach().mean(),
            "logps_rejected": policy_rejected_logps.detach().mean(),
            "ref_logps_chosen": ref_chosen_logps.detach().mean(),
            "ref_logps_rejected": ref_rejected_logps.detach().mean(),
            "kl": (policy - ref).mean(),
        }
    return {name: float(value) for name, value in metrics.items()}
