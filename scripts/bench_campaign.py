#!/usr/bin/env python3
"""Short tasks on loopback nodes: our campaign against GNU parallel and a plain ssh loop.

Starts 3 loopback sshd nodes (``tests.sshfleet``) and runs N tasks (1,000 by default) of
about 50 ms each (``sleep 0.05``, then one line appended to the task's marker file in
``$HOME/bench-markers/ROUND/``), with the same concurrency for every contender (2 per node
by default, 6 in all), side by side in one process:

  parallel     GNU parallel ``--sshlogin 2/node1,...`` through an ssh config written for
               the fleet (its key and known_hosts; one SSH connection per task, its default;
               its ``-M`` lost jobs and hung here, GNU parallel 20221122, so it is left out)
  ssh loop     one ``ssh node CMD`` per task from 2 workers per node, in threads
  ssh loop -M  the same, every ssh multiplexed over one connection per node (OpenSSH
               ControlMaster/ControlPersist): the per-task cost without the handshake
  campaign     ``cluster-experiment --cluster-config C --config SPEC --auto-place`` with a
               spec ``sweep: {repeat: N}``, ``suite: {workers: 2}``, ``dispatch: all``;
               timed until every task's marker exists (the nodes work through their
               pool queues), then ``status --json`` must list N tasks, all exited

Every contender must leave exactly one marker line per task, over all nodes. Prints wall
time, throughput, the per-task overhead (``wall * concurrency / N - task seconds``), client
CPU, and each contender's speed-up against each baseline. Run as root:

    python scripts/bench_campaign.py [--tasks 1000] [--per-node 2] [--rounds 1]
                                     [--baselines-only] [--only parallel,ssh-loop,...]

Exit 2 when the machine cannot run it (no sshd fleet, GNU parallel missing: ``apt-get
install parallel``), 1 when a contender failed or left wrong markers (including a CLI that
does not support campaigns yet), 0 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from bench_common import (
    BenchFailure,
    FleetError,
    Series,
    SSHFleet,
    cluster_yaml,
    load_note,
    load_scale,
    measure,
    print_table,
    require_fleet,
    scaled_deadline,
)

NODES = 3
TASK_SECONDS = 0.05
CONTENDER_TIMEOUT_S = 600.0
BENCH_LIMIT_S = 1000
"""Idle-machine limit for the whole run, multiplied by the load factor measured at start."""
CLI_EXIT_GRACE_S = 60.0
MARKERS = "bench-markers"
TEMPLATE = "bench"  # the campaign's template id: tasks are bench.0000, bench.0001, ...

Finish = Callable[[], None]


# --------------------------------------------------------------------------- the setting

@dataclass(frozen=True)
class Env:
    """What every contender gets: the fleet, an ssh config naming its nodes, the task list."""

    fleet: SSHFleet
    ssh_config: Path
    workdir: Path
    tasks: tuple[str, ...]
    per_node: int

    @property
    def hosts(self) -> tuple[str, ...]:
        return tuple(h.name for h in self.fleet.hosts)

    @property
    def concurrency(self) -> int:
        return self.per_node * len(self.fleet.hosts)


def task_ids(n: int) -> tuple[str, ...]:
    """The same ids as the campaign's tasks get (``bench.0000``...), for every contender."""
    width = max(4, len(str(n - 1)))
    return tuple(f"{TEMPLATE}.{i:0{width}d}" for i in range(n))


def task_command(tag: str, task_id: str) -> str:
    """The shell command of one task: 50 ms of sleep, then one marker line."""
    return (f"sleep {TASK_SECONDS:g}; echo x >> \"$HOME/{MARKERS}/{tag}/\""
            f"{shlex.quote(task_id)}")


def write_ssh_config(fleet: SSHFleet, path: Path) -> Path:
    """An ssh_config with one ``Host nodeN`` entry per fleet host (key, port, known_hosts)."""
    blocks = []
    for h in fleet.hosts:
        blocks.append("\n".join([
            f"Host {h.name}",
            f"  HostName {h.address}",
            f"  Port {h.port}",
            f"  User {h.user}",
            f"  IdentityFile {fleet.client_key}",
            "  IdentitiesOnly yes",
            f"  UserKnownHostsFile {fleet.known_hosts}",
            "  GlobalKnownHostsFile /dev/null",
            "  StrictHostKeyChecking yes",
            "  BatchMode yes",
        ]))
    path.write_text("\n\n".join(blocks) + "\n")
    return path


def prepare_markers(env: Env, tag: str) -> None:
    """An empty marker directory per node for this round (owned by the node's user)."""
    for h in env.fleet.hosts:
        for path in (h.home / MARKERS, h.home / MARKERS / tag):
            path.mkdir(exist_ok=True)
            os.chown(path, h.uid, -1)


def marker_counts(env: Env, tag: str) -> tuple[Counter[str], dict[str, int]]:
    """Marker lines per task over all nodes, and marker files per node (read from disk)."""
    lines: Counter[str] = Counter()
    per_node: dict[str, int] = {}
    for h in env.fleet.hosts:
        d = h.home / MARKERS / tag
        files = list(d.iterdir()) if d.is_dir() else []
        per_node[h.name] = len(files)
        for f in files:
            lines[f.name] += len(f.read_text().splitlines())
    return lines, per_node


def markers_present(env: Env, tag: str) -> int:
    """How many marker files exist so far (cheap: directory listings only)."""
    total = 0
    for h in env.fleet.hosts:
        with os.scandir(h.home / MARKERS / tag) as it:
            total += sum(1 for _ in it)
    return total


def check_markers(env: Env, tag: str, label: str) -> str:
    """Exactly one marker line per task over all nodes; returns the per-node split."""
    lines, per_node = marker_counts(env, tag)
    missing = [t for t in env.tasks if lines[t] == 0]
    twice = sorted(t for t, n in lines.items() if n > 1)
    extra = sorted(set(lines) - set(env.tasks))
    if missing or twice or extra:
        raise BenchFailure(f"{label}: {len(missing)} task(s) never ran (e.g. {missing[:3]}), "
                           f"{len(twice)} ran twice (e.g. {twice[:3]}), {len(extra)} unknown "
                           f"marker(s) (e.g. {extra[:3]})")
    return " ".join(f"{name}={n}" for name, n in per_node.items())


# --------------------------------------------------------------------------- contenders

def run_gnu_parallel(env: Env, tag: str) -> None:
    """GNU parallel over the fleet: ``-S 2/node1,2/node2,...`` and our ssh config."""
    ids = env.workdir / f"ids-{tag}.txt"
    ids.write_text("".join(t + "\n" for t in env.tasks))
    logins = ",".join(f"{env.per_node}/{h}" for h in env.hosts)
    cmd = (f"sleep {TASK_SECONDS:g}; echo x >> \"$HOME/{MARKERS}/{tag}/\"{{}}")
    argv = ["parallel", "--will-cite", "--ssh", f"ssh -F {shlex.quote(str(env.ssh_config))}",
            "-S", logins, "--halt", "now,fail=1", "-a", str(ids), cmd]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=CONTENDER_TIMEOUT_S,
                          check=False, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise BenchFailure(f"GNU parallel exited {proc.returncode}: "
                           f"{proc.stderr.strip()[-400:]}")


def run_ssh_loop(env: Env, tag: str, *, master: bool = False) -> Finish | None:
    """``per_node`` workers per node, each running ``ssh node CMD`` for the next task.

    ``master``: every ssh shares one connection per node (OpenSSH ControlMaster, kept by
    ControlPersist and closed with ``-O exit`` after the timing).
    """
    todo: queue.SimpleQueue[str] = queue.SimpleQueue()
    for t in env.tasks:
        todo.put(t)
    errors: list[str] = []
    ssh = ["ssh", "-F", str(env.ssh_config)]
    if master:
        ssh += ["-o", "ControlMaster=auto", "-o", f"ControlPath={env.workdir}/cm-{tag}-%C",
                "-o", "ControlPersist=300"]

    def worker(host: str) -> None:
        while not errors:
            try:
                tid = todo.get_nowait()
            except queue.Empty:
                return
            proc = subprocess.run([*ssh, host, task_command(tag, tid)],
                                  capture_output=True, text=True, timeout=60, check=False,
                                  stdin=subprocess.DEVNULL)
            if proc.returncode != 0:
                errors.append(f"{host}: ssh exited {proc.returncode}: {proc.stderr.strip()}")

    threads = [threading.Thread(target=worker, args=(h,), daemon=True)
               for h in env.hosts for _ in range(env.per_node)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(CONTENDER_TIMEOUT_S)
    if errors:
        raise BenchFailure(f"ssh loop: {errors[0]}")
    if not master:
        return None

    def close_masters() -> None:
        for host in env.hosts:
            subprocess.run([*ssh, "-O", "exit", host], capture_output=True, timeout=30,
                           check=False, stdin=subprocess.DEVNULL)
    return close_masters


def run_ssh_loop_master(env: Env, tag: str) -> Finish | None:
    return run_ssh_loop(env, tag, master=True)


def campaign_project(env: Env, tag: str) -> tuple[Path, Path, Path]:
    """A tiny project (cluster config for the fleet, one sweep spec); its paths."""
    root = env.workdir / f"campaign-{tag}"
    (root / "experiments").mkdir(parents=True, exist_ok=True)
    config = cluster_yaml(
        root / "cluster_config.yaml", env.fleet,
        work_dir=lambda h: f"{h.home}/work/{tag}",
        health={"timeout_seconds": 10},
        extra={"deploy": {"source": "."}, "failover": {"auto_restart": False}})
    doc = yaml.safe_load(config.read_text())
    for node in doc["nodes"]:  # the same concurrency as the baselines: per_node per node
        node["max_instances"] = env.per_node
        node["claims_dir"] = f"{node['remote_work_dir']}.claims"
    config.write_text(yaml.safe_dump(doc))
    spec = root / "experiments" / f"{TEMPLATE}.json"
    spec.write_text(json.dumps({
        "experiment_id": TEMPLATE,
        "command": task_command(tag, "PLACEHOLDER").replace("PLACEHOLDER", "{task_id}"),
        "ram_gb": 0.25,
        "sweep": {"repeat": len(env.tasks)},
        "suite": {"workers": env.per_node},
        "dispatch": "all",
    }, indent=2))
    return root, config, spec


def cli_argv(*args: str) -> list[str]:
    """``cluster-experiment ARGS`` (the installed entry point, run by this interpreter)."""
    return [sys.executable, "-m", "infra.cli.main", *args]


def campaign_support(env: Env) -> str | None:
    """Why this CLI cannot run the campaign contender (its validation line), or None."""
    root, config, spec = campaign_project(env, "probe")
    proc = subprocess.run(cli_argv("--cluster-config", str(config), "--config", str(spec),
                                   "--validate-config", "--json"),
                          cwd=root, capture_output=True, text=True, timeout=120, check=False)
    if proc.returncode == 0:
        return None
    line = (proc.stderr.strip() or proc.stdout.strip()).splitlines()[-1:] or ["(no output)"]
    return (f"the CLI does not support campaigns yet (validating a spec with sweep/suite/"
            f"dispatch exits {proc.returncode}: {line[0]})")


def run_campaign(env: Env, tag: str) -> Finish:
    """Submit the sweep with ``--auto-place``; done when every task's marker exists.

    Returns what runs after the timing: wait for the coordinator to end (or stop the one
    this started), then check the run's status.
    """
    root, config, spec = campaign_project(env, tag)
    out, err = root / "run.out", root / "run.err"
    with out.open("w") as fout, err.open("w") as ferr:
        proc = subprocess.Popen(cli_argv("--cluster-config", str(config), "--config", str(spec),
                                         "--auto-place", "--json"),
                                cwd=root, stdout=fout, stderr=ferr, stdin=subprocess.DEVNULL,
                                env={**os.environ, "COLUMNS": "200"})
    try:
        wait_for_markers(env, tag, proc, err)
    except BaseException:
        proc.kill()
        proc.wait()
        raise

    def finish() -> None:
        try:
            proc.wait(CLI_EXIT_GRACE_S)
        except subprocess.TimeoutExpired:
            proc.terminate()
            proc.wait(30)
        check_campaign_status(env, root, config)
    return finish


def wait_for_markers(env: Env, tag: str, proc: subprocess.Popen[bytes], err: Path) -> None:
    """Poll the nodes' marker directories until all N exist (the CLI may have detached)."""
    limit = time.monotonic() + CONTENDER_TIMEOUT_S
    while markers_present(env, tag) < len(env.tasks):
        code = proc.poll()
        if code not in (None, 0):
            last = err.read_text(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
            raise BenchFailure(f"campaign: cluster-experiment exited {code}: {last[0]}")
        if time.monotonic() > limit:
            raise BenchFailure(f"campaign: {markers_present(env, tag)} of {len(env.tasks)} "
                               f"tasks done after {CONTENDER_TIMEOUT_S:g} s")
        time.sleep(0.02)


def check_campaign_status(env: Env, root: Path, config: Path) -> None:
    """``status --json`` of the run: N task instances, every one exited."""
    proc = subprocess.run(cli_argv("--cluster-config", str(config), "status", "--json"),
                          cwd=root, capture_output=True, text=True, timeout=300, check=False)
    if proc.returncode != 0:
        raise BenchFailure(f"campaign: status --json exited {proc.returncode}: "
                           f"{proc.stderr.strip()[-300:]}")
    doc = json.loads(proc.stdout)
    states = Counter(i["state"] for i in doc.get("instances", []))
    if sum(states.values()) != len(env.tasks) or states["exited"] != len(env.tasks):
        raise BenchFailure(f"campaign: status of {doc.get('run_id')} lists "
                           f"{dict(states)}, expected {len(env.tasks)} exited")


@dataclass(frozen=True)
class Contender:
    """One way to run the tasks; ``run`` may return checks to do after the timing."""

    key: str
    label: str
    run: Callable[[Env, str], Finish | None]
    baseline: bool


CONTENDERS = (
    Contender("parallel", "GNU parallel --sshlogin", run_gnu_parallel, True),
    Contender("ssh-loop", "plain ssh loop", run_ssh_loop, True),
    Contender("ssh-loop-M", "ssh loop, ControlMaster", run_ssh_loop_master, True),
    Contender("campaign", "campaign (pools, dispatch: all)", run_campaign, False),
)


# --------------------------------------------------------------------------- main

def rotated(items: Sequence[Contender], r: int) -> list[Contender]:
    """The contenders' order in round ``r``: rotated so none always goes first."""
    k = r % len(items) if items else 0
    return [*items[k:], *items[:k]]


def overhead_ms(wall: float, env: Env) -> float:
    """Per-task cost beyond the task itself: ``wall * concurrency / N - task seconds``."""
    return (wall * env.concurrency / len(env.tasks) - TASK_SECONDS) * 1000


def report(env: Env, series: dict[str, Series], failures: dict[str, str]) -> None:
    baselines = [c for c in CONTENDERS if c.baseline and series[c.key].samples]
    rows: list[list[Any]] = []
    for c in CONTENDERS:
        s = series[c.key]
        if not s.samples:
            rows.append([c.label, 0, "-", "-", "-", "-", *["-" for _ in baselines]])
            continue
        wall = s.median()
        rows.append([c.label, len(s.samples), f"{wall:.2f}", f"{len(env.tasks) / wall:.1f}",
                     f"{overhead_ms(wall, env):.1f}", f"{s.median('cpu'):.2f}",
                     *[f"{series[b.key].median() / wall:.2f}x" for b in baselines]])
    print_table(f"{len(env.tasks)} tasks of {TASK_SECONDS * 1000:g} ms on {NODES} loopback "
                f"nodes, {env.per_node} per node ({env.concurrency} at once); wall median "
                f"over rounds; speed-up = that baseline's wall / this wall",
                ["contender", "n", "wall s", "tasks/s", "overhead ms/task", "client cpu s",
                 *[f"vs {b.key}" for b in baselines]], rows)
    ideal = len(env.tasks) * TASK_SECONDS / env.concurrency
    print(f"\nideal wall (tasks only, no overhead): {ideal:.2f} s; {load_note()}")
    for key, why in failures.items():
        print(f"FAILED {key}: {why}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--tasks", type=int, default=1000, help="tasks per contender (1000)")
    parser.add_argument("--per-node", type=int, default=2,
                        help="tasks at once per node, for every contender (2)")
    parser.add_argument("--rounds", type=int, default=1, help="timed rounds (1)")
    parser.add_argument("--only", default="",
                        help="comma list of contenders: " + ",".join(c.key for c in CONTENDERS))
    parser.add_argument("--baselines-only", action="store_true",
                        help="skip the campaign contender")
    args = parser.parse_args()
    if args.tasks < 1 or args.per_node < 1 or args.rounds < 1:
        print("--tasks, --per-node and --rounds must be at least 1", file=sys.stderr)
        return 2
    chosen = [c for c in CONTENDERS if (not args.only or c.key in args.only.split(","))
              and not (args.baselines_only and not c.baseline)]
    unknown = set(filter(None, args.only.split(","))) - {c.key for c in CONTENDERS}
    if unknown or not chosen:
        print(f"--only: unknown or no contenders: {', '.join(sorted(unknown)) or '(none)'}",
              file=sys.stderr)
        return 2
    require_fleet()
    if any(c.key.startswith("parallel") for c in chosen) and shutil.which("parallel") is None:
        print("cannot run: GNU parallel is missing (apt-get install parallel)", file=sys.stderr)
        return 2

    series = {c.key: Series(c.label) for c in CONTENDERS}
    failures: dict[str, str] = {}
    try:
        with scaled_deadline(BENCH_LIMIT_S, load_scale()), tempfile.TemporaryDirectory(prefix="bench-campaign-") as tmp, \
                SSHFleet.start(NODES, workdir=Path(tmp) / "fleet") as fleet:
            env = Env(fleet=fleet, ssh_config=write_ssh_config(fleet, Path(tmp) / "ssh_config"),
                      workdir=Path(tmp), tasks=task_ids(args.tasks), per_node=args.per_node)
            if any(c.key == "campaign" for c in chosen):
                why = campaign_support(env)
                if why is not None:
                    failures["campaign"] = why
                    chosen = [c for c in chosen if c.key != "campaign"]
                    print(f"campaign: not measured: {why}", flush=True)
            for r in range(args.rounds):
                for c in rotated(chosen, r):
                    if c.key in failures:
                        continue
                    tag = f"{c.key}-r{r}"
                    prepare_markers(env, tag)
                    samples = len(series[c.key].samples)
                    try:
                        with measure(series[c.key]):
                            finish = c.run(env, tag)
                        if finish is not None:
                            finish()
                        split = check_markers(env, tag, c.label)
                    except (BenchFailure, subprocess.TimeoutExpired) as exc:
                        failures[c.key] = str(exc)
                        del series[c.key].samples[samples:]  # a failed round has no time
                        print(f"  round {r} {c.label:<34} FAILED: {exc}", flush=True)
                        continue
                    wall = series[c.key].samples[-1].wall
                    print(f"  round {r} {c.label:<34} {wall:7.2f} s  "
                          f"{overhead_ms(wall, env):6.1f} ms/task overhead  ({split})",
                          flush=True)
            report(env, series, failures)
    except FleetError as exc:
        print(f"cannot run: {exc}", file=sys.stderr)
        return 2
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
