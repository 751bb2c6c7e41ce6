"""Flavor registry and parameter counts."""

import json
import subprocess
import sys

import pytest

from megatron_m2.config import ConfigError, M2ModelConfig
from megatron_m2.flavors import FLAVORS, count_parameters, get_flavor

# Counts of the official inference graph (both branches of both stacks, embeddings, position
# tables, four ITC heads, two scales), as the release's configurations define them.
OFFICIAL = {"0.4b": 262.7e6, "1b": 729.4e6, "10b": 10.17e9}


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_official_parameter_counts_within_one_percent(name):
    n = count_parameters(FLAVORS[name])
    assert abs(n - OFFICIAL[name]) / OFFICIAL[name] < 0.01, (name, n)


def _list_flavors(*flags) -> str:
    """``m2-plan --list-flavors`` (the console script's module, so no install is needed)."""
    return subprocess.run([sys.executable, "-m", "megatron_m2.cli.plan", "--list-flavors",
                           *flags], capture_output=True, text=True, check=True).stdout


def test_flavors_cli_json():
    table = json.loads(_list_flavors("--json"))
    assert set(table) == set(FLAVORS)
    for name, row in table.items():
        assert row["params"] == count_parameters(FLAVORS[name])
        assert M2ModelConfig.from_dict({k: v for k, v in row.items() if k != "params"})


def test_flavors_cli_table():
    lines = _list_flavors().strip().splitlines()
    assert lines[0].split() == ["flavor", "d", "heads", "d_ffn", "layers", "embed", "params"]
    assert [line.split()[0] for line in lines[1:]] == list(FLAVORS)
    for line in lines[1:]:
        name = line.split()[0]
        cfg = FLAVORS[name]
        assert line.split()[-1] == f"{count_parameters(cfg):,}"
        assert f"{cfg.num_sep_layers}+{cfg.num_vl_layers}" in line


def test_count_matches_a_built_model(dist_world_of_one):
    """The analytic count equals the parameters a real TP=1 model allocates."""
    from megatron_m2.model import build_model
    from tests.model.common import TINY

    model = build_model(TINY)
    assert sum(p.numel() for p in model.parameters()) == count_parameters(TINY)


def test_get_flavor_overrides_and_errors():
    cfg = get_flavor("tiny", vocab_size=5000)
    assert cfg.vocab_size == 5000 and FLAVORS["tiny"].vocab_size != 5000
    with pytest.raises(KeyError, match="unknown flavor"):
        get_flavor("3b")
    with pytest.raises(ConfigError, match="unknown model config field"):
        get_flavor("tiny", hidden=3)


@pytest.mark.parametrize("kwargs,field", [
    (dict(hidden_size=100, num_attention_heads=3), "num_attention_heads"),
    (dict(image_size=100), "patch_size"),
    (dict(num_vl_layers=0), "num_vl_layers"),
    (dict(max_text_len=2000), "text_pos_table"),
    (dict(vocab_size=100), "eos_token_id"),
])
def test_config_validation_names_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        M2ModelConfig(**kwargs)


@pytest.mark.parametrize("tp,pp,msg", [(5, 1, "num_attention_heads"), (1, 5, "number of layers")])
def test_parallel_validation(tp, pp, msg):
    with pytest.raises(ConfigError, match=msg):
        FLAVORS["0.4b"].validate_parallel(tp, pp)
