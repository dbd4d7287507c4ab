"""ReMambaConfig: validation and the span plan (edge cases)."""
import pytest

from mambakit.errors import MambaKitError
from mambakit.remamba import ReMambaConfig


@pytest.mark.parametrize("name,value", [("p", 0.0), ("p", 1.5), ("p", -0.1), ("rho", 0.0), ("rho", 2.0),
                                        ("s", 1.0), ("s", -0.2), ("p", float("nan")), ("rho", True)])
def test_out_of_range_names_argument_and_value(name, value):
    with pytest.raises(MambaKitError) as info:
        ReMambaConfig(**{name: value})
    assert f"ReMambaConfig.{name}" in str(info.value) and repr(value) in str(info.value)


def test_plan_basic():
    plan = ReMambaConfig(p=0.3, rho=0.1, s=0.0).plan(100)
    assert (plan.start, plan.length, plan.keep) == (0, 30, 3)
    assert plan.compressed_len(100) == 73
    # ceil(0.3 * 10) is 3 despite 0.3 * 10 = 3.0000000000000004
    assert ReMambaConfig(p=0.3, rho=1.0).plan(10).length == 3


def test_span_longer_than_prompt_is_clipped_before_the_last_token():
    plan = ReMambaConfig(p=1.0, rho=0.5, s=0.5).plan(10)
    assert (plan.start, plan.length, plan.keep) == (5, 4, 2)


def test_empty_span_is_a_noop():
    assert ReMambaConfig(p=0.5, rho=0.5).plan(1).is_noop
    assert ReMambaConfig(p=0.5, rho=0.5, s=0.95).plan(10).is_noop
    with pytest.raises(MambaKitError, match="prompt length"):
        ReMambaConfig().plan(0)


def test_json_round_trip():
    cfg = ReMambaConfig(p=0.25, rho=0.1, s=0.1)
    assert ReMambaConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(MambaKitError, match="unknown ReMambaConfig fields"):
        ReMambaConfig.from_dict({"q": 1})
