"""The study layer (top): the plan (`plan`: params/study.yaml into cells, one planner per notebook), the cells'
records and what is stale (`cells`), the runner (`runner`: papermill, the schedule, `--dry-run`), the index page
(`index`) and the corpus builder (`corpus`).

The package's own names are what the notebooks call of the runs on disk (`from studylib import study`): the
run records of `studylib.analysis.records` and `train_run` of `studylib.training.train`, defined there.
"""

from studylib.analysis.records import RunRecord, example_rows, list_runs, read_run, run_tables, runs_table
from studylib.training.train import train_run

__all__ = ["RunRecord", "example_rows", "list_runs", "read_run", "run_tables", "runs_table", "train_run"]
