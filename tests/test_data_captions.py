"""Caption transforms: trigger prefix, CFG dropout to " ", tag shuffling; caption decoding."""

import random
from collections import Counter

from hidream_ft.config import DataConfig
from hidream_ft.data.captions import build_caption, decode_caption, shuffle_tags
from hidream_ft.model.layout import EMPTY_PROMPT


def test_trigger_is_prefixed_once():
    cfg = DataConfig(trigger="ohwx person")
    assert build_caption("a photo on a beach", cfg, random.Random(0)) == "ohwx person, a photo on a beach"
    assert build_caption("ohwx person smiling", cfg, random.Random(0)) == "ohwx person smiling"
    assert build_caption("", cfg, random.Random(0)) == "ohwx person"


def test_empty_caption_without_trigger_is_the_unconditional_prompt():
    assert EMPTY_PROMPT == " "
    assert build_caption("", DataConfig(), random.Random(0)) == " "


def test_dropout_replaces_everything_with_a_single_space():
    always = DataConfig(trigger="sks", caption_dropout=1.0)
    assert build_caption("a dog", always, random.Random(0)) == " "
    half = DataConfig(trigger="sks", caption_dropout=0.5)
    results = [build_caption("a dog", half, random.Random(seed)) for seed in range(400)]
    dropped = results.count(" ")
    assert 150 < dropped < 250
    assert set(results) == {" ", "sks, a dog"}


def test_tag_shuffle_keeps_the_prefix_and_permutes_the_rest():
    caption = "1girl, red hair, smile, outdoors, looking at viewer, blue sky"
    orders = {shuffle_tags(caption, 2, random.Random(seed)) for seed in range(30)}
    assert len(orders) > 10
    for order in orders:
        tags = order.split(", ")
        assert tags[:2] == ["1girl", "red hair"]
        assert sorted(tags) == sorted(caption.split(", "))
    assert shuffle_tags(" a ,, b ,c ", 0, random.Random(1)).count(",") == 2  # blanks dropped, spaces trimmed


def test_tag_shuffle_happens_before_the_trigger_and_is_reproducible():
    cfg = DataConfig(trigger="sks", shuffle_tags=True, keep_tags=1)
    first = build_caption("cat, sofa, lamp, rug, window", cfg, random.Random("x"))
    assert first == build_caption("cat, sofa, lamp, rug, window", cfg, random.Random("x"))
    assert first.startswith("sks, cat, ")


def test_dropout_setting_does_not_change_the_tag_order():
    caption = "a, b, c, d, e, f"
    no_dropout = DataConfig(shuffle_tags=True)
    some_dropout = DataConfig(shuffle_tags=True, caption_dropout=0.01)
    for seed in range(20):
        kept = build_caption(caption, some_dropout, random.Random(seed))
        if kept != " ":
            assert kept == build_caption(caption, no_dropout, random.Random(seed))


def test_non_utf8_caption_is_decoded_with_replacement_and_counted():
    counts = Counter()
    assert decode_caption("café au lait".encode("utf-8"), counts, "a.txt") == "café au lait"
    assert decode_caption("\ufeffbom first\n".encode("utf-8"), counts, "b.txt") == "bom first"
    assert counts["caption_not_utf8"] == 0
    assert decode_caption("café".encode("latin-1"), counts, "c.txt") == "caf\ufffd"
    assert counts["caption_not_utf8"] == 1
