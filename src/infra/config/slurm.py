"""Character and syntax rules for the Slurm values of a topology entry and a spec.

Pure: each ``*_problem`` returns why a value is not acceptable, or None. The config parser
refuses a bad value before anything is contacted; ``backends.slurm.sbatch`` checks again
before a value becomes an sbatch argument (stored specs are trusted, but cheap to check).
"""

from __future__ import annotations

import re

DURATION_FORMS = "MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS"
_DURATION = re.compile(
    r"^(?:(?P<days>\d{1,4})-(?P<dh>\d{1,2})(?::(?P<dm>\d{1,2})(?::(?P<ds>\d{1,2}))?)?"
    r"|(?P<a>\d{1,6})(?::(?P<b>\d{1,2})(?::(?P<c>\d{1,2}))?)?)$")
_SLURM_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")
_SIGNAL = re.compile(r"^(?:(?P<flag>B|R|BR|RB):)?(?P<sig>[A-Za-z0-9]+)(?:@(?P<secs>\d{1,5}))?$")
SIGNAL_NAMES = frozenset({
    "HUP", "INT", "QUIT", "ABRT", "KILL", "USR1", "USR2", "PIPE", "ALRM", "TERM", "CONT",
    "STOP", "TSTP", "TTIN", "TTOU", "URG", "XCPU", "XFSZ", "VTALRM", "PROF", "WINCH", "IO",
    "PWR", "SYS", "TRAP", "BUS",
})
MAX_SIGNAL_SECONDS = 65535
"""sbatch's limit on the ``@SECONDS`` of ``--signal``."""
MAX_SIGNAL_NUMBER = 64


def duration_seconds(text: str) -> int | None:
    """Seconds in a Slurm duration (``MM``, ``MM:SS``, ``HH:MM:SS``, ``D-HH[:MM[:SS]]``),
    or None when ``text`` is not one."""
    m = _DURATION.match(text)
    if m is None:
        return None
    if m.group("days") is not None:
        days, hours = int(m.group("days")), int(m.group("dh"))
        minutes, seconds = int(m.group("dm") or 0), int(m.group("ds") or 0)
        if hours > 23 or minutes > 59 or seconds > 59:
            return None
        return ((days * 24 + hours) * 60 + minutes) * 60 + seconds
    a, b, c = m.group("a"), m.group("b"), m.group("c")
    if b is None:  # MM
        return int(a) * 60
    if c is None:  # MM:SS
        return None if int(b) > 59 else int(a) * 60 + int(b)
    if int(b) > 59 or int(c) > 59:  # HH:MM:SS
        return None
    return (int(a) * 60 + int(b)) * 60 + int(c)


def duration_problem(text: str) -> str | None:
    """Why ``text`` is not a positive Slurm duration, or None."""
    seconds = duration_seconds(text)
    if seconds is None:
        return f"is not a Slurm duration ({DURATION_FORMS}), got {text!r}"
    if seconds <= 0:
        return f"must be longer than zero (0 means no limit to Slurm), got {text!r}"
    return None


def signal_problem(text: str) -> str | None:
    """Why ``text`` is not Slurm's ``[B:|R:]SIG[@SECONDS]`` (``USR1@60``, ``B:TERM@120``)."""
    form = "[B:]SIG[@SECONDS], e.g. USR1@60 or B:TERM@120"
    m = _SIGNAL.match(text)
    if m is None:
        return f"is not a Slurm signal ({form}), got {text!r}"
    sig = m.group("sig").upper()
    if sig.isdigit():
        if not 1 <= int(sig) <= MAX_SIGNAL_NUMBER:
            return f"signal number must be in 1..{MAX_SIGNAL_NUMBER}, got {text!r}"
    elif sig.removeprefix("SIG") not in SIGNAL_NAMES:
        return (f"unknown signal {m.group('sig')!r} in {text!r} (names: "
                f"{', '.join(sorted(SIGNAL_NAMES))}; or a number)")
    secs = m.group("secs")
    if secs is not None and int(secs) > MAX_SIGNAL_SECONDS:
        return f"seconds after '@' must be at most {MAX_SIGNAL_SECONDS}, got {text!r}"
    return None


def name_problem(text: str, *, many: bool = False) -> str | None:
    """Why ``text`` is not a Slurm partition/account/QoS name (``many``: comma-separated
    names, as ``--partition`` takes), or None."""
    parts = text.split(",") if many else [text]
    for part in parts:
        if not _SLURM_NAME.match(part):
            what = "a comma-separated list of names" if many else "a name"
            return (f"is not {what} Slurm accepts (letters, digits, '_', '.', '-'; at most "
                    f"64 characters each), got {text!r}")
    return None
