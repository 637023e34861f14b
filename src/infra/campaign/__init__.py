"""Campaigns: sweep expansion, the coordinator's task queue and progress (pure code)."""
