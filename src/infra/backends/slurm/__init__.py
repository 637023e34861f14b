"""Slurm targets: one spec -> one sbatch job, one sweep -> one throttled job array.

Pure parts: ``sbatch`` (the options and batch script of a job) and ``jobstate`` (Slurm's
``scontrol``/``sacct`` answers as typed states in plain words). See docs/slurm.md.
"""
