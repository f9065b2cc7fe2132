"""``python -m hidream_ft.sample``: single images, LoRAs, comparison grids, and its error messages."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from hidream_ft.inference.grid import GridGeometry, compose_grid, wrap_text
from hidream_ft.lora import lora_label
from hidream_ft.sample import main

FAST = ["--steps", "2", "--size", "64x64"]


def sample(tmp_path, name, *args) -> bytes:
    out = tmp_path / name
    main([*args, "--out", str(out)])
    return out.read_bytes()


def test_same_seed_same_bytes_and_lora_changes_them(tmp_path, tiny_checkpoint, adapter_dir):
    model = ["--model", str(tiny_checkpoint), "--prompt", "a red circle", *FAST]
    first = sample(tmp_path, "a.png", *model, "--seed", "7")
    again = sample(tmp_path, "b.png", *model, "--seed", "7")
    other = sample(tmp_path, "c.png", *model, "--seed", "8")
    styled = sample(tmp_path, "d.png", *model, "--seed", "7", "--lora", f"{adapter_dir}:0.8")
    assert first == again and first != other and first != styled
    image = Image.open(tmp_path / "d.png")
    assert image.size == (64, 64)
    record = json.loads(image.text["hidream_ft"])
    assert record["loras"] == [[str(adapter_dir), 0.8]] and record["settings"]["seed"] == 7


def test_weights_from_a_comfyui_single_file(tmp_path, tiny_checkpoint, capsys):
    from hidream_ft.convert import merge_checkpoint

    comfy = merge_checkpoint(tiny_checkpoint, tmp_path / "comfy.safetensors", layout="comfyui")  # fp32 weights
    model = ["--model", str(tiny_checkpoint), "--prompt", "a red circle", *FAST]
    assert sample(tmp_path, "file.png", *model, "--weights", str(comfy)) == sample(tmp_path, "dir.png", *model)
    reference = tmp_path / "ref.png"
    Image.new("RGB", (64, 64), (200, 10, 10)).save(reference)
    capsys.readouterr()
    edit = [*model, "--weights", str(comfy), "--reference", str(reference), "--out", str(tmp_path / "edit.png")]
    assert main(edit) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(
        "error: edit / IP generation needs the ViT's DeepStack mergers")


def test_dev_preset_and_explicit_timesteps(tmp_path, tiny_checkpoint):
    model = ["--model", str(tiny_checkpoint), "--prompt", "a green square", "--size", "64x64"]
    sample(tmp_path, "dev.png", *model, "--preset", "dev", "--timesteps", "999,500,8")
    record = json.loads(Image.open(tmp_path / "dev.png").text["hidream_ft"])["settings"]
    assert record["scheduler"] == "flash" and record["cfg"] == 0.0 and record["noise_clip_std"] == 2.5
    assert record["timesteps"] == [999, 500, 8]


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize("args, message", [
    (["--size", "64x65"], "sampling.height: must be a positive multiple of 32, got 65"),
    (["--timesteps", "10,500"], "sampling.timesteps: timesteps must be strictly decreasing"),
    (["--lora", "missing.safetensors"], "missing.safetensors"),
])
def test_bad_input_is_one_clear_line(tmp_path, tiny_checkpoint, capsys, args, message):
    assert main(["--model", str(tiny_checkpoint), "--prompt", "x", "--out", str(tmp_path / "x.png"), *args]) == 2
    assert message in one_error_line(capsys)


def test_missing_model_directory(tmp_path, capsys):
    assert main(["--model", str(tmp_path / "nope"), "--prompt", "x", "--out", str(tmp_path / "x.png")]) == 2
    assert one_error_line(capsys).startswith("error: model directory not found")


def test_grid_from_toml(tmp_path, tiny_checkpoint, adapter_dir):
    config = tmp_path / "grid.toml"
    out = tmp_path / "grid.png"
    config.write_text(f"""
model = "{tiny_checkpoint}"
out = "{out}"
prompts = ["a red circle on a blue background", "a green square"]
[sampling]
steps = 2
width = 64
height = 64
seed = 3
[[columns]]
label = "base"
[[columns]]
loras = ["{adapter_dir}"]
[[columns]]
loras = ["{adapter_dir}:0.5", "{adapter_dir / 'adapter'}:0.5"]
""")
    main(["grid", "--config", str(config)])
    grid = np.asarray(Image.open(out).convert("RGB"))
    geometry = GridGeometry(rows=2, columns=3, cell_width=64, cell_height=64)
    assert (grid.shape[1], grid.shape[0]) == geometry.size
    cells = [[grid[y:y + 64, x:x + 64] for x, y in (geometry.cell_origin(r, c) for c in range(3))] for r in range(2)]
    assert not np.array_equal(cells[0][0], cells[0][1])  # the LoRA column differs from the base column
    halves = np.abs(cells[0][1].astype(int) - cells[0][2].astype(int))
    assert halves.max() <= 1  # 0.5 + 0.5 of the same adapter is the adapter, up to float rounding
    assert not np.array_equal(cells[0][0], cells[1][0])  # rows are different prompts
    record = json.loads(Image.open(out).text["hidream_ft"])
    assert [c["label"] for c in record["columns"]] == ["base", adapter_dir.name,
                                                       f"{adapter_dir.name} x0.5 + {adapter_dir.name} x0.5"]


def test_grid_from_flags_matches_single_images(tmp_path, tiny_checkpoint):
    args = ["--model", str(tiny_checkpoint), "--seed", "5", *FAST]
    main(["grid", *args, "--prompt", "a red circle", "--prompt", "a green square", "--out", str(tmp_path / "g.png")])
    main([*args, "--prompt", "a green square", "--out", str(tmp_path / "one.png")])
    grid = np.asarray(Image.open(tmp_path / "g.png").convert("RGB"))
    x, y = GridGeometry(rows=2, columns=1, cell_width=64, cell_height=64).cell_origin(1, 0)
    assert np.array_equal(grid[y:y + 64, x:x + 64], np.asarray(Image.open(tmp_path / "one.png").convert("RGB")))


def test_grid_file_errors(tmp_path, capsys):
    config = tmp_path / "grid.toml"
    config.write_text('model = "m"\nprompts = ["p"]\n[sampling]\nstepz = 3\n')
    assert main(["grid", "--config", str(config)]) == 2
    assert "grid.toml: sampling: unknown key 'stepz'; did you mean 'steps'?" in one_error_line(capsys)
    config.write_text('model = "m"\n')
    assert main(["grid", "--config", str(config)]) == 2
    assert "grid.prompts: at least one prompt is required" in one_error_line(capsys)


def test_compose_grid_places_cells_and_labels():
    cells = [[torch.full((3, 32, 48), 40 * (r * 2 + c), dtype=torch.uint8) for c in range(2)] for r in range(3)]
    image = compose_grid(cells, ["one", "two", "three"], ["base", "lora"])
    geometry = GridGeometry(3, 2, 48, 32)
    assert image.size == geometry.size == (geometry.label_width + 96, geometry.header_height + 96)
    pixels = np.asarray(image)
    for r in range(3):
        for c in range(2):
            x, y = geometry.cell_origin(r, c)
            assert (pixels[y:y + 32, x:x + 48] == 40 * (r * 2 + c)).all()
    assert (pixels[:geometry.header_height, geometry.label_width:] < 128).any()  # column labels were drawn
    assert (pixels[geometry.header_height:, :geometry.label_width] < 128).any()  # row labels were drawn
    with pytest.raises(ValueError, match="labels do not match"):
        compose_grid(cells, ["one"], ["base", "lora"])


def test_wrap_text():
    fits = lambda line: len(line) <= 10  # noqa: E731
    assert wrap_text("a red fox jumps over", fits, 3) == ["a red fox", "jumps over"]
    assert wrap_text("a red fox jumps over", fits, 1) == ["a red f..."]
    assert wrap_text("abcdefghijklmnop", lambda line: len(line) <= 5, 9) == ["abcde", "fghij", "klmno", "p"]
    assert wrap_text("", fits, 2) == []


def test_lora_labels(tmp_path):
    assert lora_label("runs/style/adapter", 1.0) == "style"
    assert lora_label("runs/style/checkpoints/step-00000100", 1.0) == "style@100"
    assert lora_label("loras/ink.safetensors", 0.5) == "ink x0.5"
