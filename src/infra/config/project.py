"""Which directory a deploy copies: the project, never a folder that merely holds a config.

A deploy rsyncs its source into each node's work dir with ``--delete``, so a wrong source
wipes the node's copy of the project and every output not protected. The source is
``deploy.source`` when set (relative to the config file's folder), else the directory the
command runs from, or its git top-level when that is inside a git work tree. A default
source must look like a project (one of ``PROJECT_MARKERS``); no source may be the home
directory, the filesystem root or a directory above the home directory.
"""

from __future__ import annotations

from pathlib import Path

from infra.errors import ConfigError

PROJECT_MARKERS: tuple[str, ...] = (
    "pyproject.toml", "setup.py", "setup.cfg", "requirements.txt", ".git", "experiments",
)
"""Entries one of which a default deploy source must hold (``experiments`` as a directory)."""


def git_top_level(start: Path) -> Path | None:
    """The nearest directory at or above ``start`` holding ``.git`` (dir or worktree file)."""
    for candidate in (start, *start.parents):
        if (candidate / ".git").exists():
            return candidate
    return None


def project_markers(path: Path) -> tuple[str, ...]:
    """The ``PROJECT_MARKERS`` present in ``path``."""
    found = []
    for name in PROJECT_MARKERS:
        entry = path / name
        if (entry.is_dir() if name == "experiments" else entry.exists()):
            found.append(name)
    return tuple(found)


def _too_broad(path: Path) -> str | None:
    """Why ``path`` can never be a deploy source (home, root, above home), else None."""
    home = Path.home().resolve()
    if path == home:
        return f"{path} is the home directory"
    if path == Path(path.anchor):
        return f"{path} is the filesystem root"
    if path in home.parents:
        return f"{path} holds the home directory"
    return None


def resolve_deploy_source(config: Path, source: str | None, cwd: Path) -> Path:
    """The checked deploy source for the config file ``config``; raises ``ConfigError``.

    ``source`` is ``deploy.source`` as written (None: not set); ``cwd`` is where the
    command runs. The error names the config and says to set ``deploy.source`` there.
    """
    file = str(config)
    hint = f"set deploy.source in {config}"
    if source is not None:
        path = Path(source).expanduser()
        path = (path if path.is_absolute() else config.parent / path).resolve()
        if not path.exists():
            raise ConfigError(file, "deploy.source", f"{path} does not exist")
        if not path.is_dir():
            raise ConfigError(file, "deploy.source", f"{path} is not a directory")
        broad = _too_broad(path)
        if broad:
            raise ConfigError(file, "deploy.source",
                              f"{broad}; point it at the project directory")
        return path
    here = cwd.resolve()
    path = git_top_level(here) or here
    where = "the current directory" if path == here else f"the git top-level of {here}"
    broad = _too_broad(path)
    if broad:
        raise ConfigError(file, "deploy.source", f"not set, and {where} is not a project: "
                                                 f"{broad}; run from the project or {hint}")
    if not project_markers(path):
        raise ConfigError(file, "deploy.source", f"not set, and {where} ({path}) is not a "
                                                 f"project (none of {', '.join(PROJECT_MARKERS)}"
                                                 f" in it); run from the project or {hint}")
    return path
