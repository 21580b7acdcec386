"""Training metrics: one JSON object per line in ``metrics.jsonl``, TensorBoard when installed, a loss plot.

Every record has ``step``; training records carry ``loss``, ``learning_rate``, ``grad_norm``,
``tokens_per_s``, ``memory_gib`` and ``epoch``, eval records ``eval_loss``. On resume the
file is cut back to the checkpoint's step, so it reads as one uninterrupted run.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

METRICS_NAME = "metrics.jsonl"
PLOT_NAME = "loss_curve.png"


class MetricsLogger:
    """Appends records to ``<output_dir>/metrics.jsonl`` (and TensorBoard) and draws ``loss_curve.png``."""

    def __init__(self, output_dir: str | os.PathLike, report_to: str = "auto", resume_step: int | None = None):
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.output_dir / METRICS_NAME
        self.records: list[dict[str, Any]] = []
        if resume_step is not None and self.path.is_file():
            self.records = [r for r in _read(self.path) if r.get("step", 0) <= resume_step]
        _write_lines(self.path, self.records)  # a fresh run starts an empty file; a resumed one a cut-back one
        self.tensorboard = None
        self.tensorboard_note = "TensorBoard: off (report_to=none)"
        if report_to != "none":
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tensorboard = SummaryWriter(str(self.output_dir / "tensorboard"))
                self.tensorboard_note = f"TensorBoard: {self.output_dir / 'tensorboard'}"
            except ImportError:
                if report_to == "tensorboard":
                    raise ImportError(
                        "report_to=tensorboard needs the tensorboard package: pip install tensorboard"
                    ) from None
                self.tensorboard_note = "TensorBoard: not installed (pip install tensorboard), skipped"

    def log(self, record: dict[str, Any]) -> None:
        """Append one record (it must have ``step``)."""
        record = {k: _plain(v) for k, v in record.items()}
        self.records.append(record)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tensorboard is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    group = "eval" if key.startswith("eval_") else "train"
                    self.tensorboard.add_scalar(f"{group}/{key.removeprefix('eval_')}", value, record["step"])
            self.tensorboard.flush()

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """(steps, values) of ``key`` over the records that have it."""
        pairs = [(r["step"], r[key]) for r in self.records if isinstance(r.get(key), (int, float))]
        return [s for s, _ in pairs], [v for _, v in pairs]

    def plot(self) -> Path:
        """Write ``loss_curve.png`` (train and eval loss against the step), atomically."""
        return plot_losses(self.series("loss"), self.series("eval_loss"), self.output_dir / PLOT_NAME)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()


def plot_losses(train: tuple[list, list], evaluation: tuple[list, list], path: Path) -> Path:
    """A PNG of the two loss curves (Agg backend: no display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if train[0]:
        ax.plot(*train, label="train loss", color="tab:blue", linewidth=1.2)
    if evaluation[0]:
        ax.plot(*evaluation, label="eval loss", color="tab:orange", marker="o", linewidth=1.5)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (mean CE per target token)")
    ax.grid(alpha=0.3)
    if train[0] or evaluation[0]:
        ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fig.savefig(tmp, format="png")
    os.replace(tmp, path)
    return path


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):  # 0-d tensors and NumPy scalars
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no nan/inf
    return value


def _read(path: Path) -> list[dict[str, Any]]:
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a crash
            continue
    return records


def _write_lines(path: Path, records: list[dict[str, Any]]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    os.replace(tmp, path)
