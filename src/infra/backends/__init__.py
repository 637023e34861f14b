"""Backends that run work somewhere other than the bench nodes (Slurm: ``backends.slurm``).

A backend's pure modules (job scripts, state parsing) live here beside its I/O; the bench
nodes' own path stays in ``infra.runner``.
"""
