"""Commands on a Slurm target's login host: submit once, job states, cancel, requeue, logs.

Every call goes through the target's login node transport (``target.login_node()`` in the
run's ``ConnectionPool``) with a timeout and an output cap; every word that reaches the
login host's shell is quoted by ``shlex`` (``infra.quoting``). Slurm and the files under
``<work>/.infra/slurm/<run>/`` on the cluster are the durable truth; the coordinator's
store is a cache of them.
"""

from __future__ import annotations

import base64
import functools
import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources

from infra.backends.slurm.jobstate import SACCT_FORMAT, JobState, parse_sacct, parse_scontrol
from infra.backends.slurm.sbatch import JobScript, slurm_dir
from infra.config.model import NodeConfig
from infra.errors import BadAnswerError, CommandFailedError, InfraError, TransportError
from infra.quoting import program_command, shell_path
from infra.transport.base import Transport
from infra.transport.marker import extract_json

LOCK_WAIT_SECONDS = 60
"""How long one submission waits for another coordinator's submission of the same job."""
LOG_CHUNK_BYTES = 256 * 1024
"""Bytes of one job output file one log read brings (per file and call)."""
LOG_FILES_PER_CALL = 32
"""Output files one log read covers (the rest wait for the next call)."""
_JOB_ID = re.compile(r"^[0-9]+$")
_TASK_WORD = re.compile(r"^[0-9]+(_[0-9]+)?$")
_BEGIN_JOB = "@@INFRA-SLURM-JOB "
_END_JOB = "@@INFRA-SLURM-RC "


class SlurmCommandError(CommandFailedError):
    """A Slurm command on the login host failed (sbatch refused, scancel failed, ...)."""


@functools.cache
def log_reader_source() -> str:
    """The node-side output reader's source, read once from the installed package."""
    return resources.files("infra.remote").joinpath("slurm_logs.py").read_text(
        encoding="utf-8")


def submit_command(state: str, key: str, script: JobScript) -> str:
    """The one shell command that submits a job at most once (the script comes on stdin).

    Under ``flock`` on ``<key>.lock``: a ``<key>.jobid`` written by an earlier submission is
    the answer; else a job of the same name Slurm still knows (a coordinator that died
    between sbatch and the marker); else the script is written, sbatch'ed, and its id put
    in ``<key>.jobid`` atomically (tmp + mv) before it is printed.
    """
    q = shlex.quote
    script_path = f"{key}.sh"
    sbatch = " ".join(["sbatch", "--parsable", *(q(o) for o in script.options), q(script_path)])
    return "\n".join([
        "set -e",
        "umask 077",
        f"mkdir -p {shell_path(state)}",
        f"cd {shell_path(state)}",
        f"exec 9>>{q(key + '.lock')}",
        f"flock -w {LOCK_WAIT_SECONDS} 9 || {{ echo 'another submission of this job holds "
        f"its lock' >&2; exit 75; }}",
        f"if [ -s {q(key + '.jobid')} ]; then",
        f"  echo \"{_BEGIN_JOB}marker $(head -n 1 {q(key + '.jobid')})\"",
        "  cat >/dev/null; exit 0",
        "fi",
        # a job of this name Slurm still knows (any state): submitted by a coordinator that
        # died before the marker was written
        f"found=$(squeue -h --states=all --name={q(script.name)} --format=%F 2>/dev/null "
        "| head -n 1 | tr -d ' ')",
        "if [ -z \"$found\" ]; then",
        f"  found=$(sacct -n -X -P --name={q(script.name)} --format=JobIDRaw 2>/dev/null "
        "| head -n 1 | sed 's/_.*//' | tr -d ' ')",
        "fi",
        "if [ -n \"$found\" ]; then",
        f"  printf '%s\\n' \"$found\" > {q(key + '.jobid.tmp')}",
        f"  mv {q(key + '.jobid.tmp')} {q(key + '.jobid')}",
        f"  echo \"{_BEGIN_JOB}name $found\"",
        "  cat >/dev/null; exit 0",
        "fi",
        f"cat > {q(script_path + '.tmp')}",
        f"mv {q(script_path + '.tmp')} {q(script_path)}",
        f"out=$({sbatch})",
        "id=${out%%;*}",
        f"printf '%s\\n' \"$id\" > {q(key + '.jobid.tmp')}",
        f"mv {q(key + '.jobid.tmp')} {q(key + '.jobid')}",
        f"echo \"{_BEGIN_JOB}submitted $id\"",
    ])


@dataclass(frozen=True)
class Submitted:
    """What the login host answered for one job: its id and how it was known."""

    job_id: str
    how: str  # "submitted", "marker" (an earlier submission), "name" (found in Slurm)


@dataclass(frozen=True)
class LogPiece:
    """Bytes of one output file from the asked offset, and the file's size (None: none yet)."""

    data: bytes
    size: int | None
    error: str | None = None


class SlurmClient:
    """One Slurm target's login host, reached through its transport."""

    def __init__(self, node: NodeConfig, transport: Transport, *, timeout: float) -> None:
        self.node = node
        self.transport = transport
        self.timeout = timeout

    async def _run(self, command: str, *, what: str, input: str | None = None,
                   timeout: float | None = None) -> str:
        """Run ``command``; a non-zero exit raises ``SlurmCommandError`` with its stderr."""
        result = await self.transport.run(command, input=input,
                                          timeout=timeout or self.timeout)
        if not result.ok:
            detail = " ".join((result.stderr or result.stdout).split())[-300:]
            raise SlurmCommandError(self.node.name, f"{what} failed (exit "
                                    f"{result.exit_status}): {detail or 'no output'}",
                                    result.exit_status, result.stderr)
        return result.stdout

    async def work_dir(self) -> str:
        """The target's ``remote_work_dir`` as an absolute path on the cluster."""
        path = self.node.remote_work_dir
        out = await self._run(f"mkdir -p {shell_path(path)} && cd {shell_path(path)} && pwd",
                              what="finding the work directory")
        lines = [ln for ln in out.splitlines() if ln.startswith("/")]
        if not lines:
            raise BadAnswerError(self.node.name, f"no absolute path for {path}: {out[:200]!r}")
        return lines[-1]

    async def submit_once(self, work_dir: str, run_id: str, script: JobScript) -> Submitted:
        """Submit ``script`` unless the cluster already has it (marker or job name)."""
        command = submit_command(slurm_dir(work_dir, run_id), script.key, script)
        out = await self._run(command, what=f"submitting {script.key}", input=script.text,
                              timeout=max(self.timeout, LOCK_WAIT_SECONDS + 30.0))
        for line in reversed(out.splitlines()):
            if line.startswith(_BEGIN_JOB):
                how, _, job = line[len(_BEGIN_JOB):].strip().partition(" ")
                job = job.strip()
                if _JOB_ID.match(job):
                    return Submitted(job, how)
        raise BadAnswerError(self.node.name, f"sbatch of {script.key} gave no job id: "
                             f"{' '.join(out.split())[-200:]!r}")

    async def show_jobs(self, job_ids: Sequence[str]) -> dict[str, list[JobState] | None]:
        """``scontrol show -o job ID`` for each job (one round trip): its states, or None for
        a job scontrol no longer knows (ended long ago: ask ``sacct``)."""
        ids = [j for j in dict.fromkeys(job_ids) if _JOB_ID.match(j)]
        if not ids:
            return {}
        loop = " ".join(shlex.quote(j) for j in ids)
        command = (f"for id in {loop}; do echo \"{_BEGIN_JOB}$id\"; "
                   "scontrol show -o job \"$id\" 2>&1; echo \"" + _END_JOB + "$?\"; done")
        out = await self._run(command, what="scontrol show job")
        found: dict[str, list[JobState] | None] = {}
        current: str | None = None
        body: list[str] = []
        for line in out.splitlines():
            if line.startswith(_BEGIN_JOB):
                current, body = line[len(_BEGIN_JOB):].strip(), []
            elif line.startswith(_END_JOB) and current is not None:
                rc = line[len(_END_JOB):].strip()
                text = "\n".join(body)
                if rc == "0":
                    found[current] = parse_scontrol(text)
                elif "Invalid job id" in text:
                    found[current] = None
                else:
                    raise SlurmCommandError(self.node.name, "scontrol show job "
                                            f"{current} failed: {' '.join(text.split())[:300]}")
                current = None
            elif current is not None:
                body.append(line)
        missing = [j for j in ids if j not in found]
        if missing:
            raise BadAnswerError(self.node.name, f"scontrol gave no answer for job(s) "
                                 f"{', '.join(missing)}")
        return found

    async def accounting(self, job_ids: Sequence[str]) -> list[JobState] | None:
        """``sacct`` for jobs scontrol forgot; None when accounting is off (or fails)."""
        ids = [j for j in dict.fromkeys(job_ids) if _JOB_ID.match(j)]
        if not ids:
            return []
        command = ("sacct -n -P -X -j " + shlex.quote(",".join(ids)) +
                   f" --format={SACCT_FORMAT}")
        try:
            out = await self._run(command, what="sacct")
        except SlurmCommandError:
            return None
        return parse_sacct(out)

    async def cancel(self, words: Sequence[str]) -> None:
        """``scancel`` the jobs (``ID``: a whole job or array; ``ID_i``: one array task)."""
        safe = [w for w in words if _TASK_WORD.match(w)]
        if not safe:
            return
        await self._run(" ".join(["scancel", *(shlex.quote(w) for w in safe)]),
                        what="scancel")

    async def requeue(self, word: str) -> None:
        """``scontrol requeue`` one job or array task (its restart rules allow another go)."""
        if not _TASK_WORD.match(word):
            raise InfraError(f"not a Slurm job id: {word!r}")
        await self._run(f"scontrol requeue {shlex.quote(word)}", what=f"requeue of {word}")

    async def read_logs(self, reads: Sequence[tuple[str, int]]) -> list[LogPiece]:
        """Bytes of each output file from its offset (at most ``LOG_CHUNK_BYTES`` each)."""
        if not reads:
            return []
        args = [str(LOG_CHUNK_BYTES)]
        for path, offset in reads:
            args += [path, str(max(0, offset))]
        command = program_command(self.node.python_path, ["-", *args])
        result = await self.transport.run(command, input=log_reader_source(),
                                          timeout=self.timeout)
        try:
            doc = extract_json(result.stdout)
            files = doc["files"]
            pieces = [LogPiece(base64.b64decode(f["data"]),
                               None if f["size"] is None else int(f["size"]),
                               None if f["error"] is None else str(f["error"]))
                      for f in files]
        except (ValueError, KeyError, TypeError) as exc:
            detail = " ".join((result.stderr or result.stdout).split())[-200:]
            raise BadAnswerError(self.node.name, f"could not read job output: "
                                 f"{detail or exc}") from None
        if len(pieces) != len(reads):
            raise BadAnswerError(self.node.name, "the output reader answered for "
                                 f"{len(pieces)} of {len(reads)} files")
        return pieces


def transport_reason(exc: InfraError) -> str:
    """An error's text without the target's name in front."""
    return " ".join(exc.reason.split()) if isinstance(exc, TransportError) else exc.one_line()
