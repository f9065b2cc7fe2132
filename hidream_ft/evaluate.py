"""Compare the base model and adapters on the same prompts: a comparison grid and a score table
(docs/quality.md, "Evaluating adapters").

    python -m hidream_ft.evaluate --config evaluate.toml
    python -m hidream_ft.evaluate --model DIR --prompt "add a hat" --reference dog.png \\
        --column base --column "style=runs/style" --dino /models/dinov2-base --heldout data/val --out eval/
        [--target fox.png]        # text-to-image rows: compare with these images too

Writes OUT/grid.png, OUT/scores.csv and OUT/scores.md (one row per column: mean DINO similarity of its
images to their references, held-out loss, held-out loss per σ) and prints the table.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from hidream_ft.cli import entry_point
from hidream_ft.config import ConfigError, DataConfig, FolderSource, SamplingSettings, ValidationConfig
from hidream_ft.data.collate import TrainCollator
from hidream_ft.data.folders import resolved_folder
from hidream_ft.data.heldout import HeldoutBatches
from hidream_ft.errors import UserError
from hidream_ft.flow.noise import NOISE_SCALE
from hidream_ft.inference.grid import GridColumn, compose_grid, grid_rows, sample_cells
from hidream_ft.inference.heldout import HeldoutLoss, heldout_loss
from hidream_ft.lora import lora_applied
from hidream_ft.model.conditioning import ConditionProcessor
from hidream_ft.model.patches import pixels_from_image, pixels_from_uint8
from hidream_ft.perceptual.dino import DinoFeatures, dino_similarity
from hidream_ft.sample import (GridFile, add_grid_arguments, grid_record, load_columns, load_for_sampling,
                               open_reference_sets, resolve_grid, save_png)


@dataclass
class EvaluationFile(GridFile):
    """The ``--config`` TOML file: a grid file (docs/sampling.md) whose ``out`` is a folder, plus the scorers."""

    out: str = "evaluation"
    targets: list[str] = field(default_factory=list)  # images the text-to-image rows are compared with
    dino: str = ""  # DINOv2 / DINOv3 folder; empty: no similarity column
    heldout: list[FolderSource | str] = field(default_factory=list)  # as data.folders; empty: no held-out loss
    heldout_sigmas: list[float] = field(default_factory=lambda: list(ValidationConfig().loss_sigmas))
    heldout_batch_size: int = 1
    heldout_seed: int = 0

    def validate(self, where: str) -> None:
        """``where`` is empty for the file's top level (its path prefixes the message)."""
        key = lambda name: f"{where}.{name}" if where else name  # noqa: E731
        self.heldout = [FolderSource(path=f) if isinstance(f, str) else f for f in self.heldout]
        for i, folder in enumerate(self.heldout):
            folder.validate(key(f"heldout[{i}]"))
        if not self.heldout_sigmas or not all(0 < sigma <= 1 for sigma in self.heldout_sigmas):
            raise ConfigError(f"{key('heldout_sigmas')}: expected one or more σ in (0, 1], got {self.heldout_sigmas}")
        if len(set(self.heldout_sigmas)) != len(self.heldout_sigmas):
            raise ConfigError(f"{key('heldout_sigmas')}: a σ is listed twice in {self.heldout_sigmas}")
        if self.heldout_batch_size < 1:
            raise ConfigError(f"{key('heldout_batch_size')}: must be at least 1, got {self.heldout_batch_size}")


@dataclass
class ColumnScores:
    """One row of the score table."""

    label: str
    adapters: str
    dino_similarity: float | None = None
    heldout_loss: float | None = None
    heldout_per_sigma: dict[float, float] = field(default_factory=dict)


def mean_similarity(similarities: Sequence[torch.Tensor]) -> float | None:
    """The mean over every scored image of its mean similarity to its own reference images; None when no image
    has any."""
    per_image = [s.double().mean() for s in similarities if s.numel()]
    return float(torch.stack(per_image).mean()) if per_image else None


def table_header(scores: Sequence[ColumnScores]) -> list[str]:
    sigmas = sorted({sigma for row in scores for sigma in row.heldout_per_sigma})
    return ["label", "adapters", "dino_similarity", "heldout_loss", *(f"heldout_loss_sigma_{s:.2f}" for s in sigmas)]


def table_rows(scores: Sequence[ColumnScores], digits: int | None = None) -> list[list[str]]:
    """Each configuration's cells as text, numbers rounded to ``digits`` (None: every digit of the float); an
    unmeasured score is empty."""
    sigmas = sorted({sigma for row in scores for sigma in row.heldout_per_sigma})
    number = lambda value: "" if value is None else repr(value) if digits is None else f"{value:.{digits}f}"  # noqa: E731
    return [[row.label, row.adapters, number(row.dino_similarity), number(row.heldout_loss),
             *(number(row.heldout_per_sigma.get(s)) for s in sigmas)] for row in scores]


def write_csv(scores: Sequence[ColumnScores], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(table_header(scores))
        writer.writerows(table_rows(scores))


def markdown_table(scores: Sequence[ColumnScores]) -> str:
    header = table_header(scores)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") or "–" for cell in row) + " |"
              for row in table_rows(scores, digits=4)]
    return "\n".join(lines) + "\n"


def dino_scores(dino: DinoFeatures, cells: Sequence[Sequence[torch.Tensor]],
                comparisons: Sequence[Sequence[Image.Image]], device: torch.device) -> list[float | None]:
    """Per column: :func:`mean_similarity` of its images (``cells[row][column]``, uint8) to their row's
    comparison images (its references, or the targets for a text-to-image row)."""
    with torch.no_grad():
        embedded = [torch.cat([dino.embed(pixels_from_image(image)[None].to(device)) for image in images])
                    if images else None for images in comparisons]
        similarities: list[list[torch.Tensor]] = [[] for _ in cells[0]]
        for row, references in zip(cells, embedded):
            if references is None:
                continue
            for column, cell in enumerate(row):
                image = dino.embed(pixels_from_uint8(cell)[None].to(device))
                similarities[column].append(dino_similarity(image.expand_as(references), references).cpu())
    return [mean_similarity(column) for column in similarities]


def heldout_data(settings: SamplingSettings) -> DataConfig:
    """Held-out images are bucketed at the grid's pixel area (width × height), as training buckets at
    ``data.area``."""
    return DataConfig(area=settings.width * settings.height, num_workers=0)


def column_heldout_loss(model, column: GridColumn, batches: HeldoutBatches, evaluation: EvaluationFile,
                        device: torch.device) -> HeldoutLoss:
    """The held-out loss with the column's adapters attached, under bf16 autocast on CUDA as sampling runs."""
    precision = (torch.autocast(device.type, dtype=torch.bfloat16) if device.type == "cuda"
                 else contextlib.nullcontext())
    with lora_applied(model, column.loras), precision:
        return heldout_loss(model, batches, evaluation.heldout_sigmas, seed=evaluation.heldout_seed,
                            noise_scale=NOISE_SCALE, device=device)


def open_images(paths: Sequence[str], what: str) -> list[Image.Image]:
    images = []
    for path in paths:
        try:
            with Image.open(path) as image:
                images.append(image.convert("RGB"))
        except OSError as e:
            raise UserError(f"{what}: {e}") from None
    return images


def run(argv: list[str]) -> Path:
    parser = argparse.ArgumentParser(prog="python -m hidream_ft.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_grid_arguments(parser, "output folder (default: evaluation)")
    parser.add_argument("--target", action="append", default=[], metavar="IMAGE",
                        help="an image the text-to-image rows are compared with; repeat for more")
    parser.add_argument("--dino", metavar="DIR", help="DINOv2 / DINOv3 folder for the similarity scores")
    parser.add_argument("--heldout", action="append", default=[], metavar="DIR",
                        help="held-out image folder (captions as in training data) for the held-out loss; repeat "
                             "for more")
    args = parser.parse_args(argv)
    evaluation, settings = resolve_grid(parser, args, EvaluationFile, "evaluation")
    evaluation.targets = args.target or evaluation.targets
    evaluation.dino = args.dino or evaluation.dino
    evaluation.heldout = [FolderSource(path=path) for path in args.heldout] or evaluation.heldout
    evaluation.validate("evaluation")
    for i, folder in enumerate(evaluation.heldout):
        for path in [folder.path, *folder.controls]:
            resolved_folder(path, f"evaluation.heldout[{i}]")
    if evaluation.targets and not evaluation.dino:
        raise ConfigError("evaluation.targets: comparing with target images needs a DINO model (dino / --dino)")
    columns = load_columns(evaluation.columns)
    reference_sets = open_reference_sets(evaluation.references, evaluation.model)
    targets = open_images(evaluation.targets, "--target")
    rows = grid_rows(evaluation.prompts, reference_sets)
    model, tokenizer, tokens, device = load_for_sampling(evaluation.model, evaluation.dtype, evaluation.device or None,
                                                         args.attention, evaluation.weights or None)
    dino = DinoFeatures.load(evaluation.dino, device=device) if evaluation.dino else None
    batches = None
    if evaluation.heldout:
        data = heldout_data(settings)
        collate = TrainCollator(tokenizer, tokens, data.max_text_tokens,
                                ConditionProcessor.from_pretrained(evaluation.model))
        held_out = ValidationConfig(loss_folders=list(evaluation.heldout),
                                    loss_batch_size=evaluation.heldout_batch_size)
        batches = HeldoutBatches(data, held_out, collate)
    cells = sample_cells(model, tokenizer, tokens, rows, columns, settings, device, progress=True)
    out = Path(evaluation.out)
    out.mkdir(parents=True, exist_ok=True)
    save_png(compose_grid(cells, [row.label for row in rows], [c.label for c in columns]), out / "grid.png",
             grid_record(evaluation, settings, columns))
    scores = [ColumnScores(c.label, ", ".join(s.loras)) for c, s in zip(columns, evaluation.columns)]
    if dino is not None:
        comparisons = [row.references.images if row.references else targets for row in rows]
        for row, similarity in zip(scores, dino_scores(dino, cells, comparisons, device)):
            row.dino_similarity = similarity
    if batches is not None:
        for row, column in zip(scores, columns):
            result = column_heldout_loss(model, column, batches, evaluation, device)
            row.heldout_loss, row.heldout_per_sigma = result.total, result.per_sigma
    write_csv(scores, out / "scores.csv")
    table = markdown_table(scores)
    (out / "scores.md").write_text(table)
    print(table, end="")
    return out


@entry_point
def main(argv: list[str]) -> None:
    print(run(argv))


if __name__ == "__main__":
    sys.exit(main())
