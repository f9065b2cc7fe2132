"""The network: key-for-key loading, layouts and positions, attention semantics, batching."""

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from hidream_ft.model import CheckpointError, build_t2i_layout, collate_layouts, layout_from_ids, load_model
from hidream_ft.model.layout import FIX_POINT, rope_index_fix_point
from hidream_ft.model.loading import weight_files


def test_loads_every_key_of_the_official_layout(tiny_checkpoint, tiny_model):
    files = weight_files(tiny_checkpoint)
    state = tiny_model.state_dict()
    assert set(state) == set(files)
    assert {"model.t_embedder1.mlp.0.weight", "model.x_embedder.proj1.weight", "model.final_layer2.linear.bias",
            "lm_head.weight", "model.visual.deepstack_merger_list.1.norm.weight"} <= set(state)
    for key, file in files.items():
        with safe_open(file, "pt") as f:
            assert torch.equal(f.get_tensor(key), state[key]), key
    assert all(t.device.type == "cpu" for t in state.values())
    assert tiny_model.inv_freq.dtype == torch.float32


def test_loading_in_bf16_keeps_fp32_rope(tiny_checkpoint, tokenizer):
    model = load_model(tiny_checkpoint, dtype=torch.bfloat16, tokenizer=tokenizer)
    assert model.model.language_model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    assert model.inv_freq.dtype == torch.float32


def _copy_checkpoint(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_missing_and_unexpected_keys_are_listed(tiny_checkpoint, tmp_path):
    ckpt = _copy_checkpoint(tiny_checkpoint, tmp_path / "ckpt")
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    shard = ckpt / index["weight_map"]["model.x_embedder.proj1.weight"]
    with safe_open(shard, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    del tensors["model.x_embedder.proj1.weight"]
    tensors["model.extra_head.weight"] = torch.zeros(2)
    save_file(tensors, shard)
    index["weight_map"].pop("model.x_embedder.proj1.weight")
    index["weight_map"]["model.extra_head.weight"] = shard.name
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"missing keys: model\.x_embedder\.proj1\.weight.*unexpected keys: model\.extra_head\.weight"):
        load_model(ckpt)


def test_shape_mismatch_names_the_tensor(tiny_checkpoint, tmp_path):
    ckpt = _copy_checkpoint(tiny_checkpoint, tmp_path / "ckpt")
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    shard = ckpt / index["weight_map"]["model.final_layer2.linear.weight"]
    with safe_open(shard, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors["model.final_layer2.linear.weight"] = torch.zeros(5, 5)
    save_file(tensors, shard)
    with pytest.raises(CheckpointError, match=r"model\.final_layer2\.linear\.weight has shape \[5, 5\]"):
        load_model(ckpt)


@pytest.mark.parametrize("broken", ["no_dir", "no_config", "no_weights", "missing_shard", "bad_mrope"])
def test_wrong_layout_gives_clear_errors(tiny_checkpoint, tmp_path, broken):
    ckpt = _copy_checkpoint(tiny_checkpoint, tmp_path / "ckpt")
    expected = {
        "no_dir": "model directory not found",
        "no_config": "config.json is missing",
        "no_weights": "neither model.safetensors.index.json nor model.safetensors",
        "missing_shard": "names shard files that do not exist",
        "bad_mrope": "mrope_section",
    }[broken]
    if broken == "no_dir":
        ckpt = tmp_path / "nowhere"
    elif broken == "no_config":
        (ckpt / "config.json").unlink()
    elif broken == "no_weights":
        for f in ckpt.glob("model*.safetensors*"):
            f.unlink()
    elif broken == "missing_shard":
        next(ckpt.glob("model-00002-*.safetensors")).unlink()
    else:
        config = json.loads((ckpt / "config.json").read_text())
        config["text_config"]["rope_scaling"]["mrope_section"] = [4, 4, 4]
        (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=expected):
        load_model(ckpt)


def test_t2i_positions_and_types_match_the_spec(tokenizer, tokens):
    layout = build_t2i_layout(tokenizer, tokens, "a red circle", height=64, width=96)
    ids = layout.input_ids.tolist()
    text = len(ids)
    assert ids[-2:] == [tokens.boi, tokens.tms]
    assert layout.num_target_tokens == 6
    expected_text = torch.arange(text).expand(3, -1)
    assert torch.equal(layout.position_ids[:, :text], expected_text)
    rows, cols = torch.meshgrid(torch.arange(2), torch.arange(3), indexing="ij")
    expected_image = torch.stack([torch.full((6,), FIX_POINT), FIX_POINT + rows.flatten(), FIX_POINT + cols.flatten()])
    assert torch.equal(layout.position_ids[:, text:], expected_image)
    assert layout.token_types.tolist() == [0] * (text - 1) + [3] + [1] * 6


def test_edit_layout_positions_match_hand_computation(tokens):
    t = tokens
    # text: two words, a ViT image (merged grid 2x2), vision end, a word, boi, tms
    ids = [10, 11, t.vision_start] + [t.image_pad] * 4 + [t.vision_end, 12, t.boi, t.tms]
    layout = layout_from_ids(ids, tokens, target=(2, 3), references=[(2, 2)], vit_grids=[(2, 2)])
    p = layout.position_ids
    assert p[:, :3].tolist() == [[0, 1, 2]] * 3
    assert p[:, 3:7].tolist() == [[3, 3, 3, 3], [3, 3, 4, 4], [3, 4, 3, 4]]
    assert p[:, 7:11].tolist() == [[5, 6, 7, 8]] * 3
    assert p[:, 11:17].tolist() == [[4096] * 6, [4096, 4096, 4096, 4097, 4097, 4097],
                                    [4096, 4097, 4098, 4096, 4097, 4098]]
    assert p[:, 17:21].tolist() == [[4099] * 4, [4099, 4099, 4100, 4100], [4099, 4100, 4099, 4100]]
    assert layout.token_types.tolist() == [0] * 10 + [3] + [1] * 6 + [2] * 4


def test_rope_index_rejects_nothing_silently():
    with pytest.raises(ValueError):
        rope_index_fix_point([1, 2, 3], [(1, 2, 2)], [1], image_pad_id=99)


def test_prefix_must_stay_below_the_fix_point(tokens):
    with pytest.raises(ValueError, match="below the 4096"):
        layout_from_ids([5] * 4100 + [tokens.boi, tokens.tms], tokens, target=(2, 2), references=[], vit_grids=[])


def _inputs(tokenizer, tokens, prompts, height=64, width=64, seed=0):
    layouts = [build_t2i_layout(tokenizer, tokens, p, height, width) for p in prompts]
    batch = collate_layouts(layouts, tokens.pad)
    g = torch.Generator().manual_seed(seed)
    vinputs = torch.randn(len(prompts), batch.num_target_tokens, 3072, generator=g)
    timestep = torch.rand(len(prompts), generator=g)
    return batch, vinputs, timestep


def _hidden_of_last_layer(model, batch, vinputs, timestep):
    captured = {}
    hook = model.decoder_layers[-1].register_forward_hook(lambda m, a, out: captured.setdefault("h", out))
    with torch.no_grad():
        x_pred = model(**batch.model_inputs(), vinputs=vinputs, timestep=timestep)
    hook.remove()
    return captured["h"], x_pred


@pytest.mark.parametrize("attention", ["split", "dense", "flex"])
def test_text_tokens_never_see_the_image_or_timestep(tiny_model, tokenizer, tokens, attention):
    tiny_model.attention = attention
    batch, vinputs, timestep = _inputs(tokenizer, tokens, ["a red circle"])
    text = batch.input_ids.shape[1]
    h1, x1 = _hidden_of_last_layer(tiny_model, batch, vinputs, timestep)
    h2, x2 = _hidden_of_last_layer(tiny_model, batch, vinputs + 1.0, timestep + 0.5)
    assert torch.equal(h1[:, : text - 1], h2[:, : text - 1])  # AR text rows: bit-identical
    assert not torch.allclose(h1[:, text - 1], h2[:, text - 1])  # the tms row sees the timestep
    assert not torch.allclose(x1, x2)  # image rows see the image


def test_image_tokens_see_later_image_tokens(tiny_model, tokenizer, tokens):
    batch, vinputs, timestep = _inputs(tokenizer, tokens, ["a red circle"])
    changed = vinputs.clone()
    changed[:, -1] += 1.0
    _, x1 = _hidden_of_last_layer(tiny_model, batch, vinputs, timestep)
    _, x2 = _hidden_of_last_layer(tiny_model, batch, changed, timestep)
    assert not torch.allclose(x1[:, 0], x2[:, 0])  # the first image token attends to the last (bidirectional)


def test_split_attention_equals_the_dense_reference(tiny_model, tokenizer, tokens):
    batch, vinputs, timestep = _inputs(tokenizer, tokens, ["a red circle", "a green square over a gradient"])
    assert batch.attention_mask is not None
    with torch.no_grad():
        tiny_model.attention = "dense"
        dense = tiny_model(**batch.model_inputs(), vinputs=vinputs, timestep=timestep)
        tiny_model.attention = "split"
        split = tiny_model(**batch.model_inputs(), vinputs=vinputs, timestep=timestep)
    torch.testing.assert_close(split, dense, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attention", ["split", "dense", "flex"])
def test_batch_with_different_prompt_lengths_equals_each_alone(tiny_model, tokenizer, tokens, attention):
    tiny_model.attention = attention
    prompts = ["a red circle", "the quick brown fox jumps over the lazy dog"]
    batch, vinputs, timestep = _inputs(tokenizer, tokens, prompts)
    with torch.no_grad():
        together = tiny_model(**batch.model_inputs(), vinputs=vinputs, timestep=timestep)
        for i, prompt in enumerate(prompts):
            single, _, _ = _inputs(tokenizer, tokens, [prompt])
            assert single.attention_mask is None
            alone = tiny_model(**single.model_inputs(), vinputs=vinputs[i : i + 1], timestep=timestep[i : i + 1])
            torch.testing.assert_close(together[i : i + 1], alone, rtol=1e-5, atol=1e-5)


def test_output_tokens_limits_the_prediction(tiny_model, tokenizer, tokens):
    batch, vinputs, timestep = _inputs(tokenizer, tokens, ["a red circle"])
    with torch.no_grad():
        full = tiny_model(**batch.model_inputs(), vinputs=vinputs, timestep=timestep)
        first = tiny_model(**batch.model_inputs(), vinputs=vinputs, timestep=timestep, output_tokens=2)
    assert first.shape == (1, 2, 3072)
    torch.testing.assert_close(first, full[:, :2])


def test_special_token_ids_come_from_the_tokenizer(tokens, tokenizer):
    assert tokens.tms == tokenizer.convert_tokens_to_ids("<|tms_token|>") != 151673
    assert tokens.boi == tokenizer.convert_tokens_to_ids("<|boi_token|>")
