"""The project tried from outside: fast --help and config errors, one-line errors before the model loads,
Ctrl-C, a full disk, oversized images, no bitsandbytes noise, and a demo folder that can be moved."""

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest
from PIL import Image

from helpers import pythonpath_with_tests, wait_for
from hidream_ft.config import DataConfig, load_config
from hidream_ft.data.images import ImageTooLarge, decode_rgb
from hidream_ft.data.samples import make_sample
from hidream_ft.demo import write_demo
from hidream_ft.train import main as train_main

ENV = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=pythonpath_with_tests())


def python(code: str, cwd=None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, cwd=cwd,
                          timeout=timeout)


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


# -- start-up --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("args", [["--help"], ["--config", "CONFIG", "--set", "optim.lrr=1"]])
def test_help_and_config_errors_answer_without_loading_torch(tmp_path, args):
    config = tmp_path / "c.toml"
    config.write_text("")
    argv = [str(config) if a == "CONFIG" else a for a in args]
    code = ("import sys\nfrom hidream_ft.train import main\n"
            f"try:\n    status = main({argv!r})\nexcept SystemExit as e:\n    status = e.code\n"
            "print(sorted(m for m in ('torch', 'transformers', 'peft', 'bitsandbytes') if m in sys.modules))\n"
            "sys.exit(status)\n")
    start = time.perf_counter()
    result = python(code)
    elapsed = time.perf_counter() - start
    assert result.stdout.strip().splitlines()[-1] == "[]", result.stdout + result.stderr
    assert result.returncode == (0 if args == ["--help"] else 2), result.stderr
    assert elapsed < 3.0, f"{args}: {elapsed:.1f} s"


# -- one-line errors -------------------------------------------------------------------------------------

@pytest.mark.parametrize("override, message", [
    ("logging.log_every=0", "logging.log_every: must be ≥ 1"),
    ("optim.betas=[0.9]", "optim.betas: expected two numbers"),
    ("checkpoint.every=-1", "checkpoint.every: must be ≥ 0"),
    ("checkpoint.resume='/nowhere/step-00000010'", "not a complete checkpoint"),
    ("data.folders=['/nowhere/images']", "data.folders[0]: '/nowhere/images' is not a directory"),
    ("data.shards=['/nowhere/shard-{000..001}.tar']", "data.shards: '/nowhere/shard-000.tar' is not a file"),
    ("model.weights='/nowhere/model.safetensors'", "model.weights: '/nowhere/model.safetensors' is not a file"),
])
def test_bad_values_and_missing_inputs_stop_before_the_model_loads(tmp_path, capsys, monkeypatch, override,
                                                                     message):
    config = write_demo(tmp_path / "demo", steps=1)

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the inputs were checked")

    monkeypatch.setattr("hidream_ft.trainer.load_model", no_model)
    folders = ["--set", "data.folders=[]"] if override.startswith("data.shards") else []
    assert train_main(["--config", str(config), *folders, "--set", override]) == 2
    assert message in one_error_line(capsys)


# -- Ctrl-C and a full disk, in a training process --------------------------------------------------------

def test_ctrl_c_checkpoints_at_the_next_step_and_exits_without_a_traceback(tmp_path):
    config = write_demo(tmp_path / "demo", steps=1000)
    out = tmp_path / "demo" / "output"
    process = subprocess.Popen(
        [sys.executable, "-m", "hidream_ft.train", "--config", str(config), "--set", "checkpoint.every=0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        wait_for(lambda: (out / "config.toml").is_file() or process.poll() is not None, "the trainer to start",
                 timeout=240)
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=240)
    finally:
        process.kill()
    assert process.returncode == 75, err[-3000:]
    assert "Traceback" not in err and "caught SIGINT" in err
    assert list((out / "checkpoints").glob("step-*/COMPLETE")), err[-3000:]


def test_second_ctrl_c_aborts_at_once():
    from hidream_ft.runtime.preemption import ABORT_AFTER_S, PreemptionHandler

    with PreemptionHandler() as handler:
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)  # the same Ctrl-C forwarded by torchrun: not a second one
        assert handler.signal_received
        time.sleep(ABORT_AFTER_S)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)


def test_a_full_disk_while_checkpointing_is_one_line_naming_the_folder(tmp_path):
    config = write_demo(tmp_path / "demo", steps=3)
    checkpoints = tmp_path / "demo" / "output" / "checkpoints"
    code = f"""
import errno, sys
import torch.distributed.checkpoint.filesystem as filesystem
from hidream_ft.train import main

real_write, saves = filesystem._write_item, []

def write_item(*args, **kwargs):  # the second checkpoint finds the disk full
    if len(saves) > 0 and saves[-1] != 'first':
        raise OSError(errno.ENOSPC, 'No space left on device')
    return real_write(*args, **kwargs)

filesystem._write_item = write_item
import hidream_ft.runtime.checkpoint as checkpoint
real_save = checkpoint.Checkpointer._write

def counted(self, *args, **kwargs):
    saves.append('first' if not saves else 'second')
    return real_save(self, *args, **kwargs)

checkpoint.Checkpointer._write = counted
sys.exit(main(['--config', {str(config)!r}, '--set', 'checkpoint.every=1']))
"""
    result = python(code)
    assert result.returncode == 2, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert last.startswith(f"error: {checkpoints}: no space left on the device"), last
    assert f"the last complete checkpoint, {checkpoints / 'step-00000001'}, is intact" in last
    assert (checkpoints / "step-00000001" / "COMPLETE").is_file()
    assert not list(checkpoints.glob(".step-*.tmp"))


# -- data ------------------------------------------------------------------------------------------------

def png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 10, 10)).save(buffer, "PNG")
    return buffer.getvalue()


def test_images_over_the_pixel_cap_are_skipped_from_the_header(monkeypatch):
    assert DataConfig().max_image_pixels == 8192 * 8192
    source = png(200, 100)

    def no_decode(self):
        raise AssertionError("decoded")

    with monkeypatch.context() as patch:
        patch.setattr(Image.Image, "load", no_decode)
        with pytest.raises(ImageTooLarge, match="200x100 is 20,000 pixels, more than data.max_image_pixels"):
            decode_rgb(source, Counter(), "big.png", max_pixels=19_999)
    cfg = load_config(None, ["data.max_image_pixels=19999"]).data
    counts = Counter()
    assert make_sample(source, "big.png", "big", "a caption", 1.0, (64, 64), cfg, (0,), counts) is None
    assert counts == {"too_large_skipped": 1}
    assert make_sample(png(100, 100), "ok.png", "ok", "a caption", 1.0, (64, 64), cfg, (0,), counts) is not None


# -- the demo as a newcomer runs it ------------------------------------------------------------------------

def test_config_paths_starting_with_dot_are_relative_to_the_file(tmp_path):
    config = tmp_path / "project" / "train.toml"
    config.parent.mkdir()
    config.write_text('[model]\npath = "./model"\n[logging]\noutput_dir = "runs/x"\n'
                      '[[data.folders]]\npath = "../images"\ncontrol_dir = "./controls"\n')
    cfg = load_config(config, ["model.weights='./w.safetensors'"])
    assert cfg.model.path == str(tmp_path / "project" / "model")
    assert cfg.data.folders[0].path == str(tmp_path / "images")
    assert cfg.data.folders[0].control_dir == str(tmp_path / "project" / "controls")
    assert cfg.logging.output_dir == "runs/x"  # relative to where the command runs
    assert cfg.model.weights == "./w.safetensors"  # --set: relative to where the command runs


def test_moved_demo_trains_quietly_without_bitsandbytes(tmp_path):
    write_demo(tmp_path / "first", steps=2)
    shutil.move(tmp_path / "first", tmp_path / "moved")
    code = ("import sys\nfrom hidream_ft.train import main\n"
            "status = main(['--config', 'moved/train.toml'])\n"
            "print('bitsandbytes imported:', 'bitsandbytes' in sys.modules)\nsys.exit(status)\n")
    result = python(code, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "bitsandbytes imported: False" in result.stdout
    assert "gemm_4bit" not in result.stderr and "kernels-community" not in result.stderr
    # The progress bar is closed before the last line, which is not followed by a redrawn bar.
    assert result.stderr.rstrip().splitlines()[-1].startswith("finished at step 2"), result.stderr[-2000:]
    adapter = json.loads((tmp_path / "moved" / "output" / "adapter" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == os.path.join("moved", "tiny-model")
