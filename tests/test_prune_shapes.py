"""Structured pruning never produces a shape transformers refuses to save."""

from __future__ import annotations

import pytest

from slmkit.compress.prune.structured import Plan, candidate_plans, check_plan, count_params
from slmkit.errors import ConfigError
from slmkit.models.presets import build_config


class _Vocab:
    bos_token_id, eos_token_id, pad_token_id = 0, 0, 1

    def __len__(self):
        return 4096


@pytest.mark.parametrize("fraction", [0.35, 0.5, 0.75])
def test_candidate_plans_keep_hidden_divisible_by_heads(fraction):
    config = build_config("micro", _Vocab())
    plans = candidate_plans(config, int(fraction * count_params(config)))
    assert plans
    for plan in plans:
        heads = config.num_attention_heads - plan.heads
        assert (config.hidden_size - plan.hidden) % heads == 0, plan
        assert (config.hidden_size - plan.hidden) % 32 == 0, plan


def test_explicit_bad_shape_is_a_clear_error():
    config = build_config("micro", _Vocab())   # hidden 192, 6 heads
    with pytest.raises(ConfigError, match="not a valid shape"):
        check_plan(config, Plan(heads=3, hidden=8))   # 184 hidden channels over 3 heads
