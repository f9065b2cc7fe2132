"""Parameter sweeps: grids of config values expanded into one run per combination.

A grid comes from the config's ``[sweep]`` table and from ``--sweep KEY=[v1, v2]`` on the command line::

    [sweep]
    "optim.lr" = [1e-4, 3e-4]        # or, equivalently, a nested table: optim.lr = [1e-4, 3e-4]
    "lora.rank" = [16, 32]

Its cartesian product gives the sweep points, in a fixed order (the last key varies fastest). Every point runs
with its values as ``--set`` overrides and its own output directory ``<logging.output_dir>/<point name>``, e.g.
``runs/x/lr=0.0001,rank=16``.

For sbatch arrays without submitit (slurm/array.sbatch) this module is also a small command line::

    python -m launch.sweep --config FILE [--set K=V ...] [--sweep K=[...] ...] --count
    python -m launch.sweep --config FILE ... --point 3      # that point's overrides, one per line
"""

from __future__ import annotations

import argparse
import itertools
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hidream_ft.cli import entry_point
from hidream_ft.config import Config, ConfigError, load_config, parse_literal, toml_literal


@dataclass(frozen=True)
class SweepPoint:
    index: int
    name: str
    values: dict[str, Any]  # dotted key → value
    output_dir: str

    @property
    def overrides(self) -> list[str]:
        """``--set`` items for this point: its values, its own output directory, and no sweep of its own."""
        items = [f"{key}={toml_literal(value)}" for key, value in self.values.items()]
        return items + [f"logging.output_dir={toml_literal(self.output_dir)}", "sweep={}"]

    def as_json(self) -> dict:
        return {"index": self.index, "name": self.name, "output_dir": self.output_dir,
                "values": self.values, "overrides": self.overrides}


def flatten_grid(table: dict, where: str = "sweep") -> dict[str, list]:
    """``{"optim": {"lr": [..]}}`` or ``{"optim.lr": [..]}`` → ``{"optim.lr": [..]}``; every leaf must be a list."""
    grid: dict[str, list] = {}
    for key, value in table.items():
        dotted = f"{where}.{key}"
        if isinstance(value, dict):
            for sub, values in flatten_grid(value, dotted).items():
                grid[f"{key}.{sub}"] = values
            continue
        if not isinstance(value, list) or not value:
            raise ConfigError(f"{dotted}: expected a non-empty list of values to sweep over, got {value!r}")
        if len({toml_literal(v) for v in value}) != len(value):
            raise ConfigError(f"{dotted}: the same value appears twice in {value!r}")
        grid[key] = value
    return grid


def parse_sweep_args(items: list[str]) -> dict[str, list]:
    """``["optim.lr=[1e-4, 3e-4]"]`` → ``{"optim.lr": [1e-4, 3e-4]}``."""
    grid: dict[str, list] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--sweep {item!r}: expected KEY=[v1, v2, ...], e.g. --sweep 'optim.lr=[1e-4, 3e-4]'")
        try:
            value = parse_literal(raw)
        except ConfigError:
            raise ConfigError(f"--sweep {item!r}: {raw!r} is not a TOML list, e.g. [1e-4, 3e-4]") from None
        grid.update(flatten_grid({key.strip(): value}, where="--sweep"))
    return grid


def _short_keys(keys: list[str]) -> dict[str, str]:
    """The last dotted component of each key, or the whole key where two keys share a last component."""
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: (short if last.count(short) == 1 else k) for k, short in zip(keys, last)}


def _name_part(value: Any) -> str:
    if isinstance(value, list):
        text = "x".join(_name_part(v) for v in value)
    elif isinstance(value, bool):
        text = "true" if value else "false"
    else:
        text = str(value)
    return re.sub(r"[^A-Za-z0-9._+\-]", "_", text)


def expand(grid: dict[str, list], base_output_dir: str) -> list[SweepPoint]:
    """The cartesian product of ``grid``; each point named after its values, e.g. ``lr=0.0001,rank=16``."""
    keys = list(grid)
    short = _short_keys(keys)
    points = []
    for index, combo in enumerate(itertools.product(*(grid[k] for k in keys))):
        values = dict(zip(keys, combo))
        name = ",".join(f"{short[k]}={_name_part(v)}" for k, v in values.items())
        points.append(SweepPoint(index, name, values, str(Path(base_output_dir) / name)))
    names = [p.name for p in points]
    if len(set(names)) != len(names):
        duplicate = next(n for n in names if names.count(n) > 1)
        raise ConfigError(f"sweep: two points would share the run directory name {duplicate!r}; "
                          f"make the swept values distinguishable")
    return points


@dataclass(frozen=True)
class Plan:
    """What one ``launch.submit`` invocation runs: the base config, and its sweep points (none: a single run)."""

    config_path: Path
    overrides: list[str]
    config: Config
    grid: dict[str, list]
    points: list[SweepPoint]

    def run_overrides(self) -> list[list[str]]:
        """The ``--set`` list of every run: one for a single job, one per point for a sweep."""
        if not self.points:
            return [list(self.overrides)]
        return [list(self.overrides) + p.overrides for p in self.points]

    def manifest(self) -> dict:
        return {"config": str(self.config_path), "overrides": self.overrides, "grid": self.grid,
                "output_dir": self.config.logging.output_dir, "points": [p.as_json() for p in self.points]}


def plan(config_path: str | Path, overrides: list[str], sweep_items: list[str]) -> Plan:
    """Load and validate the config, merge the ``[sweep]`` table with ``--sweep`` items, validate every point."""
    config_path = Path(config_path).resolve()
    config = load_config(config_path, overrides)
    grid = flatten_grid(config.sweep)
    grid.update(parse_sweep_args(sweep_items))
    set_keys = {item.partition("=")[0].strip() for item in overrides}
    for key in grid:
        if key in set_keys:
            raise ConfigError(f"sweep: '{key}' is both swept and fixed with --set; drop one of them")
        if key == "logging.output_dir" or key.startswith("sweep") or key.startswith("slurm"):
            raise ConfigError(f"sweep: '{key}' cannot be swept (every point gets its own run directory and "
                              f"the same resources)")
    points = expand(grid, config.logging.output_dir) if grid else []
    for point in points:  # a typo in a swept key or value fails here, before anything is submitted
        load_config(config_path, overrides + point.overrides)
    return Plan(config_path, list(overrides), config, grid, points)


@entry_point
def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--sweep", action="append", default=[], metavar="KEY=[V1,V2]")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--count", action="store_true", help="print the number of sweep points")
    what.add_argument("--point", type=int, metavar="INDEX", help="print that point's overrides, one per line")
    args = parser.parse_args(argv)
    result = plan(args.config, args.set, args.sweep)
    if args.count:
        print(len(result.points))
        return 0
    if not 0 <= args.point < len(result.points):
        raise ConfigError(f"--point {args.point}: the sweep has {len(result.points)} points (0 … "
                          f"{len(result.points) - 1})")
    print("\n".join(result.run_overrides()[args.point]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
