"""The training benchmark's packed case (``--max-tokens``): the row it builds, its token and FLOP counts, and a
CPU run at the tiny shape."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from transformers import AutoTokenizer

from hidream_ft import bench
from hidream_ft.model.conditioning import ConditionProcessor
from hidream_ft.model.layout import PackedLayout, SpecialTokens
from hidream_ft.model.loading import load_hf_config


def test_packed_batch_fills_the_row_with_whole_samples_of_each_size(tmp_path):
    shape_dir = bench.write_shape_dir(tmp_path, "tiny")
    tokenizer = AutoTokenizer.from_pretrained(str(shape_dir))
    collator_owner = SimpleNamespace(tokenizer=tokenizer,
                                     tokens=SpecialTokens.from_tokenizer(tokenizer, load_hf_config(shape_dir)))
    # 64 text tokens + 4 image tokens at 64², + 9 at 96²: 68, 73, 68, 73, ... and the 10th (73) passes 700.
    batch = bench.packed_batch(collator_owner, ConditionProcessor.from_pretrained(shape_dir), [64, 96], 700, 64)
    assert isinstance(batch.layout, PackedLayout)
    assert batch.size == 9 and batch.layout.token_types.shape == (1, 700)
    assert bench.sequence_lengths(batch) == [68, 73] * 4 + [68]
    assert batch.packed_target_counts == [4, 9] * 4 + [4]


def test_mean_flops_per_token_gives_each_sample_its_own_attention_length():
    lengths = [1152, 4224, 1152]
    per_token = bench.mean_flops_per_token(6_950_000_000, 36, 4096, lengths)
    expected = sum((6 * 6.95e9 + 12 * 36 * 4096 * s) * s for s in lengths) / sum(lengths)
    assert per_token == pytest.approx(expected, rel=1e-12)
    # One length: the unpacked convention exactly.
    assert bench.mean_flops_per_token(6_950_000_000, 36, 4096, [1152] * 4) == \
        bench.model_flops_per_token(6_950_000_000, 36, 4096, 1152)


def test_packed_benchmark_runs_the_trainer_step_at_tiny_shape(capsys):
    args = bench.parse_args(["--shape", "tiny", "--size", "64,96", "--max-tokens", "700", "--text-tokens", "64",
                             "--steps", "1", "--warmup", "1"])
    row = bench.run(args)
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[:9] == ["tiny", "lora", "64²,96²", "9 packed × 1", "none", "no", "adamw", "dense", "700"]
    step_s, images_per_s, tokens_per_s = float(cells[9]), float(cells[10]), float(cells[11].replace(",", ""))
    assert images_per_s == pytest.approx(9 / step_s, rel=0.05)
    assert tokens_per_s == pytest.approx(632 / step_s, rel=0.05)  # the real tokens, not the 700 of the row
    assert row in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--size", "64,96"], "need --max-tokens"),
    (["--size", "64", "--max-tokens", "100", "--text-tokens", "128"], "takes 132 tokens"),
    (["--size", "64", "--max-tokens", "700", "--attention", "split"], "packed rows need"),
])
def test_packed_options_are_checked(argv, message, capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(argv)
    assert message in capsys.readouterr().err
