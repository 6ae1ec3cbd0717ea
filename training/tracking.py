"""MLflow tracking of training runs: parameters, per-epoch metrics, the report and plots.

Optional: `mlflow` comes with the `track` extra (`pip install 'mmoe-ranker[track]'`). Without
it `open_tracker` returns None and the caller says so in one line. The store is local: a SQLite
database and an artifact directory under `runs/mlruns` (MLflow 3 refuses its old file store
unless told otherwise), or `$MLFLOW_TRACKING_URI` when set. Open the UI with

    mlflow ui --backend-store-uri sqlite:///runs/mlruns/mlflow.db

One MLflow experiment per dataset (`synthetic`, `census_income`), one run per `ranker train`,
named after its run directory; with several seeds or a search, a nested run per seed and per
trial, so the UI compares them side by side.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

DEFAULT_STORE = Path("runs/mlruns")
DB_FILE = "mlflow.db"
ARTIFACTS = "artifacts"
# files of a run directory logged as artifacts (the checkpoint is exported, not tracked)
ARTIFACT_SUFFIXES = (".json", ".md", ".png")


def mlflow_available() -> bool:
    return importlib.util.find_spec("mlflow") is not None


def tracking_uri(store: Path | None = None) -> str:
    """`$MLFLOW_TRACKING_URI`, else SQLite under `store` (default runs/mlruns)."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env and store is None:
        return env
    base = Path(store or DEFAULT_STORE).resolve()
    base.mkdir(parents=True, exist_ok=True)  # SQLite creates the file, not its directory
    return f"sqlite:///{base / DB_FILE}"


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config dicts -> MLflow params ("train.lr": 0.002); lists become strings."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v if isinstance(v, int | float | str | bool) or v is None else str(v)
    return out


class Tracker:
    """One MLflow run (and its nested runs) for one `ranker train`."""

    def __init__(self, experiment: str, store: Path | None = None) -> None:
        import mlflow

        self.mlflow = mlflow
        self.uri = tracking_uri(store)
        mlflow.set_tracking_uri(self.uri)
        exp = mlflow.get_experiment_by_name(experiment)
        if exp is None:
            artifacts: str | None = None
            if self.uri.startswith("sqlite:///"):  # artifacts next to the database
                db = Path(self.uri.removeprefix("sqlite:///"))
                artifacts = (db.parent / ARTIFACTS).resolve().as_uri()
            self.experiment_id = mlflow.create_experiment(experiment, artifact_location=artifacts)
        else:
            self.experiment_id = exp.experiment_id

    @contextlib.contextmanager
    def run(self, name: str, params: Mapping[str, Any], *, nested: bool = False) -> Iterator[str]:
        """A (nested) MLflow run with these params; yields its run id."""
        with self.mlflow.start_run(
            run_name=name, experiment_id=self.experiment_id, nested=nested
        ) as r:
            if params:
                self.mlflow.log_params(flatten(params))
            yield r.info.run_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        self.mlflow.log_params(flatten(params))

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        clean = {k: float(v) for k, v in metrics.items() if v is not None}
        if clean:
            self.mlflow.log_metrics(clean, step=step)

    def log_history(self, model: str, history: Mapping[str, Any]) -> None:
        """A model's curves, one MLflow step per epoch: `<model>.train_loss`, `.val_loss`,
        `.val_<task>_loss`, and its best epoch."""
        for i, (tr, vl) in enumerate(zip(history["train_loss"], history["val_loss"],
                                         strict=True)):
            m = {f"{model}.train_loss": tr, f"{model}.val_loss": vl}
            for t, x in history["val_task_loss"][i].items():
                m[f"{model}.val_{t}_loss"] = x
            self.log_metrics(m, step=i + 1)
        self.log_metrics({f"{model}.best_epoch": history["best_epoch"]})

    def log_test(self, model: str, test: Mapping[str, Any], tasks: list[str]) -> None:
        """Test AUC and log loss per task: `<model>.test_<task>_auc`, `..._log_loss`."""
        m: dict[str, float] = {}
        for t in tasks:
            if t in test:
                m[f"{model}.test_{t}_auc"] = test[t]["auc"]
                m[f"{model}.test_{t}_log_loss"] = test[t]["log_loss"]
        self.log_metrics(m)

    def log_models(self, models: Mapping[str, Any], tasks: list[str]) -> None:
        for name, m in models.items():
            self.log_history(name, m["history"])
            self.log_test(name, m["test"], tasks)

    def log_run_dir(self, run_dir: Path) -> None:
        """The report (json, md) and the plots of a run directory as artifacts."""
        for p in sorted(Path(run_dir).iterdir()):
            if p.is_file() and p.suffix in ARTIFACT_SUFFIXES:
                self.mlflow.log_artifact(str(p))


def open_tracker(experiment: str, store: Path | None = None) -> Tracker | None:
    """A tracker, or None when mlflow is not installed (the caller prints the notice)."""
    return Tracker(experiment, store) if mlflow_available() else None


NOT_INSTALLED = "tracking off: mlflow is not installed (pip install 'mmoe-ranker[track]')"
