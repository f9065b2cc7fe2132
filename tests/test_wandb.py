"""The optional wandb writer, against a recording stand-in for the wandb package (which tests do not install)."""

import importlib.machinery
import sys
import types

import numpy as np
import pytest
import torch

from helpers import set_flags, tensorboard_scalars
from hidream_ft.config import ConfigError, LoggingConfig, load_config
from hidream_ft.demo import write_demo
from hidream_ft.inference import log_validation
from hidream_ft.metrics import WANDB_RUN_ID_FILE, MetricsLogger, require_wandb
from hidream_ft.train import main as train_main


class FakeRun:
    def __init__(self, calls: list, kwargs: dict):
        self.calls, self.kwargs = calls, kwargs

    def log(self, values: dict, step: int) -> None:
        self.calls.append(("log", dict(values), step))

    def finish(self) -> None:
        self.calls.append(("finish",))


class FakeImage:
    def __init__(self, array: np.ndarray):
        self.array = array


@pytest.fixture
def fake_wandb(monkeypatch):
    """A ``wandb`` module that records ``init`` arguments and every run call in ``module.calls``."""
    module = types.ModuleType("wandb")
    module.__spec__ = importlib.machinery.ModuleSpec("wandb", None)  # found, as if installed
    module.calls = []
    module.Image = FakeImage

    def init(**kwargs):
        module.calls.append(("init", kwargs))
        return FakeRun(module.calls, kwargs)

    module.init = init
    monkeypatch.setitem(sys.modules, "wandb", module)
    return module


def wandb_logging(**overrides) -> LoggingConfig:
    return LoggingConfig(**{**dict(tensorboard=False, wandb=True), **overrides})


def test_scalars_and_images_go_to_wandb_at_their_steps(fake_wandb, tmp_path):
    output_dir = tmp_path / "my-run"
    output_dir.mkdir()
    log = MetricsLogger(output_dir, True, wandb_logging(), total_steps=20, start_step=0)
    log.scalars(10, {"train/loss": 0.5, "train/lr": 1e-4})
    image = torch.arange(3 * 2 * 4, dtype=torch.uint8).reshape(3, 2, 4)
    log_validation(log, 10, [("a red fox", image), ("", image.flip(0))])
    log.scalars(20, {"train/loss": 0.25})
    log.close()

    init, *calls = fake_wandb.calls
    run_id = (output_dir / WANDB_RUN_ID_FILE).read_text().strip()
    assert init == ("init", dict(project="hidream-ft", name="my-run", id=run_id, resume="allow", mode="offline",
                                 dir=str(output_dir)))
    assert len(run_id) == 8
    assert [call[0] for call in calls] == ["log", "log", "log", "log", "finish"]
    assert calls[0][1:] == ({"train/loss": 0.5, "train/lr": 1e-4}, 10)
    assert calls[3][1:] == ({"train/loss": 0.25}, 20)
    for call, (tag, chw) in zip(calls[1:3], [("validation/00_a_red_fox", image), ("validation/01", image.flip(0))]):
        (logged_tag, logged), step = call[1].popitem(), call[2]
        assert (logged_tag, step) == (tag, 10)
        assert logged.array.shape == (2, 4, 3) and np.array_equal(logged.array, chw.permute(1, 2, 0).numpy())


def test_a_resumed_run_reuses_the_run_id_and_settings(fake_wandb, tmp_path):
    settings = wandb_logging(wandb_project="proj", wandb_run_name="named", wandb_mode="online")
    for _ in range(2):
        MetricsLogger(tmp_path, True, settings, total_steps=1, start_step=0).close()
    inits = [call[1] for call in fake_wandb.calls if call[0] == "init"]
    assert len(inits) == 2 and inits[0] == inits[1]
    assert inits[0]["id"] == (tmp_path / WANDB_RUN_ID_FILE).read_text().strip()
    assert (inits[0]["project"], inits[0]["name"], inits[0]["mode"]) == ("proj", "named", "online")


def test_other_ranks_and_the_default_do_not_start_wandb(fake_wandb, tmp_path):
    MetricsLogger(tmp_path, False, wandb_logging(), total_steps=1, start_step=0).close()
    MetricsLogger(tmp_path, True, LoggingConfig(tensorboard=False), total_steps=1, start_step=0).close()
    assert fake_wandb.calls == [] and not (tmp_path / WANDB_RUN_ID_FILE).exists()


def test_a_missing_wandb_package_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import machinery: "not installed"
    with pytest.raises(ConfigError) as error:
        require_wandb(wandb_logging())
    assert str(error.value) == "logging.wandb = true needs the wandb package: pip install wandb"
    require_wandb(LoggingConfig())  # off: never looked for


@pytest.mark.parametrize("override, message", [
    ("logging.wandb_mode='disabled'", r"logging\.wandb_mode: 'disabled' is not one of 'online', 'offline'"),
    ("logging.wandb_project=''", r"logging\.wandb_project: must not be empty when logging\.wandb = true"),
])
def test_wandb_keys_are_validated(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["logging.wandb=true", override])


def test_training_stops_before_the_model_loads_without_wandb(tmp_path, capsys, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before wandb was checked")

    monkeypatch.setattr("hidream_ft.trainer.load_model", no_model)
    monkeypatch.setitem(sys.modules, "wandb", None)
    config = write_demo(tmp_path / "demo", steps=1)
    assert train_main(["--config", str(config), *set_flags("logging.wandb=true")]) == 2
    err = capsys.readouterr().err
    assert err == "error: logging.wandb = true needs the wandb package: pip install wandb\n"


def test_training_sends_tensorboard_scalars_and_validation_images_to_wandb(fake_wandb, tmp_path):
    config = write_demo(tmp_path / "demo", steps=2)
    assert train_main(["--config", str(config), *set_flags(
        "logging.wandb=true", "logging.log_every=1", "data.num_workers=0", "validation.every=2",
        "validation.prompts=['a fox']", "validation.steps=1", "validation.width=64", "validation.height=32")]) == 0
    output_dir = tmp_path / "demo" / "output"
    init, *calls = fake_wandb.calls
    assert init[1]["name"] == "output" and calls[-1] == ("finish",)
    logs = [call for call in calls if call[0] == "log"]
    scalars = [(values, step) for _, values, step in logs if "train/loss" in values]
    assert [step for _, step in scalars] == [1, 2]
    for values, step in scalars:
        assert values["train/loss"] == pytest.approx(tensorboard_scalars(output_dir, "train/loss")[step])
    assert set(scalars[0][0]) == set(scalars[1][0]) and "perf/step_s" in scalars[0][0]
    images = [(values, step) for _, values, step in logs if "train/loss" not in values]
    assert [(list(values), step) for values, step in images] == [(["validation/00_a_fox"], 2)]
    assert images[0][0]["validation/00_a_fox"].array.shape == (32, 64, 3)
