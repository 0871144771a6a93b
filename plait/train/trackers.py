"""Experiment trackers beside metrics.jsonl: TensorBoard, Weights & Biases, MLflow.

Every tracker logs the same keys: the numeric scalars of each metrics.jsonl record
(``scalars``), at the record's step. Each is an optional extra; a tracker the config asks for
whose package is missing is a config error, raised before any rank starts (``check_trackers``),
except TensorBoard, which is on by default and skipped quietly when absent.

- W&B runs offline by default (``metrics.wandb_mode``): it writes ``run.dir/wandb`` and needs no
  account; ``wandb sync`` uploads it later.
- MLflow logs to ``metrics.mlflow_uri``, by default a file store in ``run.dir/mlruns``. MLflow 3
  keeps its file store in maintenance mode and refuses it unless ``MLFLOW_ALLOW_FILE_STORE`` is
  set; plait sets it for ``file:`` stores only (the user chose the store by choosing the URI).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import sys
import time
from typing import Any

from plait.config import JobConfig
from plait.errors import ConfigError


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The keys every tracker logs: a record's numbers (a NaN loss too), without ``step`` and
    ``time`` (trackers stamp their own)."""
    return {k: float(v) for k, v in record.items()
            if k not in ("step", "time") and isinstance(v, (int, float)) and not isinstance(v, bool)}


def check_trackers(cfg: JobConfig) -> None:
    """Raise ConfigError when a tracker the config asks for cannot be imported."""
    for wanted, module, extra in ((cfg.metrics.wandb, "wandb", "wandb"), (cfg.metrics.mlflow, "mlflow", "mlflow")):
        if wanted and importlib.util.find_spec(module) is None:
            raise ConfigError(f"metrics.{extra} = true needs the '{module}' package; install it with "
                              f"pip install 'plait[{extra}]', or set metrics.{extra} = false")


def _flat_config(cfg: JobConfig) -> dict[str, Any]:
    return {f"{section}.{key}": value for section, fields in dataclasses.asdict(cfg).items()
            for key, value in fields.items()}


class TensorBoardTracker:
    def __init__(self, cfg: JobConfig):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(os.path.join(cfg.run.dir, "tensorboard"))

    def log(self, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    def __init__(self, cfg: JobConfig):
        import wandb

        m = cfg.metrics
        self.run = wandb.init(project=m.wandb_project, dir=cfg.run.dir, mode=m.wandb_mode,
                              name=os.path.basename(os.path.abspath(cfg.run.dir)), config=_flat_config(cfg))

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class MlflowTracker:
    def __init__(self, cfg: JobConfig):
        uri = cfg.metrics.mlflow_uri or "file:" + os.path.join(os.path.abspath(cfg.run.dir), "mlruns")
        if uri.startswith("file:"):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(uri)
        name = cfg.metrics.mlflow_experiment
        found = self.client.get_experiment_by_name(name)
        experiment = found.experiment_id if found else self.client.create_experiment(name)
        self.run_id = self.client.create_run(experiment, run_name=os.path.basename(os.path.abspath(cfg.run.dir))).info.run_id
        params = [Param(k, str(v)[:500]) for k, v in _flat_config(cfg).items()]
        for start in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[start:start + 100])

    def log(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def open_trackers(cfg: JobConfig) -> list:
    """The trackers ``cfg.metrics`` asks for (rank 0 only). One that cannot start (W&B online
    without a key, an MLflow server out of reach) is a ConfigError: the run stops with one
    line rather than being restarted for a fault it does not have."""
    trackers: list = []
    if cfg.metrics.tensorboard:
        try:
            trackers.append(TensorBoardTracker(cfg))
        except ImportError:
            pass
    for wanted, name, kind in ((cfg.metrics.wandb, "wandb", WandbTracker), (cfg.metrics.mlflow, "mlflow", MlflowTracker)):
        if not wanted:
            continue
        try:
            trackers.append(kind(cfg))
        except Exception as exc:
            for started in trackers:
                started.close()
            raise ConfigError(f"metrics.{name} = true but the tracker did not start: {str(exc).splitlines()[0][:300]}") from None
    return trackers


def log_to(trackers: list, values: dict[str, float], step: int) -> None:
    """Log to every tracker; one that fails (a network drop) is reported once and dropped, and
    the training goes on."""
    for tracker in list(trackers):
        try:
            tracker.log(values, step)
        except Exception as exc:
            trackers.remove(tracker)
            print(f"plait: warning: {type(tracker).__name__} stopped logging at step {step} "
                  f"({str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__}); the others go on",
                  file=sys.stderr, flush=True)
