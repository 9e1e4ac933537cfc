"""The local host, `progan train-local`: every phase in one process, without Ray or MLflow.

The same plan, trainer and `PhaseSession` as the Ray pipeline, reporting to a folder, so it
runs on a bare GPU host that has torch, lmdb, pydantic and PyYAML. Everything goes to one
output folder:

    config.yaml        the resolved config (a rerun must match it, except the fields that
                       pipeline.config.changes allows to change)
    checkpoints/       the latest run.keep_checkpoints checkpoint directories
                       (pipeline.phases.checkpoints: images-NNNNNNNNN/state.pt ...), every
                       run.checkpoint_every_kimg and at each phase end; a rerun continues
                       from the latest, bit-identically on CPU
    samples/           one grid of fixed latents per checkpoint (<images shown>.png)
    stats.jsonl        the loop's stats at every run.log_every_kimg (losses, alpha, images/s)
    metrics.jsonl      cfg.eval's metrics at each phase end (or only the last, with
                       --final-eval-only), and where a time budget stopped training
    generator.pt       the EMA generator where training stopped (the session's export)
    samples-final.png  the grid there
    summary.json       wall and training time, images shown, throughput, final metrics

`--time-budget-min M` stops training once this invocation has trained for M minutes
(evaluations are not counted), saves a checkpoint, evaluates and exports there; a rerun
without a budget continues to the end of the plan.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from pipeline.config import ConfigError, PipelineConfig, changed_since, dump_config
from pipeline.dataset import ensure_dataset
from pipeline.phases.checkpoints import STATE_FILE, latest_checkpoint
from pipeline.phases.session import PhaseJob, PhaseSession, PhaseSink, restore_trainer
from pipeline.progress import PROGRESS_FILE, ProgressDisplay
from progan.device import configure_device
from progan.schedule import Phase
from progan.trainer import GANTrainer

CONFIG_FILE = "config.yaml"
CHECKPOINTS = "checkpoints"
SAMPLES = "samples"
STATS_FILE = "stats.jsonl"
METRICS_FILE = "metrics.jsonl"
GENERATOR_FILE = "generator.pt"
FINAL_GRID = "samples-final.png"
SUMMARY_FILE = "summary.json"
OLD_CHECKPOINT = "checkpoint.pt"  # the layout before checkpoint directories

CheckpointHook = Callable[[GANTrainer, Path], None]


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
    if (out / OLD_CHECKPOINT).is_file() and not (out / CHECKPOINTS).is_dir():
        raise ConfigError(
            f"{out} was written by an older progan ({OLD_CHECKPOINT}); re-run into another --out"
        )
    config_path = out / CONFIG_FILE
    if config_path.is_file():
        changed = changed_since(config_path, cfg)
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


def copy_atomic(source: Path, target: Path) -> Path:
    """Copy a file or a folder so that `target` appears complete or not at all."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    if tmp.is_dir():
        shutil.rmtree(tmp)
    tmp.unlink(missing_ok=True)
    if source.is_dir():
        shutil.copytree(source, tmp)
        shutil.rmtree(target, ignore_errors=True)
    else:
        shutil.copyfile(source, tmp)
    tmp.replace(target)
    return target


class LocalFolderSink(PhaseSink):
    """train-local's side of a session: the output folder, console lines, the time budget."""

    def __init__(
        self,
        out: Path,
        console: Console,
        book: dict[str, Any],
        budget_s: float | None,
        hook: CheckpointHook | None,
    ) -> None:
        self.out, self.console, self.budget_s, self.hook = out, console, budget_s, hook
        self.display: ProgressDisplay | None = None  # pipeline.progress, set by train_local
        self.book = {
            "train_seconds": 0.0,
            "eval_seconds": 0.0,
            "invocations": 0,
            "phase_seconds": {},
            **book,
        }
        self.book["invocations"] += 1
        self.trained_here = 0.0  # finished sessions of this invocation (the budget's clock)

    def say(self, text: str) -> None:
        """A log line, flushed at once (logs are often a pipe or a file)."""
        self.console.print(text, highlight=False)
        self.console.file.flush()

    def stats(self, session: PhaseSession, stats: dict[str, float]) -> None:
        append_jsonl(self.out / STATS_FILE, {"phase": session.phase.name, **stats})
        if self.display is not None:
            self.display.point(session.phase.index, stats)

    def step(self, session: PhaseSession) -> None:
        if self.budget_s is not None and self.trained_here + session.train_seconds >= self.budget_s:
            session.request_stop(f"time budget of {self.budget_s / 60:g} min")

    def evaluated(self, session: PhaseSession, metrics: dict[str, float]) -> None:
        phase, shown = session.phase, session.trainer.images_shown
        self.book["eval_seconds"] += metrics.get("eval_seconds", 0.0)
        record = {
            "phase": phase.name,
            "resolution": phase.resolution,
            "kind": phase.kind,
            "images_shown": shown,
            "alpha": phase.alpha_at(shown),
            "phase_complete": shown >= phase.end_images,
            **metrics,
        }
        if not self.recorded(phase, shown):
            append_jsonl(self.out / METRICS_FILE, record)  # once per point, across reruns
        note = ""
        if "SWDx1e3_avg" in record:
            note = (
                f"  SWD x1e3 {record['SWDx1e3_avg']:.2f} "
                f"(real floor {record['SWDx1e3_avg_real_floor']:.2f})"
            )
        if "msssim_fake" in record:
            note += f"  MS-SSIM {record['msssim_fake']:.3f} (real {record['msssim_real']:.3f})"
        self.say(f"{phase.name}  evaluated in {metrics['eval_seconds']:.1f} s{note}")
        if self.display is not None:
            self.display.evaluated(phase.index, metrics)

    def evaluation_failed(self, session: PhaseSession, error: Exception) -> None:
        self.say(
            f"[yellow]{session.phase.name}  evaluation failed ({session.evaluation_error}); "
            "training goes on[/]"
        )

    def recorded(self, phase: Phase, images_shown: int) -> bool:
        """Whether metrics.jsonl has this phase's evaluation at `images_shown`."""
        return any(
            r["phase"] == phase.name and r["images_shown"] == images_shown
            for r in read_jsonl(self.out / METRICS_FILE)
        )

    def state_extras(self, session: PhaseSession) -> dict[str, Any]:
        now = session.train_seconds
        book = json.loads(json.dumps(self.book))  # a copy, with this session's time added
        book["train_seconds"] += now
        per_phase = book["phase_seconds"]
        per_phase[session.phase.name] = per_phase.get(session.phase.name, 0.0) + now
        return {"book": book}

    def sample_grid(self, session: PhaseSession, path: Path, images_shown: int) -> None:
        copy_atomic(path, self.out / SAMPLES / path.name)

    def exported(self, session: PhaseSession, path: Path) -> None:
        copy_atomic(path, self.out / GENERATOR_FILE)
        grid = self.out / SAMPLES / f"{session.trainer.images_shown:09d}.png"
        copy_atomic(grid, self.out / FINAL_GRID)

    def checkpoint(
        self, session: PhaseSession, directory: Path | None, report: dict[str, Any]
    ) -> None:
        assert directory is not None  # one process: rank 0
        folder = self.out / CHECKPOINTS
        kept = copy_atomic(directory, folder / directory.name)
        kept_dirs = sorted(p for p in folder.glob("images-*") if p.is_dir())
        for old in kept_dirs[: -session.cfg.run.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
        if self.hook is not None:
            self.hook(session.trainer, kept / STATE_FILE)

    def finished(self, session: PhaseSession) -> None:
        self._account(session)
        if session.stop_reason:
            self.say(
                f"{session.stop_reason} reached at {session.trainer.images_shown} images; "
                "rerun to continue"
            )

    def failed(self, session: PhaseSession, error: BaseException) -> None:
        self._account(session)

    def _account(self, session: PhaseSession) -> None:
        now = session.train_seconds
        self.trained_here += now
        self.book["train_seconds"] += now
        per_phase = self.book["phase_seconds"]
        per_phase[session.phase.name] = per_phase.get(session.phase.name, 0.0) + now


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

    `on_checkpoint(trainer, path)` runs after each checkpoint is kept (tests use it to
    interrupt a run). `eval_every_phase=False` evaluates only at the end of the plan (or
    where the time budget stops it).
    """
    started = time.perf_counter()
    console = console or Console(soft_wrap=True)
    if time_budget_min is not None and time_budget_min <= 0:
        raise ConfigError(f"--time-budget-min must be > 0, got {time_budget_min}")
    dev = resolve_device(device)
    out = Path(out)
    ensure_dataset(cfg, console)
    open_out_dir(cfg, out)
    trainer = GANTrainer(cfg.gan, dev, plan=cfg.plan)
    latest = latest_checkpoint(out / CHECKPOINTS)
    restored = restore_trainer(trainer, [("checkpoint", latest)])
    budget_s = time_budget_min * 60 if time_budget_min is not None else None
    sink = LocalFolderSink(out, console, restored.host.get("book", {}), budget_s, on_checkpoint)
    sink.display = ProgressDisplay(
        out.name, cfg.plan, console, out / PROGRESS_FILE, budget_s=budget_s
    )
    origin = restored.origin
    where = f" at {trainer.images_shown} images" if origin != "scratch" else ""
    sink.say(f"train-local: {cfg.model.arch} on {dev}, output in {out}")
    sink.say(f"starting from {origin}{where}")
    stopped_in = cfg.plan[-1]
    try:
        stopped_in = train_phases(cfg, trainer, sink, origin, eval_every_phase)
    except BaseException as err:
        sink.display.close_after(err)
        raise
    sink.display.close("done" if trainer.images_shown >= cfg.plan[-1].end_images else "stopped")
    return write_summary(cfg, out, trainer, sink.book, stopped_in, time.perf_counter() - started)


def train_phases(
    cfg: PipelineConfig,
    trainer: GANTrainer,
    sink: LocalFolderSink,
    origin: str,
    eval_every_phase: bool,
) -> Phase:
    """Every phase not done yet, in this process; returns the phase training stopped in."""
    stopped_in = cfg.plan[-1]
    for phase in cfg.plan:
        wanted = eval_every_phase or phase is cfg.plan[-1]
        if trainer.images_shown >= phase.end_images:
            if (
                trainer.images_shown == phase.end_images
                and wanted
                and not sink.recorded(phase, phase.end_images)
            ):
                # stopped during its evaluation, after the final checkpoint: evaluate only
                PhaseSession(PhaseJob(cfg, phase.index), trainer, [sink], origin).run()
            continue
        sink.say(
            f"phase {phase.name}: {phase.num_images} images, batch {phase.batch_size}, "
            f"lr {phase.lr:g}"
        )
        job = PhaseJob(cfg, phase.index, evaluate=wanted)
        outcome = PhaseSession(job, trainer, [sink], origin).run()
        origin = "previous-phase"
        if outcome.stopped:
            stopped_in = phase
            break
    return stopped_in


def write_summary(
    cfg: PipelineConfig,
    out: Path,
    trainer: GANTrainer,
    book: dict[str, Any],
    phase: Phase,
    wall_s: float,
) -> LocalResult:
    """summary.json for where training stopped (generator.pt is the session's export)."""
    shown = trainer.images_shown
    evals = [m for m in read_jsonl(out / METRICS_FILE) if m["images_shown"] == shown]
    summary = {
        "complete": shown >= cfg.plan[-1].end_images,
        "device": str(trainer.device),
        "arch": cfg.model.arch,
        "resolution": phase.resolution,
        "phase": phase.name,
        "alpha": phase.alpha_at(shown),
        "images_shown": shown,
        "images_planned": cfg.plan[-1].end_images,
        "train_seconds": round(book["train_seconds"], 2),
        "eval_seconds": round(book["eval_seconds"], 2),
        "images_per_s": round(shown / max(book["train_seconds"], 1e-9), 1),
        "wall_seconds_this_invocation": round(wall_s, 2),
        "invocations": book["invocations"],
        "phase_seconds": {k: round(v, 2) for k, v in book["phase_seconds"].items()},
        "final_metrics": evals[-1] if evals else {},
    }
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    return LocalResult(out, out / GENERATOR_FILE, summary)
