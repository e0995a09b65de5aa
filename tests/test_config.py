import json
import math

import pytest

from hf_chts import SparsifyConfig
from hf_chts.config import METHODS, PRESETS


@pytest.mark.parametrize("method", METHODS)
def test_presets_fill_the_method_table(method):
    config = SparsifyConfig(method=method)
    for name, value in PRESETS[method].items():
        if name == "target_density" and method != "dense":
            continue
        assert getattr(config, name) == value, (method, name)


def test_method_table_of_algorithms_section_7():
    chtss, chts, cht = SparsifyConfig("chtss"), SparsifyConfig("chts"), SparsifyConfig("cht")
    assert (chtss.schedule, chtss.initial_density, chtss.regrowth, chtss.regrowth_selection) == ("sigmoid", 1.0, "ch2_l3n", "soft")
    assert chtss.prune_alpha == 0.0 and chtss.removal == "soft"
    assert (chts.schedule, chts.initial_density, chts.init) == ("constant", 0.3, "brf")
    assert (cht.regrowth, cht.regrowth_selection, cht.removal, cht.init) == ("ch3_l3", "rigid", "rigid", "bsw")
    assert SparsifyConfig("set").regrowth == "random" and SparsifyConfig("rigl").regrowth == "gradient"
    gmp = SparsifyConfig("gmp")
    assert (gmp.schedule, gmp.regrowth, gmp.initial_density) == ("cubic", "none", 1.0)
    assert SparsifyConfig("dense", target_density=0.3).is_dense


def test_explicit_fields_override_the_preset():
    config = SparsifyConfig(method="chtss", init="bsw", regrowth="ch3_l3n", initial_density=0.5)
    assert (config.init, config.regrowth, config.initial_density) == ("bsw", "ch3_l3n", 0.5)


def test_parity_switch_follows_released_code():
    paper, parity = SparsifyConfig("chtss"), SparsifyConfig("chtss", parity=True)
    assert paper.removal_temperature_range == (1.0, 3.0)
    assert parity.removal_temperature_range[0] == 1.0 and math.isclose(parity.removal_temperature_range[1], 9.0)
    assert paper.rope_aware and not parity.rope_aware
    assert parity.regrowth_selection == "rigid" and parity.skip_optimizer_step_on_update
    assert SparsifyConfig("chtss", parity=True, regrowth_selection="soft").regrowth_selection == "soft"
    # the released recipe (docs/parity.md): no chain removal, 10-step re-warm-up every cycle, budgets rounded down
    assert (paper.percolation, paper.lr_rewarmup_steps, paper.lr_rewarmup_mode, paper.budget_rounding) == (
        True, 0, "after_update", "nearest")
    assert (parity.percolation, parity.lr_rewarmup_steps, parity.lr_rewarmup_mode, parity.budget_rounding) == (
        False, 10, "every_cycle", "floor")
    assert paper.removal_temperature_schedule == parity.removal_temperature_schedule == "t_linear"
    explicit = SparsifyConfig("chts", parity=True, percolation=True, lr_rewarmup_steps=0, budget_rounding="nearest")
    assert (explicit.percolation, explicit.lr_rewarmup_steps, explicit.budget_rounding) == (True, 0, "nearest")
    assert not SparsifyConfig("set", parity=True).percolation
    assert SparsifyConfig.from_dict(parity.to_dict()) == parity


@pytest.mark.parametrize(
    "field,value",
    [
        ("target_density", 0.0), ("target_density", 1.5), ("target_density", -0.1), ("target_density", "0.3"),
        ("initial_density", 0.1), ("method", "magic"), ("init", "grid"), ("init_beta", 1.5), ("init_beta", -0.1),
        ("init_r", 2.0), ("init_degree_mode", "powerlaw"), ("removal", "random"), ("removal_alpha", 2.0),
        ("removal_delta_start", 1.2), ("removal_delta_end", 0.2), ("prune_alpha", -1.0), ("regrowth", "magic"),
        ("regrowth_selection", "greedy"), ("regrowth_temperature", -1.0), ("update_interval", -5),
        ("update_interval", 0), ("update_interval", 2.5), ("removal_fraction", 1.0), ("removal_fraction", -0.1),
        ("removal_fraction_schedule", "linear"), ("update_end_fraction", 1.5), ("schedule", "linear"),
        ("sigmoid_k", 0.0), ("decay_start_fraction", -0.5), ("decay_end_fraction", 0.9), ("percolation", "yes"),
        ("rope_aware", 1), ("parity", "no"), ("lr_rewarmup_steps", -1), ("target_modules", 3),
        ("exclude_modules", [1, 2]), ("seed", -1), ("ch_memory_budget_mb", 0),
        ("removal_temperature_schedule", "cubic"), ("lr_rewarmup_mode", "always"), ("budget_rounding", "up"),
    ],
)
def test_every_invalid_field_raises_value_error_naming_it(field, value):
    with pytest.raises(ValueError) as error:
        SparsifyConfig(**{field: value})
    assert field in str(error.value)
    assert repr(value) in str(error.value)


def test_constant_schedule_requires_equal_densities():
    with pytest.raises(ValueError, match="initial_density"):
        SparsifyConfig(method="set", target_density=0.3, initial_density=1.0)


def test_json_round_trip(tmp_path):
    config = SparsifyConfig(method="chts", target_density=0.1, init="bsw", init_beta=0.5, target_modules=["q_proj"],
                            removal_delta_end=1.0, regrowth_temperature=math.inf)
    again = SparsifyConfig.from_dict(json.loads(config.to_json_string()))
    assert again == config
    path = tmp_path / "sparsify_config.json"
    config.save(path)
    assert SparsifyConfig.load(path) == config
    assert not list(tmp_path.glob(".*tmp"))  # atomic write leaves no temp file


def test_from_dict_rejects_unknown_keys_with_suggestion():
    with pytest.raises(ValueError, match="did you mean 'target_density'"):
        SparsifyConfig.from_dict({"target_densty": 0.3})


def test_constructor_names_the_closest_field_of_a_typo():
    with pytest.raises(TypeError, match="unknown field.*'update_intervall' \\(did you mean 'update_interval'\\?\\)"):
        SparsifyConfig(update_intervall=5)
    with pytest.raises(TypeError, match="'no_such_option'"):
        SparsifyConfig(method="chts", no_such_option=1)


@pytest.mark.parametrize("spelling", ["CHTss", "ChTsS", "CHTSS"])
def test_method_is_case_insensitive(spelling):
    config = SparsifyConfig(method=spelling)
    assert config.method == "chtss" and config == SparsifyConfig(method="chtss")
    assert SparsifyConfig.from_dict({"method": spelling}).method == "chtss"


def test_load_reports_truncated_json(tmp_path):
    path = tmp_path / "sparsify_config.json"
    path.write_text('{"method": "chtss", "target_dens')
    with pytest.raises(ValueError, match="truncated or corrupted"):
        SparsifyConfig.load(path)


def test_inconsistent_combinations_are_refused():
    with pytest.raises(ValueError, match="SparsifyConfig.init='dense'.*initial_density"):
        SparsifyConfig(method="gmp", initial_density=0.5)
    with pytest.raises(ValueError, match="SparsifyConfig.init='dense'"):
        SparsifyConfig(method="chts", init="dense")
    with pytest.raises(ValueError, match="SparsifyConfig.regrowth='none'"):
        SparsifyConfig(method="chts", regrowth="none")
    with pytest.raises(ValueError, match="regrowth_temperature"):
        SparsifyConfig(regrowth_temperature=True)
    assert SparsifyConfig(method="gmp", initial_density=0.5, init="er").initial_density == 0.5
