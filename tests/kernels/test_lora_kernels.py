"""Multi-LoRA kernels: Triton (natively on CUDA, else TRITON_INTERPRET=1) vs the PyTorch
reference, and the reference vs a dense per-row computation written out here."""

from __future__ import annotations

import importlib.util
import math
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from steerserve.kernels.dispatch import triton_interpreting
from steerserve.kernels.lora import ops as lora

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(
    not HAS_TRITON or not (DEVICE == "cuda" or triton_interpreting()),
    reason="needs triton, and CUDA or TRITON_INTERPRET=1",
)
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Both backends round t to the dtype and y once; tolerances allow a few ulps of each.
TOL = {
    torch.float32: {"atol": 1e-4, "rtol": 1e-4},
    torch.bfloat16: {"atol": 6e-2, "rtol": 2e-2},
    torch.float16: {"atol": 1e-2, "rtol": 5e-3},
}
REPO = Path(__file__).resolve().parents[2]


def _randn(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen)


def guarded(t: torch.Tensor) -> torch.Tensor:
    """t on DEVICE, as the middle of a buffer with a NaN slab before and after it: a kernel
    that reads outside t (a -1 slot, a row past a segment) then produces NaN, and one that
    writes outside it breaks guard_intact."""
    buf = torch.full((t.shape[0] + 2, *t.shape[1:]), math.nan, dtype=t.dtype, device=DEVICE)
    buf[1:-1] = t
    return buf[1:-1]


def guard_intact(view: torch.Tensor) -> bool:
    buf = view._base  # the buffer allocated by guarded()
    return bool(torch.isnan(buf[0]).all() and torch.isnan(buf[-1]).all())


def make_weights(
    slot_ranks: list[int], k: int, n_out: int, dtype: torch.dtype, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stacked slots, each adapter zero-padded from its own rank to the max rank."""
    gen = torch.Generator().manual_seed(seed)
    num_slots, max_rank = len(slot_ranks), max(slot_ranks)
    lora_a = torch.zeros(num_slots, max_rank, k)  # (S, R, K)
    lora_b = torch.zeros(num_slots, n_out, max_rank)  # (S, OUT, R)
    for s, r in enumerate(slot_ranks):
        lora_a[s, :r] = _randn(gen, r, k) / math.sqrt(k)
        lora_b[s, :, :r] = _randn(gen, n_out, r) / math.sqrt(r)
    scaling = 0.5 + 1.5 * torch.rand(num_slots, generator=gen)  # (S,) float32
    return guarded(lora_a.to(dtype)), guarded(lora_b.to(dtype)), scaling.to(DEVICE)


def make_rows(n: int, k: int, n_out: int, dtype: torch.dtype,
              seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """x (N, K) and y (N, OUT), both inside NaN guards."""
    gen = torch.Generator().manual_seed(seed)
    return guarded(_randn(gen, n, k).to(dtype)), guarded(_randn(gen, n, n_out).to(dtype))


def fresh(y0: torch.Tensor) -> torch.Tensor:
    """A guarded copy of y0 to update in place."""
    return guarded(y0)


def slot_ranks_for(max_rank: int) -> list[int]:
    return [max_rank, max(1, max_rank // 2), max(1, max_rank - 3)]


def index(values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32, device=DEVICE)


def segments(lengths: list[int], slots: list[int], offset: int = 0) -> tuple[torch.Tensor, ...]:
    starts = [offset]
    for n in lengths:
        starts.append(starts[-1] + n)
    return (torch.tensor(starts, dtype=torch.int64, device=DEVICE),
            torch.tensor(slots, dtype=torch.int64, device=DEVICE))


def rows_slots(lengths: list[int], slots: list[int], offset: int, n: int) -> list[int]:
    """Per-row slot (-1 where no segment covers the row) for the dense check."""
    per_row = [-1] * n
    row = offset
    for length, slot in zip(lengths, slots, strict=True):
        per_row[row:row + length] = [slot] * length
        row += length
    return per_row


def dense_lora(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
               scaling: torch.Tensor, per_row: list[int], y: torch.Tensor) -> torch.Tensor:
    """y[i] + scaling[s] * B[s] @ (A[s] @ x[i]), one row at a time, in float64."""
    out = y.double().clone()
    for i, s in enumerate(per_row):
        if s >= 0:
            out[i] += scaling[s].double() * (lora_b[s].double() @ (lora_a[s].double() @
                                                                    x[i].double()))
    return out


def assert_untouched(y: torch.Tensor, y0: torch.Tensor, per_row: list[int]) -> None:
    idle = [i for i, s in enumerate(per_row) if s < 0]
    assert torch.equal(y[idle], y0[idle]), "rows without an adapter must not change"


# (max rank, in features, out features, per-row slots): odd sizes, batch 1, -1 mixed in.
BGMV_CASES = [
    pytest.param(1, 37, 45, [0, -1, 1, 1, 2], id="r1-odd"),
    pytest.param(8, 64, 96, [2, 0, -1, 2, 1, 0, 2], id="r8"),
    pytest.param(16, 576, 1536, [1], id="r16-batch1"),
    pytest.param(64, 100, 72, [1, 1, -1, 0], id="r64"),
]
# (max rank, in, out, segment lengths, segment slots, rows before the first segment, rows
# after the last): empty segments, -1 segments and rows outside every segment.
SGMV_CASES = [
    pytest.param(1, 37, 45, [3, 0, 2, 4], [0, 1, -1, 2], 0, 0, id="r1-odd"),
    pytest.param(8, 64, 96, [0, 5, 0, 3, 1], [1, 0, 2, -1, 2], 1, 2, id="r8-empty"),
    pytest.param(16, 576, 1536, [2, 3], [0, 1], 0, 0, id="r16-wide"),
    pytest.param(64, 100, 72, [4, 2, 0], [2, -1, 1], 0, 1, id="r64"),
]


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("rank", "k", "n_out", "slots"), BGMV_CASES)
def test_bgmv_triton_matches_reference(rank: int, k: int, n_out: int, slots: list[int],
                                       dtype: torch.dtype) -> None:
    lora_a, lora_b, scaling = make_weights(slot_ranks_for(rank), k, n_out, dtype)
    x, y0 = make_rows(len(slots), k, n_out, dtype)
    idx = index(slots)
    t_ref = lora.lora_shrink_bgmv_torch(x, lora_a, idx)  # (N, R)
    t_tri = lora.lora_shrink_bgmv_triton(x, lora_a, idx)
    assert t_tri.shape == t_ref.shape and t_tri.dtype == dtype
    torch.testing.assert_close(t_tri, t_ref, **TOL[dtype])
    # Expand from the same t, so this compares the expand kernels alone.
    y_ref, y_tri = fresh(y0), fresh(y0)
    lora.lora_expand_bgmv_torch(t_ref, lora_b, idx, scaling, y_ref)
    lora.lora_expand_bgmv_triton(t_ref, lora_b, idx, scaling, y_tri)
    torch.testing.assert_close(y_tri, y_ref, **TOL[dtype])
    assert_untouched(y_tri, y0, slots)
    y_apply = fresh(y0)
    lora.apply_lora_bgmv_triton(x, lora_a, lora_b, idx, scaling, y_apply)
    torch.testing.assert_close(y_apply, y_ref, **TOL[dtype])
    assert guard_intact(y_tri) and guard_intact(y_apply)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("rank", "k", "n_out", "lengths", "slots", "before", "after"),
                         SGMV_CASES)
def test_sgmv_triton_matches_reference(rank: int, k: int, n_out: int, lengths: list[int],
                                       slots: list[int], before: int, after: int,
                                       dtype: torch.dtype) -> None:
    lora_a, lora_b, scaling = make_weights(slot_ranks_for(rank), k, n_out, dtype)
    n = before + sum(lengths) + after
    x, y0 = make_rows(n, k, n_out, dtype)
    starts, seg_slots = segments(lengths, slots, offset=before)
    t_ref = lora.lora_shrink_sgmv_torch(x, lora_a, starts, seg_slots)  # (N, R)
    t_tri = lora.lora_shrink_sgmv_triton(x, lora_a, starts, seg_slots)
    torch.testing.assert_close(t_tri, t_ref, **TOL[dtype])
    y_ref, y_tri = fresh(y0), fresh(y0)
    lora.lora_expand_sgmv_torch(t_ref, lora_b, starts, seg_slots, scaling, y_ref)
    lora.lora_expand_sgmv_triton(t_ref, lora_b, starts, seg_slots, scaling, y_tri)
    torch.testing.assert_close(y_tri, y_ref, **TOL[dtype])
    assert_untouched(y_tri, y0, rows_slots(lengths, slots, before, n))
    # The grid-size hint must not change the result.
    y_apply = fresh(y0)
    lora.apply_lora_sgmv_triton(x, lora_a, lora_b, starts, seg_slots, scaling, y_apply,
                                max_segment_len=max(lengths))
    torch.testing.assert_close(y_apply, y_ref, **TOL[dtype])
    assert guard_intact(y_tri) and guard_intact(y_apply)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["bgmv", "sgmv"])
def test_reference_matches_dense(layout: str, dtype: torch.dtype) -> None:
    lora_a, lora_b, scaling = make_weights([8, 3, 5], 37, 45, dtype)
    lengths, slots = [2, 0, 3, 1, 2], [1, 0, -1, 2, 1]
    n = sum(lengths) + 1  # the last row lies outside every segment
    per_row = rows_slots(lengths, slots, 0, n)
    x, y0 = make_rows(n, 37, 45, dtype)
    y = y0.clone()
    if layout == "bgmv":
        lora.apply_lora_bgmv_torch(x, lora_a, lora_b, index(per_row), scaling, y)
    else:
        starts, seg_slots = segments(lengths, slots)
        lora.apply_lora_sgmv_torch(x, lora_a, lora_b, starts, seg_slots, scaling, y)
    expected = dense_lora(x, lora_a, lora_b, scaling, per_row, y0)
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else TOL[dtype]
    torch.testing.assert_close(y.double(), expected, **tol)
    assert_untouched(y, y0, per_row)


def _both_backends() -> list[str]:
    return ["torch", pytest.param("triton", marks=needs_triton)]


def _fn(backend: str, name: str) -> Callable[..., Any]:
    return getattr(lora, f"{name}_{backend}")


@pytest.mark.parametrize("backend", _both_backends())
def test_zero_rows(backend: str) -> None:
    lora_a, lora_b, scaling = make_weights([4, 2], 37, 45, torch.float32)
    x, y = make_rows(0, 37, 45, torch.float32)
    t = _fn(backend, "lora_shrink_bgmv")(x, lora_a, index([]))
    assert t.shape == (0, 4)
    _fn(backend, "apply_lora_bgmv")(x, lora_a, lora_b, index([]), scaling, y)
    for lengths in ([], [0, 0]):
        starts, seg_slots = segments(lengths, [0] * len(lengths))
        t = _fn(backend, "lora_shrink_sgmv")(x, lora_a, starts, seg_slots)
        assert t.shape == (0, 4)
        _fn(backend, "apply_lora_sgmv")(x, lora_a, lora_b, starts, seg_slots, scaling, y)


@pytest.mark.parametrize("backend", _both_backends())
def test_no_adapter_rows_are_untouched(backend: str) -> None:
    lora_a, lora_b, scaling = make_weights([4, 2], 37, 45, torch.float16)
    x, y0 = make_rows(5, 37, 45, torch.float16)
    y = fresh(y0)
    t = _fn(backend, "lora_shrink_bgmv")(x, lora_a, index([-1] * 5))
    assert torch.count_nonzero(t) == 0
    _fn(backend, "apply_lora_bgmv")(x, lora_a, lora_b, index([-1] * 5), scaling, y)
    starts, seg_slots = segments([2, 0, 3], [-1, 0, -1])  # the slot-0 segment is empty
    _fn(backend, "apply_lora_sgmv")(x, lora_a, lora_b, starts, seg_slots, scaling, y,
                                    max_segment_len=0)
    _fn(backend, "apply_lora_sgmv")(x, lora_a, lora_b, starts, seg_slots, scaling, y)
    assert torch.equal(y, y0) and guard_intact(y)


@pytest.mark.parametrize("backend", _both_backends())
def test_strided_output_slice(backend: str) -> None:
    """y may be a column slice of a wider (e.g. fused QKV) output: only that slice changes."""
    lora_a, lora_b, scaling = make_weights([4, 2], 37, 45, torch.float32)
    x, _ = make_rows(3, 37, 45, torch.float32)
    wide0 = make_rows(3, 37, 100, torch.float32, seed=2)[1]
    wide = wide0.clone()
    y = wide[:, 10:55]  # (3, 45) with row stride 100
    expected = y.clone()
    lora.apply_lora_bgmv_torch(x, lora_a, lora_b, index([1, -1, 0]), scaling, expected)
    _fn(backend, "apply_lora_bgmv")(x, lora_a, lora_b, index([1, -1, 0]), scaling, y)
    torch.testing.assert_close(y, expected, **TOL[torch.float32])
    assert torch.equal(wide[:, :10], wide0[:, :10]) and torch.equal(wide[:, 55:], wide0[:, 55:])


@needs_triton
def test_shrink_bgmv_split_k_matches_reference() -> None:
    from steerserve.kernels.lora.shrink import shrink_bgmv

    # K blocks are 1024 wide in the interpreter and 128..512 on GPU: 2100 features make at
    # least 3 blocks, so a 2-way split is uneven and a 5-way one is clamped.
    lora_a, _, _ = make_weights([8, 5], 2100, 16, torch.bfloat16)
    x, _ = make_rows(3, 2100, 16, torch.bfloat16)
    idx = index([1, -1, 0])
    expected = lora.lora_shrink_bgmv_torch(x, lora_a, idx)
    for split_k in (2, 5):
        torch.testing.assert_close(shrink_bgmv(x, lora_a, idx, split_k=split_k), expected,
                                   **TOL[torch.bfloat16])


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_gpu_block_config(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU block sizes (several row, K, output and rank blocks per program grid, and a
    split K), run where these tests run. Not bfloat16: with the interpreter's flag hidden the
    kernels would hand it a bfloat16 tl.dot, which it cannot do (triton#11584)."""
    from steerserve.kernels.lora import expand as lora_expand
    from steerserve.kernels.lora import shrink as lora_shrink

    if DEVICE == "cpu":  # pick the GPU configuration while still interpreting
        monkeypatch.setattr(lora_shrink, "triton_interpreting", lambda: False)
        monkeypatch.setattr(lora_expand, "triton_interpreting", lambda: False)
    # Rank 80 > 64 loops over rank blocks; 70 rows > 64 span two row blocks of a segment.
    lora_a, lora_b, scaling = make_weights([80, 33, 7], 600, 200, dtype)
    lengths, slots = [70, 0, 5, 3], [0, 2, -1, 1]
    n = sum(lengths)
    x, y0 = make_rows(n, 600, 200, dtype)
    per_row = rows_slots(lengths, slots, 0, n)
    starts, seg_slots = (part.int() for part in segments(lengths, slots))  # int32 here
    y_ref, y_sgmv = fresh(y0), fresh(y0)
    lora.apply_lora_sgmv_torch(x, lora_a, lora_b, starts, seg_slots, scaling, y_ref)
    lora.apply_lora_sgmv_triton(x, lora_a, lora_b, starts, seg_slots, scaling, y_sgmv)
    torch.testing.assert_close(y_sgmv, y_ref, **TOL[dtype])
    few = list(range(0, n, 13))  # a decode-sized batch: split K kicks in
    idx = index([per_row[i] for i in few]).long()  # int64 this time
    y_few = fresh(y0[few])
    lora.apply_lora_bgmv_triton(guarded(x[few]), lora_a, lora_b, idx, scaling, y_few)
    torch.testing.assert_close(y_few, y_ref[few], **TOL[dtype])
    assert guard_intact(y_sgmv) and guard_intact(y_few)


def test_build_segments() -> None:
    seg = lora.build_segments(index([-1, -1, 2, 2, 0, -1, -1, -1, 2]))
    assert seg.starts.tolist() == [0, 2, 4, 5, 8, 9]
    assert seg.adapter.tolist() == [-1, 2, 0, -1, 2]
    assert seg.max_len == 2  # the run of three -1 rows does not count
    empty = lora.build_segments(index([]))
    assert empty.starts.tolist() == [0] and empty.adapter.numel() == 0 and empty.max_len == 0


@pytest.mark.parametrize("backend", _both_backends())
def test_build_segments_round_trip(backend: str) -> None:
    lora_a, lora_b, scaling = make_weights([4, 2, 3], 37, 45, torch.float32)
    per_row = [2, 2, -1, 0, 0, 0, 1, -1]
    x, y0 = make_rows(len(per_row), 37, 45, torch.float32)
    y_bgmv, y_sgmv = fresh(y0), fresh(y0)
    _fn(backend, "apply_lora_bgmv")(x, lora_a, lora_b, index(per_row), scaling, y_bgmv)
    seg = lora.build_segments(index(per_row))
    _fn(backend, "apply_lora_sgmv")(x, lora_a, lora_b, seg.starts, seg.adapter, scaling,
                                    y_sgmv, max_segment_len=seg.max_len)
    torch.testing.assert_close(y_sgmv, y_bgmv, **TOL[torch.float32])


# (function, argument overrides) that the checks must reject, before launching anything.
BAD_INPUTS = [
    pytest.param("lora_shrink_bgmv", {"x": torch.zeros(2, 8, dtype=torch.float64)}, id="x-dtype"),
    pytest.param("lora_shrink_bgmv", {"lora_a": torch.zeros(2, 4, 8, dtype=torch.float16)},
                 id="a-dtype"),
    pytest.param("lora_shrink_bgmv", {"lora_a": torch.zeros(2, 4, 9)}, id="in-features"),
    pytest.param("lora_shrink_bgmv", {"x": torch.zeros(8, 2).T}, id="x-stride"),
    pytest.param("lora_shrink_bgmv", {"adapter_index": torch.zeros(2)}, id="index-dtype"),
    pytest.param("lora_shrink_bgmv", {"adapter_index": torch.zeros(3, dtype=torch.int32)},
                 id="index-length"),
    pytest.param("lora_expand_bgmv", {"y": torch.zeros(2, 7)}, id="y-shape"),
    # made on the device: a copy to another device would materialize the expanded rows
    pytest.param("lora_expand_bgmv", {"y": torch.zeros(1, 6, device=DEVICE).expand(2, 6)},
                 id="y-overlap"),
    pytest.param("lora_expand_bgmv", {"y": torch.zeros(2, 6, dtype=torch.bfloat16)},
                 id="y-dtype"),
    pytest.param("lora_expand_bgmv", {"t": torch.zeros(2, 3)}, id="rank"),
    pytest.param("lora_expand_bgmv", {"scaling": torch.ones(2, dtype=torch.float16)},
                 id="scaling-dtype"),
    pytest.param("lora_expand_bgmv", {"scaling": torch.ones(3)}, id="scaling-slots"),
    pytest.param("lora_shrink_sgmv", {"segment_starts": torch.tensor([0, 2])},
                 id="starts-length"),
    pytest.param("lora_shrink_sgmv", {"segment_adapter": torch.zeros(1, 2, dtype=torch.int64)},
                 id="segments-2d"),
]


def _good_args(name: str) -> dict[str, torch.Tensor]:
    args = {
        "x": torch.zeros(2, 8), "lora_a": torch.zeros(2, 4, 8), "t": torch.zeros(2, 4),
        "lora_b": torch.zeros(2, 6, 4), "adapter_index": torch.zeros(2, dtype=torch.int32),
        "scaling": torch.ones(2), "y": torch.zeros(2, 6),
        "segment_starts": torch.tensor([0, 1, 2]), "segment_adapter": torch.tensor([0, -1]),
    }
    wanted = {
        "lora_shrink_bgmv": ["x", "lora_a", "adapter_index"],
        "lora_expand_bgmv": ["t", "lora_b", "adapter_index", "scaling", "y"],
        "lora_shrink_sgmv": ["x", "lora_a", "segment_starts", "segment_adapter"],
    }[name]
    return {key: args[key].to(DEVICE) for key in wanted}


@pytest.mark.parametrize("backend", _both_backends())
@pytest.mark.parametrize(("name", "overrides"), BAD_INPUTS)
def test_bad_inputs_raise_value_error(name: str, overrides: dict[str, torch.Tensor],
                                      backend: str) -> None:
    args = _good_args(name) | {key: value.to(DEVICE) for key, value in overrides.items()}
    with pytest.raises(ValueError):
        _fn(backend, name)(**args)


def test_reference_rejects_bad_slots_and_segments() -> None:
    x, lora_a = torch.zeros(3, 8, device=DEVICE), torch.zeros(2, 4, 8, device=DEVICE)
    with pytest.raises(ValueError, match="out of range"):
        lora.lora_shrink_bgmv_torch(x, lora_a, index([0, 2, -1]))
    starts = torch.tensor([0, 2, 1, 3], device=DEVICE)
    with pytest.raises(ValueError, match="non-decreasing"):
        lora.lora_shrink_sgmv_torch(x, lora_a, starts, torch.zeros(3, dtype=torch.int64,
                                                                    device=DEVICE))


def test_public_entry_points_pick_one_backend() -> None:
    lora_a, lora_b, scaling = make_weights([4, 2], 37, 45, torch.float32)
    x, y0 = make_rows(3, 37, 45, torch.float32)
    idx = index([1, -1, 0])
    expected, y = fresh(y0), fresh(y0)
    lora.apply_lora_bgmv_torch(x, lora_a, lora_b, idx, scaling, expected)
    lora.apply_lora_bgmv(x, lora_a, lora_b, idx, scaling, y)
    torch.testing.assert_close(y, expected, **TOL[torch.float32])
    expected_triton = HAS_TRITON and (DEVICE == "cuda" or triton_interpreting())
    assert lora.use_triton(DEVICE) is expected_triton


def test_import_and_run_without_triton() -> None:
    code = (
        "import sys; sys.modules['triton'] = None\n"  # makes `import triton` fail
        "import torch\n"
        "from steerserve.kernels.lora import ops as lora\n"
        "assert not lora.use_triton('cpu')\n"
        "a, b, y = torch.ones(1, 2, 3), torch.ones(1, 4, 2), torch.zeros(2, 4)\n"
        "lora.apply_lora_bgmv(torch.ones(2, 3), a, b, torch.tensor([0, -1]), torch.ones(1), y)\n"
        "assert y[0].tolist() == [6.0] * 4 and y[1].tolist() == [0.0] * 4\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
