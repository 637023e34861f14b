"""Campaigns: parameter sweeps, the task queue, node pools and the results table."""
