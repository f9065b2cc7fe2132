"""Edit / IP sampling on the tiny model: determinism, the unconditional row, the CLI and reference grids."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from hidream_ft.inference import SamplingSettings, generate
from hidream_ft.inference.grid import GridGeometry
from hidream_ft.inference.pipeline import initial_noise, predict_x0
from hidream_ft.inference.references import ReferenceImages
from hidream_ft.model.conditioning import ConditionProcessor, prepare_references
from hidream_ft.model.reference_layout import build_reference_inputs
from hidream_ft.sample import main

FAST = ["--steps", "1", "--cfg", "1", "--size", "64x64"]


def image(width, height, seed):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


@pytest.fixture(scope="module")
def processor(tiny_checkpoint):
    return ConditionProcessor.from_pretrained(tiny_checkpoint)


@pytest.fixture(scope="module")
def reference_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("references")
    paths = []
    for i, size in enumerate([(128, 64), (64, 128)]):  # 2 patches each even at K = 2 on a 64x64 target
        paths.append(folder / f"ref{i}.png")
        image(*size, seed=i).save(paths[-1])
    return [str(p) for p in paths]


def test_edit_sampling_is_deterministic_for_a_seed(tiny_model, tokenizer, tokens, processor):
    settings = SamplingSettings(width=64, height=64, steps=2, cfg=3.0, seed=3)
    references = ReferenceImages([image(128, 64, 0)], processor)
    first = generate(tiny_model, tokenizer, tokens, "add a hat", settings, references=references)
    again = generate(tiny_model, tokenizer, tokens, "add a hat", settings, references=references)
    other_seed = generate(tiny_model, tokenizer, tokens, "add a hat", SamplingSettings(
        width=64, height=64, steps=2, cfg=3.0, seed=4), references=references)
    other_reference = generate(tiny_model, tokenizer, tokens, "add a hat", settings,
                               references=ReferenceImages([image(128, 64, 1)], processor))
    assert first.shape == (3, 64, 64) and torch.equal(first, again)
    assert not torch.equal(first, other_seed)
    assert not torch.equal(first, other_reference)


def test_unconditional_row_keeps_the_images(tiny_model, tokenizer, tokens, processor):
    refs = prepare_references([image(128, 64, 0), image(64, 128, 1)], 64, 64)  # K = 2 → S = 48: 64x32, 32x64
    assert [tuple(r.shape[1:]) for r in refs] == [(32, 64), (64, 32)]
    inputs, conditions = build_reference_inputs(tokenizer, tokens, processor, "the dog wears the hat", refs, 64, 64,
                                                guided=True)
    z = initial_noise(0, 64, 64, 8.0)
    with torch.no_grad():
        together = predict_x0(tiny_model, inputs, z, 500.0, conditions)
        alone = []
        for caption in ["the dog wears the hat", " "]:
            single, single_conditions = build_reference_inputs(tokenizer, tokens, processor, caption, refs, 64, 64,
                                                               guided=False)
            alone.append(predict_x0(tiny_model, single, z, 500.0, single_conditions))
    assert together.shape == (2, 4, 3072)  # target rows only
    torch.testing.assert_close(together[0], alone[0][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(together[1], alone[1][0], rtol=1e-5, atol=1e-5)


def test_cli_edit_sampling_records_the_references(tmp_path, tiny_checkpoint, reference_files):
    args = ["--model", str(tiny_checkpoint), "--prompt", "add a hat", "--reference", reference_files[0], *FAST]
    main([*args, "--out", str(tmp_path / "a.png")])
    main([*args, "--out", str(tmp_path / "b.png")])
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    assert json.loads(Image.open(tmp_path / "a.png").text["hidream_ft"])["references"] == reference_files[:1]


@pytest.mark.parametrize("references, message", [
    (["missing.png"], "missing.png"),
    (["{0}"] * 11, "11 reference images given; edit/IP layouts take 1 to 10"),
])
def test_cli_reference_errors_are_one_line(tmp_path, tiny_checkpoint, reference_files, capsys, references, message):
    flags = [flag for path in references for flag in ("--reference", path.format(reference_files[0]))]
    assert main(["--model", str(tiny_checkpoint), "--prompt", "x", "--out", str(tmp_path / "x.png"), *flags,
                 *FAST]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_grid_rows_are_reference_sets_times_prompts(tmp_path, tiny_checkpoint, reference_files):
    out = tmp_path / "grid.png"
    main(["grid", "--model", str(tiny_checkpoint), "--prompt", "add a hat", "--prompt", "make it brighter",
          "--reference", reference_files[0], "--reference", ",".join(reference_files), "--seed", "2", *FAST,
          "--out", str(out)])
    grid = np.asarray(Image.open(out).convert("RGB"))
    geometry = GridGeometry(rows=4, columns=1, cell_width=64, cell_height=64)
    assert (grid.shape[1], grid.shape[0]) == geometry.size
    cells = [grid[y:y + 64, x:x + 64] for x, y in (geometry.cell_origin(r, 0) for r in range(4))]
    single = tmp_path / "single.png"
    main(["--model", str(tiny_checkpoint), "--prompt", "make it brighter", "--reference", reference_files[0],
          "--seed", "2", *FAST, "--out", str(single)])
    assert np.array_equal(cells[1], np.asarray(Image.open(single).convert("RGB")))  # (reference 0, prompt 1)
    assert not np.array_equal(cells[0], cells[2])  # same prompt, other reference set
    record = json.loads(Image.open(out).text["hidream_ft"])
    assert record["references"] == [reference_files[:1], reference_files]
