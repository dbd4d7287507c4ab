"""`mambakit.layers.registry`: one table of mixer names, spellings, classes and defaults, used by every builder."""
from __future__ import annotations

import math

import pytest

from mambakit.errors import MambaKitError
from mambakit.layers.registry import (
    MIXERS,
    default_d_state,
    default_headdim,
    mixer_spec,
    ssm_layer_names,
)


@pytest.mark.parametrize("spelling, name", [
    ("Mamba1", "Mamba1"), ("mamba1", "Mamba1"), ("mamba", "Mamba1"),  # config, train / nd, tasks
    ("Mamba2", "Mamba2"), ("mamba2", "Mamba2"), ("S4", "S4"), ("s4", "S4"), ("attention", "MHA"), ("MHA", "MHA"),
])
def test_every_existing_spelling_resolves(spelling, name) -> None:
    assert mixer_spec(spelling).name == name


def test_unknown_or_disallowed_spellings_raise_naming_the_argument() -> None:
    with pytest.raises(MambaKitError, match=r"--mixer must be one of .*'mamba2'.*got 'lstm'"):
        mixer_spec("lstm", arg="--mixer")
    with pytest.raises(MambaKitError, match=r"mixer must be one of \['Mamba1', 'mamba1', 'mamba'\], got 's4'"):
        mixer_spec("s4", allowed=("Mamba1",))
    with pytest.raises(MambaKitError, match="got None"):
        mixer_spec(None)


def test_classes_and_defaults() -> None:
    from mambakit.layers.attention import MHA
    from mambakit.layers.mamba import Mamba
    from mambakit.layers.mamba2 import Mamba2
    from mambakit.layers.mamba3 import Mamba3
    from mambakit.layers.s4 import S4

    classes = {name: spec.layer_class() for name, spec in MIXERS.items()}
    assert classes == {"Mamba1": Mamba, "Mamba2": Mamba2, "Mamba3": Mamba3, "S4": S4, "MHA": MHA}
    assert {m: default_d_state(m) for m in ("mamba", "mamba2", "mamba3", "s4", "attention")} == \
        {"mamba": 16, "mamba2": 64, "mamba3": 64, "s4": 64, "attention": None}
    assert ssm_layer_names() == ("Mamba1", "Mamba2", "Mamba3", "S4")
    assert [name for name, spec in MIXERS.items() if spec.has_heads] == ["Mamba2", "Mamba3"]


def test_headdim_rule_matches_the_former_three_rules() -> None:
    for d_model in range(1, 200):
        d_inner = 2 * d_model
        tasks = next((h for h in (64, 32, 16, 8) if d_inner % h == 0), math.gcd(d_inner, 64))
        nd = 32 if d_inner % 32 == 0 else math.gcd(d_inner, 64)
        assert default_headdim(d_inner) == tasks
        assert default_headdim(d_inner, preferred=(32,)) == nd
        if d_model % 8 == 0:  # the LM trainer: only multiples of 8, first of 64, 32, 16
            assert default_headdim(d_inner) == next(h for h in (64, 32, 16) if d_inner % h == 0)


def test_config_normalises_a_spelling_to_the_name() -> None:
    from mambakit.models.config import MIXER_LAYERS, MambaConfig

    assert MIXER_LAYERS == ssm_layer_names()
    cfg = MambaConfig(d_model=16, n_layer=1, ssm_cfg={"layer": "mamba2", "headdim": 8})
    assert cfg.mixer_layer == "Mamba2" and cfg.ssm_cfg == {"layer": "Mamba2", "headdim": 8}
    assert MambaConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(MambaKitError, match=r"ssm_cfg\['layer'\] must be one of"):
        MambaConfig(ssm_cfg={"layer": "attention"})  # attention goes in attn_layer_idx
