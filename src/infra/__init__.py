"""Lab experiment orchestrator: place, run, watch and recover experiments over SSH."""
__version__ = "0.1.0"
