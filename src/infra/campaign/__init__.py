"""Campaigns: sweep expansion, task parameters and the queue's pure rules.

Only the value types are re-exported here (``config.model`` uses them); import
``infra.campaign.sweep`` for parsing and expansion.
"""

# ``config`` first: its spec parser imports ``campaign.sweep``, which imports ``config``
# back; loading ``config`` before any campaign module keeps that cycle from showing
# whichever of the two packages a program imports first.
import infra.config  # noqa: F401
from infra.campaign.model import (
    CampaignSpec,
    CpuBinding,
    DispatchMode,
    Scalar,
    SuiteSpec,
    SweepSpec,
)

__all__ = ["CampaignSpec", "CpuBinding", "DispatchMode", "Scalar", "SuiteSpec", "SweepSpec"]
