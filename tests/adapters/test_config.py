"""MALoRAConfig validation and defaults."""

import dataclasses

import pytest

from malora_fx import ConfigError, MALoRAConfig


def test_paper_defaults():
    cfg = MALoRAConfig()
    assert (cfg.method, cfg.num_experts, cfg.top_k, cfg.rank, cfg.shared_rank, cfg.alpha) == (
        "malora",
        8,
        2,
        12,
        32,
        24.0,
    )
    assert cfg.scale == 2.0 and not cfg.normalize_top_k and cfg.aux_loss_coef == 0.01
    assert MALoRAConfig(method="molora").rank == 8
    assert MALoRAConfig(method="lora").rank == 64
    assert MALoRAConfig(method="lora").shared_rank is None


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"method": "moe"}, "method: unknown method 'moe'; allowed: malora, molora, hydralora, lora"),
        ({"top_k": 9}, "top_k: 9 is larger than num_experts=8; allowed: 1..8"),
        ({"rank": 0}, "rank: 0 is not allowed; expected an integer >= 1"),
        ({"rank": -3}, "rank: -3 is not allowed"),
        ({"shared_rank": 0}, "shared_rank: 0 is not allowed"),
        ({"num_experts": 0}, "num_experts: 0 is not allowed"),
        ({"dropout": 1.0}, "dropout: 1.0 is out of range; allowed: 0 <= dropout < 1"),
        ({"alpha": -1}, "alpha: -1 must be > 0"),
        ({"beta": 0}, "beta: 0 must be > 0"),
        ({"method": "lora", "shared_rank": 8}, "shared_rank is only used by method 'malora'"),
        ({"targets": "q_proj,,v_proj"}, "targets: 'q_proj,,v_proj' has an empty name"),
        ({"targets": "re:("}, "targets: invalid regular expression"),
    ],
)
def test_bad_values_name_value_and_range(changes, message):
    with pytest.raises(ConfigError) as info:
        MALoRAConfig(**changes)
    assert message in str(info.value)


def test_frozen_and_round_trips_through_dict():
    cfg = MALoRAConfig(targets=["q_proj", "v_proj"], rank=8, shared_rank=22)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.rank = 4
    assert cfg.targets == ("q_proj", "v_proj")
    assert MALoRAConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.replace(method="lora").rank == 64
