"""Combining lanes: methods by hand, then dense and Triton (interpreter on CPU) vs the reference."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch

from steerserve.kernels.combine import ops as combine_module
from steerserve.kernels.combine.ops import (
    combine_aligned,
    combine_lanes,
    combine_lanes_dense,
    combine_lanes_torch,
    combine_lanes_triton,
)
from tests.kernels.support import (
    DEVICE,
    assert_triton_imported_lazily,
    record_dispatch,
    requires_triton,
)

IMPLS = [
    pytest.param(combine_lanes_torch, id="torch"),
    pytest.param(combine_lanes_dense, id="dense"),
    pytest.param(combine_lanes_triton, id="triton", marks=requires_triton),
]

NEG_INF = float("-inf")
Impl = Callable[..., torch.Tensor]


@pytest.fixture(autouse=True)
def _small_block(monkeypatch: pytest.MonkeyPatch) -> None:
    # Several vocabulary blocks per row even at small V, and a fast interpreter.
    monkeypatch.setattr(combine_module, "BLOCK_V", 128)


@dataclass
class Row:
    """One request row: its (lane, weight) slots, the mode and the plausibility mask."""

    slots: list[tuple[int, float]] = field(default_factory=list)
    log_softmax: bool = False
    plausible_lane: int = -1
    alpha: float = 1.0


def _f32(values: object) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=DEVICE)


def _i32(values: object) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32, device=DEVICE)


def _tensors(
    lanes: torch.Tensor,  # (L, V)
    temperature: list[float],  # (L,)
    rows: list[Row],
    num_slots: int | None = None,  # M; default: the most slots of any row
) -> list[torch.Tensor]:
    """The op's seven arguments; unused slots are (-1, 0.0)."""
    if num_slots is None:
        num_slots = max((len(row.slots) for row in rows), default=1)
    padded = [row.slots + [(-1, 0.0)] * (num_slots - len(row.slots)) for row in rows]
    lane_index = [[lane for lane, _ in slots] for slots in padded]
    weight = [[w for _, w in slots] for slots in padded]
    return [
        lanes.to(DEVICE).contiguous(),
        _f32(temperature),
        _i32(lane_index).reshape(len(rows), num_slots),
        _f32(weight).reshape(len(rows), num_slots),
        torch.tensor([row.log_softmax for row in rows], dtype=torch.bool, device=DEVICE),
        _i32([row.plausible_lane for row in rows]),
        _f32([row.alpha for row in rows]),
    ]


def _assert_same(got: torch.Tensor, expected: torch.Tensor) -> None:
    """Same shape, dtype and -inf positions, no NaN or +inf, values to 1e-5."""
    expected = expected.to(got.device)
    assert got.shape == expected.shape and got.dtype == torch.float32
    assert not got.isnan().any() and not got.isposinf().any()
    assert torch.equal(got == NEG_INF, expected == NEG_INF)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- methods by hand

# Lanes: 0 base, 1 expert, 2 anti-expert / amateur at T = 1, 3 amateur at T = 0.5,
# 4 SH2 ponder, 5 SH2 orig, 6 DoLa mature, 7 DoLa premature.
_GEN = torch.Generator().manual_seed(7)
LANES = torch.randn(8, 11, generator=_GEN) * 2.0  # (L, V)
LANES[3] = LANES[2]  # the amateur twice: T = 1 (O'Brien) and T = 0.5 (Li et al.)
TEMPERATURE = [1.0, 1.0, 1.0, 0.5, 1.0, 1.0, 1.0, 1.0]
Z = list(LANES)  # per-lane views for the formulas below


def _lsm(x: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(x, dim=-1)


def _relative_top(x: torch.Tensor, alpha: float) -> torch.Tensor:
    """Additive mask by the probability test: 0 where p(v) >= alpha * max p, else -inf."""
    p = torch.softmax(x, dim=-1)
    return torch.where(p >= alpha * p.max(), 0.0, NEG_INF)


PROXY_A, CD_BETA, SH2_ALPHA = 0.8, 0.5, 1.6
METHODS = [  # (row, expected row computed from the paper's formula)
    pytest.param(
        Row([(0, 1.0), (1, PROXY_A), (2, -PROXY_A)]),
        Z[0] + PROXY_A * (Z[1] - Z[2]),
        id="proxy-tuning",
    ),
    pytest.param(  # anti-expert = base, deduplicated into one lane
        Row([(0, 1.0), (1, PROXY_A), (0, -PROXY_A)]),
        Z[0] + PROXY_A * (Z[1] - Z[0]),
        id="proxy-tuning-shared-lane",
    ),
    pytest.param(
        Row([(1, 1.0), (3, -CD_BETA)], log_softmax=True, plausible_lane=1, alpha=0.1),
        _lsm(Z[1]) - CD_BETA * _lsm(Z[2] / 0.5) + _relative_top(Z[1], 0.1),
        id="contrastive-li2022",
    ),
    pytest.param(
        Row([(1, 1.0 + CD_BETA), (2, -CD_BETA)], plausible_lane=1, alpha=0.1),
        torch.where(
            Z[1] < math.log(0.1) + Z[1].max(), NEG_INF, (1 + CD_BETA) * Z[1] - CD_BETA * Z[2]
        ),
        id="contrastive-obrien",
    ),
    pytest.param(
        Row([(4, 1.0 + SH2_ALPHA), (5, -SH2_ALPHA)], log_softmax=True),
        _lsm(Z[4]) + SH2_ALPHA * (_lsm(Z[4]) - _lsm(Z[5])),
        id="sh2",
    ),
    pytest.param(
        Row([(6, 1.0), (7, -1.0)], log_softmax=True, plausible_lane=6, alpha=0.1),
        _lsm(Z[6]) - _lsm(Z[7]) + _relative_top(Z[6], 0.1),
        id="dola",
    ),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(("row", "expected"), METHODS)
def test_method_by_hand(impl: Impl, row: Row, expected: torch.Tensor) -> None:
    got = impl(*_tensors(LANES, TEMPERATURE, [row]))
    _assert_same(got, expected.unsqueeze(0))


def test_masks_in_method_cases_are_not_trivial() -> None:
    # Guards the by-hand cases: each mask must drop some tokens and keep several.
    for case in METHODS:
        _, expected = case.values
        kept = int((expected > NEG_INF).sum())
        assert kept >= 2 and (kept == expected.numel() or kept <= expected.numel() - 2)
    assert any(bool((case.values[1] == NEG_INF).any()) for case in METHODS)


@pytest.mark.parametrize("impl", IMPLS)
def test_methods_in_one_batch(impl: Impl) -> None:
    rows = [case.values[0] for case in METHODS]
    expected = torch.stack([case.values[1] for case in METHODS])
    _assert_same(impl(*_tensors(LANES, TEMPERATURE, rows)), expected)


# --------------------------------------------------------------------------- rules, literal values


def _one(impl: Impl, lanes: list[list[float]], temperature: list[float], row: Row) -> list[float]:
    return impl(*_tensors(_f32(lanes), temperature, [row]))[0].tolist()


@pytest.mark.parametrize("impl", IMPLS)
def test_proxy_tuning_literal(impl: Impl) -> None:
    lanes = [[1.0, 2.0, 3.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]  # base, expert, anti-expert
    row = Row([(0, 1.0), (1, 0.5), (2, -0.5)])
    assert _one(impl, lanes, [1.0] * 3, row) == [0.5, 2.5, 3.0]


@pytest.mark.parametrize("impl", IMPLS)
def test_alpha_one_keeps_tied_argmax(impl: Impl) -> None:
    row = Row([(0, 1.0)], plausible_lane=0, alpha=1.0)
    assert _one(impl, [[1.0, 3.0, 3.0, 2.0]], [1.0], row) == [NEG_INF, 3.0, 3.0, NEG_INF]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    ("temperature", "expected"),
    [(1.0, [0.0, -2.0, NEG_INF]), (0.5, [0.0, NEG_INF, NEG_INF])],
    ids=["t1", "t0.5"],
)
def test_mask_uses_scaled_lane(impl: Impl, temperature: float, expected: list[float]) -> None:
    # log(0.1) = -2.30: z = -2 is plausible at T = 1, z / T = -4 is not at T = 0.5.
    row = Row([(0, 1.0)], plausible_lane=0, alpha=0.1)
    assert _one(impl, [[0.0, -2.0, -3.0]], [temperature], row) == expected


NEG_LANES = [[0.0, NEG_INF, 1.0], [1.0, 2.0, NEG_INF], [NEG_INF] * 3]
LSE_A = math.log(1.0 + math.e)  # logsumexp of lane 0's finite entries (0, 1)
NEG_INF_RULES = [  # (row, expected)
    pytest.param(Row([(0, 1.0), (1, -1.0)]), [-1.0, NEG_INF, NEG_INF], id="negative-weight"),
    pytest.param(Row([(0, 1.0), (1, 2.0)]), [2.0, NEG_INF, NEG_INF], id="positive-weight"),
    pytest.param(Row([(0, 1.0), (1, 0.0)]), [0.0, NEG_INF, 1.0], id="zero-weight-absent"),
    pytest.param(Row([(2, 0.0), (1, 1.0)]), [1.0, 2.0, NEG_INF], id="zero-weight-all-inf"),
    pytest.param(Row([(2, 0.0)]), [0.0, 0.0, 0.0], id="only-zero-weight"),
    pytest.param(Row([(0, 1.0)], True), [-LSE_A, NEG_INF, 1.0 - LSE_A], id="lsm-keeps-inf"),
    pytest.param(Row([(0, 1.0), (2, 1.0)], True), [NEG_INF] * 3, id="lsm-all-inf-lane"),
    pytest.param(Row([(0, 1.0)], plausible_lane=2), [NEG_INF] * 3, id="mask-on-all-inf-lane"),
    pytest.param(Row([(1, 1.0)], plausible_lane=0, alpha=0.01), [1.0, NEG_INF, NEG_INF],
                 id="masked-in-plausible-lane"),
]  # fmt: skip


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(("row", "expected"), NEG_INF_RULES)
def test_neg_inf_rules(impl: Impl, row: Row, expected: list[float]) -> None:
    got = _one(impl, NEG_LANES, [1.0] * 3, row)
    torch.testing.assert_close(_f32(got), _f32(expected), rtol=1e-6, atol=1e-6)


UNUSED_ROWS = [  # (row, expected) over lanes [[1, 2, 3], [0, 5, 1]]
    pytest.param(Row([(-1, 0.0), (-1, 0.0)]), [0.0, 0.0, 0.0], id="all-unused"),
    pytest.param(Row([(-1, 0.7)]), [0.0, 0.0, 0.0], id="unused-with-weight"),
    pytest.param(Row([(-1, 0.0)], plausible_lane=1, alpha=0.5), [NEG_INF, 0.0, NEG_INF],
                 id="all-unused-masked"),
    pytest.param(Row([(2, 1.0), (-5, 1.0), (0, 2.0)]), [2.0, 4.0, 6.0], id="out-of-range-lane"),
    pytest.param(Row([(1, 1.0)], plausible_lane=2, alpha=1.0), [0.0, 5.0, 1.0],
                 id="out-of-range-plausible-lane"),
]  # fmt: skip


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(("row", "expected"), UNUSED_ROWS)
def test_unused_and_out_of_range_slots(impl: Impl, row: Row, expected: list[float]) -> None:
    assert _one(impl, [[1.0, 2.0, 3.0], [0.0, 5.0, 1.0]], [1.0, 1.0], row) == expected


# --------------------------------------------------------------------------- random batches


def _random_case(
    num_rows: int, num_slots: int, vocab: int, num_lanes: int, seed: int
) -> list[torch.Tensor]:
    """Mixed rows: 1..min(M, 4) present slots, raw / log-softmax, masks, -inf entries, zero
    weights, a repeated lane, out-of-range indices, an all -1 row and an all -inf lane."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_lanes, vocab, generator=gen) * 3.0  # (L, V)
    sparse = torch.rand(num_lanes, vocab, generator=gen) < 0.08
    logits = torch.where(sparse & (torch.arange(num_lanes) % 2 == 1).unsqueeze(-1), NEG_INF, logits)
    logits[-1] = NEG_INF  # only used by the special rows below
    temperature = 0.5 + 1.5 * torch.rand(num_lanes, generator=gen)
    temperature[0] = 1.0

    lane_index = torch.randint(0, num_lanes - 1, (num_rows, num_slots), generator=gen)
    count = torch.randint(1, min(num_slots, 4) + 1, (num_rows,), generator=gen)  # (R,)
    lane_index[torch.arange(num_slots) >= count.unsqueeze(-1)] = -1
    weight = torch.randn(num_rows, num_slots, generator=gen)
    weight[torch.rand(num_rows, num_slots, generator=gen) < 0.1] = 0.0
    log_softmax = torch.rand(num_rows, generator=gen) < 0.5
    plausible = torch.randint(-1, num_lanes - 1, (num_rows,), generator=gen)
    alphas = torch.tensor([0.05, 0.1, 0.5, 1.0])
    alpha = alphas[torch.randint(0, 4, (num_rows,), generator=gen)]

    specials = [  # (row slots, log_softmax, plausible lane)
        ([0, 0, 1], [1.0, -0.4, 0.6], False, -1),  # a repeated lane
        ([-1], [0.0], False, 0),  # all unused, masked
        ([num_lanes - 1, 1], [0.0, 1.0], True, 1),  # zero weight on the all -inf lane
        ([num_lanes + 3, -7, 0], [1.0, 1.0, -0.5], True, num_lanes),  # out of range
        ([num_lanes - 1, 0], [0.5, 1.0], True, -1),  # all -inf lane used: all -inf row
    ]
    for row, (lanes, weights, lsm, p_lane) in enumerate(specials[:num_rows]):
        used = min(len(lanes), num_slots)
        lane_index[row] = -1
        lane_index[row, :used] = torch.tensor(lanes[:used])
        weight[row, :used] = torch.tensor(weights[:used])
        log_softmax[row], plausible[row] = lsm, p_lane
    tensors = [logits, temperature, lane_index.int(), weight, log_softmax, plausible.int(), alpha]
    return [t.to(DEVICE).contiguous() for t in tensors]


RANDOM_SHAPES = [  # (R, M, V, L): V below, at, and not a multiple of the patched BLOCK_V (128)
    (8, 4, 300, 6),
    (6, 8, 1000, 5),
    (5, 1, 128, 3),
    (7, 3, 129, 4),
    (4, 2, 1, 3),
    (0, 4, 300, 3),
]


@pytest.mark.parametrize("impl", IMPLS[1:])
@pytest.mark.parametrize(("num_rows", "num_slots", "vocab", "num_lanes"), RANDOM_SHAPES)
def test_matches_reference(
    impl: Impl, num_rows: int, num_slots: int, vocab: int, num_lanes: int
) -> None:
    case = _random_case(num_rows, num_slots, vocab, num_lanes, seed=num_rows * vocab + num_slots)
    expected = combine_lanes_torch(*case)
    _assert_same(impl(*case), expected)
    if num_rows * vocab >= 1000:  # the case exercises both finite values and -inf
        finite = expected > NEG_INF
        assert 0.2 < finite.float().mean() < 0.9


@requires_triton
def test_triton_default_block_matches_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(combine_module, "BLOCK_V", 1024)
    case = _random_case(3, 2, 2500, 3, seed=11)
    _assert_same(combine_lanes_triton(*case), combine_lanes_torch(*case))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    ("num_rows", "num_slots", "vocab", "num_lanes"),
    [(0, 2, 8, 2), (2, 2, 0, 2), (2, 2, 8, 0), (2, 0, 8, 2)],
    ids=["no-rows", "no-vocab", "no-lanes", "no-slots"],
)
def test_empty(impl: Impl, num_rows: int, num_slots: int, vocab: int, num_lanes: int) -> None:
    args = [
        torch.ones(num_lanes, vocab, device=DEVICE),
        torch.ones(num_lanes, device=DEVICE),
        torch.zeros(num_rows, num_slots, dtype=torch.int32, device=DEVICE),  # lane 0
        torch.ones(num_rows, num_slots, device=DEVICE),
        torch.ones(num_rows, dtype=torch.bool, device=DEVICE),
        torch.full((num_rows,), -1, dtype=torch.int32, device=DEVICE),
        torch.ones(num_rows, device=DEVICE),
    ]
    got = impl(*args)
    assert got.shape == (num_rows, vocab) and got.dtype == torch.float32
    assert torch.equal(got, torch.zeros(num_rows, vocab, device=DEVICE))  # nothing present


# --------------------------------------------------------------------------- validation


def _args(**changes: object) -> list[object]:
    case: dict[str, object] = dict(
        zip(
            ["lane_logits", "lane_temperature", "lane_index", "weight", "log_softmax",
             "plausible_lane", "plausible_alpha"],
            _tensors(torch.zeros(3, 8), [1.0] * 3, [Row([(0, 1.0), (1, -1.0)])] * 2),
            strict=True,
        )
    )  # fmt: skip
    case.update(changes)
    return list(case.values())


_F32 = {"dtype": torch.float32, "device": DEVICE}
_I32 = {"dtype": torch.int32, "device": DEVICE}
BAD = [
    pytest.param({"lane_logits": [[0.0] * 8] * 3}, id="logits-list"),
    pytest.param({"lane_logits": torch.zeros(24, **_F32)}, id="logits-1d"),
    pytest.param({"lane_logits": torch.zeros(3, 8, dtype=torch.float16)}, id="logits-f16"),
    pytest.param({"lane_logits": torch.zeros(8, 3, **_F32).t()}, id="logits-nc"),
    pytest.param({"lane_temperature": torch.ones(2, **_F32)}, id="temperature-lanes"),
    pytest.param({"lane_temperature": torch.ones(3, dtype=torch.float64)}, id="temperature-f64"),
    pytest.param({"lane_index": torch.zeros(2, 9, **_I32)}, id="index-9-slots"),
    pytest.param({"lane_index": torch.zeros(2, 2, dtype=torch.int64)}, id="index-int64"),
    pytest.param({"lane_index": torch.zeros(4, **_I32)}, id="index-1d"),
    pytest.param({"lane_index": torch.zeros(2, 4, **_I32)[:, ::2]}, id="index-nc"),
    pytest.param({"weight": torch.ones(2, 3, **_F32)}, id="weight-slots"),
    pytest.param({"weight": torch.ones(2, 2, dtype=torch.float64)}, id="weight-f64"),
    pytest.param({"log_softmax": torch.ones(2, **_I32)}, id="lsm-int"),
    pytest.param({"log_softmax": torch.ones(3, dtype=torch.bool)}, id="lsm-rows"),
    pytest.param({"plausible_lane": torch.zeros(2, dtype=torch.int64)}, id="plausible-int64"),
    pytest.param({"plausible_alpha": torch.ones(2, 1, **_F32)}, id="alpha-2d"),
    pytest.param({"plausible_alpha": 0.1}, id="alpha-float"),
    pytest.param({"plausible_alpha": torch.ones(2, dtype=torch.float32, device="meta")},
                 id="alpha-device"),
]  # fmt: skip


@pytest.mark.parametrize("impl", [*IMPLS, pytest.param(combine_lanes, id="entry")])
@pytest.mark.parametrize("changes", BAD)
def test_rejects(impl: Impl, changes: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        impl(*_args(**changes))


@pytest.mark.parametrize("impl", IMPLS)
def test_accepts_the_valid_arguments(impl: Impl) -> None:
    # The base case of test_rejects is valid: each rejection comes from its one change.
    assert impl(*_args()).shape == (2, 8)


# --------------------------------------------------------------------------- entry point


def test_entry_point_matches_reference() -> None:
    case = _random_case(6, 4, 300, 4, seed=3)
    _assert_same(combine_lanes(*case), combine_lanes_torch(*case))


@pytest.mark.parametrize("use_triton", [True, False], ids=["triton", "dense"])
def test_entry_point_dispatch(monkeypatch: pytest.MonkeyPatch, use_triton: bool) -> None:
    decisions = record_dispatch(monkeypatch, use_triton)
    monkeypatch.setattr(combine_module, "combine_lanes_triton", lambda *args: "triton")
    monkeypatch.setattr(combine_module, "combine_lanes_dense", lambda *args: "dense")
    args = _args()
    for _ in range(2):
        assert combine_lanes(*args) == ("triton" if use_triton else "dense")
    assert len(decisions) == 1  # decided once per device type


def test_module_level_imports_leave_triton_out() -> None:
    assert_triton_imported_lazily(combine_module, (".kernel",))


@pytest.mark.parametrize("log_softmax", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_aligned_rows_match_the_reference(log_softmax: bool, masked: bool) -> None:
    """Every row combines slot k from block k's same row: the reference over a table of the
    blocks' rows gives the same values."""
    gen = torch.Generator().manual_seed(5)
    rows, vocab, weights, temps = 6, 300, [1.0, -0.5, 0.0, 0.7], [1.0, 0.5, 2.0, 1.3]
    blocks = [torch.randn(rows, vocab, generator=gen) * 3 for _ in weights]
    blocks[1][torch.rand(rows, vocab, generator=gen) < 0.05] = NEG_INF
    blocks[2][:, :10] = NEG_INF  # weight 0: ignored, -inf included
    table = torch.cat(blocks)  # slot k of row r is table row k * rows + r
    index = torch.tensor([[k * rows + r for k in range(len(weights))] for r in range(rows)])
    plausible_lane = index[:, 1] if masked else torch.full((rows,), -1)
    expected = combine_lanes_torch(
        table, torch.tensor(temps).repeat_interleave(rows), index.int(),
        torch.tensor(weights).expand(rows, -1).contiguous(),
        torch.full((rows,), log_softmax), plausible_lane.int(), torch.full((rows,), 0.1))
    got = combine_aligned(blocks, temps, weights, log_softmax, blocks[1] if masked else None,
                          temps[1], 0.1)
    _assert_same(got, expected)
