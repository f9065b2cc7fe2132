"""Mistakes a user can fix end in one ``error: ...`` line and exit status 2, not a traceback."""

import re

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from helpers import drain_pipeline, set_flags
from hidream_ft.config import ConfigError, DataConfig, FolderSource
from hidream_ft.convert.__main__ import main as convert_main
from hidream_ft.data import build_pipeline
from hidream_ft.data.demo import write_demo_dataset
from hidream_ft.data.pack import pack
from hidream_ft.demo import write_demo
from hidream_ft.errors import UserError
from hidream_ft.model import load_hf_config
from hidream_ft.model.conditioning import check_reference_count
from hidream_ft.model.layout import SpecialTokens, build_t2i_layout, chat_prompt_ids, image_grid
from hidream_ft.parallel.distributed import DistEnv, build_mesh
from hidream_ft.train import main as train_main


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


# -- corrupt safetensors files -----------------------------------------------------------------------------

def corrupt_safetensors(tmp_path, kind: str):
    path = tmp_path / f"{kind}.safetensors"
    if kind == "garbage":
        path.write_bytes(b"this is not a safetensors file at all " * 4)
    else:
        save_file({"lora_unet_x.lora_down.weight": torch.zeros(4, 64)}, str(path))
        path.write_bytes(path.read_bytes()[:-100])
    return path


@pytest.mark.parametrize("kind", ["truncated", "garbage"])
@pytest.mark.parametrize("command", [["export", "SOURCE", "--to", "comfyui", "--out", "OUT"], ["inspect", "SOURCE"],
                                     ["merge", "SOURCE", "--base", "SOURCE", "--out", "OUT"]])
def test_a_corrupt_safetensors_file_is_one_line_naming_it(tmp_path, capsys, kind, command):
    path = corrupt_safetensors(tmp_path, kind)
    argv = [{"SOURCE": str(path), "OUT": str(tmp_path / "out.safetensors")}.get(a, a) for a in command]
    assert convert_main(argv) == 2
    assert f"{path}: not a readable safetensors file" in one_error_line(capsys)


# -- oversized control images ------------------------------------------------------------------------------

def test_a_control_image_above_the_pixel_cap_skips_its_sample_and_is_counted(tmp_path):
    write_demo_dataset(tmp_path / "target", n=4, size=(128, 128))
    for index in range(4):
        size = (1024, 1024) if index == 2 else (128, 128)  # same aspect: one shape group
        (tmp_path / "source").mkdir(exist_ok=True)
        Image.new("RGB", size, (200, 40 * index, 0)).save(tmp_path / "source" / f"demo_{index:03d}.png")
    cfg = DataConfig(folders=[FolderSource(str(tmp_path / "target"), control_dir=str(tmp_path / "source"))],
                     buckets=[[128, 128]], num_workers=0, max_image_pixels=200_000)
    batches, _, stats = drain_pipeline(cfg, steps=4, batch_size=1)
    keys = [sample.key for _, (batch,) in batches for sample in batch]
    assert "demo_002" not in keys and stats["too_large_skipped"] == 1


# -- resuming with other adapter shapes -------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained_demo(tmp_path_factory):
    """The demo after 2 steps at LoRA rank 8, with its step-2 checkpoint; returns its config."""
    config = write_demo(tmp_path_factory.mktemp("resume") / "demo", steps=2)
    assert train_main(["--config", str(config), *set_flags("data.num_workers=0", "checkpoint.every=2")]) == 0
    return config


@pytest.mark.parametrize("override, message", [
    ("lora.rank=4", "shape of base_model.model.model.final_layer2.linear.lora_A.default.weight is [8, 64] but the "
                    "config gives [4, 64] (lora.rank changed?)"),
    ("lora.targets=['q_proj']", "the config's model lacks"),
    ("lora.train_heads=[]", "the config's model lacks 2 of its tensors"),
    ("lora.train_heads=['final_layer2', 't_embedder1']", "it lacks 4 tensors of the config's model"),
])
def test_resuming_with_other_adapter_shapes_is_one_line(trained_demo, capsys, override, message):
    capsys.readouterr()
    argv = ["--config", str(trained_demo), *set_flags("data.num_workers=0", "train.max_steps=4", override)]
    assert train_main(argv) == 2
    err = one_error_line(capsys)
    assert message in err and "checkpoint.resume=none" in err


# -- user mistakes raised as UserError -------------------------------------------------------------------

@pytest.fixture(scope="module")
def demo_config(tmp_path_factory):
    return write_demo(tmp_path_factory.mktemp("demo") / "demo", steps=1)


@pytest.mark.parametrize("overrides, message", [
    (["lora.targets=['qq_proj']"], "lora.targets: unknown module 'qq_proj'"),
    (["lora.train_heads=['final_layer9']"], "lora.train_heads: unknown head 'final_layer9'"),
    (["lora.targets=[]", "lora.train_heads=[]"], "lora: no targets configured"),
])
def test_lora_target_mistakes_stop_before_the_model_loads(demo_config, capsys, monkeypatch, overrides, message):
    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the LoRA targets were checked")

    monkeypatch.setattr("hidream_ft.trainer.load_model", no_model)
    assert train_main(["--config", str(demo_config), *set_flags(*overrides)]) == 2
    assert message in one_error_line(capsys)


def test_a_text_budget_without_room_for_a_caption_is_one_line(demo_config, capsys):
    assert train_main(["--config", str(demo_config), *set_flags("data.num_workers=0", "data.max_text_tokens=8")]) == 2
    assert "data.max_text_tokens = 8 leaves no room for a caption" in one_error_line(capsys)


def test_uneven_ranks_per_node_under_hsdp_name_the_key():
    env = DistEnv(rank=0, world_size=3, local_rank=0, local_world_size=2, device=torch.device("cpu"))
    with pytest.raises(ConfigError, match="parallel.hsdp"):
        build_mesh(env, hsdp=True)


@pytest.mark.parametrize("call, message", [
    (lambda tokenizer, tokens: chat_prompt_ids(tokenizer, tokens, "a <|tms_token|> cat"), "exactly one <|tms_token|>"),
    (lambda tokenizer, tokens: chat_prompt_ids(tokenizer, tokens, "a cat " * 50, max_text_tokens=20),
     "over data.max_text_tokens = 20"),
    (lambda tokenizer, tokens: image_grid(100, 64), "not a positive multiple of 32"),
    (lambda tokenizer, tokens: build_t2i_layout(tokenizer, tokens, "a cat", 32, 32), "is a single patch"),
    (lambda tokenizer, tokens: check_reference_count(11), "11 reference images given"),
])
def test_prompt_size_and_reference_mistakes_are_user_errors(tokenizer, tokens, call, message):
    with pytest.raises(UserError, match=re.escape(message)):
        call(tokenizer, tokens)


def test_a_tokenizer_without_the_special_tokens_is_a_user_error(tiny_checkpoint):
    class Plain:
        def convert_tokens_to_ids(self, token):
            return None

        unk_token_id = pad_token_id = 0

    with pytest.raises(UserError, match="special token"):
        SpecialTokens.from_tokenizer(Plain(), load_hf_config(tiny_checkpoint))


def test_a_data_state_of_other_sources_is_a_user_error(tmp_path):
    write_demo_dataset(tmp_path / "images", n=2, size=(64, 64))
    pipeline = build_pipeline(DataConfig(folders=[str(tmp_path / "images")], buckets=[[64, 64]], num_workers=0))
    with pytest.raises(UserError, match="does not fit this pipeline"):
        pipeline.load_state_dict({**pipeline.state_dict(), "mode": "shards"})


def test_packing_into_a_folder_with_shards_is_a_user_error(tmp_path):
    source = write_demo_dataset(tmp_path / "data", n=2, size=(64, 64))
    pack(source, tmp_path / "shards", 2)
    with pytest.raises(UserError, match="pass --overwrite"):
        pack(source, tmp_path / "shards", 2)


def test_a_caption_the_layout_refuses_is_one_line_from_a_data_worker(tmp_path, capsys):
    config = write_demo(tmp_path / "demo", steps=1)
    for caption in (tmp_path / "demo" / "data").glob("*.txt"):
        caption.write_text("a <|tms_token|> in the caption")
    assert train_main(["--config", str(config), *set_flags("data.num_workers=1")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    assert re.search(r"^error: sample demo_\d+: the prompt must contain exactly one <\|tms_token\|>", err, re.M), err
