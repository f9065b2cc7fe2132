"""Generate images with HiDream-O1-Image and optional LoRAs (docs/sampling.md).

    python -m hidream_ft.sample --model DIR --prompt "a red fox" [--lora FILE_OR_DIR[:WEIGHT] ...]
        [--preset full|dev|dev-2604] [--steps 50] [--cfg 5] [--shift 3] [--scheduler unipc|flow_match|flash]
        [--timesteps dev|999,987,...] [--seed 0] [--size 1024x1024] [--reference IMAGE ...] --out image.png

    python -m hidream_ft.sample grid --config grid.toml
    python -m hidream_ft.sample grid --model DIR --prompt P1 --prompt P2 \\
        --column base --column "style=runs/style/adapter" --column "=a.safetensors,b.safetensors:0.5" --out grid.png
        [--reference dog.png --reference cat.png,hat.png]      # rows = reference set × prompt (edit / IP)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from PIL.PngImagePlugin import PngInfo

from hidream_ft.cli import entry_point, image_size
from hidream_ft.config import AttentionKind, ConfigError, ModelDtype, build_table, read_toml
from hidream_ft.inference.grid import GridColumn, render_grid, to_pil
from hidream_ft.convert import load_adapter
from hidream_ft.lora import lora_applied, lora_label, parse_lora_spec
from hidream_ft.inference.pipeline import generate
from hidream_ft.flow.schedules import DEFAULT_TIMESTEPS, SCHEDULERS
from hidream_ft.config.sampling import RECIPES, SamplingSettings
from hidream_ft.errors import UserError
from hidream_ft.model import SpecialTokens, load_hf_config, load_model, load_tokenizer
from hidream_ft.model.dtypes import TORCH_DTYPES
from hidream_ft.inference.references import ReferenceImages


@dataclass
class GridColumnSpec:
    label: str = ""  # empty: derived from the LoRA names ("base" without LoRAs)
    loras: list[str] = field(default_factory=list)  # PATH or PATH:WEIGHT


@dataclass
class GridFile:
    """The ``grid --config`` TOML file; ``[sampling]`` takes the sampler keys, over the ``preset`` recipe."""

    model: str = ""
    weights: str = ""  # one .safetensors file with the weights instead of model's
    out: str = "grid.png"
    prompts: list[str] = field(default_factory=list)
    references: list[list[str]] = field(default_factory=list)  # edit / IP: one image set per row group
    columns: list[GridColumnSpec] = field(default_factory=lambda: [GridColumnSpec()])
    preset: Literal["full", "dev", "dev-2604"] = "full"
    dtype: ModelDtype = "auto"
    device: str = ""
    sampling: SamplingSettings = field(default_factory=SamplingSettings)

    def check_complete(self, where: str) -> None:
        """After the command-line flags are merged in (so not a ``validate`` run while the file is read)."""
        if not self.model:
            raise ConfigError(f"{where}: model is required (the HiDream-O1-Image folder)")
        if not self.prompts:
            raise ConfigError(f"{where}.prompts: at least one prompt is required")
        if not self.columns:
            raise ConfigError(f"{where}.columns: at least one column is required")


def parse_timesteps(text: str) -> list[int]:
    """``dev`` (the Dev model's 28 timesteps) or a comma-separated list of integers."""
    if text == "dev":
        return list(DEFAULT_TIMESTEPS)
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"timesteps {text!r}: expected 'dev' or integers like 999,500,100") from None


def add_model_arguments(parser: argparse.ArgumentParser, model_required: bool) -> None:
    parser.add_argument("--model", required=model_required, help="HiDream-O1-Image folder (official layout)")
    parser.add_argument("--weights", default=None, metavar="FILE",
                        help="one .safetensors file (e.g. ComfyUI's) with the weights instead of --model's")
    parser.add_argument("--dtype", choices=typing.get_args(ModelDtype), default=None,
                        help="weights dtype; auto = bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--device", default=None, help="cuda, cuda:1, cpu …; default: cuda if available")
    parser.add_argument("--attention", choices=typing.get_args(AttentionKind), default="auto",
                        help="hybrid attention kernel; auto = flex on CUDA, split on CPU")


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("sampling (unset flags come from --preset)")
    group.add_argument("--preset", choices=sorted(RECIPES), default=None,
                       help="official recipe: full (default), dev, dev-2604")
    group.add_argument("--steps", type=int)
    group.add_argument("--cfg", type=float, help="guidance scale; ≤ 1 disables the unconditional pass")
    group.add_argument("--shift", type=float)
    group.add_argument("--scheduler", choices=SCHEDULERS)
    group.add_argument("--timesteps", type=parse_timesteps, help="'dev' or 999,987,…: overrides --steps/--shift")
    group.add_argument("--noise-scale", dest="noise_scale", type=float)
    group.add_argument("--noise-scale-end", dest="noise_scale_end", type=float, help="flash: last-step noise")
    group.add_argument("--noise-clip-std", dest="noise_clip_std", type=float, help="flash: clip noise (0 = off)")
    group.add_argument("--seed", type=int)
    group.add_argument("--size", type=image_size, help="WIDTHxHEIGHT, multiples of 32")


def sampling_settings(args: argparse.Namespace, base: SamplingSettings | None = None) -> SamplingSettings:
    """``base`` (default: the preset's recipe), then every sampling flag that was given."""
    if base is None:
        base = SamplingSettings(**RECIPES[args.preset or "full"])
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(SamplingSettings)
             if getattr(args, f.name, None) is not None}
    if args.size is not None:
        given["width"], given["height"] = args.size
    settings = dataclasses.replace(base, **given)
    settings.validate("sampling")
    return settings


def load_for_sampling(path: str, dtype: str | None, device: str | None, attention: str, weights: str | None = None):
    """(model in eval mode, tokenizer, special tokens, device)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or "auto"
    if dtype == "auto":
        torch_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        torch_dtype = TORCH_DTYPES[dtype]
    config = load_hf_config(path)
    tokenizer = load_tokenizer(path)
    tokens = SpecialTokens.from_tokenizer(tokenizer, config)
    model = load_model(path, weights=weights, dtype=torch_dtype, device=device, attention=attention,
                       tokenizer=tokenizer).eval()
    return model, tokenizer, tokens, device


def open_references(paths: list[str], model_path: str) -> ReferenceImages:
    """The ``--reference`` images; an unreadable file is the user's to fix (a wrong count already raises a
    :class:`UserError`)."""
    try:
        return ReferenceImages.open(paths, model_path)
    except OSError as e:
        raise UserError(f"--reference: {e}") from None


def png_info(record: dict) -> PngInfo:
    """The generation parameters, stored as a PNG text chunk so an image documents how it was made."""
    info = PngInfo()
    info.add_text("hidream_ft", json.dumps(record, sort_keys=True))
    return info


def save_png(image, out: str | Path, record: dict) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out, format="PNG", pnginfo=png_info(record))
    return out


def run_single(argv: list[str]) -> Path:
    parser = argparse.ArgumentParser(prog="python -m hidream_ft.sample", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser, model_required=True)
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--reference", action="append", default=[], metavar="IMAGE",
                        help="edit / IP reference image; repeat for several subjects (at most 10)")
    parser.add_argument("--lora", action="append", default=[], metavar="FILE_OR_DIR[:WEIGHT]",
                        help="LoRA file (any key style), PEFT folder or training run; repeat to stack")
    parser.add_argument("--out", required=True, help="output PNG")
    add_sampling_arguments(parser)
    args = parser.parse_args(argv)
    settings = sampling_settings(args)
    specs = [parse_lora_spec(spec) for spec in args.lora]
    loras = [(load_adapter(path), weight) for path, weight in specs]
    references = open_references(args.reference, args.model) if args.reference else None
    model, tokenizer, tokens, device = load_for_sampling(args.model, args.dtype, args.device, args.attention,
                                                         args.weights)
    with lora_applied(model, loras):
        image = generate(model, tokenizer, tokens, args.prompt, settings, device, progress=True,
                         references=references)
    record = {"prompt": args.prompt, "model": args.model, "loras": [[p, w] for p, w in specs],
              "references": args.reference, "settings": dataclasses.asdict(settings)}
    return save_png(to_pil(image), args.out, record)


def parse_column(text: str) -> GridColumnSpec:
    """``LABEL``, ``LABEL=PATH[:W],PATH[:W]`` or ``=PATH[:W],…`` (label derived from the LoRA names)."""
    label, sep, loras = text.partition("=")
    if not sep:
        return GridColumnSpec(label=text)
    return GridColumnSpec(label=label, loras=[spec for spec in loras.split(",") if spec])


def read_grid_file(path: str | Path, schema: type[GridFile] = GridFile) -> GridFile:
    """A grid TOML file as ``schema`` (GridFile or a command's extension of it)."""
    path = Path(path)
    table = read_toml(path, "grid file")
    preset = table.get("preset", "full")
    if preset not in RECIPES:
        raise ConfigError(f"{path}: preset: {preset!r} is not one of {', '.join(map(repr, RECIPES))}")
    sampling = table.get("sampling", {})
    if not isinstance(sampling, dict):
        raise ConfigError(f"{path}: sampling: expected a table, got {sampling!r}")
    table = {**table, "sampling": {**RECIPES[preset], **sampling}}
    try:
        return build_table(schema, table)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def add_grid_arguments(parser: argparse.ArgumentParser, out_help: str) -> None:
    parser.add_argument("--config", help="grid TOML file (docs/sampling.md); flags below override it")
    add_model_arguments(parser, model_required=False)
    parser.add_argument("--prompt", action="append", default=[], help="a grid row; repeat for more rows")
    parser.add_argument("--reference", action="append", default=[], metavar="IMAGE[,IMAGE…]",
                        help="edit / IP reference set: rows become every (reference set, prompt) pair")
    parser.add_argument("--column", action="append", default=[], type=parse_column,
                        metavar="LABEL[=PATH[:W],…]", help="a grid column; repeat for more columns")
    parser.add_argument("--out", help=out_help)
    add_sampling_arguments(parser)


def resolve_grid(parser: argparse.ArgumentParser, args: argparse.Namespace, schema: type[GridFile] = GridFile,
                 where: str = "grid") -> tuple[GridFile, SamplingSettings]:
    """The ``--config`` file (or ``schema``'s defaults) with the :func:`add_grid_arguments` flags merged in, and
    the sampling settings."""
    if args.config:
        grid = read_grid_file(args.config, schema)
        if args.preset is not None:
            parser.error("--preset cannot override a grid file; set preset in the file")
        base = grid.sampling
    else:
        grid = schema()
        base = None
    grid.model = args.model or grid.model
    grid.weights = args.weights or grid.weights
    grid.prompts = args.prompt or grid.prompts
    grid.references = [spec.split(",") for spec in args.reference] or grid.references
    grid.columns = args.column or grid.columns
    grid.out = args.out or grid.out
    grid.dtype = args.dtype or grid.dtype
    grid.device = args.device or grid.device
    grid.check_complete(where)
    return grid, sampling_settings(args, base)


def load_columns(specs: list[GridColumnSpec]) -> list[GridColumn]:
    """Each column with its adapters read; an unlabelled column is named after its LoRAs ("base" without)."""
    columns = []
    for spec in specs:
        parsed = [parse_lora_spec(lora) for lora in spec.loras]
        label = spec.label or " + ".join(lora_label(path, weight) for path, weight in parsed) or "base"
        columns.append(GridColumn(label, [(load_adapter(path), weight) for path, weight in parsed]))
    return columns


def open_reference_sets(sets: list[list[str]], model_path: str) -> list[tuple[str, ReferenceImages]]:
    """Each reference set, labelled with its file names, as ``render_grid`` takes them."""
    return [(" + ".join(Path(p).name for p in paths), open_references(paths, model_path)) for paths in sets]


def grid_record(grid: GridFile, settings: SamplingSettings, columns: list[GridColumn]) -> dict:
    """What a grid PNG stores about how it was made (:func:`png_info`)."""
    return {"prompts": grid.prompts, "references": grid.references, "model": grid.model,
            "settings": dataclasses.asdict(settings),
            "columns": [{"label": c.label, "loras": s.loras} for c, s in zip(columns, grid.columns)]}


def run_grid(argv: list[str]) -> Path:
    parser = argparse.ArgumentParser(prog="python -m hidream_ft.sample grid",
                                     description="Render a prompts × configurations comparison grid.")
    add_grid_arguments(parser, "output PNG")
    args = parser.parse_args(argv)
    grid, settings = resolve_grid(parser, args)
    columns = load_columns(grid.columns)
    references = open_reference_sets(grid.references, grid.model)
    model, tokenizer, tokens, device = load_for_sampling(grid.model, grid.dtype, grid.device or None,
                                                         args.attention, grid.weights or None)
    image = render_grid(model, tokenizer, tokens, grid.prompts, columns, settings, device,
                        progress=True, references=references)
    return save_png(image, grid.out, grid_record(grid, settings, columns))


@entry_point
def main(argv: list[str]) -> None:
    out = run_grid(argv[1:]) if argv[:1] == ["grid"] else run_single(argv)
    print(out)


if __name__ == "__main__":
    sys.exit(main())
