"""Edit / IP conditioning: reference sizing, ViT inputs, sequence layouts, DeepStack and the fake ViT pass."""

import pytest
import torch
from PIL import Image

from hidream_ft.model.conditioning import (
    MAX_REFERENCES, ConditionProcessor, condition_base_size, condition_dimensions, fitted_size,
    keep_aspect_target_size, prepare_references, reference_pixel_size, resize_pilimage, resized_size,
)
from hidream_ft.model.layout import FIX_POINT, collate_layouts
from hidream_ft.model.patches import image_from_pixels, pixels_from_image, pixels_from_uint8
from hidream_ft.model.reference_layout import build_reference_inputs, build_reference_layout, generation_inputs


@pytest.fixture(scope="module")
def processor(tiny_checkpoint):
    return ConditionProcessor.from_pretrained(tiny_checkpoint)


def random_reference(height, width, seed=0):
    g = torch.Generator().manual_seed(seed)
    return pixels_from_uint8(torch.randint(0, 256, (3, height, width), generator=g, dtype=torch.uint8))


# ---------------------------------------------------------------- sizing by the number of references


@pytest.mark.parametrize("k, expected", [(1, 1024), (2, 768), (3, 512), (4, 512), (5, 384), (8, 384), (9, 256),
                                         (10, 256)])
def test_reference_pixel_size_follows_the_k_rule(k, expected):
    assert reference_pixel_size(k, height=768, width=1024) == expected
    assert reference_pixel_size(k, height=1024, width=768) == expected  # M = max(H, W)


@pytest.mark.parametrize("k, base", [(1, 384), (4, 384), (5, 288), (8, 288), (9, 192), (10, 192)])
def test_condition_base_size_follows_the_k_rule(k, base):
    assert condition_base_size(k) == base


@pytest.mark.parametrize("k", [0, MAX_REFERENCES + 1])
def test_unsupported_reference_counts_are_refused(k):
    with pytest.raises(ValueError, match=f"{k} reference images given; edit/IP layouts take 1 to 10"):
        reference_pixel_size(k, 512, 512)


def test_fitted_size_picks_the_largest_multiple_within_the_area():
    assert fitted_size(1000, 500, 512, 32) == (704, 352)  # scale 0.724 → 724 x 362 → floored to 32
    assert fitted_size(3840, 2160, 2560, 32) == (3392, 1920)  # the spec's 16:9 K = 1 case (≈ 3413 x 1920)
    assert fitted_size(512, 512, 512, 32) == (512, 512)
    assert fitted_size(4000, 100, 64, 32) == (384, 32)  # extreme aspect: one patch row, not an empty image


def test_resize_pilimage_gives_multiples_of_32_within_the_area_and_keeps_the_centre():
    image = Image.new("RGB", (1000, 500), (255, 0, 0))
    image.paste((0, 0, 255), (0, 0, 150, 500))  # a blue band on the left edge, cropped away first
    out = resize_pilimage(image, 512)
    assert out.size == (704, 352) == resized_size(1000, 500, 512)
    assert out.getpixel((352, 176)) == (255, 0, 0)
    big = Image.new("RGB", (4000, 3000))
    assert resize_pilimage(big, 512).size == resized_size(4000, 3000, 512)
    assert resized_size(4000, 3000, 512) == fitted_size(1000, 750, 512, 32)  # box-halved twice first


def test_condition_dimensions_follow_calculate_dimensions():
    assert condition_dimensions(384, 600, 400) == (448, 288)  # w = √(384²·1.5) = 470 → 448, h = 313 → 288
    assert condition_dimensions(384, 512, 512) == (384, 384)
    assert condition_dimensions(192, 64, 64) == (192, 192)


def test_prepare_references_sizes_by_k_and_keeps_aspect():
    images = [Image.new("RGB", (300, 200)), Image.new("RGB", (200, 300)), Image.new("RGB", (100, 100))]
    refs = prepare_references(images, height=256, width=256)  # K = 3 → S = 128
    assert [tuple(r.shape[1:]) for r in refs] == [(96, 128), (128, 96), (128, 128)]  # 157x105 → 128x96
    assert all(r.min() >= -1 and r.max() <= 1 for r in refs)
    assert keep_aspect_target_size(Image.new("RGB", (3840, 2160))) == resized_size(3840, 2160, 2048)


def test_tensor_image_round_trip_is_exact():
    pixels = random_reference(32, 64)
    assert torch.equal(pixels_from_image(image_from_pixels(pixels)), pixels)


# ---------------------------------------------------------------- ViT inputs


def test_vit_inputs_match_the_placeholder_counts(processor, tiny_model):
    refs = [random_reference(64, 96), random_reference(32, 64, 1), random_reference(64, 64, 2)]
    vision = processor(refs)
    # 3 references → base 384: 3:2 → 448x288 (28x18 ViT patches), 2:1 → 512x256, 1:1 → 384x384.
    assert vision.image_grid_thw.tolist() == [[1, 18, 28], [1, 16, 32], [1, 24, 24]]
    assert vision.token_counts == [126, 128, 144]
    assert vision.merged_grids == [(9, 14), (8, 16), (12, 12)]
    with torch.no_grad():
        embeds, deepstack = tiny_model.encode_images(vision.pixel_values, vision.image_grid_thw)
    assert embeds.shape[0] == sum(vision.token_counts)
    assert all(f.shape == embeds.shape for f in deepstack)


# ---------------------------------------------------------------- layouts, computed by hand


def _expected_vit_positions(start, h, w):
    """vision_start at ``start`` (text); grid (0, r, c) offset by start + 1; vision_end continues after it."""
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    base = start + 1
    return torch.stack([torch.full((h * w,), base), base + rows.flatten(), base + cols.flatten()])


def _expected_image_positions(anchor, h, w):
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack([torch.full((h * w,), anchor), anchor + rows.flatten(), anchor + cols.flatten()])


def test_one_reference_edit_layout_matches_the_spec(tokenizer, tokens, processor):
    ref = random_reference(64, 96)  # 2x3 patches; ViT 448x288 → merged grid 9x14 = 126 tokens
    item = build_reference_layout(tokenizer, tokens, processor, "add a hat", 64, 64, [ref])
    ids = item.layout.input_ids.tolist()
    vs = ids.index(tokens.vision_start)
    assert ids[vs + 1 : vs + 127] == [tokens.image_pad] * 126 and ids[vs + 127] == tokens.vision_end
    assert ids.count(tokens.image_pad) == 126 and ids[-2:] == [tokens.boi, tokens.tms]
    assert tokenizer.decode(ids[vs + 128 :]).startswith("add a hat")  # image before the caption
    text = len(ids)
    p = item.layout.position_ids
    assert torch.equal(p[:, : vs + 1], torch.arange(vs + 1).expand(3, -1))
    assert torch.equal(p[:, vs + 1 : vs + 127], _expected_vit_positions(vs, 9, 14))
    after = vs + 1 + 14  # max(9, 14) positions used by the grid
    assert torch.equal(p[:, vs + 127 : text], torch.arange(after, after + text - vs - 127).expand(3, -1))
    assert torch.equal(p[:, text : text + 4], _expected_image_positions(FIX_POINT, 2, 2))  # target 64x64
    assert torch.equal(p[:, text + 4 :], _expected_image_positions(FIX_POINT + 2, 2, 3))  # B1 = 4096 + max(2, 2)
    assert item.layout.token_types.tolist() == [0] * (text - 1) + [3] + [1] * 4 + [2] * 6
    vinput_mask = item.layout.token_types[text:] > 0
    assert vinput_mask.all() and item.layout.num_target_tokens == 4
    assert torch.equal(item.reference_patches, torch.nn.functional.unfold(ref[None], 32, stride=32)[0].T)


def test_three_reference_ip_layout_matches_the_spec(tokenizer, tokens, processor):
    refs = [random_reference(64, 96), random_reference(32, 64, 1), random_reference(64, 64, 2)]
    item = build_reference_layout(tokenizer, tokens, processor, "the dog and the cat", 96, 64, refs)
    ids = item.layout.input_ids.tolist()
    text = len(ids)
    p = item.layout.position_ids
    starts = [i for i, t in enumerate(ids) if t == tokens.vision_start]
    grids = [(9, 14), (8, 16), (12, 12)]
    assert len(starts) == 3
    next_position = starts[0]  # text before the first image is numbered 0, 1, …
    assert torch.equal(p[:, : starts[0] + 1], torch.arange(starts[0] + 1).expand(3, -1))
    for (h, w), start in zip(grids, starts):
        # vision_start sits right after the previous vision_end: it is text, one past the last position.
        assert p[0, start].item() == next_position
        assert torch.equal(p[:, start + 1 : start + 1 + h * w], _expected_vit_positions(next_position, h, w))
        assert ids[start + 1 + h * w] == tokens.vision_end
        next_position = next_position + 1 + max(h, w)
        assert p[:, start + 1 + h * w].tolist() == [next_position] * 3
        next_position += 1
    last_end = starts[-1] + 1 + 144
    assert torch.equal(p[:, last_end:text], torch.arange(next_position - 1, next_position - 1 + text - last_end)
                       .expand(3, -1))
    target = (3, 2)  # 96x64 target
    assert torch.equal(p[:, text : text + 6], _expected_image_positions(FIX_POINT, *target))
    anchor = FIX_POINT + 3  # B1 = 4096 + max(3, 2)
    offset = text + 6
    for h, w in [(2, 3), (1, 2), (2, 2)]:
        assert torch.equal(p[:, offset : offset + h * w], _expected_image_positions(anchor, h, w))
        anchor += max(h, w)
        offset += h * w
    assert offset == p.shape[1]
    assert item.layout.token_types.tolist() == [0] * (text - 1) + [3] + [1] * 6 + [2] * (6 + 2 + 4)


def test_caption_is_kept_and_bad_references_are_named(tokenizer, tokens, processor):
    with pytest.raises(ValueError, match=r"reference 1: image size 50x64 is not a positive multiple of 32"):
        build_reference_layout(tokenizer, tokens, processor, "x", 64, 64,
                               [random_reference(64, 64), random_reference(64, 50)])
    with pytest.raises(ValueError, match="reference 0 is a single 32x32 patch"):
        build_reference_layout(tokenizer, tokens, processor, "x", 64, 64, [random_reference(32, 32)])
    with pytest.raises(ValueError, match="11 reference images given"):
        build_reference_layout(tokenizer, tokens, processor, "x", 64, 64, [random_reference(32, 32)] * 11)


def test_reference_batch_left_pads_text_and_keeps_images_in_sample_order(tokenizer, tokens, processor):
    refs = [random_reference(64, 64)]
    layout, cond = build_reference_inputs(tokenizer, tokens, processor, "add a red hat to the dog", refs, 64, 64,
                                          guided=True)
    assert layout.input_ids.shape[0] == 2 and layout.attention_mask is not None  # " " is shorter
    assert torch.equal(cond.references[0], cond.references[1])
    assert cond.image_grid_thw.tolist() == [[1, 24, 24]] * 2
    assert (layout.input_ids == tokens.image_pad).sum(1).tolist() == [144, 144]
    uncond = tokenizer.decode(layout.input_ids[1][layout.attention_mask[1, : layout.input_ids.shape[1]] > 0])
    assert "add a red hat" not in uncond


# ---------------------------------------------------------------- the model with references


def _edit_inputs(tokenizer, tokens, processor, refs, caption="add a hat", size=(64, 64), seed=0):
    layout, cond = build_reference_inputs(tokenizer, tokens, processor, caption, refs, *size, guided=False)
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(1, layout.num_target_tokens, 3072, generator=g)
    return layout, cond, generation_inputs(layout, z, cond)


def test_references_condition_the_target_prediction(tiny_model, tokenizer, tokens, processor):
    refs = [random_reference(64, 64)]
    _, _, inputs = _edit_inputs(tokenizer, tokens, processor, refs)
    t = torch.tensor([0.3])
    with torch.no_grad():
        base = tiny_model(**inputs, timestep=t, output_tokens=4)
        changed_patches = dict(inputs, vinputs=inputs["vinputs"].clone())
        changed_patches["vinputs"][:, 4:] += 0.5
        by_patches = tiny_model(**changed_patches, timestep=t, output_tokens=4)
        by_vit = tiny_model(**dict(inputs, pixel_values=inputs["pixel_values"] + 0.5), timestep=t, output_tokens=4)
    assert base.shape == (1, 4, 3072)
    assert not torch.allclose(base, by_patches)  # the target attends to the reference patches
    assert not torch.allclose(base, by_vit)  # and to the ViT condition tokens


def test_deepstack_features_are_added_at_the_vit_positions(tiny_model, tokenizer, tokens, processor):
    layout, cond, inputs = _edit_inputs(tokenizer, tokens, processor, [random_reference(64, 64)])
    with torch.no_grad():
        _, deepstack = tiny_model.encode_images(cond.pixel_values, cond.image_grid_thw)
    captured = {}

    def capture_input(module, args, kwargs):
        captured["in1"] = args[0] if args else kwargs["hidden_states"]

    hooks = [
        tiny_model.decoder_layers[0].register_forward_hook(lambda m, a, out: captured.setdefault("out0", out)),
        tiny_model.decoder_layers[1].register_forward_pre_hook(capture_input, with_kwargs=True),
    ]
    with torch.no_grad():
        tiny_model(**inputs, timestep=torch.tensor([0.5]))
    for hook in hooks:
        hook.remove()
    vit = (layout.input_ids[0] == tokens.image_pad).nonzero().flatten()
    added = captured["in1"][0] - captured["out0"][0]
    torch.testing.assert_close(added[vit], deepstack[0], rtol=1e-5, atol=1e-5)
    others = torch.ones(added.shape[0], dtype=torch.bool)
    others[vit] = False
    assert torch.equal(added[others], torch.zeros_like(added[others]))
    assert deepstack[0].abs().sum() > 0


def test_deepstack_changes_the_vit_rows_and_the_target(tiny_model, tokenizer, tokens, processor, monkeypatch):
    layout, _, inputs = _edit_inputs(tokenizer, tokens, processor, [random_reference(64, 64)])
    vit = layout.input_ids[0] == tokens.image_pad

    def last_hidden(model):
        captured = {}
        hook = model.decoder_layers[-1].register_forward_hook(lambda m, a, out: captured.setdefault("h", out))
        with torch.no_grad():
            x = model(**inputs, timestep=torch.tensor([0.5]), output_tokens=4)
        hook.remove()
        return captured["h"][0], x

    h_with, x_with = last_hidden(tiny_model)
    encode = tiny_model.encode_images
    monkeypatch.setattr(tiny_model, "encode_images",
                        lambda pv, grid: (encode(pv, grid)[0], [torch.zeros_like(f) for f in encode(pv, grid)[1]]))
    h_without, x_without = last_hidden(tiny_model)
    text = layout.input_ids.shape[1]
    first_vit = int(vit.nonzero()[0])
    assert torch.equal(h_with[:first_vit], h_without[:first_vit])  # causal text before the images: untouched
    assert not torch.allclose(h_with[:text][vit], h_without[:text][vit])
    assert not torch.allclose(x_with, x_without)


def test_placeholder_and_feature_counts_must_agree(tiny_model, tokenizer, tokens, processor):
    _, cond, inputs = _edit_inputs(tokenizer, tokens, processor, [random_reference(64, 64)])
    other = processor([random_reference(64, 128)])  # 2:1 → 128 ViT tokens, not 144
    with torch.no_grad(), pytest.raises(ValueError, match="144 <|image_pad|> tokens but the ViT returned 128"):
        tiny_model(**dict(inputs, pixel_values=other.pixel_values, image_grid_thw=other.image_grid_thw),
                   timestep=torch.tensor([0.5]))


def _t2i_inputs(tokenizer, tokens):
    from hidream_ft.model import build_t2i_layout

    layout = collate_layouts([build_t2i_layout(tokenizer, tokens, "a red circle", 64, 64)], tokens.pad)
    return dict(layout.model_inputs(), vinputs=torch.randn(1, 4, 3072, generator=torch.Generator().manual_seed(0)),
                timestep=torch.tensor([0.4]))


def test_fake_vision_pass_gives_every_trainable_vit_parameter_a_zero_gradient(tiny_model, tokenizer, tokens):
    inputs = _t2i_inputs(tokenizer, tokens)
    for param in tiny_model.parameters():
        param.requires_grad_(False)
    with torch.no_grad():
        reference = tiny_model(**inputs)
    visual = tiny_model.model.visual
    for param in visual.parameters():
        param.requires_grad_(True)
    tiny_model.model.x_embedder.proj1.weight.requires_grad_(True)
    out = tiny_model(**inputs)
    torch.testing.assert_close(out, reference, rtol=0, atol=0)  # the forward result is unchanged
    out.square().mean().backward()
    for name, param in visual.named_parameters():
        assert param.grad is not None, name
        assert torch.equal(param.grad, torch.zeros_like(param.grad)), name
    assert tiny_model.model.x_embedder.proj1.weight.grad.abs().sum() > 0


def test_frozen_unsharded_vit_is_not_run_for_text_to_image(tiny_model, tokenizer, tokens, monkeypatch):
    for param in tiny_model.parameters():
        param.requires_grad_(False)
    tiny_model.model.x_embedder.proj1.weight.requires_grad_(True)
    calls = []
    monkeypatch.setattr(tiny_model, "encode_images", lambda *a: calls.append(a))
    tiny_model(**_t2i_inputs(tokenizer, tokens)).sum().backward()
    assert calls == []
