"""Multi-process training on CPU (gloo): sharded equivalence, exact resume, resharding."""

import json

import pytest

from helpers import WORKERS, run_python, set_flags

pytestmark = pytest.mark.distributed


def mode_options(mode):
    heads = ["lora.train_heads=['final_layer2']"] if mode == "lora" else []
    return [f"train.mode={mode}", "train.max_steps=4", *heads]


def run_worker(tiny_checkpoint, tmp_path, name, nproc, steps, run_dir, mode, *flags):
    out = tmp_path / f"{name}.json"
    run_python(WORKERS / "fixed_batches.py", tiny_checkpoint, run_dir, out, steps, *flags,
               *set_flags(*mode_options(mode)), nproc=nproc)
    return json.loads(out.read_text())


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_two_ranks_match_one_rank_on_the_same_global_batch(tiny_checkpoint, tmp_path, mode):
    one = run_worker(tiny_checkpoint, tmp_path, "one", 1, 3, tmp_path / "r1", mode)
    two = run_worker(tiny_checkpoint, tmp_path, "two", 2, 3, tmp_path / "r2", mode)
    for step, loss in one["losses"].items():
        assert two["losses"][step] == pytest.approx(loss, rel=1e-5, abs=1e-6)
    for key, values in one["params"].items():
        assert two["params"][key] == pytest.approx(values, rel=1e-3, abs=1e-5), key


def test_resume_is_bit_exact(tiny_checkpoint, tmp_path):
    run = tmp_path / "run"
    straight = run_worker(tiny_checkpoint, tmp_path, "straight", 2, 4, tmp_path / "straight", "full")
    run_worker(tiny_checkpoint, tmp_path, "first", 2, 4, run, "full", "--save-at", 2)
    assert (tmp_path / "run" / "checkpoints" / "step-00000002" / "COMPLETE").is_file()
    resumed = run_worker(tiny_checkpoint, tmp_path, "second", 2, 4, run, "full", "--resume")
    assert resumed["losses"] == {k: v for k, v in straight["losses"].items() if int(k) > 2}
    assert resumed["digest"] == straight["digest"]


@pytest.mark.parametrize("save_ranks, load_ranks", [(2, 1), (1, 2)])
def test_checkpoints_reshard(tiny_checkpoint, tmp_path, save_ranks, load_ranks):
    run = tmp_path / "run"
    straight = run_worker(tiny_checkpoint, tmp_path, "straight", save_ranks, 4, tmp_path / "s", "lora")
    run_worker(tiny_checkpoint, tmp_path, "first", save_ranks, 4, run, "lora", "--save-at", 2)
    resumed = run_worker(tiny_checkpoint, tmp_path, "second", load_ranks, 4, run, "lora", "--resume")
    for step in ("3", "4"):
        assert resumed["losses"][step] == pytest.approx(straight["losses"][step], rel=1e-5, abs=1e-6)
    for key, values in straight["params"].items():
        assert resumed["params"][key] == pytest.approx(values, rel=1e-3, abs=1e-5), key


def test_checkpoints_go_from_one_process_to_two_and_back(tiny_checkpoint, tmp_path):
    """One process trains a plain module, two an FSDP-sharded one; DCP reshards between them."""
    run = tmp_path / "run"
    straight = run_worker(tiny_checkpoint, tmp_path, "straight", 1, 4, tmp_path / "s", "full")
    run_worker(tiny_checkpoint, tmp_path, "first", 1, 4, run, "full", "--save-at", 2)
    run_worker(tiny_checkpoint, tmp_path, "second", 2, 4, run, "full", "--resume", "--save-at", 3)
    resumed = run_worker(tiny_checkpoint, tmp_path, "third", 1, 4, run, "full", "--resume")
    assert list(resumed["losses"]) == ["4"]
    assert resumed["losses"]["4"] == pytest.approx(straight["losses"]["4"], rel=1e-5, abs=1e-6)
    for key, values in straight["params"].items():
        assert resumed["params"][key] == pytest.approx(values, rel=1e-3, abs=1e-5), key


def test_a_replicated_frozen_base_is_not_sharded_and_matches_one_rank(tiny_checkpoint, tmp_path):
    one = run_worker(tiny_checkpoint, tmp_path, "one", 1, 3, tmp_path / "r1", "lora")
    sharded = run_worker(tiny_checkpoint, tmp_path, "sharded", 2, 3, tmp_path / "r2", "lora")
    replicated = run_worker(tiny_checkpoint, tmp_path, "replicated", 2, 3, tmp_path / "r3", "lora",
                            *set_flags("parallel.frozen_base=replicated"))
    assert sharded["frozen_shards"] > 0 and replicated["frozen_shards"] == 0
    for step, loss in one["losses"].items():
        assert replicated["losses"][step] == pytest.approx(loss, rel=1e-5, abs=1e-6)
    for key, values in one["params"].items():
        assert replicated["params"][key] == pytest.approx(values, rel=1e-3, abs=1e-5), key
