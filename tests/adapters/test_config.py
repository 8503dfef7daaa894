"""MALoRAConfig validation and defaults."""

import dataclasses

import pytest

from malora_fx import ConfigError, MALoRAConfig
from malora_fx.adapters.config import parse_targets


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
        ({"targets": "q_(proj"}, "targets: invalid regular expression 'q_(proj'"),
        ({"targets": []}, "targets: [] has an empty name; allowed: 'all-linear'"),
        ({"targets": ["q_proj", 3]}, "targets: ['q_proj', 3] holds a non-string entry"),
        ({"targets": ["q_.*"]}, "targets: list entry 'q_.*' is not a module name"),
        ({"targets": ["re:q_proj"]}, "targets: list entry 're:q_proj' is not a module name"),
        ({"targets": 7}, "targets: 7 is not allowed; allowed: 'all-linear', a list of module names"),
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


@pytest.mark.parametrize(
    "spec, parsed",
    [
        ("all-linear", "all-linear"),  # PEFT's shorthand
        (["all-linear"], "all-linear"),  # ... in PEFT users' list form
        (("all-linear", "lm_head"), ("all-linear", "lm_head")),  # all-linear plus a head
        (["q_proj", "v_proj"], ("q_proj", "v_proj")),  # a list of names: suffix match
        ({"v_proj", "q_proj"}, ("q_proj", "v_proj")),  # a set (PEFT stores one): sorted
        ("q_proj,v_proj", ("q_proj", "v_proj")),  # names separated by commas (the CLI's form)
        ("q_proj", ("q_proj",)),
        ("model.layers.0.self_attn.q_proj", ("model.layers.0.self_attn.q_proj",)),  # dots belong to names
        (r".*\.(q|v)_proj", r"re:.*\.(q|v)_proj"),  # PEFT's string form: a regex (full match)
        ("model.layers.{0,1}.mlp.up_proj", "re:model.layers.{0,1}.mlp.up_proj"),  # a comma inside a regex
        ("re:q_proj", "re:q_proj"),  # explicitly a regex
    ],
)
def test_targets_take_every_peft_form(spec, parsed):
    assert parse_targets(spec) == parsed
    assert parse_targets(parsed) == parsed  # the normal form parses to itself
    cfg = MALoRAConfig(targets=spec)
    assert cfg.targets == parsed and MALoRAConfig.from_dict(cfg.to_dict()) == cfg
