"""Shared training machinery: seeds, distribution strategy, precision, resumable callbacks."""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import keras
import pandas as pd

STRATEGIES = ("default", "mirrored", "multi_worker")


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
        # Keras' EarlyStopping here restores the best epoch's weights (restore_best_weights=True).
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


def callbacks(out_dir: str | Path, cfg: TrainConfig, monitor: str = "val_loss", mode: str = "min",
              metrics: Sequence[keras.callbacks.Callback] = ()) -> list:
    """Resumable training: backup for resume after a kill, best checkpoint, early stop, CSV/TensorBoard logs.

    ``metrics``: callbacks that add entries to the epoch's logs (e.g. a validation mAP); they run
    first, so that the checkpoint, early stopping and the CSV log see what they add.
    """
    out = Path(out_dir)
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    cbs = [
        *metrics,
        # Restores model, optimizer and epoch counter when a killed run is started again.
        keras.callbacks.BackupAndRestore(str(out / "checkpoints" / "backup"), delete_checkpoint=True),
        keras.callbacks.ModelCheckpoint(str(out / "checkpoints" / "best.weights.h5"), monitor=monitor, mode=mode,
                                        save_best_only=True, save_weights_only=True),
        # append=True keeps the rows of the epochs done before a resume.
        keras.callbacks.CSVLogger(str(out / "training_log.csv"), append=True),
    ]
    if cfg.early_stopping:
        cbs.append(keras.callbacks.EarlyStopping(monitor=monitor, mode=mode, patience=cfg.early_stopping_patience,
                                                 restore_best_weights=True))
    if cfg.tensorboard:
        cbs.append(keras.callbacks.TensorBoard(str(out / "logs"), write_graph=False, profile_batch=0))
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
) -> tuple[keras.Model, pd.DataFrame]:
    """Build and compile under the configured strategy, train with resumable callbacks, return model and history."""
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
    history = pd.read_csv(out / "training_log.csv") if (out / "training_log.csv").is_file() else pd.DataFrame()
    return model, history


def config_dict(*configs: Any) -> dict:
    """Merge dataclass configs into one JSON-able dict, keyed by class name."""
    return {type(c).__name__: json.loads(json.dumps(asdict(c), default=str)) for c in configs}
