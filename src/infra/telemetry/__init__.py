"""Telemetry samples taken on the node while an instance runs: decoding and summaries (pure)."""
