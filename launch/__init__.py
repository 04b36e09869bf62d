"""Launchers: the same ``audiodiff-train`` command on every host of a job.

- ``local.py``: N processes on this machine (development, multi-host tests);
- ``tpu_vm.py``: TPU VM pods through ``gcloud`` (queued resources, multi-slice);
- ``gke.py`` + ``jobset.yaml.tmpl``: a JobSet on GKE TPU node pools;
- ``slurm.py``: an sbatch script for GPU clusters;
- ``common.py``: the training command and environment they all pass.

Every cloud launcher takes ``--dry_run`` and prints exactly what it would run.
"""
