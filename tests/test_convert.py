"""Export / import / merge / stack of HiDream-O1 LoRAs and fine-tunes, end to end on the tiny model."""

from __future__ import annotations

import json
import math
import re
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

from hidream_ft.convert import load_adapter, load_source, merge_checkpoint
from hidream_ft.convert.__main__ import main
from hidream_ft.convert.merge import StreamingSafetensorsWriter
from hidream_ft.convert.sources import FullWeights
from hidream_ft.lora import (
    STYLES, WRITABLE_STYLES, ConvertError, LoraAdapter, LoraModule, attach_adapter, module_regex, parse_lora_spec,
    read_lora_file, read_peft_dir, stack_adapters, write_lora,
)
from hidream_ft.lora.keys import ModuleIndex, architecture_index
from hidream_ft.model import CheckpointError, load_model
from hidream_ft.testing.tiny import write_tiny_checkpoint

DECODER_TARGETS = r"model\.language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
PROJECTIONS = [f"self_attn.{p}_proj" for p in "qkvo"] + [f"mlp.{p}_proj" for p in ("gate", "up", "down")]
LAYERS = 3  # write_tiny_checkpoint default


def peft_lora_model(base, seed=0, target=DECODER_TARGETS, **config):
    torch.manual_seed(seed)
    config = {"r": 4, "lora_alpha": 8, **config}
    return get_peft_model(load_model(base, dtype=torch.float32),
                          LoraConfig(target_modules=target, init_lora_weights=False, **config))


def adapter_of(peft_model) -> LoraAdapter:
    """The trainer's PEFT adapter as our canonical adapter, through a PEFT directory."""
    with tempfile.TemporaryDirectory() as tmp:
        peft_model.save_pretrained(tmp)
        return read_peft_dir(tmp)


@torch.no_grad()
def forward(model, inputs):
    return model(**inputs)


@pytest.fixture(scope="module")
def trained(base, inputs):
    """A PEFT LoRA on every decoder projection (r=4, alpha=8), its adapter and its forward output."""
    model = peft_lora_model(base)
    return {"adapter": adapter_of(model), "state": get_peft_model_state_dict(model),
            "output": forward(model, inputs), "model": model}


def assert_same_adapter(got: LoraAdapter, want: LoraAdapter):
    assert got.modules.keys() == want.modules.keys()
    for path, module in want.modules.items():
        assert torch.equal(got.modules[path].down, module.down) and torch.equal(got.modules[path].up, module.up)
        assert got.modules[path].scale == module.scale, path


def output_path(tmp_path, style):
    return tmp_path / "peft" if style == "peft" else tmp_path / f"lora-{style}.safetensors"


# --- key styles --------------------------------------------------------------------------------------------


def test_every_linear_layer_resolves_from_every_spelling(base):
    model = load_model(base, dtype=torch.float32)
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    index = architecture_index()
    assert ModuleIndex.from_model(model).templates == index.templates
    for path in linears:
        relative = path.removeprefix("model.")
        for name in {path, relative}:
            assert index.resolve(name, flat=False) == path
            assert index.resolve(name.replace(".", "_"), flat=True) == path
    assert index.resolve("model_language_model_layers_12_self_attn_q_proj", flat=True) == \
        "model.language_model.layers.12.self_attn.q_proj"
    assert index.resolve("language_model.embed_tokens", flat=False) is None  # an Embedding, not a Linear
    assert index.resolve("model.language_model.layers.0.self_attn", flat=False) is None


def test_module_regex_matches_exactly_the_given_modules():
    paths = [f"model.language_model.layers.{i}.{proj}" for i in (0, 2, 11) for proj in PROJECTIONS[:3]]
    paths += ["model.language_model.layers.5.mlp.up_proj", "model.t_embedder1.mlp.0", "lm_head",
              "model.visual.deepstack_merger_list.1.linear_fc2"]
    pattern = re.compile(module_regex(paths))
    assert all(pattern.fullmatch(p) for p in paths)
    for other in ["model.language_model.layers.1.self_attn.q_proj", "model.language_model.layers.1",
                  "model.language_model.layers.5.mlp.down_proj", "model.language_model.layers.0.self_attn.o_proj",
                  "model.t_embedder1.mlp.2", "model.t_embedder1.mlp.0.x", "xlm_head",
                  "model.language_model.layers.110.self_attn.q_proj"]:
        assert not pattern.fullmatch(other), other


def test_module_regex_slot_matches_any_layer_and_keeps_the_order_given():
    layer = "model.language_model.layers.#"
    pattern = module_regex([f"{layer}.self_attn.v_proj", f"{layer}.mlp.up_proj", f"{layer}.self_attn.q_proj",
                            "model.x_embedder.proj1"])
    assert pattern == (r"^(model\.language_model\.layers\.\d+\.(self_attn\.(v_proj|q_proj)|mlp\.(up_proj))"
                       r"|model\.x_embedder\.proj1)$")
    assert re.fullmatch(pattern, "model.language_model.layers.47.self_attn.q_proj")
    assert not re.fullmatch(pattern, "model.language_model.layers.47.self_attn.o_proj")


def test_cli_weight_syntax_is_the_samplers():
    assert parse_lora_spec("runs/a:0.5") == ("runs/a", 0.5)
    assert parse_lora_spec("C:/loras/x.safetensors") == ("C:/loras/x.safetensors", 1.0)
    with pytest.raises(ConvertError, match="empty LoRA spec"):
        parse_lora_spec("")


# --- export → import → identical forward --------------------------------------------------------------------


@pytest.mark.parametrize("style", WRITABLE_STYLES)
def test_export_then_import_gives_the_same_forward(style, base, inputs, trained, tmp_path):
    written = write_lora(trained["adapter"], style, output_path(tmp_path, style))
    imported = load_adapter(written)
    assert imported.modules.keys() == trained["adapter"].modules.keys()
    applied = attach_adapter(load_model(base, dtype=torch.float32), imported)
    torch.testing.assert_close(forward(applied, inputs), trained["output"], rtol=0, atol=0)


def test_rslora_scale_survives_every_format(base, inputs, tmp_path):
    model = peft_lora_model(base, seed=1, use_rslora=True)  # scale = 8 / √4 = 4, not 8 / 4
    reference = forward(model, inputs)
    adapter = adapter_of(model)
    q_proj = model.base_model.model.model.language_model.layers[0].self_attn.q_proj
    assert q_proj.scaling["default"] == 4.0
    for style in WRITABLE_STYLES:
        imported = load_adapter(write_lora(adapter, style, output_path(tmp_path, style)))
        assert_same_adapter(imported, adapter)
        assert {m.scale for m in imported.modules.values()} == {4.0}, style
    applied = attach_adapter(load_model(base, dtype=torch.float32), imported)
    torch.testing.assert_close(forward(applied, inputs), reference, rtol=0, atol=0)


def test_comfyui_keys_are_exactly_the_configured_targets(trained, tmp_path):
    path = write_lora(trained["adapter"], "comfyui", tmp_path / "c.safetensors")
    tensors = load_file(str(path))
    expected = set()
    for layer in range(LAYERS):
        for proj in PROJECTIONS:
            stem = f"diffusion_model.language_model.layers.{layer}.{proj}"
            expected |= {f"{stem}.lora_A.weight", f"{stem}.lora_B.weight", f"{stem}.alpha"}
    assert set(tensors) == expected
    assert {tensors[k].item() for k in expected if k.endswith(".alpha")} == {8.0}
    stem = "diffusion_model.language_model.layers.1.mlp.up_proj"
    assert tensors[f"{stem}.lora_A.weight"].shape == (4, 64)
    assert tensors[f"{stem}.lora_B.weight"].shape == (128, 4)


def test_comfyui_rslora_alpha_reproduces_the_peft_scale(base, tmp_path):
    model = peft_lora_model(base, seed=2, r=8, lora_alpha=6, use_rslora=True)
    tensors = load_file(str(write_lora(adapter_of(model), "comfyui", tmp_path / "rs.safetensors")))
    layer = model.base_model.model.model.language_model.layers[2].mlp.down_proj
    alpha = tensors["diffusion_model.language_model.layers.2.mlp.down_proj.alpha"].item()
    assert alpha == pytest.approx(6 * math.sqrt(8))
    assert alpha / 8 == pytest.approx(layer.scaling["default"]) == pytest.approx(6 / math.sqrt(8))


def test_alpha_tensors_where_each_style_needs_them(base, tmp_path):
    adapter = adapter_of(peft_lora_model(base, seed=3, r=4, lora_alpha=4))  # alpha = rank: scale 1
    comfy = load_file(str(write_lora(adapter, "comfyui", tmp_path / "c.safetensors")))
    kohya = load_file(str(write_lora(adapter, "kohya", tmp_path / "k.safetensors")))
    musubi = load_file(str(write_lora(adapter, "musubi", tmp_path / "m.safetensors")))
    assert not any(k.endswith(".alpha") for k in comfy)
    assert sum(k.endswith(".alpha") for k in kohya) == sum(k.endswith(".alpha") for k in musubi) == LAYERS * 7
    assert "lora_unet_language_model_layers_0_self_attn_q_proj.lora_down.weight" in kohya
    assert "lora_unet_model_language_model_layers_0_self_attn_q_proj.lora_up.weight" in musubi
    assert kohya["lora_unet_language_model_layers_2_mlp_gate_proj.alpha"].item() == 4.0


def test_modules_outside_the_diffusion_model_need_a_full_path_style(base, tmp_path):
    adapter = adapter_of(peft_lora_model(base, target=r"lm_head|model\.x_embedder\.proj1"))
    assert set(adapter.modules) == {"lm_head", "model.x_embedder.proj1"}
    with pytest.raises(ConvertError, match="lm_head"):
        write_lora(adapter, "comfyui", tmp_path / "c.safetensors")
    back = load_adapter(write_lora(adapter, "musubi", tmp_path / "m.safetensors"))
    assert set(back.modules) == {"lm_head", "model.x_embedder.proj1"}


def test_metadata_header_is_strings_with_provenance(trained, tmp_path):
    adapter = LoraAdapter(trained["adapter"].modules, metadata={
        "hidream_ft.base_model": "/models/HiDream-O1-Image", "hidream_ft.training_steps": "1200",
        "hidream_ft.trigger": "ohwx dog"})
    for style in WRITABLE_STYLES:
        written = write_lora(adapter, style, output_path(tmp_path, style))
        file = written / "adapter_model.safetensors" if style == "peft" else written
        with safe_open(str(file), "pt") as f:
            header = f.metadata()
        assert all(isinstance(v, str) for v in header.values())
        assert header["hidream_ft.base_model"] == "/models/HiDream-O1-Image"
        assert header["hidream_ft.training_steps"] == "1200"
        assert header["hidream_ft.trigger"] == header["modelspec.trigger_phrase"] == "ohwx dog"
        assert header["hidream_ft.rank"] == header["ss_network_dim"] == "4"
        assert header["hidream_ft.alpha"] == header["ss_network_alpha"] == "8"
        assert "model.language_model.layers.#.self_attn.q_proj" in header["hidream_ft.targets"]
        assert load_adapter(written).metadata["hidream_ft.trigger"] == "ohwx dog"


# --- PEFT directory on the stock HF model --------------------------------------------------------------------


def test_peft_dir_loads_on_the_stock_hf_model(base, trained, tmp_path):
    directory = write_lora(trained["adapter"], "peft", tmp_path / "peft")
    torch.manual_seed(0)
    hf_model = Qwen3VLForConditionalGeneration(Qwen3VLConfig.from_dict(json.loads((base / "config.json").read_text())))
    loaded = PeftModel.from_pretrained(hf_model, str(directory))
    reference_layers = trained["model"].base_model.model.model.language_model.layers
    for layer, reference in zip(loaded.base_model.model.model.language_model.layers, reference_layers, strict=True):
        for proj in PROJECTIONS:
            got, want = layer.get_submodule(proj), reference.get_submodule(proj)
            assert torch.equal(got.lora_A["default"].weight, want.lora_A["default"].weight)
            assert torch.equal(got.lora_B["default"].weight, want.lora_B["default"].weight)
            assert got.scaling["default"] == want.scaling["default"] == 2.0


def test_peft_dir_rewrite_replaces_the_files_and_leaves_nothing_half_written(trained, tmp_path):
    out = tmp_path / "peft"
    write_lora(trained["adapter"], "peft", out)
    (out / "notes.txt").write_text("kept")
    halved = LoraAdapter({p: LoraModule(m.down, m.up / 2, m.alpha) for p, m in trained["adapter"].modules.items()})
    write_lora(halved, "peft", out)
    assert sorted(f.name for f in tmp_path.iterdir()) == ["peft"]
    assert sorted(f.name for f in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors", "notes.txt"]
    for path, module in read_peft_dir(out).modules.items():
        assert torch.equal(module.up, halved.modules[path].up)


def test_peft_dir_loads_on_hidream_with_the_same_forward(base, inputs, trained, tmp_path):
    directory = write_lora(trained["adapter"], "peft", tmp_path / "peft")
    loaded = PeftModel.from_pretrained(load_model(base, dtype=torch.float32), str(directory))
    torch.testing.assert_close(forward(loaded, inputs), trained["output"], rtol=0, atol=0)


# --- importing other tools' key styles ------------------------------------------------------------------------


def test_foreign_key_styles_are_detected_and_imported(trained, tmp_path):
    modules = trained["adapter"].modules
    path = "model.language_model.layers.1.self_attn.v_proj"
    module = modules[path]
    renamed = {
        "diffusers": {"transformer.language_model.layers.1.self_attn.v_proj.lora_A.weight": module.down,
                      "transformer.language_model.layers.1.self_attn.v_proj.lora_B.weight": module.up},
        "diffsynth": {f"{path}.lora_A.default.weight": module.down, f"{path}.lora_B.default.weight": module.up},
        "onetrainer": {"lora_transformer_language_model_layers_1_self_attn_v_proj.lora_down.weight": module.down,
                       "lora_transformer_language_model_layers_1_self_attn_v_proj.lora_up.weight": module.up,
                       "lora_transformer_language_model_layers_1_self_attn_v_proj.alpha": torch.tensor(2.0)},
        "musubi": {"lora_unet_model_language_model_layers_1_self_attn_v_proj.lora_down.weight": module.down,
                   "lora_unet_model_language_model_layers_1_self_attn_v_proj.lora_up.weight": module.up,
                   "lora_unet_model_language_model_layers_1_self_attn_v_proj.alpha": torch.tensor(8.0).bfloat16()},
    }
    expected_scale = {"diffusers": 1.0, "diffsynth": 1.0, "onetrainer": 0.5, "musubi": 2.0}
    for style, tensors in renamed.items():
        file = tmp_path / f"{style}.safetensors"
        save_file(tensors, str(file))
        imported = read_lora_file(file)
        assert list(imported.modules) == [path], style
        assert torch.equal(imported.modules[path].down, module.down)
        assert imported.modules[path].scale == expected_scale[style], style


def test_ai_toolkit_files_import_and_its_lokr_files_are_refused(trained, tmp_path):
    """ai-toolkit writes HiDream-O1 LoRAs under diffusion_model.<path> with PEFT names and no alpha (scale 1)."""
    path = "model.language_model.layers.0.mlp.up_proj"
    module = trained["adapter"].modules[path]
    save_file({"diffusion_model.language_model.layers.0.mlp.up_proj.lora_A.weight": module.down,
               "diffusion_model.language_model.layers.0.mlp.up_proj.lora_B.weight": module.up},
              str(tmp_path / "ai-toolkit.safetensors"))
    imported = read_lora_file(tmp_path / "ai-toolkit.safetensors")
    assert list(imported.modules) == [path] and imported.modules[path].scale == 1.0
    assert torch.equal(imported.modules[path].up, module.up)
    lokr = {"diffusion_model.language_model.layers.0.mlp.up_proj.lokr_w1": torch.zeros(4, 4),
            "diffusion_model.language_model.layers.0.mlp.up_proj.lokr_w2": torch.zeros(32, 16),
            "diffusion_model.language_model.layers.0.mlp.up_proj.alpha": torch.tensor(1.0)}
    save_file(lokr, str(tmp_path / "lokr.safetensors"))
    with pytest.raises(ConvertError, match="LoKr adapter") as error:
        read_lora_file(tmp_path / "lokr.safetensors")
    assert "up_proj.lokr_w1" in str(error.value) and "\n" not in str(error.value)


def test_musubi_conv_lora_loads_its_linears_and_warns_about_the_patch_embedding(trained, tmp_path, caplog):
    """musubi-tuner's conv_dim adds a LoRA on the ViT's Conv3d patch embedding (three keys)."""
    path = "model.language_model.layers.1.self_attn.v_proj"
    module = trained["adapter"].modules[path]
    conv = "lora_unet_model_visual_patch_embed_proj"
    tensors = {"lora_unet_model_language_model_layers_1_self_attn_v_proj.lora_down.weight": module.down,
               "lora_unet_model_language_model_layers_1_self_attn_v_proj.lora_up.weight": module.up,
               "lora_unet_model_language_model_layers_1_self_attn_v_proj.alpha": torch.tensor(8.0),
               f"{conv}.lora_down.weight": torch.zeros(4, 3, 2, 16, 16),
               f"{conv}.lora_up.weight": torch.zeros(32, 4, 1, 1, 1),
               f"{conv}.alpha": torch.tensor(4.0)}
    save_file(tensors, str(tmp_path / "musubi-conv.safetensors"))
    with caplog.at_level("WARNING", logger="hidream_ft.lora"):
        imported = read_lora_file(tmp_path / "musubi-conv.safetensors")
    assert list(imported.modules) == [path] and imported.modules[path].scale == 2.0
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "model.visual.patch_embed.proj" in warnings[0] and "\n" not in warnings[0]


def test_unknown_style_lists_the_expected_keys(tmp_path):
    file = tmp_path / "weird.safetensors"
    save_file({"blocks.0.attn.wq.a": torch.zeros(2, 2), "blocks.0.attn.wq.b": torch.zeros(2, 2)}, str(file))
    with pytest.raises(ConvertError) as error:
        read_lora_file(file)
    message = str(error.value)
    assert "blocks.0.attn.wq.a" in message and "not a LoRA in any known key style" in message
    for example in ("diffusion_model.language_model.layers.0.self_attn.q_proj.lora_A.weight",
                    "lora_unet_language_model_layers_0_self_attn_q_proj.lora_down.weight",
                    "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight"):
        assert example in message


def test_unmatched_keys_are_listed(trained, tmp_path):
    good = load_file(str(write_lora(trained["adapter"], "kohya", tmp_path / "k.safetensors")))
    good["lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"] = torch.zeros(4, 8)
    good["lora_unet_language_model_layers_0_self_attn_q_norm.lora_down.weight"] = torch.zeros(4, 8)
    file = tmp_path / "extra.safetensors"
    save_file(good, str(file))
    with pytest.raises(ConvertError) as error:
        read_lora_file(file)
    assert "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight" in str(error.value)
    assert "lora_unet_language_model_layers_0_self_attn_q_norm.lora_down.weight" in str(error.value)
    assert "kohya" in str(error.value)


def test_a_module_without_its_up_weight_is_refused(tmp_path):
    file = tmp_path / "half.safetensors"
    save_file({"diffusion_model.language_model.layers.0.mlp.up_proj.lora_A.weight": torch.zeros(4, 64)}, str(file))
    with pytest.raises(ConvertError, match=r"model\.language_model\.layers\.0\.mlp\.up_proj"):
        read_lora_file(file)


# --- training outputs -----------------------------------------------------------------------------------------


def write_run(root, base, peft_model, step=40, mode="lora", state=None):
    """A trainer output directory: config.toml, checkpoints/step-N/ (DCP + meta.json + COMPLETE)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.toml").write_text(
        f'[model]\npath = "{base}"\n[train]\nmax_steps = 40\n[data]\ntrigger = "ohwx cat"\n')
    step_dir = root / "checkpoints" / f"step-{step:08d}"
    if state is None:
        state = {k: v.detach().clone() for k, v in peft_model.state_dict().items() if ".lora_" in k}
    dcp.save({"model": state}, checkpoint_id=step_dir, no_dist=True)
    lora = {"rank": 4, "alpha": 8, "dropout": 0.0, "use_rslora": False, "target_modules": DECODER_TARGETS}
    meta = {"step": step, "mode": mode, "model_path": str(base), "world_size": 1,
            "lora": lora if mode == "lora" else None}
    (step_dir / "meta.json").write_text(json.dumps(meta))
    (step_dir / "COMPLETE").write_text(f"{step}\n")
    return step_dir


def test_step_checkpoint_reads_as_the_same_adapter_with_provenance(base, inputs, trained, tmp_path):
    step_dir = write_run(tmp_path / "run", base, trained["model"])
    assert any(".lora_A.default.weight" in k for k in trained["model"].state_dict())
    adapter = load_adapter(step_dir)
    assert load_adapter(tmp_path / "run").modules.keys() == adapter.modules.keys()  # run dir → newest step
    assert adapter.metadata["hidream_ft.training_steps"] == "40"
    assert adapter.metadata["hidream_ft.trigger"] == "ohwx cat"
    assert adapter.metadata["hidream_ft.base_model"] == str(base)
    applied = attach_adapter(load_model(base, dtype=torch.float32), adapter)
    torch.testing.assert_close(forward(applied, inputs), trained["output"], rtol=0, atol=0)


# --- merge -----------------------------------------------------------------------------------------------------


def test_merged_hf_model_equals_base_plus_weighted_loras(base, trained, tmp_path):
    second = adapter_of(peft_lora_model(base, seed=5, r=2, lora_alpha=3,
                                        target=r"model\.language_model\.layers\.[01]\.self_attn\.(q|v)_proj"))
    out = merge_checkpoint(base, tmp_path / "merged", loras=[(trained["adapter"], 0.75), (second, 0.5)],
                           max_shard_bytes=600_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    for side_file in ("config.json", "tokenizer_config.json", "tokenizer.json", "preprocessor_config.json"):
        assert (out / side_file).is_file()
    merged = load_model(out, dtype=torch.float32).state_dict()
    original = load_model(base, dtype=torch.float32).state_dict()
    for path, module in trained["adapter"].modules.items():
        expected = original[f"{path}.weight"] + 0.75 * 2.0 * module.up @ module.down
        if path in second.modules:
            other = second.modules[path]
            expected = expected + 0.5 * 1.5 * other.up @ other.down
        torch.testing.assert_close(merged[f"{path}.weight"], expected, rtol=1e-6, atol=1e-6)
    untouched = "model.visual.blocks.0.attn.qkv.weight"
    assert torch.equal(merged[untouched], original[untouched])


def test_merged_forward_equals_the_unmerged_lora(base, inputs, trained, tmp_path):
    merge_checkpoint(base, tmp_path / "merged", max_shard_bytes=600_000)  # an earlier, sharded export
    out = merge_checkpoint(base, tmp_path / "merged", loras=[(trained["adapter"], 1.0)])
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]
    assert not (out / "model.safetensors.index.json").exists()
    torch.testing.assert_close(forward(load_model(out, dtype=torch.float32), inputs), trained["output"],
                               rtol=1e-4, atol=1e-5)


def test_comfyui_checkpoint_is_bf16_under_the_comfy_org_keys(base, trained, tmp_path):
    out = merge_checkpoint(base, tmp_path / "comfy.safetensors", layout="comfyui",
                           loras=[(trained["adapter"], 1.0)], dtype=torch.bfloat16)
    tensors = load_file(str(out))
    original = load_model(base, dtype=torch.float32).state_dict()
    # Comfy-Org's key set: the official names without lm_head and the DeepStack mergers, which is exactly what
    # musubi-tuner's strict load expects after it removes those two modules from the official model.
    musubi_expects = {k for k in original if not k.startswith(("lm_head.", "model.visual.deepstack_merger_list."))}
    assert any(k.startswith("model.visual.deepstack_merger_list.") for k in original)
    assert set(tensors) == musubi_expects
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    path = "model.language_model.layers.2.self_attn.o_proj"
    module = trained["adapter"].modules[path]
    expected = (original[f"{path}.weight"] + module.scale * module.up @ module.down).to(torch.bfloat16)
    assert torch.equal(tensors[f"{path}.weight"], expected)


def test_a_comfyui_single_file_loads_for_training_and_sampling(base, inputs, trained, tmp_path):
    comfy = merge_checkpoint(base, tmp_path / "comfy.safetensors", layout="comfyui")  # fp32: exact weights
    official = load_model(base, dtype=torch.float32)
    single = load_model(base, weights=comfy, dtype=torch.float32)
    assert torch.equal(single.lm_head.weight, torch.zeros_like(official.lm_head.weight))
    assert all(torch.equal(p, torch.zeros_like(p)) for p in single.model.visual.deepstack_merger_list.parameters())
    torch.testing.assert_close(forward(single, inputs), forward(official, inputs), rtol=0, atol=0)
    with pytest.raises(CheckpointError, match="DeepStack mergers") as error:
        forward(single, {**inputs, "pixel_values": torch.zeros(16, 1536), "image_grid_thw": torch.tensor([[1, 4, 4]])})
    assert "\n" not in str(error.value)
    # A LoRA merged into the single file gives a single file again (the base may be the file itself).
    merged = merge_checkpoint(comfy, tmp_path / "styled.safetensors", layout="comfyui",
                              loras=[(trained["adapter"], 1.0)])
    torch.testing.assert_close(forward(load_model(base, weights=merged, dtype=torch.float32), inputs),
                               trained["output"], rtol=1e-5, atol=1e-5)
    with pytest.raises(ConvertError, match="official HiDream-O1-Image folder"):
        merge_checkpoint(comfy, tmp_path / "hf", loras=[(trained["adapter"], 1.0)])
    # Only what ComfyUI leaves out may be missing, and only from a single file.
    tensors = load_file(str(comfy))
    del tensors["model.language_model.norm.weight"]
    save_file(tensors, str(tmp_path / "broken.safetensors"))
    with pytest.raises(CheckpointError, match="1 missing keys: model.language_model.norm.weight"):
        load_model(base, weights=tmp_path / "broken.safetensors")


def test_full_finetune_exports_both_layouts(base, inputs, tmp_path):
    generator = torch.Generator().manual_seed(7)
    tuned = load_model(base, dtype=torch.float32)
    with torch.no_grad():
        for name, param in tuned.named_parameters():
            if name.startswith("model.language_model.layers.") or name.startswith("model.final_layer2"):
                param.add_(0.01 * torch.randn(param.shape, generator=generator))
    state = {k: v.clone() for k, v in tuned.state_dict().items()}
    step_dir = write_run(tmp_path / "run", base, None, mode="full", state=state)
    source = load_source(step_dir)
    assert isinstance(source, FullWeights)
    out = merge_checkpoint(base, tmp_path / "hf", full=source.tensors)
    reloaded = load_model(out, dtype=torch.float32)
    for key, value in reloaded.state_dict().items():
        assert torch.equal(value, state[key]), key
    torch.testing.assert_close(forward(reloaded, inputs), forward(tuned, inputs), rtol=0, atol=0)
    comfy = load_file(str(merge_checkpoint(base, tmp_path / "c.safetensors", layout="comfyui", full=source.tensors,
                                           dtype=torch.bfloat16)))
    key = "model.language_model.layers.1.mlp.down_proj.weight"
    assert torch.equal(comfy[key], state[key].to(torch.bfloat16))


def test_lora_for_another_base_model_is_refused_with_module_and_shapes(base, trained, tmp_path):
    bad = dict(trained["adapter"].modules)
    path = "model.language_model.layers.0.self_attn.k_proj"
    bad[path] = LoraModule(torch.zeros(4, 48), torch.zeros(32, 4), 4.0)
    with pytest.raises(ConvertError) as error:
        merge_checkpoint(base, tmp_path / "m", loras=[(LoraAdapter(bad), 1.0)])
    assert path in str(error.value) and "[32, 48]" in str(error.value) and "[32, 64]" in str(error.value)
    assert not (tmp_path / "m").exists()
    smaller = write_tiny_checkpoint(tmp_path / "two-layers", text_layers=2)
    with pytest.raises(ConvertError, match=r"model\.language_model\.layers\.2\.mlp\.down_proj has no weight"):
        merge_checkpoint(smaller, tmp_path / "m2", loras=[(trained["adapter"], 1.0)])
    with pytest.raises(ConvertError, match=r"layers\.2\.mlp\.up_proj has no weight in the model"):
        attach_adapter(load_model(smaller, dtype=torch.float32), trained["adapter"])


def test_streaming_writer_output_reads_back_and_checks_order(tmp_path):
    tensors = {"a": torch.randn(3, 5), "b": torch.arange(7), "c": torch.randn(2).to(torch.bfloat16),
               "d": torch.tensor(2.5)}
    entries = [(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]
    with StreamingSafetensorsWriter(tmp_path / "s.safetensors", entries, {"format": "pt", "x": "y"}) as writer:
        for k, v in tensors.items():
            writer.write(k, v)
    back = load_file(str(tmp_path / "s.safetensors"))
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], v) for k, v in tensors.items())
    with safe_open(str(tmp_path / "s.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt", "x": "y"}
    with pytest.raises(ConvertError, match="expected a"):
        with StreamingSafetensorsWriter(tmp_path / "t.safetensors", entries, {}) as writer:
            writer.write("b", tensors["b"])
    with pytest.raises(ConvertError, match="never written"):
        with StreamingSafetensorsWriter(tmp_path / "u.safetensors", entries, {}) as writer:
            writer.write("a", tensors["a"])
    assert not list(tmp_path.glob("[tu].safetensors*"))


# --- stacking --------------------------------------------------------------------------------------------------


def test_stacked_adapter_equals_applying_both(base, inputs, trained, tmp_path):
    first = trained["adapter"]
    second = adapter_of(peft_lora_model(base, seed=9, r=2, lora_alpha=5, use_rslora=True,
                                        target=r"model\.language_model\.layers\.[12]\.mlp\.(up|down)_proj|lm_head"))
    stacked = stack_adapters([(first, 0.75), (second, 0.5)])
    shared = "model.language_model.layers.1.mlp.up_proj"
    assert stacked.modules[shared].rank == 6 and stacked.modules[shared].scale == 1.0
    assert stacked.modules["model.language_model.layers.0.mlp.up_proj"].rank == 4

    reference = load_model(base, dtype=torch.float32)
    with torch.no_grad():
        for adapter, weight in ((first, 0.75), (second, 0.5)):
            for path, module in adapter.modules.items():
                reference.get_submodule(path).weight.add_(weight * module.scale * module.up @ module.down)
    expected = forward(reference, inputs)
    applied = attach_adapter(load_model(base, dtype=torch.float32), stacked)
    torch.testing.assert_close(forward(applied, inputs), expected, rtol=1e-4, atol=1e-5)
    # mixed ranks survive a PEFT directory (rank_pattern) and PeftModel.from_pretrained
    directory = write_lora(stacked, "peft", tmp_path / "stacked")
    loaded = PeftModel.from_pretrained(load_model(base, dtype=torch.float32), str(directory))
    torch.testing.assert_close(forward(loaded, inputs), expected, rtol=1e-4, atol=1e-5)


def test_stacking_shape_conflicts_are_refused(trained):
    other = LoraAdapter({"model.language_model.layers.0.mlp.up_proj": LoraModule(torch.zeros(2, 64),
                                                                                    torch.zeros(64, 2), 2.0)})
    with pytest.raises(ConvertError, match="different weight shapes"):
        stack_adapters([(trained["adapter"], 1.0), (other, 1.0)])


# --- command line ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run_dir(base, trained, tmp_path_factory):
    """A finished LoRA run: config.toml, one checkpoint, and the final PEFT adapter/."""
    root = tmp_path_factory.mktemp("run")
    write_run(root, base, trained["model"])
    trained["model"].save_pretrained(str(root / "adapter"))
    return root


@pytest.mark.parametrize("style", WRITABLE_STYLES)
def test_cli_export_from_a_run(style, run_dir, base, trained, tmp_path, capsys):
    out = output_path(tmp_path, style)
    assert main(["export", str(run_dir), "--to", style, "--out", str(out), "--base", str(base)]) == 0
    assert str(out) in capsys.readouterr().out
    imported = load_adapter(out)
    assert_same_adapter(imported, trained["adapter"])
    assert imported.metadata["hidream_ft.trigger"] == "ohwx cat"
    assert imported.metadata["hidream_ft.training_steps"] == "40"
    assert imported.metadata["hidream_ft.base_model"] == str(base)


def test_cli_imports_a_foreign_file_and_inspects_it(run_dir, tmp_path, capsys):
    kohya = tmp_path / "k.safetensors"
    assert main(["export", str(run_dir / "checkpoints" / "step-00000040"), "--to", "kohya", "--out", str(kohya),
                 "--dtype", "bf16", "--trigger", "sks"]) == 0
    assert {t.dtype for t in load_file(str(kohya)).values() if t.dim()} == {torch.bfloat16}
    capsys.readouterr()
    assert main(["inspect", str(kohya)]) == 0
    shown = capsys.readouterr().out
    assert "style: kohya" in shown and "modules: 21" in shown and "hidream_ft.trigger: sks" in shown
    assert main(["export", str(kohya), "--to", "peft", "--out", str(tmp_path / "peft")]) == 0
    assert (tmp_path / "peft" / "adapter_config.json").is_file()


def test_cli_merge_and_stack(run_dir, base, inputs, trained, tmp_path):
    comfy = tmp_path / "lora.safetensors"
    assert main(["export", str(run_dir), "--to", "comfyui", "--out", str(comfy)]) == 0
    out = tmp_path / "merged"
    # no --base: the base recorded by training is used
    assert main(["merge", f"{run_dir}:0.75", f"{comfy}:0.5", "--out", str(out), "--max-shard-size", "0.6MB"]) == 0
    merged = load_model(out, dtype=torch.float32)
    path = "model.language_model.layers.0.self_attn.q_proj"
    module = trained["adapter"].modules[path]
    expected = load_model(base, dtype=torch.float32).get_submodule(path).weight + 1.25 * 2.0 * module.up @ module.down
    torch.testing.assert_close(merged.get_submodule(path).weight, expected, rtol=1e-6, atol=1e-6)
    with safe_open(str(next(out.glob("model-00001-*.safetensors"))), "pt") as f:
        assert "×0.75" in f.metadata()["hidream_ft.merged"]

    comfy_model = tmp_path / "model.safetensors"
    assert main(["merge", str(run_dir), "--out", str(comfy_model), "--layout", "comfyui", "--base", str(base)]) == 0
    assert {t.dtype for t in load_file(str(comfy_model)).values()} == {torch.bfloat16}

    stacked = tmp_path / "stacked.safetensors"
    assert main(["stack", f"{run_dir}:0.5", f"{comfy}:0.5", "--to", "comfyui", "--out", str(stacked)]) == 0
    applied = attach_adapter(load_model(base, dtype=torch.float32), load_adapter(stacked))
    torch.testing.assert_close(forward(applied, inputs), trained["output"], rtol=1e-4, atol=1e-5)


def test_cli_reports_bad_input_in_one_line(run_dir, tmp_path, capsys):
    weird = tmp_path / "weird.safetensors"
    save_file({"foo.bar": torch.zeros(1)}, str(weird))
    assert main(["export", str(weird), "--to", "comfyui", "--out", str(tmp_path / "x.safetensors")]) == 2
    assert main(["export", str(run_dir), "--to", "kohya", "--out", str(tmp_path / "x.safetensors"),
                 "--base", str(write_tiny_checkpoint(tmp_path / "small", text_layers=2))]) == 2
    assert main(["export", str(tmp_path / "missing"), "--to", "peft", "--out", str(tmp_path / "p")]) == 2
    assert main(["merge", str(run_dir), "--out", str(tmp_path / "m.bin"), "--layout", "comfyui"]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 4 and all(line.startswith("error: ") for line in errors)
    assert "foo.bar" in errors[0]
    assert "layers.2" in errors[1] and "has no weight" in errors[1]
    assert "no such file or directory" in errors[2]
    assert "*.safetensors" in errors[3]


def test_styles_table_matches_the_docs():
    docs = (Path(__file__).parent.parent / "docs" / "export.md").read_text()
    for name, style in STYLES.items():
        assert f"`{name}`" in docs, name
        for example in style.examples():
            assert example in docs, example
