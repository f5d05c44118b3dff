"""Training: data-parallel Ray Train over image shards, checkpointed every epoch, resumable.

Layout of a run folder `<out_url>` (any fsspec URL):

    run.json          the settings the run was started with; a rerun must match them
    metrics.jsonl     one JSON line per finished epoch (rewritten whole, so it works on S3)
    checkpoints/      Ray Train's storage: epoch-NNNN/ checkpoints (the best few + the latest)
    model/            the exported model: the best epoch's weights + calibration

Decoding runs as Ray Data CPU tasks and streams to the workers through
`get_dataset_shard(...).iter_torch_batches`; the driver never holds the corpus. Running the
same command again after a kill continues from the latest checkpoint (Train V2 restores a
run from `RunConfig(name, storage_path)`), and ends after the requested epochs.

The job is two steps: `prepare` checks the data and the run folder without Ray (the shard
prefix is listed once), `run` trains on the connected cluster. `train` does both.

Modules: config (TrainConfig, the run folder's files), loop (the workers' epochs), job (the
driver), export (the best epoch with its calibration and bank), invariance (`--invariance`:
edited training views and the contrastive term that makes near-duplicates share a latent).
"""

from pipeline.train.config import (
    CHECKPOINTS_DIR, METRICS_FILE, MODEL_DIR, PLACEMENT_STRATEGIES, RESUME_KEYS, RUN_FILE, TRAIN_STATE_FILE,
    TrainConfig, TrainPlan, TrainResult,
)
from pipeline.train.export import calibrate_export, export_best
from pipeline.train.job import check_run_folder, format_progress, prepare, run, train
from pipeline.train.loop import defect_loss, train_loop

__all__ = [
    "CHECKPOINTS_DIR", "METRICS_FILE", "MODEL_DIR", "PLACEMENT_STRATEGIES", "RESUME_KEYS", "RUN_FILE",
    "TRAIN_STATE_FILE", "TrainConfig", "TrainPlan", "TrainResult", "calibrate_export", "check_run_folder",
    "defect_loss", "export_best", "format_progress", "prepare", "run", "train", "train_loop",
]
