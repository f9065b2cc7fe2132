"""Loss masks: per-image masks cropped like their images, reduced to per-token weights of the loss."""

from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import drain_pipeline, quantized_pixels
from hidream_ft.config import ConfigError, DataConfig, FolderSource, load_config
from hidream_ft.data import Sample
from hidream_ft.data.collate import TrainCollator
from hidream_ft.data.demo import write_demo_dataset
from hidream_ft.data.planner import PackedSamples
from hidream_ft.data.samples import make_sample
from hidream_ft.flow.objective import diffusion_loss
from hidream_ft.model.conditioning import ConditionProcessor
from hidream_ft.trainer import compute_loss


@pytest.fixture(scope="module")
def collator(tiny_checkpoint, tokenizer, tokens):
    return TrainCollator(tokenizer, tokens, 128, ConditionProcessor.from_pretrained(tiny_checkpoint))


def grey_mask(width: int, height: int, boxes: dict[tuple[int, int, int, int], int]) -> Image.Image:
    """A black mask with each (left, top, right, bottom) box filled with its grey level."""
    values = np.zeros((height, width), dtype=np.uint8)
    for (left, top, right, bottom), level in boxes.items():
        values[top:bottom, left:right] = level
    return Image.fromarray(values, "L")


def test_mask_is_cropped_with_its_image_and_averaged_per_patch(tmp_path):
    # A 128x64 image in the 64x64 bucket: the centre crop keeps x in [32, 96). The mask is white in the crop's
    # top-left patch, grey (128) in its bottom-right one and white left of the crop, which must not show.
    Image.new("RGB", (128, 64), (10, 20, 30)).save(tmp_path / "a.png")
    grey_mask(128, 64, {(32, 0, 64, 32): 255, (64, 32, 96, 64): 128, (0, 0, 32, 64): 255}).save(tmp_path / "m.png")
    sample = make_sample(str(tmp_path / "a.png"), "a.png", "a", "a caption", 1.0, (64, 64), DataConfig(), (0,),
                         Counter(), mask=str(tmp_path / "m.png"))
    assert sample.mask.shape == (64, 64)
    weights = torch.nn.functional.avg_pool2d(sample.mask[None, None], 32).flatten()
    torch.testing.assert_close(weights, torch.tensor([1.0, 0.0, 0.0, 128 / 255]), rtol=0, atol=1e-5)


def test_folder_masks_reach_the_batch_as_token_weights_in_patch_order(tmp_path, collator):
    images, masks = write_demo_dataset(tmp_path / "images", n=2, size=(64, 64)), tmp_path / "masks"
    masks.mkdir()
    # Only demo_000 has a mask (a JPEG: any image extension); white in its top-right patch, else black.
    grey_mask(64, 64, {(32, 0, 64, 32): 255}).convert("RGB").save(masks / "demo_000.jpg", quality=100)
    cfg = DataConfig(folders=[FolderSource(str(images), mask_dir=str(masks))], buckets=[[64, 64]], num_workers=0)
    [(_, [samples])], _, _ = drain_pipeline(cfg, 1, batch_size=2)
    batch = collator(sorted(samples, key=lambda s: s.key))
    assert batch.keys == ["demo_000", "demo_001"]
    torch.testing.assert_close(batch.token_weights, torch.tensor([[0.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]]),
                               rtol=0, atol=2e-3)  # JPEG ringing at the patch edges


def masked_samples() -> list[Sample]:
    """Two 64x64 samples and one 64x96 sample; masks with white, grey and black patches (and one without)."""
    half = torch.ones(64, 64)
    half[:32] = 0.0  # top row of patches ignored
    grey = torch.full((96, 64), 0.25)
    grey[:, :32] = 1.0
    return [
        Sample(quantized_pixels(64, 64, 0), "a red circle", "a", noise_seed=0, weight=1.0, mask=half),
        Sample(quantized_pixels(64, 64, 1), "a blue square", "b", noise_seed=1, weight=0.5),
        Sample(quantized_pixels(96, 64, 2), "a green triangle", "c", noise_seed=2, weight=2.0, mask=grey),
    ]


def test_all_white_masks_give_the_unmasked_loss_bit_for_bit(tiny_model, collator):
    cfg = load_config(None, [])
    samples = masked_samples()[:2]
    white = [Sample(s.pixels, s.caption, s.key, s.weight, noise_seed=s.noise_seed, mask=torch.ones(64, 64))
             for s in samples]
    plain = [Sample(s.pixels, s.caption, s.key, s.weight, noise_seed=s.noise_seed) for s in samples]
    for pack in (list, lambda s: PackedSamples(s, 512)):
        masked_batch, plain_batch = collator(pack(white)), collator(pack(plain))
        assert masked_batch.token_weights is None
        with torch.no_grad():
            assert torch.equal(compute_loss(tiny_model, masked_batch, cfg.diffusion),
                               compute_loss(tiny_model, plain_batch, cfg.diffusion))


@pytest.mark.parametrize("packed", [False, True])
def test_ignored_tokens_have_no_influence_on_the_loss(packed, collator):
    samples = masked_samples()[:2]
    batch = collator(PackedSamples(samples, 512) if packed else samples)
    counts = batch.packed_target_counts
    x0 = batch.x0
    x_pred = (x0 + 0.1 * torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))).requires_grad_()
    sigmas = torch.tensor([0.3, 0.7])
    ignored = batch.token_weights == 0
    assert int(ignored.sum()) == 2  # sample "a": its top row of two patches

    def loss(target):
        return diffusion_loss(x_pred, target, sigmas, token_weights=batch.token_weights,
                              sample_weights=batch.weights, token_counts=counts)

    changed = x0.clone()
    changed[ignored] = -x0[ignored] + 3.0
    value = loss(x0)
    assert torch.equal(value, loss(changed))
    value.backward()
    assert torch.equal(x_pred.grad[ignored], torch.zeros_like(x_pred.grad[ignored]))
    assert bool((x_pred.grad[~ignored] != 0).any())
    # The learnt tokens alone, their mean per sample, times the sample weights: sample "a" counts its bottom row.
    err = (x_pred.detach() - x0).pow(2).mean(-1)
    learnt_a, all_b = (err[2:4], err[4:]) if packed else (err[0, 2:], err[1])
    per_sample = torch.stack([learnt_a.mean(), all_b.mean()])
    torch.testing.assert_close(value.detach(), (per_sample * torch.tensor([1.0, 0.5])).mean(),
                               rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["x0", "velocity"])
def test_packed_masked_loss_equals_the_unpacked_one(kind, tiny_model, collator):
    tiny_model.attention = "dense"
    cfg = load_config(None, [f"diffusion.loss='{kind}'"])
    samples = masked_samples()
    with torch.no_grad():
        packed = compute_loss(tiny_model, collator(PackedSamples(samples, 1024)), cfg.diffusion)
        alone = torch.stack([compute_loss(tiny_model, collator([s]), cfg.diffusion) for s in samples])
        torch.testing.assert_close(packed, alone.mean(), rtol=0, atol=1e-6)  # each alone carries its weight
        pair = samples[:2]
        torch.testing.assert_close(compute_loss(tiny_model, collator(PackedSamples(pair, 1024)), cfg.diffusion),
                                   compute_loss(tiny_model, collator(pair), cfg.diffusion), rtol=0, atol=1e-6)


def test_a_missing_mask_folder_is_a_one_line_config_error(tmp_path):
    images = write_demo_dataset(tmp_path / "images", n=2)
    cfg = DataConfig(folders=[FolderSource(str(images), mask_dir=str(tmp_path / "nowhere"))], num_workers=0)
    with pytest.raises(ConfigError, match=r"data\.folders\[0\]\.mask_dir: .*nowhere.* is not a directory") as e:
        drain_pipeline(cfg, 1)
    assert "\n" not in str(e.value)
    inside = FolderSource(str(images), mask_dir=str(images))
    with pytest.raises(ConfigError, match=r"mask_dir: .* is inside the image folder"):
        drain_pipeline(DataConfig(folders=[inside], num_workers=0), 1)


def test_bad_masks_leave_their_images_out_and_are_counted(tmp_path):
    images, masks = write_demo_dataset(tmp_path / "images", n=6), tmp_path / "masks"
    masks.mkdir()
    (masks / "demo_000.png").write_bytes(b"not an image")  # unreadable header: left out at indexing
    grey_mask(32, 32, {}).save(masks / "demo_001.png")  # not its image's size: left out at indexing
    grey_mask(64, 64, {}).save(masks / "demo_002.png")  # black everywhere: nothing to learn
    png = (masks / "demo_003.png")
    grey_mask(64, 64, {(0, 0, 64, 64): 255}).save(png)
    png.write_bytes(png.read_bytes()[:-40])  # truncated pixel data: fails when loaded, like a truncated image
    grey_mask(64, 64, {(0, 0, 32, 32): 255}).save(masks / "demo_004.png")
    cfg = DataConfig(folders=[FolderSource(str(images), mask_dir=str(masks))], buckets=[[64, 64]], num_workers=0)
    out, _, stats = drain_pipeline(cfg, 8, batch_size=1)
    seen = {sample.key for _, micro_batches in out for batch in micro_batches for sample in batch}
    assert seen == {"demo_004", "demo_005"}
    assert stats["mask_empty_skipped"] >= 1 and stats["replacement_used"] >= 2
    assert stats["corrupt_image"] >= 3  # two at indexing, the truncated one each time it is drawn
