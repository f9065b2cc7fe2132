"""Fold LoRAs and full fine-tunes into the base model; write the official HF layout or one ComfyUI file.

    W' = W + Σᵢ weightᵢ · ΔWᵢ(W),   W = W_ft or W_base             (computed in fp32, then cast)

with ΔW = scale · B · A for a LoRA and each other kind's own update (:mod:`hidream_ft.lora.adapter`).

Streaming: the base shards are memory-mapped and processed one tensor at a time, and each output file is
written tensor by tensor behind a header laid out in advance (:class:`StreamingSafetensorsWriter`). Peak
memory is a few tensors plus the adapters (and the fine-tuned state dict, when merging a step-N/ folder of a
full fine-tune) — never a second copy of the model.

Layouts:
    hf       model-0000i-of-0000n.safetensors + model.safetensors.index.json (or one model.safetensors), with
             config.json, tokenizer and processor files copied from the base directory; loads with
             :func:`hidream_ft.model.load_model`, the official pipeline and ``from_pretrained``.
    comfyui  one .safetensors under the official ``model.…`` names, as Comfy-Org publishes HiDream-O1 (and
             musubi-tuner and ai-toolkit load it): without ``lm_head`` and the ViT's DeepStack mergers, which
             ComfyUI's model does not have (:data:`hidream_ft.model.loading.COMFYUI_OMITTED`).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import struct
from collections import defaultdict
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch

from hidream_ft.convert.sources import TensorSource
from hidream_ft.errors import listing
from hidream_ft.lora import AdapterModule, ConvertError, LoraAdapter, check_fits
from hidream_ft.model.dtypes import SAFETENSORS_DTYPES, TORCH_DTYPES, dtype_name, safetensors_code
from hidream_ft.model.loading import COMFYUI_OMITTED, INDEX_FILE, SINGLE_FILE, weight_files
from hidream_ft.model.safetensors_io import open_safetensors

LAYOUTS = ("hf", "comfyui")
DEFAULT_SHARD_BYTES = 5_000_000_000
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
_SHARD_NAME = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors")


class StreamingSafetensorsWriter:
    """One ``.safetensors`` file written tensor by tensor; names, dtypes and shapes are fixed up front.

    The file appears under its name only when every tensor has been written (``.partial`` until then).
    """

    def __init__(self, path: Path, entries: Sequence[tuple[str, torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str]):
        header: dict = {"__metadata__": metadata}
        offset = 0
        for name, dtype, shape in entries:
            size = math.prod(shape) * dtype.itemsize
            header[name] = {"dtype": safetensors_code(dtype), "shape": list(shape),
                            "data_offsets": [offset, offset + size]}
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the format aligns the tensor data on 8 bytes
        self.path = path
        self._partial = path.with_name(path.name + ".partial")
        self._pending = list(entries)[::-1]
        self._file = open(self._partial, "wb")
        self._file.write(struct.pack("<Q", len(raw)))
        self._file.write(raw)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if not self._pending:
            raise ConvertError(f"{self.path}: {name} is one tensor more than the header declares")
        expected_name, dtype, shape = self._pending.pop()
        if (name, tensor.dtype, tuple(tensor.shape)) != (expected_name, dtype, shape):
            raise ConvertError(f"{self.path}: expected {expected_name} {dtype} {list(shape)} next, "
                               f"got {name} {tensor.dtype} {list(tensor.shape)}")
        self._file.write(memoryview(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()))

    def __enter__(self) -> "StreamingSafetensorsWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._file.close()
        if exc_type is not None or self._pending:
            self._partial.unlink(missing_ok=True)
        if exc_type is None and self._pending:
            raise ConvertError(f"{self.path}: {len(self._pending)} declared tensors were never written")
        if exc_type is None:
            os.replace(self._partial, self.path)


@dataclass(frozen=True)
class _Entry:
    key: str  # in the base checkpoint and the output
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def weight_shapes(base_dir: str | Path) -> dict[str, tuple[int, ...]]:
    """Every weight's shape in the base checkpoint, from the safetensors headers (nothing is loaded)."""
    files = weight_files(base_dir)
    shapes = {}
    for file in sorted(set(files.values())):
        with open_safetensors(file) as f:
            shapes.update({key: tuple(f.get_slice(key).get_shape()) for key in f.keys() if files.get(key) == file})
    return shapes


def base_weights(base_dir: str | Path) -> Callable[[str], torch.Tensor]:
    """A module path's base weight (``<path>.weight``), read from the checkpoint when asked for."""
    files = weight_files(base_dir)

    def read(path: str) -> torch.Tensor:
        with open_safetensors(files[f"{path}.weight"]) as f:
            return f.get_tensor(f"{path}.weight")

    return read


def _check_full(full: TensorSource, shapes: dict[str, tuple[int, ...]], base_dir: Path) -> None:
    unknown = [k for k in full.keys() if k not in shapes]
    if unknown:
        raise ConvertError(f"{full.where} has {len(unknown)} weights the base model at {base_dir} lacks: "
                           f"{listing(unknown)}")
    wrong = [f"{k}: {list(full.shape(k))} vs base {list(shapes[k])}" for k in full.keys()
             if full.shape(k) != shapes[k]]
    if wrong:
        raise ConvertError(f"{full.where} does not fit the base model at {base_dir} (another model?): "
                           f"{listing(wrong, 4)}")


def _shard(entries: list[_Entry], max_bytes: int) -> list[list[_Entry]]:
    shards: list[list[_Entry]] = [[]]
    size = 0
    for entry in entries:
        if shards[-1] and size + entry.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += entry.nbytes
    return shards


def _copy_side_files(base_dir: Path, out: Path, dtype: torch.dtype | None) -> None:
    """Config, tokenizer, chat template, processor config …: everything but the weights."""
    for item in sorted(base_dir.iterdir()):
        if item.is_file() and item.suffix not in WEIGHT_SUFFIXES and not item.name.endswith(".index.json"):
            shutil.copy2(item, out / item.name)
    config_file = out / "config.json"
    if dtype in TORCH_DTYPES.values() and config_file.is_file():
        config = json.loads(config_file.read_text())
        config["torch_dtype"] = dtype_name(dtype)
        config_file.write_text(json.dumps(config, indent=2))


def _write_hf(out: Path, entries: list[_Entry], produce: Callable[[_Entry], torch.Tensor],
              metadata: dict[str, str], max_shard_bytes: int) -> None:
    shards = _shard(entries, max_shard_bytes)
    count = len(shards)
    names = [SINGLE_FILE] if count == 1 else [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
    weight_map = {}
    for name, shard in zip(names, shards):
        with StreamingSafetensorsWriter(out / name, [(e.key, e.dtype, e.shape) for e in shard], metadata) as w:
            for entry in shard:
                w.write(entry.key, produce(entry))
        weight_map.update({entry.key: name for entry in shard})
    for stale in out.iterdir():  # shards of an earlier export into the same directory
        if _SHARD_NAME.fullmatch(stale.name) and stale.name not in names:
            stale.unlink()
    index = out / INDEX_FILE
    if count == 1:
        index.unlink(missing_ok=True)  # a stale index would shadow the single file
    else:
        total = sum(e.nbytes for e in entries)
        index.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def merge_checkpoint(
    base_dir: str | Path,
    out: str | Path,
    *,
    layout: str = "hf",
    loras: Sequence[tuple[LoraAdapter, float]] = (),
    full: TensorSource | None = None,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write base + full fine-tune (``full``) + Σ weight·LoRA as ``layout`` at ``out`` (a directory for hf,
    a ``.safetensors`` file for comfyui). ``dtype`` casts floating tensors (None keeps the base dtypes).
    ``base_dir`` is the official directory or, for the comfyui layout, also a ComfyUI single file."""
    base_dir, out = Path(base_dir), Path(out)
    if layout not in LAYOUTS:
        raise ConvertError(f"unknown layout {layout!r}; choose from {', '.join(LAYOUTS)}")
    if layout == "comfyui" and out.suffix != ".safetensors":
        raise ConvertError(f"{out}: a ComfyUI checkpoint is a single file; name it *.safetensors")
    if layout == "hf" and (out.is_file() or (out.exists() and out.resolve() == base_dir.resolve())):
        raise ConvertError(f"{out}: the hf layout needs a new or existing output directory other than the base")
    if layout == "hf" and base_dir.is_file():
        raise ConvertError(f"{base_dir}: the hf layout needs the official HiDream-O1-Image folder as the base; "
                           "a single file lacks its config, tokenizer (and maybe lm_head and DeepStack mergers)")
    files = weight_files(base_dir)
    metadata = {"format": "pt", **(metadata or {})}
    deltas: dict[str, list[tuple[AdapterModule, float]]] = defaultdict(list)
    for adapter, weight in loras:
        for path, module in adapter.modules.items():
            deltas[f"{path}.weight"].append((module, weight))

    with ExitStack() as stack:
        handles = {f: stack.enter_context(open_safetensors(f)) for f in sorted(set(files.values()))}
        slices = {key: handles[file].get_slice(key) for key, file in files.items()}
        shapes = {key: tuple(s.get_shape()) for key, s in slices.items()}
        for adapter, _ in loras:
            check_fits(adapter, shapes, f"the base model at {base_dir}")
        if full is not None:
            _check_full(full, shapes, base_dir)

        def produce(entry: _Entry) -> torch.Tensor:
            use_full = full is not None and entry.key in full
            tensor = full.get(entry.key) if use_full else handles[files[entry.key]].get_tensor(entry.key)
            if entry.key in deltas:
                merged = tensor.to(torch.float32, copy=True)
                for module, weight in deltas[entry.key]:
                    if module.kind == "lora":
                        merged.addmm_(module.up.float(), module.down.float(), alpha=weight * module.scale)
                    else:  # relative to the unmerged weight, so stacked adapters add up in any order
                        merged.add_(module.delta(tensor), alpha=weight)
                tensor = merged
            return tensor.to(entry.dtype)

        entries = []
        for key in sorted(files, key=lambda k: (str(files[k]), k)):
            if layout == "comfyui" and key.startswith(COMFYUI_OMITTED):
                continue
            base_dtype = SAFETENSORS_DTYPES[slices[key].get_dtype()]
            out_dtype = dtype if dtype is not None and base_dtype.is_floating_point else base_dtype
            entries.append(_Entry(key, out_dtype, shapes[key]))

        if layout == "hf":
            out.mkdir(parents=True, exist_ok=True)
            _write_hf(out, entries, produce, metadata, max_shard_bytes)
            _copy_side_files(base_dir, out, dtype)
        else:
            out.parent.mkdir(parents=True, exist_ok=True)
            with StreamingSafetensorsWriter(out, [(e.key, e.dtype, e.shape) for e in entries], metadata) as w:
                for entry in entries:
                    w.write(entry.key, produce(entry))
    return out
