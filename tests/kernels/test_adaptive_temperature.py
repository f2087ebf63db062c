"""Adaptive temperature: the reference by hand, then Triton (interpreter on CPU) against it."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

from steerserve.kernels.adaptive_temperature import ops as at_module
from steerserve.kernels.adaptive_temperature.ops import (
    TempMethod,
    adaptive_temperature,
    adaptive_temperature_torch,
    adaptive_temperature_triton,
)
from tests.kernels.support import DEVICE, assert_triton_imported_lazily, requires_triton

IMPLS = [
    pytest.param(adaptive_temperature_torch, id="torch"),
    pytest.param(adaptive_temperature_triton, id="triton", marks=requires_triton),
]

FIXED, EDT, DYNA, GIVEN = (int(m) for m in TempMethod)
NEG_INF = float("-inf")
Impl = Callable[..., torch.Tensor]


def _f32(values: object) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=DEVICE)


def _run(
    impl: Impl,
    rows: list[list[float]],  # (R, V) logits
    params: list[tuple[int, float, float, float]],  # per row: (method, t0, a, b)
    method_dtype: torch.dtype = torch.int32,
) -> tuple[torch.Tensor, torch.Tensor]:  # (temperatures (R,), scaled logits (R, V))
    logits = _f32(rows)
    method, t0, a, b = zip(*params, strict=True)
    method_t = torch.tensor(method, dtype=method_dtype, device=DEVICE)
    temp = impl(logits, method_t, _f32(t0), _f32(a), _f32(b))
    return temp, logits


@pytest.fixture(autouse=True)
def _small_block(monkeypatch: pytest.MonkeyPatch) -> None:
    # Several loop steps per row even at small V, and a fast interpreter.
    monkeypatch.setattr(at_module, "BLOCK_V", 256)


# --------------------------------------------------------------------------- by hand

# p = (1/4, 1/4, 1/2) over 3 of 6 tokens: H = 1.5 ln 2, Hmax = ln 3 (candidates, not V).
MASKED_ROW = [0.0, NEG_INF, 0.0, math.log(2.0), NEG_INF, NEG_INF]
MASKED_NORM = 1.5 * math.log(2.0) / math.log(3.0)
ONE_HOT = [NEG_INF, 2.5, NEG_INF, NEG_INF]

BY_HAND = [  # (row, (method, t0, a, b), expected T)
    pytest.param([1.0] * 4, (EDT, 1.0, 0.5, 0.8), 0.8 ** (0.5 / math.log(4.0)), id="edt-uniform"),
    pytest.param([1.0] * 4, (EDT, 2.0, 0.5, 0.8), 2 * 0.8 ** (0.5 / math.log(4.0)), id="edt-t0"),
    pytest.param([0.3, -1.0, 2.0, 0.0], (DYNA, 0.7, 0.0, 1.0), 0.7, id="dyna-range-0"),
    pytest.param([1.0] * 4, (DYNA, 0.7, 0.4, 1.0), 1.1, id="dyna-uniform"),
    pytest.param(MASKED_ROW, (DYNA, 1.0, 0.5, 2.0), 0.5 + MASKED_NORM**2, id="dyna-masked"),
    pytest.param(MASKED_ROW, (DYNA, 0.3, 0.5, 1.0), 0.8 * MASKED_NORM, id="dyna-tmin-clamped"),
    pytest.param(ONE_HOT, (DYNA, 0.6, 0.5, 1.0), 0.6, id="dyna-one-candidate"),
    pytest.param([0.3, -1.0, 2.0, 0.0], (FIXED, 0.5, 9.0, 9.0), 0.5, id="fixed"),
    pytest.param([0.3, -1.0, 2.0, 0.0], (GIVEN, 1.7, 9.0, 9.0), 1.7, id="given"),
    pytest.param([0.3, -1.0, 2.0, 0.0], (7, 1.3, 0.5, 0.8), 1.3, id="unknown-is-fixed"),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(("row", "params", "expected"), BY_HAND)
def test_by_hand(
    impl: Impl, row: list[float], params: tuple[int, float, float, float], expected: float
) -> None:
    temp, logits = _run(impl, [row], [params])
    assert temp.item() == pytest.approx(expected, rel=1e-5)
    torch.testing.assert_close(logits[0], _f32(row) / temp[0], rtol=1e-6, atol=0.0)


GREEDY = [  # rows whose temperature is 0: left bit-identical
    pytest.param(ONE_HOT, (EDT, 1.0, 0.5, 0.8), id="edt-one-hot"),
    pytest.param([NEG_INF] * 4, (EDT, 1.0, 0.5, 0.8), id="edt-all-masked"),
    pytest.param([0.3, -1.0, 2.0, 0.0], (FIXED, 0.0, 0.0, 0.0), id="fixed-0"),
    pytest.param([0.3, NEG_INF, 2.0, 0.0], (GIVEN, 0.0, 0.0, 0.0), id="given-0"),
    pytest.param([0.3, -1.0, 2.0, 0.0], (EDT, 0.0, 0.5, 0.8), id="edt-t0-0"),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(("row", "params"), GREEDY)
def test_zero_temperature_leaves_row(
    impl: Impl, row: list[float], params: tuple[int, float, float, float]
) -> None:
    temp, logits = _run(impl, [row], [params])
    assert temp.item() == 0.0
    assert torch.equal(logits[0], _f32(row))


@pytest.mark.parametrize("impl", IMPLS)
def test_all_masked_dynatemp_uses_t0(impl: Impl) -> None:
    temp, logits = _run(impl, [[NEG_INF] * 5], [(DYNA, 0.9, 0.5, 1.0)])
    assert temp.item() == pytest.approx(0.9)
    assert torch.equal(logits[0], _f32([NEG_INF] * 5))


@pytest.mark.parametrize("impl", IMPLS)
def test_stable_for_large_logits(impl: Impl) -> None:
    # Shifting every logit by 1e4 must not change H: uniform over 4 -> EDT as by hand.
    temp, logits = _run(impl, [[1e4] * 4 + [NEG_INF]], [(EDT, 1.0, 0.5, 0.8)])
    assert temp.item() == pytest.approx(0.8 ** (0.5 / math.log(4.0)), rel=1e-5)
    assert torch.isfinite(logits[0, :4]).all()


# --------------------------------------------------------------------------- random batches


def _random_batch(
    num_rows: int, vocab: int, method_dtype: torch.dtype, seed: int
) -> list[torch.Tensor]:
    """Mixed methods and -inf masks, incl. one-hot, all-masked and shifted rows."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_rows, vocab, generator=gen) * 3.0  # (R, V)
    keep = torch.rand(num_rows, vocab, generator=gen) < torch.rand(num_rows, 1, generator=gen)
    rows = torch.arange(num_rows)  # (R,)
    logits = torch.where(keep | (rows % 4 == 0).unsqueeze(-1), logits, NEG_INF)  # 1/4 unmasked
    if num_rows > 3:
        logits[1] = NEG_INF
        logits[1, vocab // 2] = 1.0  # one candidate
        logits[2] += 50.0
        logits[3] = NEG_INF  # no candidate
    method = rows % 4  # FIXED, EDT, DYNA, GIVEN, ...
    t0 = torch.rand(num_rows, generator=gen) * 1.5
    t0[::5] = 0.0  # some greedy rows
    is_edt = method == EDT
    param_a = torch.where(is_edt, 0.1, 0.0) + torch.rand(num_rows, generator=gen)
    param_a[(method == DYNA) & (rows % 3 == 0)] = 0.0  # dynatemp with range 0 too
    param_b = torch.where(
        is_edt, 0.5 + 0.45 * torch.rand(num_rows, generator=gen),
        0.5 + 1.5 * torch.rand(num_rows, generator=gen),
    )  # fmt: skip
    tensors = [logits, method.to(method_dtype), t0, param_a, param_b]
    return [t.to(DEVICE).contiguous() for t in tensors]


def _assert_matches_reference(impl: Impl, batch: list[torch.Tensor]) -> None:
    """Temperatures and scaled logits to 1e-5 relative; T <= 0 rows keep their bits."""
    logits, *params = batch
    original, expected_logits = logits.clone(), logits.clone()
    expected = adaptive_temperature_torch(expected_logits, *params)
    got = impl(logits, *params)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits, expected_logits, rtol=1e-5, atol=1e-5)
    greedy = expected <= 0  # (R,)
    assert greedy.any()
    assert torch.equal(logits[greedy], original[greedy])


RANDOM_SHAPES = [  # (R, V): V below, at and not a multiple of the patched BLOCK (256)
    (8, 1000),
    (6, 3000),
    (5, 17),
    (4, 256),
    (3, 1),
]


@requires_triton
@pytest.mark.parametrize("method_dtype", [torch.int32, torch.int8], ids=str)
@pytest.mark.parametrize(("num_rows", "vocab"), RANDOM_SHAPES)
def test_triton_matches_reference(num_rows: int, vocab: int, method_dtype: torch.dtype) -> None:
    batch = _random_batch(num_rows, vocab, method_dtype, seed=num_rows * vocab)
    _assert_matches_reference(adaptive_temperature_triton, batch)


@requires_triton
def test_triton_default_block_matches_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(at_module, "BLOCK_V", 1024)
    _assert_matches_reference(adaptive_temperature_triton, _random_batch(4, 2500, torch.int32, 11))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(("num_rows", "vocab"), [(0, 8), (0, 0), (3, 0)])
def test_empty(impl: Impl, num_rows: int, vocab: int) -> None:
    logits = torch.empty(num_rows, vocab, device=DEVICE)
    method = torch.tensor([FIXED, EDT, DYNA][:num_rows], dtype=torch.int32, device=DEVICE)
    t0 = torch.full((num_rows,), 0.5, device=DEVICE)
    ab = torch.full((num_rows,), 0.8, device=DEVICE)
    temp = impl(logits, method, t0, ab, ab)
    assert temp.shape == (num_rows,) and temp.dtype == torch.float32
    # No candidates: H = 0, so EDT gives 0 and dynatemp falls back to t0.
    assert temp.tolist() == [0.5, 0.0, 0.5][:num_rows]


# --------------------------------------------------------------------------- validation


def _args(**changes: object) -> list[object]:
    case: dict[str, object] = {
        "logits": torch.zeros(2, 8, device=DEVICE),
        "method": torch.zeros(2, dtype=torch.int8, device=DEVICE),
        "t0": torch.ones(2, device=DEVICE),
        "param_a": torch.ones(2, device=DEVICE),
        "param_b": torch.ones(2, device=DEVICE),
    }
    case.update(changes)
    return list(case.values())


_F32 = {"dtype": torch.float32, "device": DEVICE}
BAD = [
    pytest.param({"logits": [[0.0] * 8] * 2}, id="logits-list"),
    pytest.param({"logits": torch.zeros(16, **_F32)}, id="logits-1d"),
    pytest.param({"logits": torch.zeros(2, 8, dtype=torch.float16)}, id="logits-f16"),
    pytest.param({"logits": torch.zeros(8, 2, **_F32).t()}, id="logits-nc"),
    pytest.param({"method": torch.zeros(2, dtype=torch.int64)}, id="method-int64"),
    pytest.param({"method": torch.zeros(2, **_F32)}, id="method-float"),
    pytest.param({"method": torch.zeros(3, dtype=torch.int32)}, id="method-rows"),
    pytest.param({"t0": torch.ones(2, 1, **_F32)}, id="t0-2d"),
    pytest.param({"t0": torch.ones(2, dtype=torch.float64)}, id="t0-f64"),
    pytest.param({"param_a": torch.ones(4, **_F32)[::2]}, id="a-nc"),
    pytest.param({"param_b": torch.ones(2, dtype=torch.float32, device="meta")}, id="b-device"),
    pytest.param({"param_b": 0.8}, id="b-float"),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("changes", BAD)
def test_rejects(impl: Impl, changes: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        impl(*_args(**changes))


# --------------------------------------------------------------------------- entry point


def test_entry_point_matches_reference() -> None:
    _assert_matches_reference(adaptive_temperature, _random_batch(6, 300, torch.int32, 3))


def test_module_level_imports_leave_triton_out() -> None:
    assert_triton_imported_lazily(at_module, (".kernel",))
