"""TOML configuration: validation, overrides, round trip, documentation."""

import dataclasses
import datetime
import math
import re
import tomllib
from pathlib import Path

import pytest

from hidream_ft import config as config_module
from hidream_ft.config import Config, ConfigError, load_config, to_toml, write_toml


def write(tmp_path, text):
    path = tmp_path / "c.toml"
    path.write_text(text)
    return path


def test_defaults_and_values(tmp_path):
    cfg = load_config(write(tmp_path, '[optim]\nlr = 3e-4\nbetas = [0.9, 0.95]\n[train]\nmode = "full"\n'))
    assert cfg.optim.lr == 3e-4 and cfg.optim.betas == [0.9, 0.95] and cfg.train.mode == "full"
    assert cfg.lora.rank == 32


def test_unknown_key_names_the_nearest_valid_one(tmp_path):
    with pytest.raises(ConfigError, match=r"optim: unknown key 'lrr'; did you mean 'lr'\?"):
        load_config(write(tmp_path, "[optim]\nlrr = 1e-4\n"))
    with pytest.raises(ConfigError, match=r"unknown key 'optimm'; did you mean 'optim'\?"):
        load_config(write(tmp_path, "[optimm]\nlr = 1e-4\n"))


@pytest.mark.parametrize("text, message", [
    ('[train]\nmax_steps = "ten"\n', r"train\.max_steps: expected an integer, got 'ten'"),
    ('[train]\nmode = "half"\n', r"train\.mode: 'half' is not one of 'lora', 'full'"),
    ('[optim]\nlr = true\n', r"optim\.lr: expected a number"),
    ('[lora]\ntargets = "q_proj"\n', r"lora\.targets: expected a list of str"),
    ("[optim\n", r"invalid TOML"),
])
def test_wrong_types_are_reported_with_their_key(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, text))


def test_command_line_overrides(tmp_path):
    cfg = load_config(write(tmp_path, "[optim]\nlr = 1e-4\n"),
                      ["optim.lr=5e-5", "model.path=/models/hidream", "lora.targets=['q_proj']"])
    assert cfg.optim.lr == 5e-5
    assert cfg.model.path == "/models/hidream"
    assert cfg.lora.targets == ["q_proj"]
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(None, ["optim.lr"])


def test_missing_file():
    with pytest.raises(ConfigError, match="config file not found: nowhere.toml"):
        load_config("nowhere.toml")


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["optim.lr=2e-5", "train.mode='full'", "model.path='/a \"quoted\" path'"])
    again = load_config(write(tmp_path, to_toml(cfg)))
    assert again == cfg


def test_saved_config_round_trips_escapes_keys_and_tables(tmp_path):
    prompt = 'line one\nsays "hi" in C:\\path\twith a tab\x01 and \x7f'
    cfg = load_config(None, ["validation.every=10", "validation.prompts=['x']", "validation.noise_scale_end=2.0",
                             "data.folders=[{ path = 'a', control_dirs = ['b', 'c'] }, 'd']",
                             "data.stages=[{ until_step = 5, area = 4096 }, { buckets = [[64, 32]] }]",
                             "slurm.sbatch={ mail-type = 'END', reservation = 'big' }",
                             "sweep={ 'optim.lr' = [1e-4, 3e-4], lora = { rank = [4, 8] } }"])
    cfg.validation.prompts = [prompt, "plain"]
    again = load_config(write(tmp_path, to_toml(cfg)))
    assert again == cfg and again.validation.prompts[0] == prompt
    assert again.sweep == {"optim.lr": [1e-4, 3e-4], "lora": {"rank": [4, 8]}}


def test_written_toml_reads_back_equal():
    table = {"top": 1, "when": datetime.date(2024, 5, 1), "a b": {"x.y": [1.5, -math.inf], "z": None},
             "runs": [{"name": "n\r", "nested": {"k": True}}, {"name": ""}], "empty": {}}
    again = tomllib.loads(write_toml(table))
    assert again == {**table, "a b": {"x.y": [1.5, -math.inf]}}
    assert math.isnan(tomllib.loads(write_toml({"v": math.nan}))["v"])
    with pytest.raises(TypeError, match="cannot write"):
        write_toml({"v": object()})


def test_shipped_configs_are_valid():
    for path in sorted(Path(__file__).parents[1].glob("configs/*.toml")):
        load_config(path)


def _all_keys(cls, prefix=""):
    for f in dataclasses.fields(cls):
        name = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(f.type) or (isinstance(f.type, str) and f.type in vars(config_module)
                                                and dataclasses.is_dataclass(vars(config_module)[f.type])):
            yield from _all_keys(vars(config_module)[f.type] if isinstance(f.type, str) else f.type, f"{name}.")
        else:
            yield name


def test_every_key_is_documented():
    doc = (Path(__file__).parents[1] / "docs" / "config.md").read_text()
    documented = set(re.findall(r"^\| `([a-z_.]+)` \|", doc, flags=re.M))
    missing = [key for key in _all_keys(Config) if key not in documented]
    assert not missing, f"undocumented config keys: {missing}"
