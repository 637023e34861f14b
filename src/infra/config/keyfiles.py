"""Check the SSH key files a topology names, as OpenSSH would before it uses them.

``--validate-config`` runs this (it reads the disk, so it is not part of the pure parser):
a missing, unreadable or group/world-readable key is reported with the node and the fix,
instead of surfacing later as an authentication failure on the first contact.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from infra.config.model import Cluster
from infra.errors import ConfigError


def key_file_problem(path: Path) -> str | None:
    """Why OpenSSH would not use the private key at ``path``, or None when it would."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return f"{path} does not exist"
    except OSError as exc:
        return f"{path} cannot be read ({exc.strerror or exc})"
    if not stat.S_ISREG(st.st_mode):
        return f"{path} is not a file"
    if not os.access(path, os.R_OK):
        return f"{path} is not readable by this user"
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        return (f"{path} is readable by others (mode {mode:04o}); ssh refuses such keys: "
                f"chmod 600 {path}")
    return None


def check_key_files(cluster: Cluster) -> None:
    """Raise ``ConfigError`` for the first enabled SSH node or Slurm target whose
    ``ssh_key_path`` is unusable."""
    for node in cluster.nodes:
        if not node.enabled or node.is_local or not node.ssh_key_path:
            continue
        problem = key_file_problem(Path(node.ssh_key_path).expanduser())
        if problem is not None:
            raise ConfigError(str(cluster.path), f"{cluster.entry_key(node.name)}.ssh_key_path",
                              f"{problem} (node {node.name})")
    for target in cluster.slurm_targets:
        if not target.enabled or not target.ssh_key_path:
            continue
        problem = key_file_problem(Path(target.ssh_key_path).expanduser())
        if problem is not None:
            raise ConfigError(str(cluster.path), f"{cluster.entry_key(target.name)}.ssh_key_path",
                              f"{problem} (slurm target {target.name})")
