"""Shared training machinery: seeds, distribution strategy, precision, resumable callbacks."""

from __future__ import annotations

import contextlib
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import keras
import pandas as pd

from mammo_tf.io import atomic_write_text

STRATEGIES = ("default", "mirrored", "multi_worker")
BEST_WEIGHTS = "best.weights.h5"   # under <out>/checkpoints/: the best monitored epoch


@dataclass
class TrainConfig:
    """How a model is trained (saved beside the model as part of its config)."""

    epochs: int = 10
    batch_size: int = 32
    learning_rate: float = 1e-3
    optimizer: str = "adam"
    weight_decay: float = 0.0          # decoupled (Keras 3 optimizers' weight_decay); 0: none
    early_stopping: bool = True        # off for tiny validation sets, whose loss is mostly noise
    early_stopping_patience: int = 8
    strategy: str = "default"          # default | mirrored | multi_worker (reads $TF_CONFIG)
    mixed_precision: str = "auto"      # auto: mixed_float16 when a GPU is present, else float32
    seed: int = 0
    tensorboard: bool = True


def schedule_label(cfg: TrainConfig, monitor: str = "val loss") -> str:
    """How long a model trained and which epoch was kept, for report rows."""
    decay = f", weight decay {cfg.weight_decay:g}" if cfg.weight_decay > 0 else ""
    if cfg.early_stopping:
        # `fit` returns the best epoch's weights when early stopping is on.
        return f"best {monitor} of max {cfg.epochs} epochs, patience {cfg.early_stopping_patience}{decay}"
    return f"{cfg.epochs} epochs{decay}"


def set_seeds(seed: int) -> None:
    """Seed Python, NumPy and TensorFlow (keras.utils.set_random_seed)."""
    keras.utils.set_random_seed(seed)


def gpu_present() -> bool:
    """Whether the Keras backend sees a GPU (TensorFlow, JAX or PyTorch)."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        return bool(tf.config.list_physical_devices("GPU"))
    if backend == "jax":
        import jax

        return any(d.platform == "gpu" for d in jax.devices())
    if backend == "torch":
        import torch

        return bool(torch.cuda.is_available())
    return False


def make_strategy(name: str = "default") -> Any:
    """The tf.distribute strategy named in the config (on another Keras backend, only 'default': no scope)."""
    if keras.backend.backend() != "tensorflow":
        if name != "default":
            raise ValueError(f"strategy {name!r} needs the TensorFlow backend (this is {keras.backend.backend()})")
        return contextlib.nullcontext()
    import tensorflow as tf

    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        # All GPUs of this machine; on a CPU-only machine, all logical CPU devices.
        gpus = tf.config.list_logical_devices("GPU")
        devices = [d.name for d in gpus] or [d.name for d in tf.config.list_logical_devices("CPU")]
        return tf.distribute.MirroredStrategy(devices=devices)
    if name == "multi_worker":
        if "TF_CONFIG" not in os.environ:
            raise ValueError("strategy 'multi_worker' needs $TF_CONFIG (cluster and task) to be set")
        return tf.distribute.MultiWorkerMirroredStrategy()
    raise ValueError(f"unknown strategy {name!r} (expected one of {STRATEGIES})")


def replicas_in_sync() -> int:
    """Replicas of the current tf.distribute strategy (1 on a backend without one)."""
    if keras.backend.backend() != "tensorflow":
        return 1
    import tensorflow as tf

    return tf.distribute.get_strategy().num_replicas_in_sync


def set_precision(mode: str = "auto") -> str:
    """Set the global Keras dtype policy; 'auto' uses mixed_float16 only when a GPU is present."""
    if mode == "auto":
        mode = "mixed_float16" if gpu_present() else "float32"
    keras.mixed_precision.set_global_policy(mode)
    return mode


def make_optimizer(cfg: TrainConfig) -> keras.optimizers.Optimizer:
    """The optimizer named in the config."""
    optimizers = {"adam": keras.optimizers.Adam, "sgd": keras.optimizers.SGD, "adamw": keras.optimizers.AdamW}
    if cfg.optimizer not in optimizers:
        raise ValueError(f"unknown optimizer {cfg.optimizer!r} (expected one of {sorted(optimizers)})")
    kwargs = {"momentum": 0.9} if cfg.optimizer == "sgd" else {}
    if cfg.weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {cfg.weight_decay}")
    if cfg.weight_decay > 0:
        kwargs["weight_decay"] = cfg.weight_decay
    return optimizers[cfg.optimizer](learning_rate=cfg.learning_rate, **kwargs)


class _LoggedBest:
    """Mixin for Keras' monitor callbacks: NaN is never an improvement, and a resumed run goes on from its log.

    Keras counts the first value it sees as an improvement even when it is NaN (an epoch without a
    validation mAP), after which no number beats it; and after a kill its callbacks forget the best
    value and the patience used up before the kill, so a resumed run could keep a worse epoch.
    """

    prior: dict

    def _is_improvement(self, monitor_value: Any, reference_value: Any) -> bool:
        if monitor_value is None or math.isnan(float(monitor_value)):
            return False
        return super()._is_improvement(monitor_value, reference_value)

    def on_train_begin(self, logs: dict | None = None) -> None:
        super().on_train_begin(logs)
        if self.prior:
            self.best, self.best_epoch, self.wait = self.prior["best"], self.prior["best_epoch"], self.prior["wait"]


class _Checkpoint(_LoggedBest, keras.callbacks.ModelCheckpoint):
    pass


class _EarlyStopping(_LoggedBest, keras.callbacks.EarlyStopping):
    pass


def epochs_done(out_dir: str | Path) -> int:
    """Epochs a killed run in ``out_dir`` finished, from its BackupAndRestore metadata (0: a fresh start)."""
    meta = Path(out_dir) / "checkpoints" / "backup" / "training_metadata.json"
    return int(json.loads(meta.read_text())["epoch"]) if meta.is_file() else 0


def logged_best(log: pd.DataFrame, monitor: str, mode: str) -> dict:
    """Best finite ``monitor`` value in a training log, its epoch and the epochs since it ({} when none)."""
    if monitor not in log or log.empty:
        return {}
    values = pd.to_numeric(log[monitor], errors="coerce")
    if values.isna().all():
        return {}
    # The first best, as Keras keeps it (a later equal value is no improvement).
    i = int(values.idxmin() if mode == "min" else values.idxmax())
    best_epoch = int(log["epoch"].loc[i])
    return {"best": float(values.loc[i]), "best_epoch": best_epoch, "wait": int(log["epoch"].max()) - best_epoch}


def _resume_log(out: Path) -> pd.DataFrame:
    """The log rows of the epochs a killed run finished, rewritten without later ones.

    A fresh start drops a stale log and best checkpoint, which an earlier run may have left.
    """
    log_path = out / "training_log.csv"
    done = epochs_done(out)
    if not done or not log_path.is_file():
        log_path.unlink(missing_ok=True)
        (out / "checkpoints" / BEST_WEIGHTS).unlink(missing_ok=True)
        return pd.DataFrame()
    # The log is written before the backup, so it may hold the epoch the kill interrupted: that epoch runs again.
    log = pd.read_csv(log_path)
    log = log[log["epoch"] < done].reset_index(drop=True)
    atomic_write_text(log_path, log.to_csv(index=False))
    return log


def callbacks(out_dir: str | Path, cfg: TrainConfig, monitor: str = "val_loss", mode: str = "min",
              metrics: Sequence[keras.callbacks.Callback] = ()) -> list:
    """Resumable training: CSV/TensorBoard logs, best checkpoint, early stop, and a backup to resume after a kill.

    ``metrics``: callbacks that add entries to the epoch's logs (e.g. a validation mAP); they run
    first, so that the checkpoint, early stopping and the CSV log see what they add. The backup
    runs last: an epoch counts as done only once everything else has seen it.
    """
    out = Path(out_dir)
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    prior = logged_best(_resume_log(out), monitor, mode)
    checkpoint = _Checkpoint(str(out / "checkpoints" / BEST_WEIGHTS), monitor=monitor, mode=mode,
                             save_best_only=True, save_weights_only=True)
    checkpoint.prior = prior
    cbs = [
        *metrics,
        # append=True keeps the rows of the epochs done before a resume.
        keras.callbacks.CSVLogger(str(out / "training_log.csv"), append=True),
        checkpoint,
    ]
    if cfg.early_stopping:
        # The best epoch's weights come back from the checkpoint (see `fit`), which survives a kill.
        stopper = _EarlyStopping(monitor=monitor, mode=mode, patience=cfg.early_stopping_patience)
        stopper.prior = prior
        cbs.append(stopper)
    if cfg.tensorboard:
        cbs.append(keras.callbacks.TensorBoard(str(out / "logs"), write_graph=False, profile_batch=0))
    # Restores model, optimizer and epoch counter when a killed run is started again.
    cbs.append(keras.callbacks.BackupAndRestore(str(out / "checkpoints" / "backup"), delete_checkpoint=True))
    return cbs


def fit(
    build: Callable[[], keras.Model],
    compile_kwargs: Callable[[], dict],
    train_ds: Any,
    val_ds: Any | None,
    cfg: TrainConfig,
    out_dir: str | Path,
    monitor: str = "val_loss",
    mode: str = "min",
    class_weight: dict[int, float] | None = None,
    verbose: int | str = "auto",
    metrics: Sequence[keras.callbacks.Callback] = (),
    keep_best: bool | None = None,
) -> tuple[keras.Model, pd.DataFrame]:
    """Build and compile under the configured strategy, train with resumable callbacks, return model and history.

    ``keep_best``: return the weights of the best ``monitor`` epoch rather than the last (default:
    with early stopping).
    """
    set_seeds(cfg.seed)
    strategy = make_strategy(cfg.strategy)
    with strategy.scope() if hasattr(strategy, "scope") else strategy:
        model = build()
        model.compile(optimizer=make_optimizer(cfg), **compile_kwargs())
    out = Path(out_dir)
    model.fit(
        train_ds, validation_data=val_ds, epochs=cfg.epochs, class_weight=class_weight, shuffle=False,
        callbacks=callbacks(out, cfg, monitor if val_ds is not None else monitor.removeprefix("val_"), mode, metrics),
        verbose=verbose,
    )
    best = out / "checkpoints" / BEST_WEIGHTS
    if (cfg.early_stopping if keep_best is None else keep_best) and best.is_file():
        model.load_weights(best)
    history = pd.read_csv(out / "training_log.csv") if (out / "training_log.csv").is_file() else pd.DataFrame()
    return model, history


def config_dict(*configs: Any) -> dict:
    """Merge dataclass configs into one JSON-able dict, keyed by class name."""
    return {type(c).__name__: json.loads(json.dumps(asdict(c), default=str)) for c in configs}
