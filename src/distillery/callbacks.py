"""What the engine tells the outside: loggers (``metrics.jsonl`` always; TensorBoard, MLflow and
Weights & Biases as optional extras) and callbacks on step, evaluation, epoch and checkpoint, which
can stop the run (``state.stop = True``).

Every record is a flat dict: ``{"event": "train" | "eval", "phase", "epoch", "step", ...}`` with each
loss term apart under ``terms``. Trackers get the numbers as scalars named ``<phase>/<key>`` (terms
as ``<phase>/terms/<name>``). Trackers log on rank 0 only and never see secrets: they take their
settings (``WANDB_API_KEY``, ``MLFLOW_TRACKING_URI``, ...) from the environment themselves.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import DistilleryError
from .io import atomic_write_text


@dataclass
class State:
    """Where the run is; callbacks read it and may set ``stop``."""

    phase: str
    epoch: int = 0
    global_step: int = 0
    stop: bool = False


class Callback:
    """Override any of these; each gets the run's ``State``."""

    def on_step(self, state: State, record: dict | None) -> None:
        """After every optimiser step; ``record`` is the train record when one was logged this step."""

    def on_eval(self, state: State, record: dict) -> None:
        """After each evaluation (``record`` holds its metrics)."""

    def on_epoch(self, state: State) -> None:
        """After each epoch's evaluation, before its checkpoint (what it changes is saved with the epoch)."""

    def on_checkpoint(self, state: State, path: Path) -> None:
        """After a checkpoint was committed (rank 0)."""


class FunctionCallback(Callback):
    """The engine's ``on_step(global_step)`` / ``on_epoch(epoch)`` functions as a callback."""

    def __init__(self, on_step=None, on_epoch=None):
        self._step, self._epoch = on_step, on_epoch

    def on_step(self, state: State, record: dict | None) -> None:
        if self._step is not None:
            self._step(state.global_step)

    def on_epoch(self, state: State) -> None:
        if self._epoch is not None:
            self._epoch(state.epoch)


# --------------------------------------------------------------------------- loggers


class MetricsLog:
    """Append-only JSONL of train and eval records (see ``distillery.report`` for the fields)."""

    def __init__(self, path: Path | None):
        self.path = path
        self._buf: list[str] = []

    def log(self, record: dict) -> None:
        if self.path is not None:
            self._buf.append(json.dumps(record))

    write = log

    def flush(self) -> None:
        if self.path is not None and self._buf:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write("\n".join(self._buf) + "\n")
            self._buf.clear()

    def close(self) -> None:
        self.flush()

    def drop_after(self, phase: str, step: int) -> None:
        """On resume: forget the records of ``phase`` written after the checkpoint's step."""
        if self.path is None or not self.path.is_file():
            return
        keep = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by the interruption
            if not (r.get("phase") == phase and r.get("step", 0) > step):
                keep.append(line)
        atomic_write_text(self.path, "".join(k + "\n" for k in keep))


def scalars(record: dict) -> dict[str, float]:
    """A record's numbers as tracker scalars: ``<phase>/<key>``, terms as ``<phase>/terms/<name>``."""
    phase = record.get("phase", "run")
    prefix = f"{phase}/" if record.get("event") != "eval" else f"{phase}/eval/"
    out: dict[str, float] = {}
    for k, v in record.items():
        if k in ("event", "phase", "epoch", "step", "split"):
            continue
        if k == "terms" and isinstance(v, dict):
            out.update({f"{phase}/terms/{n}": float(x) for n, x in v.items() if isinstance(x, (int, float))})
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[prefix + k] = float(v)
    return out


class TensorBoardLogger:
    def __init__(self, folder: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise DistilleryError("train.loggers names tensorboard, which is not installed; "
                                  "pip install 'distillery[tensorboard]'.") from None
        self.writer = SummaryWriter(str(folder))

    def log(self, record: dict) -> None:
        for k, v in scalars(record).items():
            self.writer.add_scalar(k, v, record.get("step", 0))

    def close(self) -> None:
        self.writer.close()


class MLflowLogger:
    """MLflow; without ``MLFLOW_TRACKING_URI`` it writes to ``<run_dir>/mlruns``, MLflow's local file store
    (which needs no server and works with ``mlflow-skinny``; ``mlflow ui --backend-store-uri`` reads it)."""

    def __init__(self, folder: Path, name: str):
        import os

        try:
            import mlflow
        except ImportError:
            raise DistilleryError("train.loggers names mlflow, which is not installed; "
                                  "pip install 'distillery[mlflow]'.") from None
        self.mlflow = mlflow
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks for this opt-in
            mlflow.set_tracking_uri((folder / "mlruns").resolve().as_uri())
        self.run = mlflow.start_run(run_name=name)

    def log(self, record: dict) -> None:
        self.mlflow.log_metrics(scalars(record), step=int(record.get("step", 0)))

    def close(self) -> None:
        self.mlflow.end_run()


class WandbLogger:
    """Weights & Biases; ``WANDB_MODE=offline`` (the default here when no ``WANDB_API_KEY`` is set) writes
    to ``<run_dir>/wandb`` for a later ``wandb sync``."""

    def __init__(self, folder: Path, name: str):
        import os

        try:
            import wandb
        except ImportError:
            raise DistilleryError("train.loggers names wandb, which is not installed; "
                                  "pip install 'distillery[wandb]'.") from None
        mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
        folder.mkdir(parents=True, exist_ok=True)
        self.wandb = wandb
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "distillery"), name=name, dir=str(folder),
                              mode=mode, reinit=True)

    def log(self, record: dict) -> None:
        self.run.log(scalars(record), step=int(record.get("step", 0)))

    def close(self) -> None:
        self.run.finish()


TRACKERS = ("tensorboard", "mlflow", "wandb")


def make_trackers(names: list[str], run_dir: Path | None, phase: str) -> list[Any]:
    """The trackers ``names`` (``train.loggers``) for one phase, writing under ``run_dir``."""
    out: list[Any] = []
    for n in names:
        if n not in TRACKERS:
            raise DistilleryError(f"train.loggers: {n!r} is not a tracker; use any of {', '.join(TRACKERS)}.")
        if run_dir is None:
            raise DistilleryError(f"train.loggers names {n}, which writes into the run directory; give fit a run_dir.")
        if n == "tensorboard":
            out.append(TensorBoardLogger(run_dir / "tensorboard" / phase))
        elif n == "mlflow":
            out.append(MLflowLogger(run_dir, f"{run_dir.name}/{phase}"))
        else:
            out.append(WandbLogger(run_dir, f"{run_dir.name}/{phase}"))
    return out
