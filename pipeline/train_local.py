"""`progan train-local`: the whole phase plan in one process, without Ray or MLflow.

The same plan (`progan.schedule.phase_plan`) and the same per-phase loop
(`progan.loop.run_phase`) as the Ray pipeline, driven here by plain callbacks, so it runs on
a bare GPU host that has torch, lmdb, pydantic and PyYAML. Everything goes to one output
folder:

    config.yaml        the resolved config (a rerun must match it, see RESUMABLE_CHANGES)
    checkpoint.pt      the latest full trainer state (every run.checkpoint_every_kimg, and
                       at each phase end); a rerun continues from it, bit-identically on CPU
    samples/           one grid of fixed latents per checkpoint (<images shown>.png)
    stats.jsonl        the loop's stats at every run.log_every_kimg (losses, alpha, images/s)
    metrics.jsonl      cfg.eval's metrics at each phase end (or only the last, with
                       --final-eval-only), and where a time budget stopped training
    generator.pt       the EMA generator in `progan run`'s format (pipeline.common)
    samples-final.png  the final grid
    summary.json       wall and training time, images shown, throughput, final metrics

`--time-budget-min M` stops training once this invocation has trained for M minutes
(evaluations are not counted), saves a checkpoint, evaluates and exports there; a rerun
without a budget continues to the end of the plan.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from pipeline.common import (
    changed_since,
    ensure_dataset,
    evaluate_trainer,
    export_state,
    loop_options,
)
from pipeline.config import (
    ConfigError,
    PipelineConfig,
    dump_config,
)
from preprocessing.lmdb_store import LmdbImageDataset
from progan.checkpoint import load_checkpoint, save_checkpoint
from progan.device import configure_device
from progan.loop import run_phase
from progan.sampling import fixed_latents, generate, save_grid
from progan.schedule import Phase, phase_plan
from progan.trainer import GANTrainer

CONFIG_FILE = "config.yaml"
CHECKPOINT = "checkpoint.pt"
SAMPLES = "samples"
STATS_FILE = "stats.jsonl"
METRICS_FILE = "metrics.jsonl"
GENERATOR_FILE = "generator.pt"
FINAL_GRID = "samples-final.png"
SUMMARY_FILE = "summary.json"
BOOKKEEPING = "train_local"  # extra checkpoint key: times across invocations
# Keys that may change between invocations on one output folder: they do not change what
# is trained. Anything else must match the config the folder was started with.
RESUMABLE_CHANGES = (
    "eval.",
    "run.",
    "data.loader_workers",
    "data.preload_mb",
    "train.compile",
    "train.cuda_graphs",
    "data.source",
    "data.prepare",
    "data.sample_faces",
    "scaling.",
    "tracking.",
    "ray_address",
)

CheckpointHook = Callable[[GANTrainer, Path], None]


class TimeBudgetReached(Exception):
    """Raised from the stats callback to leave the loop when the budget is spent."""


@dataclass
class LocalResult:
    """Where a train-local run's outputs are, and its summary."""

    out: Path
    generator: Path
    summary: dict[str, Any]


def resolve_device(name: str | None) -> torch.device:
    """'cuda', 'cpu' or None (cuda when available); a missing GPU is a one-line error."""
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available here; use --device cpu")
    return configure_device(device)


def open_out_dir(cfg: PipelineConfig, out: Path) -> None:
    """Create `out`, or refuse to continue it under a config that changes what is trained."""
    config_path = out / CONFIG_FILE
    if config_path.is_file():
        changed = changed_since(config_path, cfg, RESUMABLE_CHANGES)
        if changed:
            raise ConfigError(
                f"{out} was started with a different config ({', '.join(changed)}); "
                "use another --out, or the same config to continue it"
            )
    dump_config(cfg, config_path)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """All records of a JSON-lines file (none if it does not exist)."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    """Append one record as a line."""
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


class LocalRun:
    """One invocation of train-local on an output folder: the loop's callbacks and outputs."""

    def __init__(
        self,
        cfg: PipelineConfig,
        out: Path,
        device: torch.device,
        console: Console,
        time_budget_s: float | None = None,
        on_checkpoint: CheckpointHook | None = None,
        eval_every_phase: bool = True,
    ) -> None:
        self.cfg, self.out, self.console = cfg, out, console
        self.budget_s, self.hook = time_budget_s, on_checkpoint
        self.eval_every_phase = eval_every_phase
        self.trainer = GANTrainer(cfg.gan, device)
        self.plan = self.trainer.plan
        self.latents = fixed_latents(cfg.run.sample_grid, cfg.model.latent_size, cfg.train.seed)
        self.book: dict[str, Any] = {
            "train_seconds": 0.0,
            "eval_seconds": 0.0,
            "invocations": 0,
            "phase_seconds": {},
        }
        self.origin = "scratch"
        if (out / CHECKPOINT).is_file():
            state = load_checkpoint(out / CHECKPOINT)  # to CPU; load_state_dict places it
            self.trainer.load_state_dict(state)
            self.book.update(state.get(BOOKKEEPING, {}))
            self.origin = f"checkpoint at {self.trainer.images_shown} images"
        self.book["invocations"] += 1
        self.trained_here = 0.0  # training seconds of this invocation (the budget's clock)
        self.log_every = max(1, round(cfg.run.log_every_kimg * 1000))
        self.segment: tuple[Phase, float] | None = None  # phase being trained, since when

    def say(self, text: str, **kwargs: Any) -> None:
        """A log line, flushed at once (logs are often a pipe or a file)."""
        self.console.print(text, **kwargs)
        self.console.file.flush()

    # -- bookkeeping ----------------------------------------------------------------------
    def _close_segment(self) -> None:
        """Add the time since the segment started to the totals."""
        if self.segment is None:
            return
        phase, since = self.segment
        now = time.perf_counter()
        self.book["train_seconds"] += now - since
        per_phase = self.book["phase_seconds"]
        per_phase[phase.name] = per_phase.get(phase.name, 0.0) + now - since
        self.trained_here += now - since
        self.segment = (phase, now)

    def _trained_here_now(self) -> float:
        return self.trained_here + (
            time.perf_counter() - self.segment[1] if self.segment is not None else 0.0
        )

    # -- callbacks of run_phase -------------------------------------------------------------
    def on_stats(self, phase: Phase, stats: dict[str, float]) -> None:
        """Every run.log_every_kimg (and at the phase end): a log line and a stats record."""
        shown = int(stats["images_shown"])
        append_jsonl(self.out / STATS_FILE, {"phase": phase.name, **stats})
        self.say(
            f"{phase.name}  {shown - phase.start_images:>9,}/{phase.num_images:,} img  "
            f"alpha {stats['alpha']:.2f}  "
            f"d_loss {stats['d_loss']:8.3f}  g_loss {stats['g_loss']:8.3f}  "
            f"{stats['images_per_s']:8.0f} img/s",
            highlight=False,
        )

    def on_step(self, trainer: GANTrainer) -> None:
        """After every step: stop when the time budget is spent (reads no device value)."""
        if self.budget_s is not None and self._trained_here_now() >= self.budget_s:
            raise TimeBudgetReached

    def save(self, phase: Phase) -> Path:
        """Checkpoint (full state + bookkeeping) and a sample grid at the current images."""
        self._close_segment()
        state = {**self.trainer.state_dict(), BOOKKEEPING: self.book}
        path = save_checkpoint(state, self.out / CHECKPOINT)
        shown = self.trainer.images_shown
        self.grid(phase, self.out / SAMPLES / f"{shown:09d}.png")
        if self.hook is not None:
            self.hook(self.trainer, path)
        return path

    def grid(self, phase: Phase, path: Path) -> Path:
        """The fixed latents through G_ema in `phase` at the current images shown."""
        alpha = phase.alpha_at(self.trainer.images_shown)
        return save_grid(generate(self.trainer.G_ema, self.latents, phase.level, alpha), path)

    # -- phases -------------------------------------------------------------------------
    def evaluate(self, phase: Phase) -> dict[str, Any] | None:
        """cfg.eval's metrics in `phase` now, appended to metrics.jsonl (once per point)."""
        cfg = self.cfg
        if not (cfg.eval.enabled and cfg.eval.metrics):
            return None
        shown = self.trainer.images_shown
        for old in read_jsonl(self.out / METRICS_FILE):
            if old["phase"] == phase.name and old["images_shown"] == shown:
                return old  # evaluated before an interruption
        started = time.perf_counter()
        metrics = evaluate_trainer(cfg, self.trainer, phase, Path(cfg.run.root) / "metrics-cache")
        self.book["eval_seconds"] += time.perf_counter() - started
        record = {
            "phase": phase.name,
            "resolution": phase.resolution,
            "kind": phase.kind,
            "images_shown": shown,
            "alpha": phase.alpha_at(shown),
            "phase_complete": shown >= phase.end_images,
            **metrics,
        }
        append_jsonl(self.out / METRICS_FILE, record)
        note = ""
        if "SWDx1e3_avg" in record:
            note = (
                f"  SWD x1e3 {record['SWDx1e3_avg']:.2f} "
                f"(real floor {record['SWDx1e3_avg_real_floor']:.2f})"
            )
        if "msssim_fake" in record:
            note += f"  MS-SSIM {record['msssim_fake']:.3f} (real {record['msssim_real']:.3f})"
        self.say(
            f"{phase.name}  evaluated in {metrics['eval_seconds']:.1f} s{note}", highlight=False
        )
        return record

    def train_phase(self, phase: Phase) -> bool:
        """Train `phase` to its end; False if the time budget stopped it first."""
        self.say(
            f"phase {phase.name}: {phase.num_images} images, batch {phase.batch_size}, "
            f"lr {phase.lr:g}",
            highlight=False,
        )
        cfg = self.cfg
        options = loop_options(cfg, log_every_images=self.log_every)
        dataset = LmdbImageDataset(cfg.data.dataset, phase.resolution)
        self.segment = (phase, time.perf_counter())
        try:
            run_phase(
                self.trainer,
                dataset,
                phase,
                options,
                lambda stats: self.on_stats(phase, stats),
                lambda trainer, stats, final: self.save(phase),
                self.on_step,
            )
        except TimeBudgetReached:
            self.trainer.read_stats()  # a NaN/inf loss since the last log raises here
            self.save(phase)
            self.say(
                f"time budget of {self.budget_s / 60:g} min reached at "
                f"{self.trainer.images_shown} images; rerun to continue",
                highlight=False,
            )
            return False
        finally:
            self._close_segment()
            self.segment = None
        return True

    def run(self) -> Phase:
        """Every phase not done yet; returns the phase training stopped in.

        Each phase is evaluated at its end (only the last one without eval_every_phase),
        and where a time budget stops training.
        """
        shown = self.trainer.images_shown
        self.say(f"starting from {self.origin}", highlight=False)
        done = [p for p in self.plan if p.end_images <= shown]
        for phase in self.plan:
            wanted = self.eval_every_phase or phase is self.plan[-1]
            if phase in done:
                if phase is done[-1] and wanted:  # unless evaluated before an interruption
                    self.evaluate(phase)
                continue
            finished = self.train_phase(phase)
            if wanted or not finished:
                self.evaluate(phase)
            if not finished:
                return phase
        return self.plan[-1]

    def finish(self, phase: Phase, wall_s: float) -> LocalResult:
        """generator.pt, samples-final.png and summary.json for where training stopped."""
        trainer, shown = self.trainer, self.trainer.images_shown
        alpha = phase.alpha_at(shown)
        state = trainer.state_dict()
        # where the generator stands: the phase just trained (at a phase's last image the
        # trainer's own position is already the next phase, at alpha 0)
        state.update(phase_index=phase.index, phase_name=phase.name, resolution=phase.resolution)
        state["alpha"] = alpha
        generator = export_state(state, self.out / GENERATOR_FILE)
        self.grid(phase, self.out / FINAL_GRID)
        evals = [m for m in read_jsonl(self.out / METRICS_FILE) if m["images_shown"] == shown]
        complete = shown >= self.plan[-1].end_images
        book = self.book
        summary = {
            "complete": complete,
            "device": str(trainer.device),
            "arch": self.cfg.model.arch,
            "resolution": phase.resolution,
            "phase": phase.name,
            "alpha": alpha,
            "images_shown": shown,
            "images_planned": self.plan[-1].end_images,
            "train_seconds": round(book["train_seconds"], 2),
            "eval_seconds": round(book["eval_seconds"], 2),
            "images_per_s": round(shown / max(book["train_seconds"], 1e-9), 1),
            "wall_seconds_this_invocation": round(wall_s, 2),
            "invocations": book["invocations"],
            "phase_seconds": {k: round(v, 2) for k, v in book["phase_seconds"].items()},
            "final_metrics": evals[-1] if evals else {},
        }
        (self.out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
        return LocalResult(self.out, generator, summary)


def train_local(
    cfg: PipelineConfig,
    out: str | Path,
    *,
    device: str | None = None,
    time_budget_min: float | None = None,
    console: Console | None = None,
    on_checkpoint: CheckpointHook | None = None,
    eval_every_phase: bool = True,
) -> LocalResult:
    """Train (or continue) every phase of cfg's plan in this process; see the module doc.

    `on_checkpoint(trainer, path)` runs after each checkpoint is written (tests use it to
    interrupt a run). `eval_every_phase=False` evaluates only at the end of the plan (or
    where the time budget stops it).
    """
    started = time.perf_counter()
    console = console or Console(soft_wrap=True)
    if time_budget_min is not None and time_budget_min <= 0:
        raise ConfigError(f"--time-budget-min must be > 0, got {time_budget_min}")
    dev = resolve_device(device)
    out = Path(out)
    ensure_dataset(cfg, phase_plan(cfg.schedule, cfg.model.resolution), console)
    open_out_dir(cfg, out)
    budget_s = time_budget_min * 60 if time_budget_min is not None else None
    run = LocalRun(cfg, out, dev, console, budget_s, on_checkpoint, eval_every_phase)
    run.say(f"train-local: {cfg.model.arch} on {dev}, output in {out}", highlight=False)
    stopped_in = run.run()
    return run.finish(stopped_in, time.perf_counter() - started)
