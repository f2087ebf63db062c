"""SAE feature edit: Triton (interpreter on CPU) and the dense path against the reference.

The reference is checked by hand on 2-d hidden states first; everything else compares the
other paths with it, including bit-identity of what must stay untouched.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from steerserve.kernels.sae import dense as sae_dense
from steerserve.kernels.sae import ops as sae
from steerserve.kernels.sae.dense import sae_edit_dense
from steerserve.kernels.sae.ops import (
    MAX_FEATURES,
    MAX_HIDDEN,
    MODE_ADD,
    MODE_CLAMP,
    sae_edit,
    sae_edit_torch,
    sae_edit_triton,
)
from tests.kernels.support import (
    DEVICE,
    assert_triton_imported_lazily,
    record_dispatch,
    requires_triton,
)

# Every path computes in fp32; differences are reduction order plus one output rounding.
# (The interpreter also rounds fp32 -> bf16 toward zero, not to nearest: 1 ulp more.)
TOLERANCES = {
    torch.float32: {"rtol": 1e-5, "atol": 1e-5},
    torch.bfloat16: {"rtol": 2e-2, "atol": 2e-2},
}
DTYPES = list(TOLERANCES)

IMPLS = [
    pytest.param(sae_edit_torch, id="torch"),
    pytest.param(sae_edit_dense, id="dense"),
    pytest.param(sae_edit_triton, id="triton", marks=requires_triton),
]
FAST_IMPLS = IMPLS[1:]  # what is compared with the reference

ADD, CLAMP = MODE_ADD, MODE_CLAMP
NUM_FEATURES = 5


def _t(values: object, dtype: torch.dtype) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype, device=DEVICE)


# --------------------------------------------------------------------------- by hand


@pytest.mark.parametrize("impl", IMPLS)
def test_by_hand(impl: Callable[..., torch.Tensor]) -> None:
    # Every row starts at x = (3, 4). Pre-activations: u0 = 3, u1 = 7, u2 = 3 - 1 = 2,
    # u3 = 7 but below its JumpReLU threshold 10, so act3 = 0.
    encoders = _t([[1.0, 0.0], [1.0, 1.0], [1.0, 0.0], [1.0, 1.0]], torch.float32)
    decoders = _t([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]], torch.float32)
    enc_bias = _t([0.0, 0.0, -1.0, 0.0], torch.float32)
    threshold = _t([0.0, 0.0, 0.0, 10.0], torch.float32)
    rows = [  # (slots as (index, mode, value), expected)
        ([(0, ADD, 2.0)], [5.0, 4.0]),
        ([(0, CLAMP, 1.0)], [1.0, 4.0]),  # act 3 -> 1
        ([(1, CLAMP, 0.0)], [3.0, -3.0]),  # act 7 -> 0
        ([(0, CLAMP, 1.0), (1, CLAMP, 0.0)], [1.0, -3.0]),  # both encoded from (3, 4)
        ([(1, CLAMP, 0.0), (0, CLAMP, 1.0)], [1.0, -3.0]),  # so order does not matter
        ([(2, CLAMP, 0.0)], [1.0, 4.0]),  # the bias counts: act 2 -> 0
        ([(3, CLAMP, 2.0)], [3.0, 6.0]),  # inactive (JumpReLU): act 0 -> 2
        ([(0, ADD, 1.0), (0, ADD, 1.0)], [5.0, 4.0]),  # repeated slots accumulate
        ([], [3.0, 4.0]),
        ([(0, 5, 9.0), (7, ADD, 9.0)], [3.0, 4.0]),  # unknown mode, index out of range
    ]
    f = 2
    hidden = _t([[[3.0, 4.0]]] * len(rows), torch.float32)  # (10, 1, 2)
    index = [[s[0] for s in slots] + [-1] * (f - len(slots)) for slots, _ in rows]
    mode = [[s[1] for s in slots] + [ADD] * (f - len(slots)) for slots, _ in rows]
    value = [[s[2] for s in slots] + [0.0] * (f - len(slots)) for slots, _ in rows]
    impl(
        hidden, encoders, enc_bias, threshold, decoders,
        _t(index, torch.int32), _t(mode, torch.int8), _t(value, torch.float32),
    )  # fmt: skip
    expected = _t([[expected] for _, expected in rows], torch.float32)
    torch.testing.assert_close(hidden, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_by_hand_position_mask(impl: Callable[..., torch.Tensor]) -> None:
    hidden = _t([[[3.0, 4.0], [3.0, 4.0]]], torch.float32)  # (1, 2, 2)
    one = _t([[1.0, 0.0]], torch.float32)
    impl(
        hidden, one, _t([0.0], torch.float32), _t([0.0], torch.float32), one,
        _t([[0]], torch.int32), _t([[CLAMP]], torch.int8), _t([[1.0]], torch.float32),
        _t([[False, True]], torch.bool),  # prompt position excluded, generated one edited
    )  # fmt: skip
    torch.testing.assert_close(hidden, _t([[[3.0, 4.0], [1.0, 4.0]]], torch.float32))


# --------------------------------------------------------------------------- random cases


def _place_thresholds(
    x: torch.Tensor, encoders: torch.Tensor, enc_bias: torch.Tensor, threshold: torch.Tensor
) -> float:
    """Shift biases (ReLU) or thresholds (JumpReLU) into the middle of the widest gap near
    each feature's median pre-activation: about half the positions fire, and none sits near
    the cut, where rounding could flip a comparison. Returns the smallest margin."""
    pre = x.reshape(-1, x.shape[-1]).double() @ encoders.double().T + enc_bias.double()
    margin = float("inf")
    for u in range(encoders.shape[0]):
        ranked = pre[:, u].sort().values
        n = ranked.numel()
        lo, hi = max(n // 4, 0), max(3 * n // 4, 1)
        gaps = ranked[lo + 1 : hi + 1] - ranked[lo:hi]
        k = lo + int(gaps.argmax())
        cut = float(ranked[k] + ranked[k + 1]) / 2
        margin = min(margin, float(ranked[k + 1] - ranked[k]) / 2)
        if threshold[u] > 0:
            threshold[u] = cut
        else:
            enc_bias[u] -= cut
    return margin


def _case(
    num_rows: int,
    seq: int,
    hidden_size: int,
    slots: int,
    dtype: torch.dtype,
    *,
    masked: bool = True,
    seed: int = 0,
) -> dict[str, torch.Tensor | None]:
    """Mixed rows: row 0 has no features (if there are 2+ rows), row 1 one slot, the last row
    only valid slots; the rest a random mix with -1, out-of-range indices and unknown modes.
    Feature 0 is shared by rows 1 and the last; features 2.. are JumpReLU."""
    gen = torch.Generator().manual_seed(seed)
    u = NUM_FEATURES
    index = torch.randint(-1, u + 2, (num_rows, slots), generator=gen, dtype=torch.int32)
    mode_choices = torch.tensor((ADD, CLAMP, CLAMP, ADD, 2, -1), dtype=torch.int8)
    mode = mode_choices[torch.randint(0, len(mode_choices), (num_rows, slots), generator=gen)]
    if num_rows > 0:
        index[-1] = torch.randint(0, u, (slots,), generator=gen, dtype=torch.int32)
        mode[-1] = torch.randint(0, 2, (slots,), generator=gen, dtype=torch.int8)
        index[-1, 0], mode[-1, 0] = 0, CLAMP
    if num_rows > 1:
        index[0] = -1
        index[1], index[1, 0], mode[1, 0] = -1, 0, ADD
    mask = None
    if masked:
        mask = torch.rand(num_rows, seq, generator=gen) < 0.7
        if seq > 0:
            mask[:, -1] = True  # the decode position is always edited somewhere
    hidden = torch.randn(num_rows, seq, hidden_size, generator=gen).to(dtype)
    encoders = torch.randn(u, hidden_size, generator=gen) / hidden_size**0.5
    enc_bias = torch.randn(u, generator=gen) * 0.1
    threshold = torch.tensor([0.0, 0.0] + [0.5] * (u - 2))
    if num_rows * seq > 1:
        assert _place_thresholds(hidden, encoders, enc_bias, threshold) > 1e-4
    case = {
        "hidden": hidden,
        "encoders": encoders,
        "enc_bias": enc_bias,
        "threshold": threshold,
        "decoders": torch.randn(u, hidden_size, generator=gen) * 0.5,
        "feature_index": index,
        "mode": mode,
        "value": torch.randn(num_rows, slots, generator=gen) * 2,
        "position_mask": mask,
    }
    return {name: None if t is None else t.to(DEVICE) for name, t in case.items()}


def _untouched(case: dict[str, torch.Tensor | None]) -> torch.Tensor:
    """(num_rows, seq) bool: positions that must come back bit-identical."""
    index, mode, hidden = case["feature_index"], case["mode"], case["hidden"]
    assert index is not None and mode is not None and hidden is not None
    valid = (index >= 0) & (index < NUM_FEATURES) & ((mode == ADD) | (mode == CLAMP))
    mask = case["position_mask"]
    edited = torch.ones(hidden.shape[:2], dtype=torch.bool, device=DEVICE)
    if mask is not None:
        edited = mask
    return ~edited | ~valid.any(dim=1)[:, None]


SHAPES = [  # (num_rows, seq, hidden, F, masked)
    pytest.param(1, 1, 64, 1, False, id="decode-batch1-h64-f1"),
    pytest.param(6, 1, 40, 4, True, id="decode-mixed-h40-f4"),
    pytest.param(3, 5, 64, 3, True, id="prefill-masked-h64-f3"),
    pytest.param(4, 2, 40, MAX_FEATURES, False, id="prefill-nomask-h40-f16"),
]


@pytest.mark.parametrize("impl", FAST_IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("num_rows", "seq", "hidden_size", "slots", "masked"), SHAPES)
def test_matches_reference(
    impl: Callable[..., torch.Tensor], dtype: torch.dtype, num_rows: int, seq: int,
    hidden_size: int, slots: int, masked: bool,
) -> None:
    case = _case(num_rows, seq, hidden_size, slots, dtype, masked=masked)
    hidden = case["hidden"]
    assert hidden is not None
    args = [case[name] for name in list(case)[1:]]
    expected = sae_edit_torch(hidden.clone(), *args)
    got = impl(hidden.clone(), *args)
    torch.testing.assert_close(got, expected, **TOLERANCES[dtype])
    untouched = _untouched(case)
    assert torch.equal(got[untouched], hidden[untouched])
    assert torch.equal(expected[untouched], hidden[untouched])
    assert not torch.equal(got[-1, -1], hidden[-1, -1])


@pytest.mark.parametrize("impl", IMPLS)
def test_invalid_slots_are_no_ops(impl: Callable[..., torch.Tensor]) -> None:
    # Row 0: only invalid slots (-1, out of range both ways, unknown modes), NaN values.
    # Row 1: the same plus one valid slot, which must match that slot alone (no NaN leak).
    case = _case(2, 3, 40, 6, torch.float32, masked=False, seed=3)
    nan = float("nan")
    case["feature_index"] = _t([[-1, NUM_FEATURES, 99, 1, 2, -7]] * 2, torch.int32)
    modes = [[ADD, CLAMP, ADD, 2, -1, CLAMP], [ADD, CLAMP, ADD, CLAMP, 127, CLAMP]]
    case["mode"] = _t(modes, torch.int8)
    case["value"] = _t([[nan] * 6, [nan, nan, nan, 1.5, nan, nan]], torch.float32)
    hidden = case["hidden"]
    assert hidden is not None
    before = hidden.clone()
    impl(*case.values())
    assert torch.equal(hidden[0], before[0])

    alone = dict(case, hidden=before[1:].clone(), feature_index=_t([[1]], torch.int32),
                 mode=_t([[CLAMP]], torch.int8), value=_t([[1.5]], torch.float32))
    expected = sae_edit_torch(*alone.values())
    assert torch.isfinite(hidden).all()
    torch.testing.assert_close(hidden[1:], expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_clamp_sets_the_activation(impl: Callable[..., torch.Tensor]) -> None:
    hidden_size, seq = 64, 2
    gen = torch.Generator().manual_seed(7)
    basis = torch.linalg.qr(torch.randn(hidden_size, hidden_size, generator=gen)).Q.T
    # dot(decoders[u], encoders[u]) == 1 and no crosstalk between features; feature 3's
    # encoder is not unit-norm, so its decoder row is not its encoder.
    encoders = torch.cat([basis[:3], 3 * basis[3:4] + 2 * basis[4:5]])  # (4, H)
    decoders = encoders / encoders.square().sum(-1, keepdim=True)
    enc_bias = torch.randn(4, generator=gen) * 0.1
    threshold = torch.full((4,), 0.2)
    hidden = torch.randn(3, seq, hidden_size, generator=gen) * 0.05
    hidden += decoders.sum(0)  # every pre-activation ~ 1 + bias
    index = torch.tensor([[0, 1], [2, -1], [3, -1]], dtype=torch.int32)
    value = torch.tensor([[2.5, 0.3], [0.0, 0.0], [1.7, 0.0]])
    mode = torch.full((3, 2), CLAMP, dtype=torch.int8)
    args = [t.to(DEVICE) for t in (encoders, enc_bias, threshold, decoders, index, mode, value)]
    hidden = hidden.to(DEVICE)
    pre_before = hidden @ args[0].T + args[1]
    assert (pre_before > args[2]).all()  # every clamped feature was active

    impl(hidden, *args)
    pre = hidden @ args[0].T + args[1]  # (R, S, U): re-encoded after the edit
    for r, targets in enumerate(([2.5, 0.3], [0.0], [1.7])):
        for u, target in zip(index[r].tolist(), targets, strict=False):
            torch.testing.assert_close(pre[r, :, u], torch.full((seq,), target, device=DEVICE),
                                       rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pre[0, :, 2], pre_before[0, :, 2])  # orthogonal: unchanged


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(("num_rows", "seq"), [(0, 1), (0, 4), (2, 0)])
def test_empty(impl: Callable[..., torch.Tensor], num_rows: int, seq: int) -> None:
    case = _case(num_rows, seq, 8, 2, torch.bfloat16)
    assert impl(*case.values()).shape == (num_rows, seq, 8)


@pytest.mark.parametrize("impl", IMPLS)
def test_no_features_in_the_launch(impl: Callable[..., torch.Tensor]) -> None:
    case = _case(2, 2, 8, 2, torch.float32, seed=1)
    empty = torch.zeros(0, 8, device=DEVICE)
    case.update(encoders=empty, decoders=empty, enc_bias=empty[:, 0], threshold=empty[:, 0])
    hidden = case["hidden"]
    assert hidden is not None
    before = hidden.clone()
    impl(*case.values())
    assert torch.equal(hidden, before)


# --------------------------------------------------------------------------- validation


def _args(**changes: object) -> list[object]:
    case: dict[str, object] = dict(_case(2, 3, 16, 2, torch.float32))
    case.update(changes)
    return list(case.values())


_F32 = {"dtype": torch.float32, "device": DEVICE}
_I32 = {"dtype": torch.int32, "device": DEVICE}
BAD = [
    pytest.param({"hidden": torch.zeros(2, 16, **_F32)}, id="hidden-2d"),
    pytest.param({"hidden": torch.zeros(2, 3, 16, **_I32)}, id="hidden-int"),
    pytest.param({"hidden": torch.zeros(2, 3, 32, **_F32)[..., ::2]}, id="hidden-strided-last"),
    pytest.param({"hidden": torch.zeros(2, 3, 0, **_F32)}, id="hidden-width-0"),
    pytest.param({"encoders": torch.zeros(5, 15, **_F32)}, id="encoders-width"),
    pytest.param({"encoders": torch.zeros(5, 16, dtype=torch.bfloat16)}, id="encoders-dtype"),
    pytest.param({"encoders": torch.zeros(16, 5, **_F32).T}, id="encoders-strided-last"),
    pytest.param({"encoders": torch.zeros(5, 16, 1, **_F32)}, id="encoders-3d"),
    pytest.param({"decoders": torch.zeros(4, 16, **_F32)}, id="decoders-rows"),
    pytest.param({"decoders": torch.zeros(5, 17, **_F32)}, id="decoders-width"),
    pytest.param({"enc_bias": torch.zeros(4, **_F32)}, id="bias-len"),
    pytest.param({"enc_bias": torch.zeros(5, dtype=torch.float64)}, id="bias-f64"),
    pytest.param({"threshold": torch.zeros(5, 1, **_F32)}, id="threshold-2d"),
    pytest.param({"feature_index": torch.zeros(2, 2, **_F32)}, id="index-float"),
    pytest.param({"feature_index": torch.zeros(2, MAX_FEATURES + 1, **_I32)}, id="f-too-big"),
    pytest.param({"feature_index": torch.zeros(2, 0, **_I32)}, id="f-zero"),
    pytest.param({"feature_index": torch.zeros(3, 2, **_I32)}, id="index-rows"),
    pytest.param({"feature_index": torch.zeros(2, 4, **_I32)[:, ::2]}, id="index-nc"),
    pytest.param({"feature_index": torch.zeros(2, **_I32)}, id="index-1d"),
    pytest.param({"mode": torch.zeros(2, 2, dtype=torch.int64)}, id="mode-int64"),
    pytest.param({"mode": torch.zeros(2, 3, dtype=torch.int8)}, id="mode-shape"),
    pytest.param({"value": torch.zeros(2, 2, dtype=torch.float16)}, id="value-f16"),
    pytest.param({"position_mask": torch.ones(2, 4, dtype=torch.bool)}, id="mask-shape"),
    pytest.param({"position_mask": torch.ones(2, 3, **_I32)}, id="mask-int"),
    pytest.param({"position_mask": "all"}, id="mask-not-tensor"),
    pytest.param({"decoders": "W_dec"}, id="decoders-not-tensor"),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("changes", BAD)
def test_rejects(impl: Callable[..., torch.Tensor], changes: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        impl(*_args(**changes))


def test_rejects_oversized_hidden() -> None:
    with pytest.raises(ValueError, match="exceeds"):
        sae_edit(*_args(hidden=torch.zeros(1, 1, MAX_HIDDEN + 1, device=DEVICE)))


# --------------------------------------------------------------------------- entry point


def test_entry_point_matches_reference() -> None:
    case = _case(4, 3, 40, 3, torch.float32, seed=6)
    hidden = case["hidden"]
    assert hidden is not None
    args = [case[name] for name in list(case)[1:]]
    expected = sae_edit_torch(hidden.clone(), *args)
    torch.testing.assert_close(sae_edit(hidden.clone(), *args), expected, **TOLERANCES[
        torch.float32])


@pytest.mark.parametrize("use_triton", [True, False], ids=["triton", "dense"])
def test_entry_point_dispatch(monkeypatch: pytest.MonkeyPatch, use_triton: bool) -> None:
    decisions = record_dispatch(monkeypatch, use_triton)
    monkeypatch.setattr(sae, "sae_edit_triton", lambda *args: "triton")
    monkeypatch.setattr(sae_dense, "sae_edit_dense", lambda *args: "dense")
    args = _args()
    for _ in range(2):
        assert sae_edit(*args) == ("triton" if use_triton else "dense")
    assert len(decisions) == 1  # decided once per device type


def test_module_level_imports_leave_triton_out() -> None:
    for module in (sae, sae_dense):
        assert_triton_imported_lazily(module, (".edit",))
