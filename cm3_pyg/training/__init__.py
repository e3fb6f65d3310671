"""Training: configuration, negative sampling, the trainer loop and complete runs."""

from cm3_pyg.io import atomic_torch_save
from cm3_pyg.training.checkpoint import CHECKPOINT_NAME, load_checkpoint, save_checkpoint
from cm3_pyg.training.config import load_config, parse_overrides, training_defaults
from cm3_pyg.training.experiment import run_experiment
from cm3_pyg.training.inputs import Splits, build_graph_inputs, get_splits
from cm3_pyg.training.loading import TrainedRun, load_run
from cm3_pyg.training.sampler import NegativeSampler, epoch_batches
from cm3_pyg.training.trainer import (
    EarlyStopping,
    EpochRecord,
    FitResult,
    NonFiniteLossError,
    Trainer,
    seed_everything,
)
from cm3_pyg.training.user_metrics import TEST_USERS_NAME, read_user_metrics, write_user_metrics

__all__ = [
    "CHECKPOINT_NAME",
    "EarlyStopping",
    "EpochRecord",
    "FitResult",
    "NegativeSampler",
    "NonFiniteLossError",
    "Splits",
    "TEST_USERS_NAME",
    "TrainedRun",
    "Trainer",
    "atomic_torch_save",
    "build_graph_inputs",
    "epoch_batches",
    "get_splits",
    "load_checkpoint",
    "load_config",
    "load_run",
    "parse_overrides",
    "read_user_metrics",
    "run_experiment",
    "save_checkpoint",
    "seed_everything",
    "training_defaults",
    "write_user_metrics",
]
