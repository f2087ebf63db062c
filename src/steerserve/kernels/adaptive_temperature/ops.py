"""Per-row adaptive temperature for a batch of logits, one launch, scaled in place.

Each row picks a temperature T by its method and, if T > 0, its logits are divided by T:

* FIXED (0) and GIVEN (3): T = t0 (GIVEN: a per-row temperature chosen elsewhere, e.g. by
  an AdaptiveDecoder head). Unknown method codes behave as FIXED.
* EDT (1, Zhang et al. 2024): T = t0 * N ** (theta / H), theta = param_a, N = param_b
  (paper default 0.8). H = 0 gives T = 0, the limit for 0 < N < 1 and theta > 0; a huge
  theta / H underflows to 0 the same way. The server validates 0 < N < 1, theta > 0,
  t0 >= 0; outside that range the formula is applied as is (N = 1: T = t0; N > 1 grows).
* DYNATEMP (2, llama.cpp `llama_sampler_temp_ext_apply`): range = param_a,
  exponent = param_b, Tmin = max(0, t0 - range), Tmax = t0 + range,
  T = Tmin + (Tmax - Tmin) * (H / ln(n)) ** exponent, n = number of candidates (tokens
  whose logit is > -inf, i.e. that survived earlier samplers). With range <= 0 (llama.cpp:
  plain temperature) or n <= 1, T = t0. (llama.cpp returns early for n <= 1 and leaves the
  logits unscaled; with one candidate the scaling cannot change the sample, and t0 keeps
  the reported temperature and the greedy rule (t0 = 0) consistent.) powf's zero cases
  apply: 0 ** 0 = 1, 0 ** (e < 0) = inf.

H = -sum p log p (natural log) of softmax over the row; -inf entries have p = 0 and add 0;
an all -inf row has H = 0. Rows with T <= 0 (greedy) or NaN are left untouched: the
sampler takes their argmax. -inf stays -inf. Logits must not contain NaN or +inf.

`adaptive_temperature_torch` is the reference, `adaptive_temperature_triton` the launcher
(same signature and contract), `adaptive_temperature` picks one per device type. Triton is
imported lazily (in `kernels.adaptive_temperature_kernel`).
"""

from __future__ import annotations

from enum import IntEnum

import torch

from steerserve.kernels import dispatch
from steerserve.kernels.checks import check_tensor, require

__all__ = [
    "BLOCK_V",
    "TempMethod",
    "adaptive_temperature",
    "adaptive_temperature_torch",
    "adaptive_temperature_triton",
]


class TempMethod(IntEnum):
    FIXED = 0
    EDT = 1
    DYNATEMP = 2
    GIVEN = 3


# Vocabulary chunk per loop step in the kernel (tests lower it: the interpreter is slow).
BLOCK_V = 1024

_METHOD_DTYPES = (torch.int8, torch.int32)

# Backend decided once per device type, logged once.


# --------------------------------------------------------------------------- validation


def _check_args(
    logits: torch.Tensor,
    method: torch.Tensor,
    t0: torch.Tensor,
    param_a: torch.Tensor,
    param_b: torch.Tensor,
) -> None:
    require(isinstance(logits, torch.Tensor), "logits must be a torch.Tensor")
    require(logits.dim() == 2, f"logits must be 2-D (num_rows, vocab), got {logits.dim()}-D")
    require(logits.dtype == torch.float32, f"logits has dtype {logits.dtype}, expected fp32")
    require(logits.is_contiguous(), "logits must be contiguous")
    num_rows, device = logits.shape[0], logits.device
    check_tensor("method", method, (num_rows,), _METHOD_DTYPES, device)
    for name, value in (("t0", t0), ("param_a", param_a), ("param_b", param_b)):
        check_tensor(name, value, (num_rows,), (torch.float32,), device)


# --------------------------------------------------------------------------- reference


def _entropy_torch(
    logits: torch.Tensor,  # (R, V) fp32
    candidates: torch.Tensor,  # (R, V) bool: logit > -inf
) -> torch.Tensor:  # (R,) fp32
    log_p = torch.log_softmax(logits, dim=-1)  # (R, V); an all -inf row gives NaN
    terms = torch.where(candidates, log_p.exp() * log_p, 0.0)  # p = 0 at -inf: no 0 * -inf
    return torch.where(candidates.any(dim=-1), -terms.sum(dim=-1), 0.0)


def _edt_torch(
    t0: torch.Tensor, theta: torch.Tensor, base: torch.Tensor, entropy: torch.Tensor
) -> torch.Tensor:  # all (R,) fp32
    safe_h = torch.where(entropy > 0, entropy, 1.0)
    return torch.where(entropy > 0, t0 * base.pow(theta / safe_h), 0.0)


def _dynatemp_torch(
    t0: torch.Tensor,
    spread: torch.Tensor,
    exponent: torch.Tensor,
    entropy: torch.Tensor,
    count: torch.Tensor,  # (R,) int64: candidates per row
) -> torch.Tensor:  # all (R,) fp32
    t_min = (t0 - spread).clamp(min=0.0)
    t_max = t0 + spread
    active = (spread > 0) & (count > 1)
    max_entropy = count.clamp(min=2).float().log()
    temp = t_min + (t_max - t_min) * (entropy / max_entropy).pow(exponent)
    return torch.where(active, temp, t0)


def adaptive_temperature_torch(
    logits: torch.Tensor,  # (R, V) fp32, contiguous; scaled in place
    method: torch.Tensor,  # (R,) int8/int32, TempMethod values
    t0: torch.Tensor,  # (R,) fp32: base / centre / given temperature
    param_a: torch.Tensor,  # (R,) fp32: EDT theta; dynatemp range
    param_b: torch.Tensor,  # (R,) fp32: EDT N; dynatemp exponent
) -> torch.Tensor:  # (R,) fp32: the temperature used per row
    """Reference: every row's temperature (see the module docstring), vectorized over rows."""
    _check_args(logits, method, t0, param_a, param_b)
    method = method.long()
    # Only EDT and dynatemp read the distribution (a CPU sync here is free; GPUs run Triton).
    if not bool(((method == TempMethod.EDT) | (method == TempMethod.DYNATEMP)).any()):
        logits.div_(torch.where(t0 > 0, t0, 1.0).unsqueeze(-1))
        return t0.clone()
    candidates = logits > float("-inf")  # (R, V)
    entropy = _entropy_torch(logits, candidates)
    count = candidates.sum(dim=-1)  # (R,)
    temp = torch.where(method == TempMethod.EDT, _edt_torch(t0, param_a, param_b, entropy), t0)
    dyn = _dynatemp_torch(t0, param_a, param_b, entropy, count)
    temp = torch.where(method == TempMethod.DYNATEMP, dyn, temp)
    # x / 1 is exact, so rows with T <= 0 (or NaN) keep their bits.
    logits.div_(torch.where(temp > 0, temp, 1.0).unsqueeze(-1))
    return temp


def adaptive_temperature_triton(
    logits: torch.Tensor,  # (R, V) fp32, contiguous; scaled in place
    method: torch.Tensor,  # (R,) int8/int32, TempMethod values
    t0: torch.Tensor,  # (R,) fp32: base / centre / given temperature
    param_a: torch.Tensor,  # (R,) fp32: EDT theta; dynatemp range
    param_b: torch.Tensor,  # (R,) fp32: EDT N; dynatemp exponent
) -> torch.Tensor:  # (R,) fp32: the temperature used per row
    """Same contract as `adaptive_temperature_torch`; one program per row."""
    _check_args(logits, method, t0, param_a, param_b)
    num_rows, vocab_size = logits.shape
    temp = torch.empty(num_rows, dtype=torch.float32, device=logits.device)
    if num_rows == 0:
        return temp  # nothing to launch (vocab_size 0 is fine: no candidates, H = 0)

    from steerserve.kernels.adaptive_temperature.kernel import adaptive_temperature_kernel

    block = min(BLOCK_V, 1 << (max(vocab_size, 16) - 1).bit_length())  # a power of 2
    adaptive_temperature_kernel[(num_rows,)](
        logits, method, t0, param_a, param_b, temp, vocab_size,
        BLOCK=block, num_warps=4 if block <= 1024 else 8,
    )  # fmt: skip
    return temp


def adaptive_temperature(
    logits: torch.Tensor,
    method: torch.Tensor,
    t0: torch.Tensor,
    param_a: torch.Tensor,
    param_b: torch.Tensor,
) -> torch.Tensor:
    """Scale every row of `logits` in place by its temperature; Triton or PyTorch by device."""
    require(isinstance(logits, torch.Tensor), "logits must be a torch.Tensor")
    use_triton = dispatch.BACKENDS.use_triton("adaptive_temperature", logits.device)
    impl = adaptive_temperature_triton if use_triton else adaptive_temperature_torch
    return impl(logits, method, t0, param_a, param_b)
