"""kbit.train: the training loop, its configuration, checkpoints, metrics and the ``kbit train`` command.

``Trainer(model, tokenizer, train_data, eval_data, config).train()`` trains a LoRA-adapted (quantized) model;
``TrainConfig`` holds every key of ``kbit train`` with its default and validation; ``run_job(config)`` is a
whole run (load, quantize, LoRA, data, train, report, save) and ``kbit train`` with no config runs the
embedded default job.
"""

from .checkpoint import latest_checkpoint, list_checkpoints
from .config import ConfigError, TrainConfig, build_config
from .loop import Trainer, TrainingDiverged, TrainResult
from .schedule import lr_factor

__all__ = [
    "ConfigError",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "TrainingDiverged",
    "build_config",
    "latest_checkpoint",
    "list_checkpoints",
    "lr_factor",
    "run_job",
]


def run_job(config, job: str = "run"):
    """Run ``config`` end to end (:func:`kbit.train.job.run_job`); imported lazily: it loads transformers."""
    from .job import run_job as _run_job

    return _run_job(config, job)
