"""Steering kernels: Triton (interpreter on CPU) against the PyTorch references.

The references are checked by hand on 2-d hidden states first; everything else compares
the Triton launchers with them, including bit-identity of what must stay untouched.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

from steerserve.kernels.steering import ops as steering
from steerserve.kernels.steering.dense import steer_heads_dense, steer_residual_dense
from steerserve.kernels.steering.ops import (
    MODE_ABLATE,
    MODE_ADD,
    MODE_CLAMP,
    steer_heads,
    steer_heads_torch,
    steer_heads_triton,
    steer_residual,
    steer_residual_torch,
    steer_residual_triton,
)
from tests.kernels.support import DEVICE, assert_triton_imported_lazily, requires_triton

# Both paths compute in fp32; differences are reduction order plus one output rounding.
# (The interpreter also rounds fp32 -> bf16 toward zero, not to nearest: 1 ulp more.)
TOLERANCES = {
    torch.float32: {"rtol": 1e-5, "atol": 1e-4},
    torch.bfloat16: {"rtol": 2e-2, "atol": 2e-2},
    torch.float16: {"rtol": 2e-3, "atol": 2e-3},
}
DTYPES = list(TOLERANCES)

RESIDUAL_IMPLS = [
    pytest.param(steer_residual_torch, id="torch"),
    pytest.param(steer_residual_dense, id="dense"),
    pytest.param(steer_residual_triton, id="triton", marks=requires_triton),
]
HEADS_IMPLS = [
    pytest.param(steer_heads_torch, id="torch"),
    pytest.param(steer_heads_dense, id="dense"),
    pytest.param(steer_heads_triton, id="triton", marks=requires_triton),
]

ADD, ABLATE, CLAMP = MODE_ADD, MODE_ABLATE, MODE_CLAMP


def _t(values: object, dtype: torch.dtype) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype, device=DEVICE)


# --------------------------------------------------------------------------- by hand


@pytest.mark.parametrize("impl", RESIDUAL_IMPLS)
def test_residual_by_hand(impl: Callable[..., torch.Tensor]) -> None:
    # Every row starts at h = (3, 4), |h| = 5; v0 = (1, 0), v1 = (0, 2), v2 = 0.
    vectors = _t([[1.0, 0.0], [0.0, 2.0], [0.0, 0.0]], torch.float32)
    rows = [  # (items as (index, scale, mode), normalize, expected)
        ([(0, 2.0, ADD)], False, [5.0, 4.0]),
        ([(1, 9.0, ABLATE)], False, [3.0, 0.0]),  # scale ignored
        ([(1, 1.5, CLAMP)], False, [3.0, 1.5]),  # component along (0, 1) set to 1.5
        ([(2, 1.0, ABLATE), (2, 1.0, CLAMP)], False, [3.0, 4.0]),  # zero vector: no-op
        ([(0, 0.0, ABLATE), (1, 0.5, ADD)], False, [0.0, 5.0]),  # in order: (0,4) -> (0,5)
        ([(0, 0.0, ABLATE)], True, [0.0, 5.0]),  # (0, 4) rescaled to norm 5
        ([], True, [3.0, 4.0]),  # no items: untouched even with normalize
        ([(0, -1.0, CLAMP)], True, [-5 / math.sqrt(17), 20 / math.sqrt(17)]),  # (-1, 4)
    ]
    k = 2
    hidden = _t([[[3.0, 4.0]]] * len(rows), torch.float32)  # (8, 1, 2)
    index = [[item[0] for item in items] + [-1] * (k - len(items)) for items, _, _ in rows]
    scale = [[item[1] for item in items] + [0.0] * (k - len(items)) for items, _, _ in rows]
    mode = [[item[2] for item in items] + [0] * (k - len(items)) for items, _, _ in rows]
    impl(
        hidden,
        vectors,
        _t(index, torch.int32),
        _t(scale, torch.float32),
        _t(mode, torch.int8),
        _t([norm for _, norm, _ in rows], torch.bool),
    )
    expected = _t([[expected] for _, _, expected in rows], torch.float32)
    torch.testing.assert_close(hidden, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("impl", RESIDUAL_IMPLS)
def test_residual_by_hand_position_mask(impl: Callable[..., torch.Tensor]) -> None:
    hidden = _t([[[3.0, 4.0], [3.0, 4.0]]], torch.float32)  # (1, 2, 2)
    impl(
        hidden,
        _t([[1.0, 0.0]], torch.float32),
        _t([[0]], torch.int32),
        _t([[2.0]], torch.float32),
        _t([[ADD]], torch.int32),
        _t([False], torch.bool),
        _t([[False, True]], torch.bool),  # prompt position excluded, generated one steered
    )
    torch.testing.assert_close(hidden, _t([[[3.0, 4.0], [5.0, 4.0]]], torch.float32))


@pytest.mark.parametrize("impl", HEADS_IMPLS)
def test_heads_by_hand(impl: Callable[..., torch.Tensor]) -> None:
    attn = _t([[[1.0, 1.0, 1.0, 1.0]], [[1.0, 1.0, 1.0, 1.0]]], torch.float32)  # 2 heads x 2
    offsets = _t([[[1.0, 2.0], [0.0, 0.0]]], torch.float32)  # only head 0 steered
    impl(attn, offsets, _t([0, -1], torch.int32), _t([2.0, 5.0], torch.float32))
    expected = _t([[[3.0, 5.0, 1.0, 1.0]], [[1.0, 1.0, 1.0, 1.0]]], torch.float32)
    torch.testing.assert_close(attn, expected, rtol=0, atol=0)


# --------------------------------------------------------------------------- random cases


def _residual_case(
    num_rows: int,
    seq: int,
    hidden_size: int,
    k: int,
    dtype: torch.dtype,
    *,
    vector_dtype: torch.dtype | None = None,
    masked: bool = True,
    modes: tuple[int, ...] = (ADD, ABLATE, CLAMP),
    seed: int = 0,
) -> dict[str, torch.Tensor | None]:
    """Mixed rows: row 0 has no items (if there are 2+ rows), the last row only items with
    non-zero vectors, the rest a random mix with -1 and the zero vector."""
    gen = torch.Generator().manual_seed(seed)
    num_vectors = 4
    vectors = torch.randn(num_vectors, hidden_size, generator=gen)
    vectors[-1] = 0.0  # ablating/clamping a zero vector must be a no-op, not NaN
    index = torch.randint(-1, num_vectors, (num_rows, k), generator=gen, dtype=torch.int32)
    if num_rows > 0:
        index[-1] = torch.randint(0, num_vectors - 1, (k,), generator=gen, dtype=torch.int32)
    if num_rows > 1:
        index[0] = -1
    mode_choices = torch.tensor(modes, dtype=torch.int8)
    mode = mode_choices[torch.randint(0, len(modes), (num_rows, k), generator=gen)]
    mask = None
    if masked:
        mask = torch.rand(num_rows, seq, generator=gen) < 0.7
        if seq > 0:
            mask[:, -1] = True  # the decode position is always steered somewhere
    case = {
        "hidden": torch.randn(num_rows, seq, hidden_size, generator=gen).to(dtype),
        "vectors": vectors.to(vector_dtype or dtype),
        "vector_index": index,
        "scale": torch.randn(num_rows, k, generator=gen) * 2,
        "mode": mode,
        "normalize": torch.rand(num_rows, generator=gen) < 0.5,
        "position_mask": mask,
    }
    return {name: None if t is None else t.to(DEVICE) for name, t in case.items()}


def _untouched(case: dict[str, torch.Tensor | None]) -> torch.Tensor:
    """(num_rows, seq) bool: positions that must come back bit-identical."""
    index = case["vector_index"]
    assert index is not None
    hidden = case["hidden"]
    assert hidden is not None
    no_items = (index < 0).all(dim=1)  # (num_rows,)
    mask = case["position_mask"]
    steered = torch.ones(hidden.shape[:2], dtype=torch.bool, device=DEVICE)
    if mask is not None:
        steered = mask
    return ~steered | no_items[:, None]


def _run_both_residual(case: dict[str, torch.Tensor | None]) -> tuple[torch.Tensor, ...]:
    hidden = case["hidden"]
    assert hidden is not None
    args = [case[name] for name in list(case)[1:]]
    expected = steer_residual_torch(hidden.clone(), *args)
    got = steer_residual_triton(hidden.clone(), *args)
    return hidden, expected, got


RESIDUAL_SHAPES = [  # (num_rows, seq, hidden, K, masked)
    pytest.param(1, 1, 37, 1, False, id="decode-batch1-h37-k1"),
    pytest.param(6, 1, 576, 8, True, id="decode-mixed-h576-k8"),
    pytest.param(3, 5, 64, 3, True, id="prefill-masked-h64-k3"),
    pytest.param(2, 3, 100, 2, False, id="prefill-nomask-h100-k2"),
    pytest.param(2, 1, 2000, 4, True, id="decode-h2000-k4"),
]


@requires_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("num_rows", "seq", "hidden_size", "k", "masked"), RESIDUAL_SHAPES)
def test_residual_matches_reference(
    dtype: torch.dtype, num_rows: int, seq: int, hidden_size: int, k: int, masked: bool
) -> None:
    case = _residual_case(num_rows, seq, hidden_size, k, dtype, masked=masked)
    before, expected, got = _run_both_residual(case)
    torch.testing.assert_close(got, expected, **TOLERANCES[dtype])
    untouched = _untouched(case)
    assert torch.equal(got[untouched], before[untouched])
    assert torch.equal(expected[untouched], before[untouched])
    assert not torch.equal(got[-1, -1], before[-1, -1])  # the last row really is steered


@requires_triton
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("mode", [ADD, ABLATE, CLAMP], ids=["add", "ablate", "clamp"])
def test_residual_each_mode(mode: int, normalize: bool) -> None:
    case = _residual_case(4, 2, 48, 2, torch.float32, modes=(mode,), seed=mode)
    case["normalize"] = torch.full((4,), normalize, device=DEVICE)
    before, expected, got = _run_both_residual(case)
    torch.testing.assert_close(got, expected, **TOLERANCES[torch.float32])
    if normalize:  # steered positions keep their norm
        steered = ~_untouched(case)
        torch.testing.assert_close(got[steered].norm(dim=-1), before[steered].norm(dim=-1))


@requires_triton
def test_residual_fp32_vectors_with_bf16_hidden() -> None:
    case = _residual_case(3, 2, 40, 2, torch.bfloat16, vector_dtype=torch.float32, seed=3)
    _, expected, got = _run_both_residual(case)
    torch.testing.assert_close(got, expected, **TOLERANCES[torch.bfloat16])


@requires_triton
def test_residual_strided_hidden_leaves_neighbours_alone() -> None:
    # A view into a wider buffer (row/seq strides differ from a contiguous tensor).
    case = _residual_case(3, 2, 33, 2, torch.float32, seed=4)
    hidden = case["hidden"]
    assert hidden is not None
    buffer = torch.randn(3, 4, 40, device=DEVICE)
    view = buffer[:, 1:3, 2:35]  # (3, 2, 33), last dim contiguous
    view.copy_(hidden)
    args = [case[name] for name in list(case)[1:]]
    expected = steer_residual_torch(view.clone(), *args)
    before = buffer.clone()
    steer_residual_triton(view, *args)
    torch.testing.assert_close(view, expected, **TOLERANCES[torch.float32])
    outside = torch.ones_like(buffer, dtype=torch.bool)
    outside[:, 1:3, 2:35] = False
    assert torch.equal(buffer[outside], before[outside])


@pytest.mark.parametrize("impl", RESIDUAL_IMPLS)
def test_residual_all_rows_unsteered_is_bit_identical(impl: Callable[..., torch.Tensor]) -> None:
    case = _residual_case(3, 2, 24, 3, torch.bfloat16)
    case["vector_index"] = torch.full((3, 3), -1, dtype=torch.int32, device=DEVICE)
    case["normalize"] = torch.ones(3, dtype=torch.bool, device=DEVICE)
    hidden = case["hidden"]
    assert hidden is not None
    before = hidden.clone()
    impl(*case.values())
    assert torch.equal(hidden, before)


@pytest.mark.parametrize("impl", RESIDUAL_IMPLS)
def test_residual_bad_index_and_mode_are_no_items(impl: Callable[..., torch.Tensor]) -> None:
    # Out of range indices and unknown modes must not fault or steer (same in both paths).
    case = _residual_case(2, 1, 16, 2, torch.float32)
    case["vector_index"] = _t([[4, 0], [-2, 1]], torch.int32)
    case["mode"] = _t([[ADD, 3], [ADD, -1]], torch.int8)
    hidden = case["hidden"]
    assert hidden is not None
    before = hidden.clone()
    impl(*case.values())
    assert torch.equal(hidden, before)


@pytest.mark.parametrize("impl", RESIDUAL_IMPLS)
@pytest.mark.parametrize(("num_rows", "seq"), [(0, 1), (0, 4), (2, 0)])
def test_residual_empty(impl: Callable[..., torch.Tensor], num_rows: int, seq: int) -> None:
    case = _residual_case(num_rows, seq, 8, 2, torch.float16, masked=True)
    hidden = case["hidden"]
    assert hidden is not None
    assert impl(*case.values()).shape == (num_rows, seq, 8)


# --------------------------------------------------------------------------- head offsets


def _heads_case(
    num_rows: int,
    seq: int,
    num_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    *,
    masked: bool = True,
    seed: int = 0,
) -> dict[str, torch.Tensor | None]:
    """Row 0 has no offsets; head 1 is unsteered (zero offsets) in every offset set."""
    gen = torch.Generator().manual_seed(seed)
    num_offsets = 3
    offsets = torch.randn(num_offsets, num_heads, head_dim, generator=gen)
    offsets[:, 1 % num_heads] = 0.0
    index = torch.randint(0, num_offsets, (num_rows,), generator=gen, dtype=torch.int64)
    if num_rows > 1:
        index[0] = -1
    mask = None
    if masked:
        mask = torch.rand(num_rows, seq, generator=gen) < 0.7
    case = {
        "attn_out": torch.randn(num_rows, seq, num_heads * head_dim, generator=gen).to(dtype),
        "head_offsets": offsets.to(dtype),
        "offset_index": index,
        "scale": torch.randn(num_rows, generator=gen) * 3,
        "position_mask": mask,
    }
    return {name: None if t is None else t.to(DEVICE) for name, t in case.items()}


HEADS_SHAPES = [  # (num_rows, seq, num_heads, head_dim, masked)
    pytest.param(1, 1, 7, 5, False, id="decode-batch1-odd"),
    pytest.param(4, 1, 9, 128, True, id="decode-width1152-2chunks"),
    pytest.param(3, 4, 3, 64, True, id="prefill-masked"),
]


@requires_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("num_rows", "seq", "num_heads", "head_dim", "masked"), HEADS_SHAPES)
def test_heads_matches_reference(
    dtype: torch.dtype, num_rows: int, seq: int, num_heads: int, head_dim: int, masked: bool
) -> None:
    case = _heads_case(num_rows, seq, num_heads, head_dim, dtype, masked=masked)
    before = case["attn_out"]
    assert before is not None
    args = [case[name] for name in list(case)[1:]]
    expected = steer_heads_torch(before.clone(), *args)
    got = steer_heads_triton(before.clone(), *args)
    torch.testing.assert_close(got, expected, **TOLERANCES[dtype])

    index, mask = case["offset_index"], case["position_mask"]
    assert index is not None
    untouched = (index < 0)[:, None].expand(num_rows, seq)
    if mask is not None:
        untouched = untouched | ~mask
    assert torch.equal(got[untouched], before[untouched])
    if num_heads > 1:  # the zero-offset head keeps its bits everywhere
        head = slice(head_dim, 2 * head_dim)
        assert torch.equal(got[..., head], before[..., head])


@requires_triton
def test_heads_fp32_offsets_with_bf16_attn() -> None:
    case = _heads_case(3, 2, 4, 16, torch.bfloat16, seed=5)
    before, offsets = case["attn_out"], case["head_offsets"]
    assert before is not None and offsets is not None
    case["head_offsets"] = offsets.float()
    args = [case[name] for name in list(case)[1:]]
    expected = steer_heads_torch(before.clone(), *args)
    got = steer_heads_triton(before.clone(), *args)
    torch.testing.assert_close(got, expected, **TOLERANCES[torch.bfloat16])


@pytest.mark.parametrize("impl", HEADS_IMPLS)
@pytest.mark.parametrize(("num_rows", "seq"), [(0, 1), (2, 0)])
def test_heads_empty(impl: Callable[..., torch.Tensor], num_rows: int, seq: int) -> None:
    case = _heads_case(num_rows, seq, 2, 4, torch.float32)
    assert impl(*case.values()).shape == (num_rows, seq, 8)


# --------------------------------------------------------------------------- validation


def _residual_args(**changes: object) -> list[object]:
    case: dict[str, object] = dict(_residual_case(2, 3, 16, 2, torch.float32))
    case.update(changes)
    return list(case.values())


_F32 = {"dtype": torch.float32, "device": DEVICE}
RESIDUAL_BAD = [
    pytest.param({"hidden": torch.zeros(2, 16, **_F32)}, id="hidden-2d"),
    pytest.param({"hidden": torch.zeros(2, 3, 16, dtype=torch.int32)}, id="hidden-int"),
    pytest.param({"hidden": torch.zeros(2, 3, 32, **_F32)[..., ::2]}, id="hidden-strided-last"),
    pytest.param({"vectors": torch.zeros(4, 15, **_F32)}, id="vectors-width"),
    pytest.param({"vectors": torch.zeros(4, 16, dtype=torch.float16)}, id="vectors-dtype"),
    pytest.param({"vector_index": torch.zeros(2, 2, **_F32)}, id="index-float"),
    pytest.param({"vector_index": torch.zeros(2, 9, dtype=torch.int32)}, id="k-too-big"),
    pytest.param({"vector_index": torch.zeros(2, 0, dtype=torch.int32)}, id="k-zero"),
    pytest.param({"vector_index": torch.zeros(3, 2, dtype=torch.int32)}, id="index-rows"),
    pytest.param({"vector_index": torch.zeros(2, 4, dtype=torch.int32)[:, ::2]}, id="index-nc"),
    pytest.param({"scale": torch.zeros(2, 2, dtype=torch.float64)}, id="scale-f64"),
    pytest.param({"mode": torch.zeros(2, 2, dtype=torch.int64)}, id="mode-int64"),
    pytest.param({"normalize": torch.zeros(2, dtype=torch.int32)}, id="normalize-int"),
    pytest.param({"position_mask": torch.ones(2, 4, dtype=torch.bool)}, id="mask-shape"),
    pytest.param({"position_mask": "all"}, id="mask-not-tensor"),
]


@pytest.mark.parametrize("impl", RESIDUAL_IMPLS)
@pytest.mark.parametrize("changes", RESIDUAL_BAD)
def test_residual_rejects(impl: Callable[..., torch.Tensor], changes: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        impl(*_residual_args(**changes))


def test_residual_rejects_oversized_hidden() -> None:
    big = steering.MAX_HIDDEN + 1
    with pytest.raises(ValueError, match="exceeds"):
        steer_residual_torch(*_residual_args(hidden=torch.zeros(1, 1, big), vectors=None))


def _heads_args(**changes: object) -> list[object]:
    case: dict[str, object] = dict(_heads_case(2, 3, 2, 4, torch.float32))
    case.update(changes)
    return list(case.values())


HEADS_BAD = [
    pytest.param({"attn_out": torch.zeros(2, 3, 9, **_F32)}, id="width"),
    pytest.param({"head_offsets": torch.zeros(3, 8, **_F32)}, id="offsets-2d"),
    pytest.param({"head_offsets": torch.zeros(3, 2, 4, dtype=torch.float16)}, id="offsets-dtype"),
    pytest.param({"head_offsets": torch.zeros(3, 4, 2, **_F32).transpose(1, 2)}, id="offsets-nc"),
    pytest.param({"offset_index": torch.zeros(2, 1, dtype=torch.int32)}, id="index-2d"),
    pytest.param({"scale": torch.zeros(2, 1, **_F32)}, id="scale-2d"),
    pytest.param({"position_mask": torch.ones(3, 3, dtype=torch.bool)}, id="mask-rows"),
]


@pytest.mark.parametrize("impl", HEADS_IMPLS)
@pytest.mark.parametrize("changes", HEADS_BAD)
def test_heads_rejects(impl: Callable[..., torch.Tensor], changes: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        impl(*_heads_args(**changes))


# --------------------------------------------------------------------------- entry points


def test_entry_points_match_reference() -> None:
    case = _residual_case(3, 2, 20, 2, torch.float32, seed=6)
    hidden = case["hidden"]
    assert hidden is not None
    args = [case[name] for name in list(case)[1:]]
    expected = steer_residual_torch(hidden.clone(), *args)
    torch.testing.assert_close(steer_residual(hidden.clone(), *args), expected)

    heads = _heads_case(3, 2, 2, 4, torch.float32, seed=6)
    attn = heads["attn_out"]
    assert attn is not None
    head_args = [heads[name] for name in list(heads)[1:]]
    expected = steer_heads_torch(attn.clone(), *head_args)
    torch.testing.assert_close(steer_heads(attn.clone(), *head_args), expected)


def test_module_level_imports_leave_triton_out() -> None:
    assert_triton_imported_lazily(steering, (".residual", ".heads"))


# --------------------------------------------------------------------------- dense (CPU path)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("num_rows", "seq", "hidden_size", "k", "masked"), RESIDUAL_SHAPES)
@pytest.mark.parametrize("normalize", [False, True])
def test_residual_dense_matches_reference(
    dtype: torch.dtype, num_rows: int, seq: int, hidden_size: int, k: int, masked: bool,
    normalize: bool,
) -> None:
    case = _residual_case(num_rows, seq, hidden_size, k, dtype, masked=masked)
    case["normalize"] = torch.full((num_rows,), normalize, device=DEVICE)
    hidden = case["hidden"]
    assert hidden is not None
    args = [case[name] for name in list(case)[1:]]
    expected = steer_residual_torch(hidden.clone(), *args)
    got = steer_residual_dense(hidden.clone(), *args)
    torch.testing.assert_close(got, expected, **TOLERANCES[dtype])
    untouched = _untouched(case)
    assert torch.equal(got[untouched], hidden[untouched])
    assert not torch.equal(got[-1, -1], hidden[-1, -1])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("num_rows", "seq", "num_heads", "head_dim", "masked"), HEADS_SHAPES)
def test_heads_dense_matches_reference(
    dtype: torch.dtype, num_rows: int, seq: int, num_heads: int, head_dim: int, masked: bool
) -> None:
    case = _heads_case(num_rows, seq, num_heads, head_dim, dtype, masked=masked)
    before = case["attn_out"]
    assert before is not None
    args = [case[name] for name in list(case)[1:]]
    expected = steer_heads_torch(before.clone(), *args)
    got = steer_heads_dense(before.clone(), *args)
    torch.testing.assert_close(got, expected, **TOLERANCES[dtype])
    if num_rows > 1:  # row 0 has no offsets: bit-identical
        assert torch.equal(got[0], before[0])
