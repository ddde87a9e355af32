"""Preference losses (the DPO family, APO-zero, reference-free SimPO) and their training metrics.

Everything here works on *sequence* log-probabilities (one number per completion), so it is pure
tensor maths with no model in sight: `trainer.policy.batching` turns text into those numbers.

Notation (as in TRL's DPO documentation and `trl.trainer.dpo_trainer`). Each completion gets a
*score* s: its log-ratio ``pi - ref`` for reference-based losses, its policy log-prob ``pi``
alone for reference-free ones (SimPO). With s_w, s_l the chosen/rejected scores::

    logits   = s_w - s_l = (pi_chosen - pi_rejected) - (ref_chosen - ref_rejected)

    sigmoid  -(1-ls) * logsigmoid(beta*logits) - ls * logsigmoid(-beta*logits)
    robust   (-(1-ls) * logsigmoid(beta*logits) + ls * logsigmoid(-beta*logits)) / (1 - 2*ls)
    hinge    relu(1 - beta*logits)
    ipo      (logits - 1/(2*beta))**2
    apo_zero 1 - sigmoid(beta*s_w) + sigmoid(beta*s_l)
    simpo    -logsigmoid(beta*(avg_pi_chosen - avg_pi_rejected) - gamma)      (no reference)

    rewards  beta * s, detached: the implicit reward of each completion.

* **APO-zero** (D'Oosterlinck et al. 2024, "Anchored Preference Optimization and Contrastive
  Revisions", Eq. 7: L = -sigmoid(r_w) + sigmoid(r_l), r = beta * log(pi/ref)). Unlike DPO, which
  only moves the *difference* of the two log-ratios, it anchors each completion to the reference
  on its own: the chosen log-ratio is pushed up and the rejected one down. The authors recommend it
  when the chosen answers are better than what the model writes now. We add the constant 1 (as TRL
  does) so the loss lies in [0, 2] and is 1 when policy = reference; gradients are unchanged.
* **SimPO** (Meng, Xia & Chen 2024, "SimPO: Simple Preference Optimization with a Reference-Free
  Reward", Eq. 6): the reward is beta/|y| * log pi(y|x), the *length-normalised* log-prob, and a
  target margin gamma >= 0 separates chosen from rejected. There is no reference model, so the
  trainer skips the reference forward pass entirely (``is_reference_free``). We take gamma as the
  absolute margin of the paper's Eq. 6, which is also TRL's ``CPOConfig.simpo_gamma``; the SimPO
  code base instead sets ``gamma_beta_ratio`` = gamma/beta. Defaults: beta = 2.0 and gamma = 1.0
  (gamma/beta = 0.5): the authors' Llama-3-Base setting and their README's advice (beta 2.0 or
  2.5 as in the paper; "0.5 as a starting point for gamma_beta_ratio", tuned in 0..1). Since we fix gamma, a
  user who changes --beta should scale --simpo-gamma with it to keep that ratio. TRL's defaults
  (beta 0.1, simpo_gamma 0.5) are CPO's, not SimPO's: at beta 0.1 the margin term dominates.

Conventions worth knowing:

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
  (``sequence_logps(..., average=True)``). SimPO is length-normalised by definition and takes the
  same route. The loss function itself stays length-agnostic.
* BCO-pair is not offered: its paper (Jung et al. 2024) shifts rewards by a running mean that
  would have to be saved with every adapter version to resume exactly; TRL 1.16 dropped that shift.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from odpo.trainer.options import LOSS_TYPES, SIMPO_DEFAULT_GAMMA, default_beta

__all__ = ["LOSS_TYPES", "DPOLossOutput", "default_beta", "dpo_loss", "dpo_metrics", "is_reference_free",
           "needs_length_normalisation"]

# Loss types whose formulas expect per-token *average* log-probs rather than sums (see module doc).
_LENGTH_NORMALISED = frozenset({"ipo", "simpo"})
# Loss types with no reference model: the trainer must not run (or pay for) a reference forward.
_REFERENCE_FREE = frozenset({"simpo"})


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


def is_reference_free(loss_type: str) -> bool:
    """True when ``loss_type`` uses no reference log-probs (so none should be computed)."""
    _check_loss_type(loss_type)
    return loss_type in _REFERENCE_FREE


def _check_loss_type(loss_type: str) -> None:
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; expected one of {', '.join(LOSS_TYPES)}")


def _check_args(beta: float, loss_type: str, label_smoothing: float, simpo_gamma: float) -> None:
    """Fail early with a message a user can act on, instead of NaNs three steps later."""
    _check_loss_type(loss_type)
    if not beta > 0:  # also rejects NaN
        raise ValueError(f"beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must lie in [0, 0.5), got {label_smoothing}")
    if label_smoothing and loss_type not in ("sigmoid", "robust"):
        raise ValueError(f"label_smoothing is only defined for 'sigmoid' and 'robust', not {loss_type!r}")
    if not 0.0 <= simpo_gamma < float("inf"):  # also rejects NaN
        raise ValueError(f"simpo_gamma must be a finite margin >= 0, got {simpo_gamma}")


def _check_logps(loss_type: str, policy: list[torch.Tensor], ref: list[Optional[torch.Tensor]]) -> None:
    """Reference logps are required by reference-based losses and refused by reference-free ones:
    passing them to SimPO would mean the caller paid for a forward pass the loss ignores."""
    given = [t is not None for t in ref]
    if loss_type in _REFERENCE_FREE and any(given):
        raise ValueError(f"{loss_type!r} is reference-free: pass no reference logps")
    if loss_type not in _REFERENCE_FREE and not all(given):
        raise ValueError(f"{loss_type!r} needs both reference logps (ref_chosen_logps, ref_rejected_logps)")
    shapes = {tuple(t.shape) for t in [*policy, *ref] if t is not None}
    if len(shapes) != 1 or len(next(iter(shapes))) != 1:
        raise ValueError(f"the logps tensors must be 1-D with the same shape, got {sorted(shapes)}")


def _pair_losses(chosen: torch.Tensor, rejected: torch.Tensor, *, beta: float, loss_type: str, ls: float,
                 gamma: float) -> torch.Tensor:
    """The per-pair loss for one of LOSS_TYPES, on the chosen and rejected scores (module doc)."""
    logits = chosen - rejected
    if loss_type == "sigmoid":
        return -(1 - ls) * F.logsigmoid(beta * logits) - ls * F.logsigmoid(-beta * logits)
    if loss_type == "robust":
        return (-(1 - ls) * F.logsigmoid(beta * logits) + ls * F.logsigmoid(-beta * logits)) / (1 - 2 * ls)
    if loss_type == "hinge":
        return torch.relu(1 - beta * logits)
    if loss_type == "apo_zero":  # APO paper Eq. 7, plus the constant 1
        return 1 - torch.sigmoid(beta * chosen) + torch.sigmoid(beta * rejected)
    if loss_type == "simpo":  # SimPO paper Eq. 6, on average logps
        return -F.logsigmoid(beta * logits - gamma)
    # ipo; beta plays the role of the regulariser tau in the IPO paper (Eq. 17).
    return (logits - 1 / (2 * beta)) ** 2


def dpo_loss(
    *,
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: Optional[torch.Tensor] = None,
    ref_rejected_logps: Optional[torch.Tensor] = None,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    simpo_gamma: float = SIMPO_DEFAULT_GAMMA,
) -> DPOLossOutput:
    """Preference loss for a batch of pairs, one value per pair.

    All inputs are 1-D tensors of sequence log-probs, one entry per pair; the reference ones
    should carry no gradient (they come from the adapter-disabled model under ``no_grad``) and must
    be None for a reference-free loss. ``simpo_gamma`` is only read by SimPO.
    """
    _check_args(beta, loss_type, label_smoothing, simpo_gamma)
    _check_logps(loss_type, [policy_chosen_logps, policy_rejected_logps], [ref_chosen_logps, ref_rejected_logps])
    chosen, rejected = policy_chosen_logps, policy_rejected_logps
    if ref_chosen_logps is not None and ref_rejected_logps is not None:
        chosen, rejected = chosen - ref_chosen_logps, rejected - ref_rejected_logps
    losses = _pair_losses(chosen, rejected, beta=beta, loss_type=loss_type, ls=label_smoothing, gamma=simpo_gamma)
    return DPOLossOutput(losses=losses, chosen_rewards=beta * chosen.detach(),
                         rejected_rewards=beta * rejected.detach())


def dpo_metrics(
    out: DPOLossOutput,
    *,
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: Optional[torch.Tensor] = None,
    ref_rejected_logps: Optional[torch.Tensor] = None,
) -> dict[str, float]:
    """Plain floats for the ``train_steps`` row and the dashboard.

    ``kl`` is a *sequence-level* estimate of KL(policy || reference): the mean over all chosen and
    rejected completions of log pi(y|x) - log ref(y|x). It is an unbiased Monte-Carlo estimate only
    when the completions are sampled from the current policy; with online pairs they come from a
    recent adapter version, so treat it as a drift indicator, not an exact divergence. Logps are
    whatever the caller passed (sums, or per-token averages for length-normalised losses).

    Without reference logps (a reference-free loss) nothing about the reference is known: the
    ``ref_logps_*`` keys are left out, ``reference_free`` is 1.0 and ``kl`` is a 0.0 placeholder,
    because the ``train_steps.kl`` column and the trainer's log line require a number.
    """
    with torch.no_grad():
        margins = out.chosen_rewards - out.rejected_rewards
        metrics = {
            "loss": out.losses.detach().mean(),
            "reward_accuracy": (out.chosen_rewards > out.rejected_rewards).float().mean(),
            "reward_margin": margins.mean(),
            "reward_chosen": out.chosen_rewards.mean(),
            "reward_rejected": out.rejected_rewards.mean(),
            "logps_chosen": policy_chosen_logps.detach().mean(),
            "logps_rejected": policy_rejected_logps.detach().mean(),
        }
        if ref_chosen_logps is None or ref_rejected_logps is None:
            metrics.update(kl=torch.tensor(0.0), reference_free=torch.tensor(1.0))
        else:
            policy = torch.cat([policy_chosen_logps, policy_rejected_logps]).detach()
            ref = torch.cat([ref_chosen_logps, ref_rejected_logps]).detach()
            metrics.update(ref_logps_chosen=ref_chosen_logps.detach().mean(),
                           ref_logps_rejected=ref_rejected_logps.detach().mean(), kl=(policy - ref).mean())
    return {name: float(value) for name, value in metrics.items()}
