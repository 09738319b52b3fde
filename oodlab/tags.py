"""Names of the MLflow tags and Optuna attributes a study writes: one place, so the
runner, tracking, reports and tests agree."""

STUDY = "oodlab.study"  # study name, on parent and child runs
ROLE = "oodlab.role"  # "parent" | "trial" | "seed" (one replicate of a trial of several seeds)
TRIAL = "ray_trial_id"  # Ray trial id of a child run (also an Optuna user attr)
SEED = "oodlab.seed"  # on a seed run: the replicate's seed
REPLICA_OF = "oodlab.replica_of"  # on a seed run: the Ray trial id of its trial (its parent run)
ERROR = "oodlab.error"  # why a trial failed
METRICS = "oodlab.metrics"  # final AUROC table of a trial, JSON
DEVICE = "device"  # where the trial trained
ORPHANED = "oodlab.orphaned"  # "true" on a trial run a killed driver lost before Tune saved the trial
STOPPED_EARLY = "oodlab.stopped_early"  # "true" when the scheduler stopped the trial
STOPPED_AT_EPOCH = "oodlab.stopped_at_epoch"  # the last epoch such a trial trained
ALLOW_TEST_TARGET = "oodlab.allow_test_target"  # "true" when the target is a test metric, on request
TARGET = "oodlab.target"  # the study's target metric(s), comma-separated
SAMPLER = "oodlab.sampler"
SCHEDULER = "oodlab.scheduler"
PARENT = "mlflow.parentRunId"  # MLflow's own: nests a child run under the parent
EXPORTED_FROM = "oodlab.exported_from"  # on every run of an export: its run id in the source store

OPTUNA_ERROR = "error"  # Optuna user attr: why the trial failed
OPTUNA_NUM_SAMPLES = "num_samples"  # Optuna study user attr: trials requested (done vs interrupted)
