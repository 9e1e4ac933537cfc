"""A run's directory on the driver's side: its id, config.yaml, state.json, phases.md.

`<run.root>/<run id>/` holds what the driver and the user need (config.yaml with absolute
paths, state.json, .lock, phases.md, generator.pt), nothing a worker reads.
"""

from __future__ import annotations

import os
import re
import secrets
import time
from pathlib import Path
from typing import Any

from rich.table import Table

from pipeline.config import (
    ConfigError,
    PipelineConfig,
    changed_since,
    dump_config,
    load_config_dict,
)
from pipeline.driver.state import RunState
from progan.schedule import Phase

CONFIG_FILE = "config.yaml"
STATE_FILE = "state.json"
GENERATOR_FILE = "generator.pt"
PHASES_FILE = "phases.md"
LOG_DIR = "logs"  # driver.log and workers.log (pipeline.run_logs)


def new_run_id() -> str:
    """A fresh, sortable run id."""
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def check_run_id(run_id: str) -> str:
    """`run_id` if it can name a folder under run.root, Ray runs and a job; else ConfigError."""
    if not RUN_ID.fullmatch(run_id) or ".." in run_id:
        raise ConfigError(
            f"--run-id {run_id!r}: use 1-100 letters, digits, '.', '_' or '-', starting with a "
            "letter or digit (it names a folder under run.root, Ray runs and a Ray job)"
        )
    return run_id


def run_dir_of(cfg: PipelineConfig, run_id: str) -> Path:
    """`<run.root>/<run id>` as an absolute path (the id checked first)."""
    return Path(os.path.normpath(Path(cfg.run.root).absolute() / check_run_id(run_id)))


def origin_of(run_dir: Path) -> Path:
    """The directory a run's relative config paths were relative to: the working directory
    of the `progan run` that started it (run.root was relative to it too), or here if
    unknown. Runs saved since paths are made absolute at load time need none of this."""
    saved_root = str(load_config_dict(run_dir / CONFIG_FILE).get("run", {}).get("root", ""))
    root = Path(saved_root)
    if not saved_root or root.is_absolute() or ".." in root.parts:
        return Path.cwd()
    base = run_dir.absolute().parent
    for _ in root.parts:
        base = base.parent
    return base


def open_run_dir(cfg: PipelineConfig, run_dir: Path) -> RunState:
    """Create or reopen a run directory; refuse to resume under a changed config."""
    config_path, state_path = run_dir / CONFIG_FILE, run_dir / STATE_FILE
    if state_path.is_file():
        changed = changed_since(config_path, cfg, base=origin_of(run_dir))
        if changed:
            raise ConfigError(
                f"run {run_dir.name} exists with a different config ({', '.join(changed)}); "
                "use a new --run-id, or `progan resume` to continue it unchanged"
            )
        state = RunState.load(state_path)
    else:
        state = RunState(run_id=run_dir.name)
    dump_config(cfg, config_path)
    state.save(state_path)
    return state


def plan_table(cfg: PipelineConfig) -> Table:
    """The phase plan as a rich table."""
    workers = cfg.scaling.num_workers
    table = Table(title=f"phase plan (workers: {workers})")
    for col in ("#", "resolution", "kind", "kimg", "batch", "per worker", "lr", "steps"):
        table.add_column(col, justify="right")
    for p in cfg.plan:
        table.add_row(
            str(p.index),
            f"{p.resolution}x{p.resolution}",
            p.kind,
            f"{p.num_images / 1000:g}",
            str(p.batch_size),
            str(p.batch_size // cfg.scaling.workers_for(p.resolution)),
            f"{p.lr:g}",
            str(p.steps),
        )
    return table


def phase_table_markdown(plan: list[Phase], rows: list[dict[str, Any]]) -> str:
    """The plan and what happened to each phase, as a Markdown table."""
    lines = [
        "| # | phase | resolution | kind | kimg | batch | lr | status | wall s | Ray overhead s "
        "| SWD x1e3 (real floor) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for p, r in zip(plan, rows, strict=True):
        swd = ""
        if "SWDx1e3_avg" in r:
            swd = f"{r['SWDx1e3_avg']:.1f} ({r.get('SWDx1e3_avg_real_floor', float('nan')):.1f})"
        lines.append(
            f"| {p.index} | {p.name} | {p.resolution} | {p.kind} | {p.num_images / 1000:g} "
            f"| {p.batch_size} | {p.lr:g} | {r['status']} | {r.get('wall_s', '')} "
            f"| {r.get('ray_overhead_s', '')} | {swd} |"
        )
    return "\n".join(lines) + "\n"
