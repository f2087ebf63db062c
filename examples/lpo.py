"""Latent Preference Optimization (LPO, Dhuliawala et al. 2024) for temperature heads.

DPO applied to the head's latent choices: for a preference pair of responses, the "response"
whose likelihood is compared is the sequence of temperature choices that produced it (one per
token for ADtok, one per response for ADseq), scored by the temperature head, relative to a
frozen reference head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from steerserve.decoding.sampling.temperature_head import TemperatureHead


def lpo_loss(
    policy_chosen_logp: torch.Tensor,
    policy_rejected_logp: torch.Tensor,
    ref_chosen_logp: torch.Tensor,
    ref_rejected_logp: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """Mean over P pairs of -logsigmoid(beta * ((pc - rc) - (pr - rr))).

    Each input is (P,): per response, the SUM over its tokens of log pi(temperature choice).
    """
    inputs = (policy_chosen_logp, policy_rejected_logp, ref_chosen_logp, ref_rejected_logp)
    shapes = {tuple(t.shape) for t in inputs}
    if len(shapes) != 1 or len(next(iter(shapes))) != 1:
        raise ValueError(f"lpo_loss needs four (P,) tensors of one shape, got {sorted(shapes)}")
    if policy_chosen_logp.numel() == 0:
        raise ValueError("lpo_loss needs at least one pair")
    margin = (policy_chosen_logp - ref_chosen_logp) - (policy_rejected_logp - ref_rejected_logp)
    return -F.logsigmoid(beta * margin).mean()


def choice_log_probs(
    head: TemperatureHead,
    hidden: torch.Tensor,
    choices: torch.Tensor,
    segment_ids: torch.Tensor,
    num_segments: int,
) -> torch.Tensor:
    """Sum of log pi(choice) per response: hidden (N, H), choices/segment_ids (N,) -> (S,).

    Row n is one latent choice (a token's temperature index) belonging to response
    segment_ids[n]; responses without rows get 0.
    """
    if choices.shape != segment_ids.shape or choices.shape != hidden.shape[:1]:
        raise ValueError(
            f"choice_log_probs: hidden {tuple(hidden.shape)}, choices {tuple(choices.shape)} "
            f"and segment_ids {tuple(segment_ids.shape)} disagree on N"
        )
    logp = head.log_probs(hidden)  # (N, T)
    picked = logp.gather(1, choices.long().to(logp.device).unsqueeze(1)).squeeze(1)  # (N,)
    sums = torch.zeros(num_segments, dtype=picked.dtype, device=picked.device)
    return sums.index_add(0, segment_ids.long().to(picked.device), picked)  # (S,)
