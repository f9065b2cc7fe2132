"""``python -m hidream_ft.evaluate``: the grid, the score table and its error messages, on the tiny checkpoint."""

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hidream_ft.data.demo import write_demo_dataset
from hidream_ft.evaluate import ColumnScores, main, markdown_table, mean_similarity, table_header, table_rows
from hidream_ft.inference.grid import GridGeometry

SIZE = 64
FAST = ["--steps", "1", "--cfg", "1", "--size", f"{SIZE}x{SIZE}", "--seed", "3"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    path = tmp_path_factory.mktemp("references") / "dog.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (SIZE, 2 * SIZE, 3), dtype=np.uint8), "RGB").save(path)
    return path


@pytest.fixture(scope="module")
def heldout_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("heldout")
    write_demo_dataset(folder, n=2, size=(SIZE, SIZE))
    return folder


def cell(grid: Path, rows: int, columns: int, row: int, column: int) -> np.ndarray:
    pixels = np.asarray(Image.open(grid).convert("RGB"))
    geometry = GridGeometry(rows, columns, SIZE, SIZE)
    assert (pixels.shape[1], pixels.shape[0]) == geometry.size
    x, y = geometry.cell_origin(row, column)
    return pixels[y:y + SIZE, x:x + SIZE]


def read_scores(out) -> list[dict[str, str]]:
    with (out / "scores.csv").open() as f:
        return list(csv.DictReader(f))


def test_grid_and_scores_for_edit_rows(tmp_path, tiny_checkpoint, adapter_dir, dino_path, reference, heldout_folder,
                                       capsys):
    out = tmp_path / "eval"
    assert main(["--model", str(tiny_checkpoint), "--prompt", "add a hat", "--prompt", "make it blue",
                 "--reference", str(reference), "--column", "base", "--column", f"style={adapter_dir}",
                 "--dino", str(dino_path), "--heldout", str(heldout_folder), "--out", str(out), *FAST]) == 0
    cell(out / "grid.png", 2, 2, 1, 1)  # 1 reference set × 2 prompts rows, 2 columns
    scores = read_scores(out)
    assert [row["label"] for row in scores] == ["base", "style"]
    assert scores[1]["adapters"] == str(adapter_dir)
    base, style = (float(row["dino_similarity"]) for row in scores)
    assert -1 <= base <= 1 and -1 <= style <= 1 and base != style
    sigmas = [f"heldout_loss_sigma_{sigma:.2f}" for sigma in (0.1, 0.3, 0.5, 0.7, 0.9)]
    assert list(scores[0]) == ["label", "adapters", "dino_similarity", "heldout_loss", *sigmas]
    for row in scores:
        per_sigma = [float(row[column]) for column in sigmas]
        assert float(row["heldout_loss"]) == pytest.approx(sum(per_sigma) / len(per_sigma))
    assert scores[0]["heldout_loss"] != scores[1]["heldout_loss"]
    printed = capsys.readouterr().out
    assert printed.startswith((out / "scores.md").read_text()) and printed.rstrip().endswith(str(out))


def test_target_images_score_text_to_image_rows(tmp_path, tiny_checkpoint, adapter_dir, dino_path):
    args = ["--model", str(tiny_checkpoint), "--prompt", "a red circle", "--column", "base",
            "--column", f"={adapter_dir}", *FAST]
    main([*args, "--out", str(tmp_path / "first")])
    target = tmp_path / "base.png"
    Image.fromarray(cell(tmp_path / "first" / "grid.png", 1, 2, 0, 0)).save(target)
    main([*args, "--dino", str(dino_path), "--target", str(target), "--out", str(tmp_path / "second")])
    base, style = read_scores(tmp_path / "second")
    assert float(base["dino_similarity"]) == pytest.approx(1.0, abs=1e-5)  # the same seed redraws the target
    assert float(style["dino_similarity"]) < 1.0 - 1e-4
    assert style["label"] == adapter_dir.name and base["heldout_loss"] == ""  # no held-out folder: not measured


def test_score_table_layout():
    scores = [ColumnScores("base", "", 0.5, 0.25, {0.3: 0.2, 0.1: 0.1}),
              ColumnScores("a|b", "x.safetensors:0.5", None, None, {})]
    assert table_header(scores) == ["label", "adapters", "dino_similarity", "heldout_loss",
                                    "heldout_loss_sigma_0.10", "heldout_loss_sigma_0.30"]
    assert table_rows(scores)[1] == ["a|b", "x.safetensors:0.5", "", "", "", ""]
    assert table_rows(scores)[0][2:4] == ["0.5", "0.25"]
    lines = markdown_table(scores).splitlines()
    assert lines[2] == "| base | – | 0.5000 | 0.2500 | 0.1000 | 0.2000 |"
    assert lines[3] == "| a\\|b | x.safetensors:0.5 | – | – | – | – |"


def test_mean_similarity_weighs_images_not_references():
    assert mean_similarity([torch.tensor([1.0, 0.0]), torch.tensor([0.5])]) == pytest.approx(0.5)
    assert mean_similarity([]) is None


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize("args, message", [
    (["--column", "=missing/adapter"], "missing/adapter"),
    (["--reference", "missing.png"], "--reference"),
    (["--target", "missing.png"], "needs a DINO model"),
    (["--target", "missing.png", "--dino", "dino"], "--target"),
    (["--heldout", "missing"], "evaluation.heldout[0]: 'missing' is not a directory"),
])
def test_bad_input_is_one_line_and_status_2(tmp_path, tiny_checkpoint, capsys, args, message):
    assert main(["--model", str(tiny_checkpoint), "--prompt", "x", "--out", str(tmp_path / "e"), *FAST, *args]) == 2
    assert message in one_error_line(capsys)


def test_from_a_file_with_held_out_settings(tmp_path, tiny_checkpoint, adapter_dir, heldout_folder):
    config = tmp_path / "evaluate.toml"
    out = tmp_path / "from-file"
    config.write_text(f"""
model = "{tiny_checkpoint}"
out = "{out}"
prompts = ["a red circle"]
heldout = ["{heldout_folder}"]
heldout_sigmas = [0.5]
heldout_batch_size = 2
[sampling]
steps = 1
cfg = 1.0
width = {SIZE}
height = {SIZE}
[[columns]]
label = "base"
[[columns]]
loras = ["{adapter_dir}:0.5"]
""")
    assert main(["--config", str(config)]) == 0
    scores = read_scores(out)
    assert [row["adapters"] for row in scores] == ["", f"{adapter_dir}:0.5"]
    assert all(row["heldout_loss"] == row["heldout_loss_sigma_0.50"] != "" for row in scores)
    cell(out / "grid.png", 1, 2, 0, 1)


def test_file_errors_are_one_line(tmp_path, tiny_checkpoint, capsys):
    config = tmp_path / "evaluate.toml"
    config.write_text(f'model = "{tiny_checkpoint}"\nprompts = ["p"]\nheldout_sigmas = [0.5, 1.5]\n')
    assert main(["--config", str(config)]) == 2
    assert "evaluate.toml: heldout_sigmas: expected one or more σ in (0, 1], got [0.5, 1.5]" in one_error_line(capsys)
    config.write_text(f'model = "{tiny_checkpoint}"\nprompts = ["p"]\nheldout_sigmas = [0.5, 0.5]\n')
    assert main(["--config", str(config)]) == 2
    assert "evaluate.toml: heldout_sigmas: a σ is listed twice in [0.5, 0.5]" in one_error_line(capsys)
