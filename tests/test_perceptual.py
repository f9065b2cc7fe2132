"""Perceptual losses on the predicted image: frozen DINO embeddings and LPIPS, their σ-range masking and sample
averaging, packed rows, and a trainer that adds them to the loss."""

import json

import pytest
import torch
from transformers import DINOv3ViTConfig, DINOv3ViTModel

from helpers import (
    WORKERS, make_trainer, noise_samples, quantized_pixels, run_python, set_flags, tensorboard_scalars, tiny_overrides,
    write_lpips_weights,
)
from hidream_ft import bench
from hidream_ft.config import ConfigError, load_config
from hidream_ft.data import Sample
from hidream_ft.data.collate import TextToImageCollator, TrainCollator
from hidream_ft.data.planner import PackedSamples
from hidream_ft.demo import write_demo
from hidream_ft.model.conditioning import ConditionProcessor
from hidream_ft.model.patches import patchify
from hidream_ft.perceptual.dino import DinoFeatures, dino_loss, dino_similarity
from hidream_ft.perceptual.errors import PerceptualWeightsError
from hidream_ft.perceptual.images import square_resize
from hidream_ft.perceptual.loss import (
    PerceptualLoss, in_sigma_range, keep_masked_tokens, masked_weighted_mean, square_images,
)
from hidream_ft.perceptual.lpips import LPIPS, lpips_loss
from hidream_ft.trainer import check_inputs, run


@pytest.fixture(scope="module")
def dino(dino_path):
    return DinoFeatures.load(dino_path, resolution=64)


@pytest.fixture(scope="module")
def lpips(lpips_path):
    return LPIPS.load(lpips_path, resolution=64)


def images(seed: int, n: int = 2, height: int = 64, width: int = 64) -> torch.Tensor:
    return torch.rand(n, 3, height, width, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# -- DINO ------------------------------------------------------------------------------------------------------


def test_dino_embeddings_are_unit_vectors_of_any_image_size(dino):
    for height, width in [(64, 64), (32, 96), (17, 40)]:
        embedding = dino.embed(images(0, height=height, width=width))
        assert embedding.shape == (2, 32)
        torch.testing.assert_close(embedding.norm(dim=-1), torch.ones(2))


def test_dino_patch_mean_is_appended_after_the_cls_token(dino_path, dino):
    both = DinoFeatures.load(dino_path, resolution=64, with_patch_mean=True)
    x = images(1)
    embedding = both.embed(x)
    assert embedding.shape == (2, 64)
    torch.testing.assert_close(torch.nn.functional.normalize(embedding[:, :32], dim=-1), dino.embed(x))
    tokens = both.backbone(pixel_values=(((x + 1) / 2 - torch.tensor([0.485, 0.456, 0.406])[:, None, None])
                                         / torch.tensor([0.229, 0.224, 0.225])[:, None, None])).last_hidden_state
    expected = torch.cat([tokens[:, 0], tokens[:, 1:].mean(dim=1)], dim=-1)
    torch.testing.assert_close(embedding, torch.nn.functional.normalize(expected, dim=-1))


def test_dinov3_patch_mean_leaves_out_the_register_tokens(tmp_path):
    torch.manual_seed(0)
    DINOv3ViTModel(DINOv3ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                   patch_size=8, image_size=32, num_register_tokens=4)).save_pretrained(tmp_path)
    features = DinoFeatures.load(tmp_path, resolution=64, with_patch_mean=True)
    x = images(2, height=48, width=80)
    pixels = (((square_resize(x, 64) + 1) / 2 - torch.tensor([0.485, 0.456, 0.406])[:, None, None])
              / torch.tensor([0.229, 0.224, 0.225])[:, None, None])
    tokens = features.backbone(pixel_values=pixels).last_hidden_state
    assert tokens.shape[1] == 1 + 4 + 64
    expected = torch.cat([tokens[:, 0], tokens[:, 5:].mean(dim=1)], dim=-1)
    torch.testing.assert_close(features.embed(x), torch.nn.functional.normalize(expected, dim=-1))


def test_dino_loss_is_zero_for_identical_images_and_positive_otherwise(dino):
    a, b = images(2), images(3)
    torch.testing.assert_close(dino_loss(dino, a, a), torch.zeros(2), rtol=0, atol=1e-6)
    assert (dino_loss(dino, a, b) > 1e-4).all()
    torch.testing.assert_close(dino_similarity(dino.embed(a), dino.embed(b)), 1 - dino_loss(dino, a, b))


def test_dino_load_names_a_bad_path(tmp_path):
    with pytest.raises(PerceptualWeightsError, match="cannot be loaded"):
        DinoFeatures.load(tmp_path)


# -- LPIPS -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("net, taps", [
    ("alex", ["net.slice1.0.weight", "net.slice2.3.weight", "net.slice3.6.weight", "net.slice4.8.weight",
              "net.slice5.10.weight"]),
    ("vgg", ["net.slice1.0.weight", "net.slice1.2.weight", "net.slice2.5.weight", "net.slice3.14.weight",
             "net.slice4.21.weight", "net.slice5.28.weight"]),
])
def test_lpips_modules_carry_the_lpips_package_key_layout(net, taps):
    state = LPIPS(net).state_dict()
    assert all(key in state for key in taps)
    assert [tuple(state[f"lin{k}.model.1.weight"].shape) for k in range(5)] == [
        (1, c, 1, 1) for c in ([64, 192, 384, 256, 256] if net == "alex" else [64, 128, 256, 512, 512])]


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_lpips_is_zero_for_identical_images_and_positive_otherwise(tmp_path, suffix):
    metric = LPIPS.load(write_lpips_weights(tmp_path / f"alex{suffix}"), resolution=64)
    a, b = images(4), images(5)
    torch.testing.assert_close(metric(a, a), torch.zeros(2), rtol=0, atol=0)
    distance = metric(a, b)
    assert distance.shape == (2,) and (distance > 0).all()
    torch.testing.assert_close(lpips_loss(metric, a, b), distance)


def test_lpips_matches_the_published_formula_on_one_tap(lpips):
    a, b = images(6, n=1), images(7, n=1)
    taps_a, taps_b = lpips.taps(a), lpips.taps(b)
    x = (a - torch.tensor([-0.030, -0.088, -0.188])[:, None, None]) / torch.tensor([0.458, 0.448, 0.450])[:, None, None]
    relu1 = torch.relu(torch.nn.functional.conv2d(x, lpips.net.slice1[0].weight, lpips.net.slice1[0].bias,
                                                  stride=4, padding=2))
    torch.testing.assert_close(taps_a[0], relu1 / (relu1.norm(dim=1, keepdim=True) + 1e-10))
    # Σ over taps of the spatial mean of Σ_c w_c·(unit(a) - unit(b))²
    total = sum((getattr(lpips, f"lin{k}").model[0].weight[0, :, 0, 0][:, None, None]
                 * (taps_a[k] - taps_b[k])[0] ** 2).sum(0).mean() for k in range(5))
    torch.testing.assert_close(lpips(a, b), total[None])


def test_lpips_refuses_a_file_of_another_layout_or_negative_weights(tmp_path, lpips_path):
    state = torch.load(lpips_path, weights_only=True)
    with pytest.raises(PerceptualWeightsError, match="not an lpips 'vgg' checkpoint"):
        LPIPS.load(lpips_path, net="vgg")
    torch.save({**state, "lin2.model.1.weight": -state["lin2.model.1.weight"]}, tmp_path / "negative.pth")
    with pytest.raises(PerceptualWeightsError, match="negative calibration weights in \\['lin2"):
        LPIPS.load(tmp_path / "negative.pth")
    with pytest.raises(PerceptualWeightsError, match="no such file"):
        LPIPS.load(tmp_path / "missing.pth")
    (tmp_path / "truncated.pth").write_bytes(lpips_path.read_bytes()[:1000])
    with pytest.raises(PerceptualWeightsError, match="cannot be read as a torch file"):
        LPIPS.load(tmp_path / "truncated.pth")
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(PerceptualWeightsError, match="not a state dict of tensors"):
        LPIPS.load(tmp_path / "list.pth")


# -- both networks ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["dino", "lpips"])
def test_optimizing_an_image_toward_a_target_lowers_the_loss_and_no_gradient_reaches_the_weights(name, dino, lpips):
    net, loss_of = {"dino": (dino, dino_loss), "lpips": (lpips, lpips_loss)}[name]
    target = images(8)
    image = images(9).requires_grad_(True)
    optimizer = torch.optim.Adam([image], lr=0.05)
    losses = []
    for _ in range(8):
        loss = loss_of(net, image, target).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses
    assert all(not p.requires_grad and p.grad is None for p in net.parameters())
    net.train()
    assert not any(module.training for module in net.modules())


def test_square_images_unpatchify_each_sample_with_its_own_grid():
    wide, tall = quantized_pixels(64, 96, 0), quantized_pixels(96, 64, 1)
    packed = torch.cat([patchify(wide[None])[0], patchify(tall[None])[0]])
    together = square_images(packed, [(2, 3), (3, 2)], [6, 6], 64)
    torch.testing.assert_close(together, torch.cat([square_resize(wide[None], 64), square_resize(tall[None], 64)]))
    padded = square_images(patchify(torch.stack([wide, wide])), [(2, 3), (2, 3)], None, 64)
    torch.testing.assert_close(padded, square_resize(torch.stack([wide, wide]), 64))


def test_samples_outside_the_sigma_range_count_zero_in_the_sample_average():
    sigmas = torch.tensor([0.1, 0.5, 0.9, 1.0])
    assert in_sigma_range(sigmas, 0.5, 0.9).tolist() == [0.0, 1.0, 1.0, 0.0]
    per_sample, weights = torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([1.0, 1.0, 2.0, 1.0])
    mean = masked_weighted_mean(per_sample, in_sigma_range(sigmas, 0.5, 0.9), weights)
    torch.testing.assert_close(mean, torch.tensor((2.0 + 2 * 3.0) / 4))


def perceptual_config(dino_path, lpips_path, *overrides):
    return load_config(None, [f"perceptual.dino_path='{dino_path}'", "perceptual.dino_weight=0.5",
                              f"perceptual.lpips_path='{lpips_path}'", "perceptual.lpips_weight=2.0",
                              "perceptual.resolution=64", *overrides]).perceptual


def test_perceptual_terms_mask_by_sigma_and_weigh_each_term(dino_path, lpips_path):
    loss = PerceptualLoss.from_config(perceptual_config(dino_path, lpips_path, "perceptual.sigma_min=0.5"),
                                      torch.device("cpu"))
    x0 = torch.rand(2, 4, 3072) * 2 - 1
    x_pred = x0 + 0.3 * torch.randn(2, 4, 3072)
    grids, weights = [(2, 2), (2, 2)], torch.ones(2)
    both = loss.terms(x_pred, x0, torch.tensor([0.7, 0.2]), grids, None, weights)
    first = loss.terms(x_pred[:1], x0[:1], torch.tensor([0.7]), grids[:1], None, weights[:1])
    assert set(both) == {"dino", "lpips"}
    for name in both:  # the σ = 0.2 sample counts zero in a mean over both
        torch.testing.assert_close(both[name], first[name] / 2)
    assert loss.terms(x_pred, x0, torch.tensor([0.3, 0.2]), grids, None, weights) == {
        "dino": torch.tensor(0.0), "lpips": torch.tensor(0.0)}
    total = loss.weighted(both)
    torch.testing.assert_close(total, 0.5 * both["dino"] + 2.0 * both["lpips"])


def test_tokens_a_loss_mask_leaves_out_add_no_perceptual_difference(dino_path, lpips_path):
    loss = PerceptualLoss.from_config(perceptual_config(dino_path, lpips_path), torch.device("cpu"))
    x0 = torch.rand(1, 4, 3072) * 2 - 1
    x_pred = x0.clone()
    x_pred[0, 1] += 0.5
    token_weights = torch.tensor([[1.0, 0.0, 1.0, 1.0]])
    torch.testing.assert_close(keep_masked_tokens(x_pred, x0, token_weights), x0)
    terms = loss.terms(x_pred, x0, torch.tensor([0.5]), [(2, 2)], None, torch.ones(1), token_weights)
    assert all(value.abs() < 1e-6 for value in terms.values())
    assert all(value > 0 for value in loss.terms(x_pred, x0, torch.tensor([0.5]), [(2, 2)], None,
                                                 torch.ones(1)).values())


def test_a_packed_row_gives_the_perceptual_loss_of_its_samples_alone(dino_path, lpips_path, tiny_checkpoint,
                                                                    tokenizer, tokens):
    loss = PerceptualLoss.from_config(perceptual_config(dino_path, lpips_path), torch.device("cpu"))
    collator = TrainCollator(tokenizer, tokens, 128, ConditionProcessor.from_pretrained(tiny_checkpoint))
    samples = [Sample(quantized_pixels(64, 64, 0), "a red circle", "a", noise_seed=0, weight=1.0),
               Sample(quantized_pixels(64, 96, 1), "a green square", "b", noise_seed=1, weight=0.5),
               Sample(quantized_pixels(96, 64, 2), "a blue triangle", "c", noise_seed=2, weight=2.0)]
    packed = collator(PackedSamples(samples, 1024))
    assert packed.layout.target_grids == [(2, 2), (2, 3), (3, 2)]
    noise = torch.randn(packed.x0.shape, generator=torch.Generator().manual_seed(0))
    sigmas = torch.tensor([0.3, 0.6, 0.9])
    together = loss.terms(packed.x0 + 0.3 * noise, packed.x0, sigmas, packed.layout.target_grids,
                          packed.packed_target_counts, packed.weights)
    alone, start = [], 0
    for index, sample in enumerate(samples):
        batch = collator([sample])
        count = batch.x0.shape[1]
        assert batch.layout.target_grids == [packed.layout.target_grids[index]]
        x_pred = batch.x0 + 0.3 * noise[start:start + count][None]
        alone.append(loss.terms(x_pred, batch.x0, sigmas[index:index + 1], batch.layout.target_grids, None,
                                batch.weights))
        start += count
    for name in together:  # each sample alone already carries its weight
        expected = torch.stack([terms[name] for terms in alone]).mean()
        torch.testing.assert_close(together[name], expected, rtol=1e-5, atol=1e-6)


# -- configuration and training --------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides, message", [
    (["perceptual.dino_weight=1.0"], "perceptual.dino_path: dino_weight = 1.0 needs a path, got ''"),
    (["perceptual.lpips_weight=-1.0"], "perceptual.lpips_weight: must be ≥ 0, got -1.0"),
    (["perceptual.sigma_min=0.6", "perceptual.sigma_max=0.5"], "need 0 ≤ sigma_min < sigma_max ≤ 1, got 0.6, 0.5"),
    (["perceptual.resolution=32"], "perceptual.resolution: must be ≥ 64"),
])
def test_bad_perceptual_settings_are_refused_with_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", "\\(")):
        load_config(None, overrides)


def test_a_missing_perceptual_file_stops_the_run_before_the_model_loads(tiny_checkpoint, tmp_path):
    cfg = load_config(None, tiny_overrides(tiny_checkpoint, tmp_path) + [
        "perceptual.lpips_weight=1.0", "perceptual.lpips_path='/nowhere.pth'"])
    with pytest.raises(ConfigError, match="perceptual.lpips_path: '/nowhere.pth' is not a file"):
        check_inputs(cfg)


def test_off_by_default():
    cfg = load_config(None, [])
    assert not cfg.perceptual.enabled
    assert PerceptualLoss.from_config(cfg.perceptual, torch.device("cpu")) is None


def test_a_trainer_with_both_terms_trains_and_reads_them_only_on_logging_steps(tiny_checkpoint, tmp_path,
                                                                               dino_path, lpips_path):
    trainer = make_trainer(tiny_checkpoint, tmp_path, f"perceptual.dino_path='{dino_path}'",
                           "perceptual.dino_weight=0.5", f"perceptual.lpips_path='{lpips_path}'",
                           "perceptual.lpips_weight=1.0", "perceptual.resolution=64", "optim.lr=1e-3")
    batch = TextToImageCollator(trainer.tokenizer, trainer.tokens, 128)(noise_samples()[:2])
    readings = [trainer.step([batch]) for _ in range(6)]
    assert all(set(r["terms"]) == {"dino", "lpips"} and all(v > 0 for v in r["terms"].values()) for r in readings)
    assert readings[-1]["loss"] < readings[0]["loss"]
    assert readings[-1]["terms"]["lpips"] < readings[0]["terms"]["lpips"]
    for net in trainer.perceptual.nets.values():
        assert all(p.grad is None and not p.requires_grad for p in net.parameters())
    with bench.host_syncs() as quiet:
        stats = trainer.step([batch], read=False)
    assert quiet.count == 0 and all(isinstance(v, torch.Tensor) for v in stats["terms"].values())


@pytest.mark.distributed
def test_two_ranks_give_the_perceptual_terms_of_one_rank_on_the_same_global_batch(tiny_checkpoint, tmp_path,
                                                                                 dino_path, lpips_path):
    flags = set_flags(f"perceptual.dino_path='{dino_path}'", "perceptual.dino_weight=0.5",
                      f"perceptual.lpips_path='{lpips_path}'", "perceptual.lpips_weight=1.0",
                      "perceptual.resolution=64", "perceptual.sigma_max=0.7")
    results = {}
    for nproc in (1, 2):
        out = tmp_path / f"{nproc}.json"
        run_python(WORKERS / "fixed_batches.py", tiny_checkpoint, tmp_path / f"run{nproc}", out, 2, *flags,
                   nproc=nproc)
        results[nproc] = json.loads(out.read_text())
    one, two = results[1], results[2]
    assert set(one["terms"]["1"]) == {"dino", "lpips"}
    for step in one["losses"]:
        assert two["losses"][step] == pytest.approx(one["losses"][step], rel=1e-5, abs=1e-6)
        for name, value in one["terms"][step].items():
            assert two["terms"][step][name] == pytest.approx(value, rel=1e-4, abs=1e-6)


def test_a_run_logs_each_term(tmp_path, dino_path, lpips_path):
    demo = write_demo(tmp_path / "demo", steps=2)
    run(load_config(demo, [f"logging.output_dir='{tmp_path / 'out'}'", "logging.log_every=1", "checkpoint.every=0",
                           f"perceptual.dino_path='{dino_path}'", "perceptual.dino_weight=0.5",
                           f"perceptual.lpips_path='{lpips_path}'", "perceptual.lpips_weight=1.0",
                           "perceptual.resolution=64"]))
    for name in ("dino", "lpips"):
        logged = tensorboard_scalars(tmp_path / "out", f"train/{name}_loss")
        assert sorted(logged) == [1, 2] and all(value > 0 for value in logged.values())


def test_the_benchmark_counts_the_lpips_flops_of_its_alexnet_taps(capsys):
    bench.run(bench.parse_args(["--shape", "tiny", "--size", "64", "--batch", "1", "--steps", "1", "--warmup", "0",
                                "--perceptual", "lpips", "--counts"]))
    printed = dict(line.split(": ", 1) for line in capsys.readouterr().out.splitlines() if ": " in line)
    # AlexNet's five convolutions at 224² (outputs 55², 27², 13², 13², 13²), 2 FLOPs per multiply-add; run
    # forward on the prediction and the target and backward into the prediction: three times.
    convolutions = [(55 * 55, 64, 3 * 11 * 11), (27 * 27, 192, 64 * 25), (13 * 13, 384, 192 * 9),
                    (13 * 13, 256, 384 * 9), (13 * 13, 256, 256 * 9)]
    expected = 3 * sum(2 * pixels * out * fan_in for pixels, out, fan_in in convolutions) / 1e9
    assert float(printed["perceptual GFLOPs per step (fwd+bwd)"]) == pytest.approx(expected, rel=0.01)
    assert printed["host syncs per step"] == "0"
