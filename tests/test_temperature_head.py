"""Temperature head (ADAPTIVEDECODER) files and choices, and the LPO loss (tiny sizes, CPU)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from steerserve.decoding.sampling.temperature_head import (
    FORMAT,
    TemperatureHead,
    TemperatureHeadConfig,
    load_temperature_head,
    save_temperature_head,
)
from tests.support import load_script

# Training code (the LPO loss) lives with the training script, outside the serving packages.
_lpo = load_script("examples/lpo.py")
choice_log_probs, lpo_loss = _lpo.choice_log_probs, _lpo.lpo_loss

TEMPS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)


def biased_head(favourite: int = 3, hidden_size: int = 4) -> TemperatureHead:
    """Zero weights and a bias that favours one index: the same choice for every input."""
    head = TemperatureHead(TemperatureHeadConfig(hidden_size, TEMPS))
    with torch.no_grad():
        head.net.weight.zero_()
        head.net.bias.fill_(-5.0)
        head.net.bias[favourite] = 5.0
    return head


def routing_head() -> TemperatureHead:
    """hidden e0 -> index 0 (greedy), hidden e1 -> the last index (T = 1.0)."""
    head = TemperatureHead(TemperatureHeadConfig(2, TEMPS))
    with torch.no_grad():
        head.net.weight.zero_()
        head.net.bias.zero_()
        head.net.weight[0, 0] = 10.0
        head.net.weight[-1, 1] = 10.0
    return head


def test_biased_head_picks_its_favourite() -> None:
    head = biased_head(3)
    hidden = torch.randn(5, 4)
    idx, temps = head.choose(hidden, greedy=True)
    assert idx.tolist() == [3] * 5
    assert temps.tolist() == pytest.approx([0.6] * 5)
    assert head(hidden).shape == (5, 6)
    assert torch.allclose(head.log_probs(hidden).exp().sum(-1), torch.ones(5))


def test_routing_head_maps_known_vectors_to_known_temperatures() -> None:
    head = routing_head()
    hidden = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0]])
    idx, temps = head.choose(hidden, greedy=True)
    assert idx.tolist() == [0, 5, 0]
    assert temps.tolist() == [0.0, 1.0, 0.0]


def test_sampled_choice_is_reproducible_with_a_generator() -> None:
    head = TemperatureHead(TemperatureHeadConfig(4, TEMPS))  # random init: a spread-out dist
    hidden = torch.randn(64, 4, generator=torch.Generator().manual_seed(1))
    first = head.choose(hidden, greedy=False, generator=torch.Generator().manual_seed(7))
    second = head.choose(hidden, greedy=False, generator=torch.Generator().manual_seed(7))
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert len(set(first[0].tolist())) > 1  # really sampled, not argmax
    # A very peaked head samples its favourite.
    idx, _ = biased_head(2).choose(hidden, greedy=False, generator=torch.Generator())
    assert idx.tolist() == [2] * 64


@pytest.mark.parametrize("inner_size", [0, 8])
def test_save_load_round_trip(tmp_path, inner_size: int) -> None:
    config = TemperatureHeadConfig(4, TEMPS, inner_size=inner_size, level="sequence",
                                   model="tiny")
    head = TemperatureHead(config)
    path = tmp_path / "head.safetensors"
    save_temperature_head(head, path)
    loaded = load_temperature_head(path, hidden_size=4)
    assert loaded.config == config
    assert not loaded.training
    hidden = torch.randn(3, 4)
    with torch.no_grad():
        assert torch.equal(loaded(hidden), head(hidden))
    assert loaded.temperatures.tolist() == pytest.approx(TEMPS)


def test_load_refuses_a_wrong_hidden_size(tmp_path) -> None:
    path = tmp_path / "head.safetensors"
    save_temperature_head(biased_head(hidden_size=4), path)
    with pytest.raises(ValueError, match=r"head\.safetensors.*hidden size 4\b.*is 576"):
        load_temperature_head(path, hidden_size=576)


def test_load_refuses_nan_weights(tmp_path) -> None:
    head = biased_head()
    with torch.no_grad():
        head.net.weight[0, 0] = math.nan
    path = tmp_path / "nan.safetensors"
    save_temperature_head(head, path)
    with pytest.raises(ValueError, match="NaN"):
        load_temperature_head(path)


def test_load_refuses_other_suffixes(tmp_path) -> None:
    path = tmp_path / "head.pt"
    torch.save({"x": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="only .safetensors"):
        load_temperature_head(path)
    with pytest.raises(ValueError, match=".safetensors"):
        save_temperature_head(biased_head(), tmp_path / "head.bin")


def _write_raw(path, config: dict, tensors: dict | None = None, fmt: str = FORMAT) -> None:
    tensors = tensors or {"net.weight": torch.zeros(len(config["temperatures"]), 4),
                          "net.bias": torch.zeros(len(config["temperatures"]))}
    save_file(tensors, str(path), metadata={"format": fmt, "config": json.dumps(config)})


@pytest.mark.parametrize("temperatures", [
    [0.4, 0.2],  # descending
    [0.2, 0.2],  # not strictly ascending
    [-0.1, 0.5],  # negative
    [0.0, math.inf],  # not finite
    [0.5],  # too few
    [i / 10 for i in range(33)],  # too many
])
def test_load_refuses_bad_temperature_lists(tmp_path, temperatures) -> None:
    path = tmp_path / "bad.safetensors"
    config = {"hidden_size": 4, "temperatures": temperatures, "inner_size": 0}
    _write_raw(path, config)
    with pytest.raises(ValueError, match="temperature"):
        load_temperature_head(path)


def test_load_refuses_shape_mismatch_and_foreign_files(tmp_path) -> None:
    config = {"hidden_size": 4, "temperatures": list(TEMPS), "inner_size": 0}
    path = tmp_path / "shape.safetensors"
    _write_raw(path, config, {"net.weight": torch.zeros(6, 5), "net.bias": torch.zeros(6)})
    with pytest.raises(ValueError, match="do not match the config"):
        load_temperature_head(path)
    path = tmp_path / "foreign.safetensors"
    _write_raw(path, config, fmt="something else")
    with pytest.raises(ValueError, match="format"):
        load_temperature_head(path)


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="level"):
        TemperatureHeadConfig(4, TEMPS, level="paragraph")
    with pytest.raises(ValueError, match="hidden_size"):
        TemperatureHeadConfig(0, TEMPS)
    assert TemperatureHeadConfig(4, [0, 1]).temperatures == (0.0, 1.0)


def test_lpo_loss_matches_a_hand_computed_value_and_gradient() -> None:
    beta = 0.5
    pc = torch.tensor([-1.0, -3.0], requires_grad=True)
    pr = torch.tensor([-2.0, -1.0], requires_grad=True)
    rc = torch.tensor([-1.5, -2.0])
    rr = torch.tensor([-1.5, -2.0])
    # margins: (-1 + 1.5) - (-2 + 1.5) = 1.0 ; (-3 + 2) - (-1 + 2) = -2.0
    margins = torch.tensor([1.0, -2.0])
    expected = (math.log1p(math.exp(-0.5)) + math.log1p(math.exp(1.0))) / 2
    loss = lpo_loss(pc, pr, rc, rr, beta)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    analytic = -beta * torch.sigmoid(-beta * margins) / 2  # d loss / d pc, P = 2
    assert torch.allclose(pc.grad, analytic, atol=1e-6)
    assert torch.allclose(pr.grad, -analytic, atol=1e-6)


def test_lpo_loss_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="one shape"):
        lpo_loss(torch.zeros(2), torch.zeros(3), torch.zeros(2), torch.zeros(2), 0.1)


def test_choice_log_probs_sums_per_segment() -> None:
    head = TemperatureHead(TemperatureHeadConfig(3, TEMPS))
    hidden = torch.randn(5, 3)
    choices = torch.tensor([0, 5, 2, 2, 1])
    segments = torch.tensor([0, 0, 2, 2, 2])  # segment 1 has no rows
    sums = choice_log_probs(head, hidden, choices, segments, 3)
    logp = head.log_probs(hidden)
    expected = torch.stack([
        logp[0, 0] + logp[1, 5], torch.tensor(0.0), logp[2, 2] + logp[3, 2] + logp[4, 1],
    ])
    assert sums.shape == (3,)
    assert torch.allclose(sums, expected, atol=1e-6)
    sums.sum().backward()  # differentiable w.r.t. the head
    assert head.net.weight.grad is not None


def test_lpo_steps_move_two_clusters_to_their_temperatures() -> None:
    """Cluster A prefers greedy (index 0), cluster B the highest temperature (index 5)."""
    gen = torch.Generator().manual_seed(0)
    head = TemperatureHead(TemperatureHeadConfig(2, TEMPS))
    with torch.no_grad():
        head.net.weight.zero_()
        head.net.bias.zero_()
    ref = TemperatureHead(head.config)
    ref.load_state_dict(head.state_dict())
    centres = {"A": torch.tensor([2.0, -1.0]), "B": torch.tensor([-1.0, 2.0])}
    pairs = []  # (hidden (L, 2), chosen choices (L,), rejected choices (L,))
    for name, centre in centres.items():
        for _ in range(8):
            hidden = centre + 0.3 * torch.randn(3, 2, generator=gen)
            low, high = torch.zeros(3, dtype=torch.long), torch.full((3,), 5)
            pairs.append((hidden, low, high) if name == "A" else (hidden, high, low))
    hidden = torch.cat([p[0] for p in pairs])  # (48, 2): 16 responses of 3 tokens
    chosen = torch.cat([p[1] for p in pairs])
    rejected = torch.cat([p[2] for p in pairs])
    segments = torch.arange(len(pairs)).repeat_interleave(3)
    with torch.no_grad():
        ref_c = choice_log_probs(ref, hidden, chosen, segments, len(pairs))
        ref_r = choice_log_probs(ref, hidden, rejected, segments, len(pairs))
    optimizer = torch.optim.Adam(head.parameters(), lr=0.05)
    losses = []
    for _ in range(40):
        loss = lpo_loss(
            choice_log_probs(head, hidden, chosen, segments, len(pairs)),
            choice_log_probs(head, hidden, rejected, segments, len(pairs)),
            ref_c, ref_r, beta=0.5,
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(math.log(2), rel=1e-5)  # policy == reference
    assert losses[-1] < 0.1
    idx, temps = head.choose(torch.stack(list(centres.values())), greedy=True)
    assert idx.tolist() == [0, 5]
    assert temps.tolist() == [0.0, 1.0]
