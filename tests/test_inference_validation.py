"""Training-time validation images: rendering, TensorBoard round trip, the [validation] config section."""

import io

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import IMAGES, EventAccumulator
from torch.utils.tensorboard import SummaryWriter

from hidream_ft.config import ConfigError, ValidationConfig, load_config
from hidream_ft.inference import SamplingSettings, generate, log_validation, render_validation
from hidream_ft.inference.validation import image_tag

PROMPTS = ["a red circle on a blue background", "a green square!"]


def small_validation(**overrides) -> ValidationConfig:
    return ValidationConfig(**{**dict(every=10, prompts=PROMPTS, steps=2, width=64, height=32), **overrides})


def test_render_validation_keeps_modes_and_rng(tiny_model, tokenizer, tokens):
    tiny_model.train()
    tiny_model.model.visual.eval()  # a frozen part the trainer keeps in eval mode must stay so
    rng_before = torch.get_rng_state()
    images = render_validation(tiny_model, tokenizer, tokens, small_validation(), "cpu")
    assert [prompt for prompt, _ in images] == PROMPTS
    assert all(image.dtype == torch.uint8 and image.shape == (3, 32, 64) for _, image in images)
    assert tiny_model.training and tiny_model.model.language_model.training
    assert not tiny_model.model.visual.training
    assert torch.equal(torch.get_rng_state(), rng_before)
    # The same as sampling the prompt directly with the same settings.
    tiny_model.eval()
    assert torch.equal(images[1][1], generate(tiny_model, tokenizer, tokens, PROMPTS[1], small_validation()))


def test_validation_images_round_trip_through_tensorboard(tiny_model, tokenizer, tokens, tmp_path):
    images = render_validation(tiny_model, tokenizer, tokens, small_validation(), "cpu")
    writer = SummaryWriter(log_dir=str(tmp_path))
    log_validation(writer, 100, images)
    log_validation(writer, 200, images)
    writer.close()
    events = EventAccumulator(str(tmp_path), size_guidance={IMAGES: 0})
    events.Reload()
    tags = sorted(events.Tags()[IMAGES])
    assert tags == ["validation/00_a_red_circle_on_a_blue_background", "validation/01_a_green_square"]
    for index, (_, image) in enumerate(images):
        logged = events.Images(tags[index])
        assert [event.step for event in logged] == [100, 200]
        assert (logged[0].width, logged[0].height) == (64, 32)
        decoded = np.asarray(Image.open(io.BytesIO(logged[0].encoded_image_string)).convert("RGB"))
        assert np.array_equal(decoded, image.permute(1, 2, 0).numpy())


def test_image_tags():
    assert image_tag(3, "A fox, in the snow!") == "validation/03_A_fox_in_the_snow"
    assert image_tag(0, " ") == "validation/00"
    assert len(image_tag(1, "word " * 40)) <= len("validation/01_") + 48


def test_validation_section_in_the_training_config(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[validation]\nevery = 250\nprompts = ["a fox"]\nscheduler = "flash"\n'
                    "timesteps = [999, 500, 8]\nnoise_scale = 7.5\nnoise_clip_std = 2.5\n")
    cfg = load_config(path).validation
    assert cfg.every == 250 and cfg.prompts == ["a fox"] and cfg.timesteps == [999, 500, 8]
    assert isinstance(cfg, SamplingSettings)
    assert cfg.scheduler == "flash" and cfg.noise_clip_std == 2.5 and len(cfg.schedule()) == 3
    assert load_config(None).validation.every == 0  # off by default


@pytest.mark.parametrize("override, message", [
    ("validation.every=-1", r"validation\.every: must be ≥ 0"),
    ("validation.every=5", r"validation\.prompts: validation every 5 steps needs at least one prompt"),
    ("validation.width=100", r"validation\.width: must be a positive multiple of 32, got 100"),
    ("validation.scheduler='ddim'", r"validation\.scheduler: 'ddim' is not one of 'unipc', 'flow_match', 'flash'"),
    ("validation.timesteps=[10, 500]", r"validation\.timesteps: timesteps must be strictly decreasing"),
    ("validation.steps=0", r"validation\.steps: steps must be ≥ 1"),
])
def test_validation_config_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])
