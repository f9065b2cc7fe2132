"""Adapter kinds — LoRA, DoRA, LoHa, LoKr — trained, saved, merged, stacked, sampled and exported, on the tiny model.

References are PEFT's own layers (``merge_and_unload``) and, for the single files, a re-implementation here of
how ComfyUI's weight adapters apply the keys (``comfy/weight_adapter/``: lora, loha, lokr and ``dora_scale``).
"""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoHaConfig, LoKrConfig, LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file
from torch.distributed.tensor import DTensor
from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

from helpers import CAPTIONS, WORKERS, forward_inputs, make_trainer, noise_samples, run_python, set_flags
from hidream_ft.config import ConfigError, load_config
from hidream_ft.convert import load_adapter, merge_checkpoint
from hidream_ft.convert.__main__ import main as convert_main
from hidream_ft.convert.merge import base_weights
from hidream_ft.data.collate import TextToImageCollator
from hidream_ft.lora import ConvertError, lora_applied, read_peft_dir, stack_adapters, write_lora
from hidream_ft.lora.keys import STYLES
from hidream_ft.lora.targets import init_lora_weights
from hidream_ft.model import load_model
from hidream_ft.model.loading import weight_files
from hidream_ft.sample import main as sample_main

TARGETS = (r"model\.language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
           r"|model\.final_layer2\.linear")
# PEFT configs of each variant; random (non-zero) adapters, so that every tensor matters.
VARIANTS = {
    "lora": lambda: LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False),
    "dora": lambda: LoraConfig(r=4, lora_alpha=6, target_modules=TARGETS, init_lora_weights=False, use_dora=True),
    "loha": lambda: LoHaConfig(r=4, alpha=6, target_modules=TARGETS, init_weights=False),
    "lokr": lambda: LoKrConfig(r=2, alpha=3, target_modules=TARGETS, init_weights=False, decompose_both=True),
    # r at least half of every factor: PEFT keeps both factors whole, and ComfyUI then ignores any alpha
    "lokr_whole": lambda: LoKrConfig(r=8, alpha=4, target_modules=TARGETS, init_weights=False),
}
KIND_OPTIONS = {
    "lora": [], "dora": ["lora.kind='dora'"], "loha": ["lora.kind='loha'"],
    "lokr": ["lora.kind='lokr'", "lora.lokr_decompose_both=true", "lora.rank=2"],
}
ADAPTER_PARTS = {"lora": ("lora_A", "lora_B"), "dora": ("lora_A", "lora_B", "lora_magnitude_vector"),
                 "loha": ("hada_",), "lokr": ("lokr_",)}


def base_state(base) -> dict[str, torch.Tensor]:
    state = {}
    for file in sorted(set(weight_files(base).values())):
        state.update(load_file(file))
    return state


@pytest.fixture(scope="module")
def variants(base, tmp_path_factory):
    """Per variant: the PEFT directory PEFT itself saved, our adapter read from it, and the weights of
    PEFT's ``merge_and_unload`` (fp32)."""
    found = {}
    for seed, (name, make_config) in enumerate(VARIANTS.items()):
        torch.manual_seed(seed)
        peft_model = get_peft_model(load_model(base, dtype=torch.float32), make_config())
        with torch.no_grad():
            for key, param in peft_model.named_parameters():
                if "lora_magnitude_vector" in key:  # a magnitude of its own, not just the adapted norms
                    param.mul_(1 + 0.2 * torch.rand_like(param))
        directory = tmp_path_factory.mktemp(name) / "adapter"
        peft_model.save_pretrained(directory)
        merged = PeftModel.from_pretrained(load_model(base, dtype=torch.float32), str(directory)).merge_and_unload()
        found[name] = {"dir": directory, "adapter": read_peft_dir(directory),
                       "merged": {k: v.detach() for k, v in merged.state_dict().items()}}
    return found


def peft_delta(variants, weights, name: str, path: str) -> torch.Tensor:
    return variants[name]["merged"][f"{path}.weight"] - weights[f"{path}.weight"]


# --- ComfyUI's application of the single-file keys, re-implemented from its weight adapters -------------------


def comfyui_weight(tensors: dict[str, torch.Tensor], name: str, weight: torch.Tensor) -> torch.Tensor:
    """W' of the module named ``name`` (key prefix) as ComfyUI computes it at strength 1, in fp32.

    lora: scale·up·down, scale = alpha / rank (1 without alpha). loha: scale·(w1a·w1b)⊙(w2a·w2b), scale =
    alpha / w1b.shape[0]. lokr: scale·w1⊗w2 where a factor missing as a whole is a_·b_, and scale = alpha / the
    rank of the last decomposed factor — 1 if neither is decomposed or no alpha. dora_scale: (W + ΔW) ·
    dora_scale / (norm + eps), the norm of the base weight's rows when dora_scale has one entry per output,
    otherwise of the adapted weight's columns.
    """
    part = lambda key: tensors.get(f"{name}.{key}")  # noqa: E731
    alpha = None if part("alpha") is None else part("alpha").item()
    dim = None
    if part("hada_w1_a") is not None:
        diff = (part("hada_w1_a") @ part("hada_w1_b")) * (part("hada_w2_a") @ part("hada_w2_b"))
        dim = part("hada_w1_b").shape[0]
    elif any(key.startswith(f"{name}.lokr_") for key in tensors):
        factors = []
        for n in (1, 2):
            whole = part(f"lokr_w{n}")
            if whole is None:
                dim = part(f"lokr_w{n}_b").shape[0]
                whole = part(f"lokr_w{n}_a") @ part(f"lokr_w{n}_b")
            factors.append(whole)
        diff = torch.kron(*factors)
    else:
        up = part("lora_B.weight") if part("lora_B.weight") is not None else part("lora_up.weight")
        down = part("lora_A.weight") if part("lora_A.weight") is not None else part("lora_down.weight")
        diff, dim = up @ down, down.shape[0]
    scale = alpha / dim if alpha is not None and dim is not None else 1.0
    adapted = weight + scale * diff
    dora_scale = part("dora_scale")
    if dora_scale is None:
        return adapted
    if dora_scale.shape[0] == weight.shape[0]:
        norm = torch.linalg.vector_norm(weight, dim=1, keepdim=True)
    else:
        norm = torch.linalg.vector_norm(adapted, dim=0, keepdim=True)
    return adapted * (dora_scale / (norm + torch.finfo(torch.float32).eps))


# --- training ----------------------------------------------------------------------------------------------


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole of an FSDP-sharded tensor."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


@pytest.mark.parametrize("kind", list(KIND_OPTIONS))
def test_each_kind_trains_from_a_seeded_init_and_saves_a_peft_folder(kind, tiny_checkpoint, tokenizer, tmp_path):
    trainer = make_trainer(tiny_checkpoint, tmp_path, *KIND_OPTIONS[kind], "lora.alpha=4",
                           "lora.train_heads=['final_layer2']")
    trainable = {n: p for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable and all(any(f".{part}" in n for part in ADAPTER_PARTS[kind]) for n in trainable), trainable
    inputs = forward_inputs(tiny_checkpoint)
    base_model = load_model(tiny_checkpoint, dtype=torch.float32, tokenizer=tokenizer).eval()
    trainer.model.eval()
    with torch.no_grad():
        base_output = base_model(**inputs)
        # The init is ΔW = 0 (DoRA: the magnitude is each base row's norm) ...
        torch.testing.assert_close(trainer.model(**inputs), base_output, rtol=1e-5, atol=1e-5)
    if kind == "dora":
        layer = trainer.base.model.language_model.layers[1].mlp.down_proj
        assert torch.equal(full(layer.lora_magnitude_vector["default"].weight.detach()),
                           torch.linalg.vector_norm(full(layer.base_layer.weight.detach()), dim=1))
    # ... and a function of the seed alone.
    snapshot = lambda: {n: full(p.detach()).clone() for n, p in trainable.items()}  # noqa: E731
    first = snapshot()
    init_lora_weights(trainer.model, seed=trainer.cfg.train.seed)
    assert all(torch.equal(first[n], t) for n, t in snapshot().items())
    init_lora_weights(trainer.model, seed=trainer.cfg.train.seed + 1)
    assert any(not torch.equal(first[n], t) for n, t in snapshot().items())
    init_lora_weights(trainer.model, seed=trainer.cfg.train.seed)

    batch = TextToImageCollator(trainer.tokenizer, trainer.tokens, 128)(noise_samples(CAPTIONS[:2]))
    losses = [trainer.step([batch])["loss"] for _ in range(3)]
    assert all(torch.isfinite(torch.tensor(losses))) and trainer.skipped_total == 0, losses

    directory = trainer.save_adapter()
    config = json.loads((directory / "adapter_config.json").read_text())
    assert config["peft_type"] == {"lora": "LORA", "dora": "LORA", "loha": "LOHA", "lokr": "LOKR"}[kind]
    assert config.get("use_dora", False) == (kind == "dora")
    assert load_adapter(tmp_path).kind == kind  # the run directory
    # PEFT loads it on HiDreamO1 (the trained forward, no longer the base's) and on the stock HF model.
    loaded = PeftModel.from_pretrained(load_model(tiny_checkpoint, dtype=torch.float32, tokenizer=tokenizer),
                                       str(directory)).eval()
    trainer.model.eval()
    with torch.no_grad():
        trained_output = trainer.model(**inputs)
        torch.testing.assert_close(loaded(**inputs), trained_output, rtol=1e-5, atol=1e-5)
    assert (trained_output - base_output).abs().max() > 1e-4
    hf_config = Qwen3VLConfig.from_dict(json.loads((tiny_checkpoint / "config.json").read_text()))
    stock = PeftModel.from_pretrained(Qwen3VLForConditionalGeneration(hf_config), str(directory))
    got = get_peft_model_state_dict(stock)
    decoder = {k: v for k, v in load_file(directory / "adapter_model.safetensors").items() if "language_model" in k}
    assert decoder and all(torch.equal(got[k], v) for k, v in decoder.items())


def test_kind_specific_keys_are_checked():
    with pytest.raises(ConfigError, match="lora.use_rslora: applies to kind 'lora' and 'dora' only"):
        load_config(None, ["lora.kind='loha'", "lora.use_rslora=true"])
    with pytest.raises(ConfigError, match="apply to kind 'lokr' only"):
        load_config(None, ["lora.lokr_factor=4"])
    with pytest.raises(ConfigError, match="lora.kind"):
        load_config(None, ["lora.kind='oft'"])


def test_a_lokr_checkpoint_reads_as_the_saved_adapter_with_its_factor(tiny_checkpoint, tmp_path):
    trainer = make_trainer(tiny_checkpoint, tmp_path, *KIND_OPTIONS["lokr"], "lora.targets=['q_proj']",
                           "lora.alpha=4", "lora.lokr_factor=4")
    batch = TextToImageCollator(trainer.tokenizer, trainer.tokens, 128)(noise_samples(CAPTIONS[:2]))
    trainer.step([batch])
    step_dir = trainer.save_checkpoint(1, None)
    saved = read_peft_dir(trainer.save_adapter())
    from_checkpoint = load_adapter(step_dir)
    assert from_checkpoint.kind == "lokr" and from_checkpoint.modules.keys() == saved.modules.keys()
    for path, module in saved.modules.items():
        other = from_checkpoint.modules[path]
        assert other.rank == module.rank == 2 and other.scale == module.scale == 2.0
        assert module.factor_shape(1) == (4, 4)  # 64 features split as 4 · 16 on both sides
        assert all(torch.equal(other.tensors()[k], t) for k, t in module.tensors().items())
    # a PEFT folder written from the checkpoint rebuilds the same factor shapes in PEFT
    rewritten = write_lora(from_checkpoint, "peft", tmp_path / "rewritten")
    assert json.loads((rewritten / "adapter_config.json").read_text())["decompose_factor"] == 4
    loaded = PeftModel.from_pretrained(load_model(tiny_checkpoint, dtype=torch.float32), str(rewritten))
    assert {k: tuple(v.shape) for k, v in get_peft_model_state_dict(loaded).items()} == \
           {k: tuple(v.shape) for k, v in from_checkpoint.peft_state_dict().items()}


def test_cli_exports_a_dora_for_comfyui_with_the_base_and_refuses_what_formats_cannot_hold(
        base, variants, tmp_path, capsys):
    dora = str(variants["dora"]["dir"])
    out = tmp_path / "dora.safetensors"
    assert convert_main(["export", dora, "--to", "comfyui", "--out", str(out), "--base", str(base)]) == 0
    assert any(key.endswith(".dora_scale") for key in load_file(out))
    capsys.readouterr()
    cases = [
        (["export", dora, "--to", "comfyui", "--out", str(out)], "needs the base weights: pass --base DIR"),
        (["export", dora, "--to", "kohya", "--out", str(out)], "the kohya format cannot hold a dora adapter"),
        (["stack", str(variants["loha"]["dir"]), "--to", "peft", "--out", str(tmp_path / "s")],
         "cannot stack a loha adapter into one file"),
    ]
    for args, message in cases:
        assert convert_main(args) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    loha_file = write_lora(variants["loha"]["adapter"], "comfyui", tmp_path / "loha.safetensors")
    assert convert_main(["inspect", str(loha_file)]) == 2
    assert "a LoHa adapter" in capsys.readouterr().err


# --- PEFT folders and merges -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(VARIANTS))
def test_rewritten_peft_folder_and_merge_equal_peft_merge_and_unload(name, base, variants, tmp_path):
    variant = variants[name]
    adapter = variant["adapter"]
    assert adapter.kind == name.split("_")[0]
    rewritten = write_lora(adapter, "peft", tmp_path / "peft")
    again = PeftModel.from_pretrained(load_model(base, dtype=torch.float32), str(rewritten)).merge_and_unload()
    for key, value in again.state_dict().items():
        torch.testing.assert_close(value, variant["merged"][key], rtol=0, atol=1e-6, msg=key)

    out = merge_checkpoint(base, tmp_path / "merged", loras=[(adapter, 1.0)])
    merged = base_state(out)
    assert merged.keys() == variant["merged"].keys()
    for key, value in merged.items():
        torch.testing.assert_close(value, variant["merged"][key], rtol=0, atol=1e-6, msg=key)


# --- single files -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(VARIANTS))
def test_comfyui_file_applies_like_peft(name, base, variants, tmp_path):
    adapter = variants[name]["adapter"]
    out = write_lora(adapter, "comfyui", tmp_path / "x.safetensors", base_weights(base))
    tensors = load_file(out)
    expected_parts = {"lora": {"lora_A.weight", "lora_B.weight", "alpha"},
                      "dora": {"lora_A.weight", "lora_B.weight", "alpha", "dora_scale"},
                      "loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"},
                      "lokr": {"lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "alpha"},
                      "lokr_whole": {"lokr_w1", "lokr_w2"}}[name]
    q_proj = "diffusion_model.language_model.layers.0.self_attn.q_proj"
    assert {k[len(q_proj) + 1:] for k in tensors if k.startswith(q_proj + ".")} == expected_parts
    if name == "dora":
        gate_proj = "diffusion_model.language_model.layers.0.mlp.gate_proj"  # 64 → 128 features
        assert tensors[f"{gate_proj}.dora_scale"].shape == (128, 1)  # one per output row
    weights = base_state(base)
    for path in adapter.modules:
        comfy = comfyui_weight(tensors, "diffusion_model." + path[len("model."):], weights[f"{path}.weight"])
        torch.testing.assert_close(comfy, variants[name]["merged"][f"{path}.weight"], rtol=0, atol=1e-5, msg=path)


@pytest.mark.parametrize("style", ["kohya", "musubi"])
@pytest.mark.parametrize("name", ["loha", "lokr", "lokr_whole"])
def test_kohya_and_musubi_files_hold_loha_and_lokr(style, name, base, variants, tmp_path):
    adapter = variants[name]["adapter"]
    if style == "musubi" and name == "lokr":  # decompose_both: musubi-tuner's LoKr has a whole first factor
        with pytest.raises(ConvertError, match="^the musubi format cannot hold a lokr adapter with a decomposed"):
            write_lora(adapter, style, tmp_path / "x.safetensors")
        return
    tensors = load_file(write_lora(adapter, style, tmp_path / "x.safetensors"))
    weights = base_state(base)
    for path in adapter.modules:
        module_name = STYLES[style].module_name(path)
        part = "hada_w1_a" if name == "loha" else "lokr_w1" if name == "lokr_whole" else "lokr_w1_a"
        assert f"{module_name}.{part}" in tensors
        comfy = comfyui_weight(tensors, module_name, weights[f"{path}.weight"])
        torch.testing.assert_close(comfy, variants[name]["merged"][f"{path}.weight"], rtol=0, atol=1e-5, msg=path)
    with safe_open(tmp_path / "x.safetensors", "pt") as f:
        assert f.metadata()["hidream_ft.kind"] == name.split("_")[0]


def test_formats_that_cannot_hold_a_kind_say_so_in_one_line(variants, tmp_path):
    dora = variants["dora"]["adapter"]
    for style in ("kohya", "musubi"):
        with pytest.raises(ConvertError, match=rf"^the {style} format cannot hold a dora adapter; write it as "
                                               r"peft or comfyui$"):
            write_lora(dora, style, tmp_path / "x.safetensors")
    with pytest.raises(ConvertError, match="dora adapter in the comfyui format needs the base weights: pass --base"):
        write_lora(dora, "comfyui", tmp_path / "x.safetensors")
    with pytest.raises(ConvertError, match="cannot stack a loha adapter into one file"):
        stack_adapters([(variants["loha"]["adapter"], 1.0)])


# --- stacking at sampling and in a merge -------------------------------------------------------------------


def test_stacked_kinds_apply_and_merge_as_the_sum_of_their_deltas(base, inputs, variants, tmp_path):
    weighted = [("lora", 0.7), ("lokr", 0.5), ("dora", 0.3), ("loha", -0.4)]
    weights = base_state(base)
    reference = load_model(base, dtype=torch.float32)
    expected_weights = {}
    with torch.no_grad():
        for name, w in weighted:
            for path in variants[name]["adapter"].modules:
                expected_weights.setdefault(path, weights[f"{path}.weight"].clone())
                expected_weights[path] += w * peft_delta(variants, weights, name, path)
        for path, value in expected_weights.items():
            reference.get_submodule(path).weight.copy_(value)
        expected = reference(**inputs)

    loras = [(variants[name]["adapter"], w) for name, w in weighted]
    model = load_model(base, dtype=torch.float32)
    with torch.no_grad():
        plain = model(**inputs)
        with lora_applied(model, loras):
            stacked = model(**inputs)
        torch.testing.assert_close(model(**inputs), plain, rtol=0, atol=0)  # the base is back
    torch.testing.assert_close(stacked, expected, rtol=1e-5, atol=1e-5)
    assert (stacked - plain).abs().max() > 1e-3

    merged = base_state(merge_checkpoint(base, tmp_path / "merged", loras=loras))
    for path, value in expected_weights.items():
        torch.testing.assert_close(merged[f"{path}.weight"], value, rtol=0, atol=1e-6, msg=path)


def test_sampling_with_lora_and_lokr_adapters(tiny_checkpoint, tmp_path):
    directories = {}
    for seed, (name, make_config) in enumerate([("lora", VARIANTS["lora"]), ("lokr", VARIANTS["lokr"])]):
        torch.manual_seed(seed)
        peft_model = get_peft_model(load_model(tiny_checkpoint, dtype=torch.float32), make_config())
        directories[name] = tmp_path / name
        peft_model.save_pretrained(directories[name])
    args = ["--model", str(tiny_checkpoint), "--prompt", "a red circle", "--steps", "2", "--size", "64x64"]
    images = {}
    for label, loras in [("base", []), ("stacked", ["--lora", str(directories["lora"]),
                                                    "--lora", f"{directories['lokr']}:0.5"])]:
        out = tmp_path / f"{label}.png"
        assert sample_main([*args, *loras, "--out", str(out)]) == 0
        images[label] = out.read_bytes()
    assert images["stacked"] != images["base"]


@pytest.mark.distributed
@pytest.mark.parametrize("kind", ["dora", "loha", "lokr"])
def test_two_ranks_train_each_kind_like_one_rank(kind, tiny_checkpoint, tmp_path):
    """FSDP shards the adapter tensors (LoKr's are tiny) and a DoRA magnitude is initialised from the
    sharded base weights: the same global batches give the same losses and adapters on one and two ranks."""
    runs = {}
    for nproc in (1, 2):
        out = tmp_path / f"{nproc}.json"
        run_python(WORKERS / "fixed_batches.py", tiny_checkpoint, tmp_path / f"run{nproc}", out, 3,
                   *set_flags("train.mode=lora", "lora.train_heads=['final_layer2']", *KIND_OPTIONS[kind]),
                   nproc=nproc)
        runs[nproc] = json.loads(out.read_text())
    for step, loss in runs[1]["losses"].items():
        assert runs[2]["losses"][step] == pytest.approx(loss, rel=1e-5, abs=1e-6)
    assert runs[1]["params"].keys() == runs[2]["params"].keys()
    assert all(any(f".{part}" in key for part in ADAPTER_PARTS[kind]) for key in runs[1]["params"])
    for key, values in runs[1]["params"].items():
        assert runs[2]["params"][key] == pytest.approx(values, rel=1e-3, abs=1e-5), key
