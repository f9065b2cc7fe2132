"""Sweep grids: TOML round trips, cartesian expansion, run names, validation before submission."""

import math
import tomllib

import pytest

from hidream_ft.config import ConfigError, load_config, toml_literal
from launch import sweep
from launch.sweep import expand, flatten_grid, parse_sweep_args, plan


@pytest.mark.parametrize("value", [
    1e-4, 3e-4, 1e-05, 0.1, 2.5e10, -0.0, 7, -3, True, False, "plain", 'qu"ote\\back\nline\ttab', "",
    [[64, 64], [128, 96]], [0.9, 0.95], ["q_proj", "v_proj"], {"mail-type": "END", "n": 2},
])
def test_toml_literal_reads_back_exactly(value):
    assert tomllib.loads(f"v = {toml_literal(value)}")["v"] == value


def test_toml_literal_of_non_finite_floats():
    assert math.isinf(tomllib.loads(f"v = {toml_literal(-math.inf)}")["v"])
    assert math.isnan(tomllib.loads(f"v = {toml_literal(math.nan)}")["v"])


def test_nested_and_dotted_grids_are_the_same_grid():
    nested = tomllib.loads('[sweep]\noptim.lr = [1e-4, 3e-4]\nlora.rank = [16]\n')["sweep"]
    dotted = tomllib.loads('[sweep]\n"optim.lr" = [1e-4, 3e-4]\n"lora.rank" = [16]\n')["sweep"]
    assert flatten_grid(nested) == flatten_grid(dotted) == {"optim.lr": [1e-4, 3e-4], "lora.rank": [16]}


@pytest.mark.parametrize("table, message", [
    ({"optim": {"lr": 1e-4}}, "sweep.optim.lr: expected a non-empty list"),
    ({"optim.lr": []}, "sweep.optim.lr: expected a non-empty list"),
    ({"lora.rank": [16, 16]}, "the same value appears twice"),
])
def test_bad_grids_name_the_key(table, message):
    with pytest.raises(ConfigError, match=message):
        flatten_grid(table)


def test_cli_sweep_items():
    assert parse_sweep_args(["optim.lr=[1e-4, 3e-4]", "data.buckets=[[[64, 64]], [[32, 32]]]"]) == {
        "optim.lr": [1e-4, 3e-4], "data.buckets": [[[64, 64]], [[32, 32]]]}
    with pytest.raises(ConfigError, match="expected KEY="):
        parse_sweep_args(["optim.lr"])
    with pytest.raises(ConfigError, match="not a TOML list"):
        parse_sweep_args(["optim.lr=[1e-4,"])
    with pytest.raises(ConfigError, match="--sweep.optim.lr: expected a non-empty list"):
        parse_sweep_args(["optim.lr=1e-4"])


def test_expansion_is_the_cartesian_product_with_readable_distinct_names():
    points = expand({"optim.lr": [1e-4, 3e-4], "lora.rank": [16, 32]}, "runs/x")
    assert [p.values for p in points] == [
        {"optim.lr": 1e-4, "lora.rank": 16}, {"optim.lr": 1e-4, "lora.rank": 32},
        {"optim.lr": 3e-4, "lora.rank": 16}, {"optim.lr": 3e-4, "lora.rank": 32}]
    assert [p.name for p in points] == ["lr=0.0001,rank=16", "lr=0.0001,rank=32", "lr=0.0003,rank=16",
                                        "lr=0.0003,rank=32"]
    assert points[3].output_dir == "runs/x/lr=0.0003,rank=32"


def test_keys_sharing_a_last_component_keep_their_full_names():
    (point,) = expand({"optim.lr": [1e-4], "other.lr": [2]}, "runs")
    assert point.name == "optim.lr=0.0001,other.lr=2"


def test_names_are_filesystem_safe_and_collisions_are_refused():
    (point,) = expand({"data.buckets": [[[64, 48]]], "data.trigger": ["a b/c"]}, "runs")
    assert point.name == "buckets=64x48,trigger=a_b_c"
    with pytest.raises(ConfigError, match="share the run directory name"):
        expand({"data.trigger": ["a/b", "a b"]}, "runs")


def test_each_point_resolves_to_its_values_and_its_own_output_dir(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text('[logging]\noutput_dir = "runs/base"\n[sweep]\noptim.lr = [1e-4, 3e-4]\n')
    result = plan(config, ["train.max_steps=7"], ["lora.rank=[8, 16]"])
    assert result.grid == {"optim.lr": [1e-4, 3e-4], "lora.rank": [8, 16]}
    assert len(result.points) == 4
    for point, overrides in zip(result.points, result.run_overrides()):
        cfg = load_config(config, overrides)
        assert cfg.optim.lr == point.values["optim.lr"] and cfg.lora.rank == point.values["lora.rank"]
        assert cfg.train.max_steps == 7
        assert cfg.logging.output_dir == f"runs/base/{point.name}"
        assert cfg.sweep == {}  # a point's resolved config describes that run alone
    manifest = result.manifest()
    assert manifest["config"] == str(config.resolve()) and len(manifest["points"]) == 4
    assert manifest["points"][1]["overrides"][:2] == ["optim.lr=0.0001", "lora.rank=16"]


def test_without_a_grid_there_is_one_run_with_the_plain_overrides(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text("[train]\nmax_steps = 3\n")
    result = plan(config, ["optim.lr=0.01"], [])
    assert result.points == [] and result.run_overrides() == [["optim.lr=0.01"]]


@pytest.mark.parametrize("sweep_items, overrides, message", [
    (["optim.lrr=[1, 2]"], [], "unknown key 'lrr'; did you mean 'lr'"),
    (["lora.rank=[16, 'big']"], [], r"lora.rank: expected an integer"),
    (["optim.lr=[1e-4, 3e-4]"], ["optim.lr=1e-3"], "both swept and fixed"),
    (["logging.output_dir=['a', 'b']"], [], "cannot be swept"),
    (["slurm.nodes=[1, 2]"], [], "cannot be swept"),
])
def test_bad_sweeps_fail_before_submission(tmp_path, sweep_items, overrides, message):
    config = tmp_path / "c.toml"
    config.write_text("")
    with pytest.raises(ConfigError, match=message):
        plan(config, overrides, sweep_items)


def test_sweep_cli_for_sbatch_arrays(tmp_path, capsys):
    config = tmp_path / "c.toml"
    config.write_text('[logging]\noutput_dir = "runs/s"\n[sweep]\n"optim.lr" = [1e-4, 3e-4]\n')
    assert sweep.main(["--config", str(config), "--sweep", "lora.rank=[4, 8, 16]", "--count"]) == 0
    assert capsys.readouterr().out.strip() == "6"
    assert sweep.main(["--config", str(config), "--set", "train.seed=5", "--point", "1"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines == ["train.seed=5", "optim.lr=0.0003", 'logging.output_dir="runs/s/lr=0.0003"', "sweep={}"]
    assert sweep.main(["--config", str(config), "--point", "2"]) == 2
    assert "the sweep has 2 points" in capsys.readouterr().err
