"""Slurm's answers as typed states (backends.slurm.jobstate): ``scontrol show -o job`` lines
in Slurm 22.05's documented format, ``sacct -P`` lines, plain words for every state, and the
store phase each state maps to."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from infra.backends.slurm.jobstate import (
    JobState,
    SlurmState,
    array_indices,
    parse_sacct,
    parse_scontrol,
    phase_of,
    plain_words,
)
from infra.state.store import InstancePhase


def line(**fields: str) -> str:
    """One ``scontrol show -o job`` line: Slurm's order of the keys this parser reads,
    with the keys it does not read around them."""
    doc = {
        "JobId": "12", "JobName": "infra.r1.e1", "UserId": "alice(1000)",
        "GroupId": "alice(1000)", "MCS_label": "N/A", "Priority": "4294901759", "Nice": "0",
        "Account": "(null)", "QOS": "normal", "JobState": "COMPLETED", "Reason": "None",
        "Dependency": "(null)", "Requeue": "1", "Restarts": "0", "BatchFlag": "1",
        "Reboot": "0", "ExitCode": "0:0", "RunTime": "00:00:03", "TimeLimit": "00:01:00",
        "TimeMin": "N/A", "SubmitTime": "2026-12-06T23:01:00",
        "EligibleTime": "2026-12-06T23:01:00", "AccrueTime": "2026-12-06T23:01:00",
        "StartTime": "2026-12-06T23:01:02", "EndTime": "2026-12-06T23:01:05",
        "Deadline": "N/A", "SuspendTime": "None", "SecsPreSuspend": "0",
        "LastSchedEval": "2026-12-06T23:01:02", "Scheduler": "Main", "Partition": "debug",
        "AllocNode:Sid": "login:4242", "ReqNodeList": "(null)", "ExcNodeList": "(null)",
        "NodeList": "host", "BatchHost": "host", "NumNodes": "1", "NumCPUs": "1",
        "NumTasks": "1", "CPUs/Task": "1", "ReqB:S:C:T": "0:0:*:*",
        "TRES": "cpu=1,mem=1G,node=1,billing=1", "Socks/Node": "*",
        "NtasksPerN:B:S:C": "0:0:*:*", "CoreSpec": "*", "MinCPUsNode": "1",
        "MinMemoryNode": "1G", "MinTmpDiskNode": "0", "Features": "(null)",
        "DelayBoot": "00:00:00", "OverSubscribe": "OK", "Contiguous": "0",
        "Licenses": "(null)", "Network": "(null)", "Command": "(null)",
        "WorkDir": "/scratch/alice/lab", "Comment": "lab-orchestrator run=r1 key=e1",
        "StdErr": "/scratch/alice/lab/.infra/slurm/r1/e1.out", "StdIn": "/dev/null",
        "StdOut": "/scratch/alice/lab/.infra/slurm/r1/e1.out", "Power": "",
    }
    array = {k: fields.pop(k) for k in ("ArrayJobId", "ArrayTaskId", "ArrayTaskThrottle")
             if k in fields}
    doc.update(fields)
    if array:  # scontrol puts the array keys right after JobId
        doc = {"JobId": doc.pop("JobId"), **array, **doc}
    return " ".join(f"{k}={v}" for k, v in doc.items())


def local(text: str) -> float:
    return time.mktime(time.strptime(text, "%Y-%m-%dT%H:%M:%S"))


def one(text: str) -> JobState:
    states = parse_scontrol(text)
    assert len(states) == 1, states
    return states[0]


def test_a_completed_job() -> None:
    s = one(line())
    assert s == JobState(job_id="12", index=None, state=SlurmState.COMPLETED, reason=None,
                         exit_code=0, signal=None, node="host",
                         start_time=local("2026-12-06T23:01:02"),
                         end_time=local("2026-12-06T23:01:05"), restarts=0,
                         time_limit="00:01:00", name="infra.r1.e1", raw_state="COMPLETED")
    assert s.task_id == "12" and s.state.finished
    assert plain_words(s) == "completed" and phase_of(s) is InstancePhase.EXITED


def test_one_array_task_belongs_to_its_array() -> None:
    s = one(line(JobId="15", ArrayJobId="12", ArrayTaskId="3", ArrayTaskThrottle="4",
                 JobState="RUNNING", EndTime="2026-12-06T23:02:02", ExitCode="0:0"))
    assert (s.job_id, s.index, s.task_id, s.state, s.throttle) == \
        ("12", 3, "12_3", SlurmState.RUNNING, 4)
    assert s.end_time is None and s.exit_code is None  # a running job has neither yet
    assert plain_words(s) == "running on host" and phase_of(s) is InstancePhase.RUNNING


@pytest.mark.parametrize(("task", "indices", "throttle"), [
    ("4-15%4", list(range(4, 16)), 4),
    ("4,6,8-9", [4, 6, 8, 9], None),
    ("0-15:5", [0, 5, 10, 15], None),
    ("[1-3]", [1, 2, 3], None),
    ("7", [7], None),
])
def test_array_index_ranges(task: str, indices: list[int], throttle: int | None) -> None:
    assert array_indices(task) == (indices, throttle)


def test_a_pending_array_range_is_one_state_per_index() -> None:
    text = line(JobId="12", ArrayJobId="12", ArrayTaskId="4-15%4", ArrayTaskThrottle="4",
                JobState="PENDING", Reason="JobArrayTaskLimit", StartTime="Unknown",
                EndTime="Unknown", NodeList="(null)")
    states = parse_scontrol(text)
    assert [s.index for s in states] == list(range(4, 16))
    assert {(s.job_id, s.state, s.reason, s.node, s.start_time, s.throttle) for s in states} \
        == {("12", SlurmState.PENDING, "JobArrayTaskLimit", None, None, 4)}
    assert plain_words(states[0]) == "waiting: the array's %4 throttle"
    assert phase_of(states[0]) is InstancePhase.QUEUED
    listed = parse_scontrol(line(JobId="12", ArrayJobId="12", ArrayTaskId="4,6,8-9",
                                 JobState="PENDING", Reason="Dependency"))
    assert [s.index for s in listed] == [4, 6, 8, 9]
    assert plain_words(listed[0]) == "waiting: after its dependencies"


def test_a_whole_array_answer_mixes_running_done_and_pending() -> None:
    text = "\n".join([
        line(JobId="12", ArrayJobId="12", ArrayTaskId="4-15%4", JobState="PENDING",
             Reason="JobArrayTaskLimit", StartTime="Unknown", EndTime="Unknown"),
        line(JobId="16", ArrayJobId="12", ArrayTaskId="3", JobState="RUNNING"),
        line(JobId="15", ArrayJobId="12", ArrayTaskId="2", JobState="FAILED",
             Reason="NonZeroExitCode", ExitCode="3:0"),
        "",
        line(JobId="14", ArrayJobId="12", ArrayTaskId="1", JobState="COMPLETED"),
    ])
    states = {s.index: s for s in parse_scontrol(text)}
    assert sorted(states) == list(range(1, 16))
    assert plain_words(states[2]) == "failed: exit code 3"
    assert phase_of(states[2]) is InstancePhase.FAILED
    assert states[3].state is SlurmState.RUNNING and states[1].state is SlurmState.COMPLETED
    assert plain_words(states[15]) == "waiting: the array's %4 throttle"  # from the range


WORDS = [
    ({"JobState": "FAILED", "Reason": "NonZeroExitCode", "ExitCode": "3:0"},
     "failed: exit code 3", InstancePhase.FAILED),
    ({"JobState": "FAILED", "Reason": "RaisedSignal:9(Killed)", "ExitCode": "0:9"},
     "killed by signal 9", InstancePhase.FAILED),
    ({"JobState": "FAILED", "Reason": "launch failed requeued held", "ExitCode": "0:0"},
     "failed (launch failed requeued held)", InstancePhase.FAILED),
    ({"JobState": "FAILED", "Reason": "JobLaunchFailure", "ExitCode": "0:53"},
     "failed to launch: Slurm could not start it on its node (a missing work dir or output "
     "directory?)", InstancePhase.FAILED),
    ({"JobState": "TIMEOUT", "Reason": "TimeLimit", "ExitCode": "0:15"},
     "hit its time limit (00:01:00)", InstancePhase.FAILED),
    ({"JobState": "OUT_OF_MEMORY", "Reason": "OutOfMemory", "ExitCode": "0:125"},
     "ran out of memory", InstancePhase.FAILED),
    ({"JobState": "CANCELLED", "Reason": "None", "ExitCode": "0:15"}, "cancelled",
     InstancePhase.STOPPED),
    ({"JobState": "NODE_FAIL", "Reason": "NodeDown"}, "its Slurm node failed",
     InstancePhase.FAILED),
    ({"JobState": "PREEMPTED"}, "preempted", InstancePhase.FAILED),
    ({"JobState": "BOOT_FAIL"}, "its Slurm node failed to boot", InstancePhase.FAILED),
    ({"JobState": "DEADLINE"}, "missed its deadline", InstancePhase.FAILED),
    ({"JobState": "PENDING", "Reason": "Dependency"}, "waiting: after its dependencies",
     InstancePhase.QUEUED),
    ({"JobState": "PENDING", "Reason": "DependencyNeverSatisfied"},
     "waiting: a dependency failed, so it will never start", InstancePhase.QUEUED),
    ({"JobState": "PENDING", "Reason": "Resources"}, "waiting for resources",
     InstancePhase.QUEUED),
    ({"JobState": "PENDING", "Reason": "Priority"}, "waiting: jobs of higher priority go first",
     InstancePhase.QUEUED),
    ({"JobState": "PENDING", "Reason": "JobArrayTaskLimit"},
     "waiting: the array's max_parallel throttle", InstancePhase.QUEUED),
    ({"JobState": "PENDING", "Reason": "QOSMaxJobsPerUserLimit"},
     "waiting: a limit of its account or QoS (QOSMaxJobsPerUserLimit)", InstancePhase.QUEUED),
    ({"JobState": "PENDING", "Reason": "PartitionTimeLimit"},
     "waiting: its time limit is longer than the partition allows, so it will never start",
     InstancePhase.QUEUED),
    ({"JobState": "PENDING", "Reason": "SomethingNew"}, "waiting (SomethingNew)",
     InstancePhase.QUEUED),
    ({"JobState": "PENDING", "Reason": "None"}, "waiting in the Slurm queue",
     InstancePhase.QUEUED),
    ({"JobState": "CONFIGURING"}, "starting on host (Slurm is configuring its nodes)",
     InstancePhase.STARTING),
    ({"JobState": "COMPLETING", "ExitCode": "0:0"}, "ending on host", InstancePhase.RUNNING),
    ({"JobState": "SUSPENDED"}, "suspended on host", InstancePhase.RUNNING),
    ({"JobState": "REQUEUED"}, "requeued: it will start again", InstancePhase.RESTARTING),
    ({"JobState": "REQUEUE_HOLD"}, "requeued and held (scontrol release to let it start)",
     InstancePhase.PAUSED),
    ({"JobState": "SPECIAL_EXIT"}, "held after a special exit (scontrol release to rerun it)",
     InstancePhase.PAUSED),
    ({"JobState": "REVOKED"}, "revoked (it runs on another cluster of the federation)",
     InstancePhase.STOPPED),
    ({"JobState": "SOMETHING_NEW"}, "in Slurm state SOMETHING_NEW", InstancePhase.RUNNING),
]


@pytest.mark.parametrize(("fields", "words", "phase"), WORDS)
def test_plain_words_and_phase_for_every_state(fields: dict[str, str], words: str,
                                               phase: InstancePhase) -> None:
    s = one(line(**fields))
    assert plain_words(s) == words
    assert phase_of(s) is phase


def test_every_state_has_words_and_a_phase() -> None:
    for state in SlurmState:
        s = JobState(job_id="1", index=None, state=state, reason=None, exit_code=None,
                     signal=None, node=None, start_time=None, end_time=None, restarts=0,
                     time_limit=None, name="x")
        assert plain_words(s) and isinstance(phase_of(s), InstancePhase)
        assert state.finished == phase_of(s).finished or state in (
            SlurmState.REQUEUE_HOLD, SlurmState.SPECIAL_EXIT, SlurmState.RESV_DEL_HOLD)


def test_restarts_signal_and_times() -> None:
    s = one(line(JobState="FAILED", ExitCode="0:9", Restarts="2", StartTime="Unknown",
                 EndTime="None"))
    assert (s.restarts, s.exit_code, s.signal, s.start_time, s.end_time) == \
        (2, 0, 9, None, None)
    pending = one(line(JobState="PENDING", StartTime="2026-12-07T01:00:00",
                       EndTime="2026-12-07T02:00:00"))
    assert pending.start_time is None and pending.end_time is None  # expected, not real


def test_values_with_spaces_stay_in_their_field() -> None:
    s = one(line(JobState="RUNNING", WorkDir="/home/a b/lab JobState=FAILED",
                 Comment="lab-orchestrator run=r1 key=e1", NodeList="host"))
    assert s.state is SlurmState.RUNNING and s.node == "host"


def test_noise_and_errors_are_skipped() -> None:
    assert parse_scontrol("") == []
    assert parse_scontrol("slurm_load_jobs error: Invalid job id specified\n") == []
    assert parse_scontrol("No jobs in the system\n") == []


# --------------------------------------------------------------------------- sacct

SACCT = """\
12|12|infra.r1.e1|COMPLETED|0:0|host|2026-12-06T23:01:02|2026-12-06T23:01:05|00:01:00
13|13|infra.r1.e2|FAILED|3:0|host|2026-12-06T23:01:02|2026-12-06T23:01:04|00:01:00
14|14|infra.r1.e3|CANCELLED by 1000|0:15|host|2026-12-06T23:01:02|2026-12-06T23:01:09|00:01:00
15|15|infra.r1.e4|TIMEOUT|0:0|host|2026-12-06T23:01:02|2026-12-06T23:02:03|00:01:00
16|16|infra.r1.e5|OUT_OF_MEMORY|0:125|host|2026-12-06T23:01:02|2026-12-06T23:01:03|00:01:00
20_3|23|infra.r1.sw|RUNNING|0:0|host|2026-12-06T23:01:02|Unknown|00:01:00
20_[4-15%4]|20|infra.r1.sw|PENDING|0:0|None assigned|Unknown|Unknown|00:01:00
21|21|infra.r1.e6|NODE_FAIL|0:0|host|2026-12-06T23:01:02|2026-12-06T23:01:03|00:01:00
"""


def test_sacct_lines() -> None:
    states = parse_sacct(SACCT)
    by = {s.task_id: s for s in states}
    assert plain_words(by["12"]) == "completed"
    assert plain_words(by["13"]) == "failed: exit code 3"
    assert by["14"].state is SlurmState.CANCELLED and by["14"].reason == "by 1000"
    assert plain_words(by["14"]) == "cancelled (by 1000)"
    assert plain_words(by["15"]) == "hit its time limit (00:01:00)"
    assert plain_words(by["16"]) == "ran out of memory"
    assert plain_words(by["21"]) == "its Slurm node failed"
    assert by["20_3"].state is SlurmState.RUNNING and by["20_3"].job_id == "20"
    assert [by[f"20_{i}"].state for i in range(4, 16)] == [SlurmState.PENDING] * 12
    assert by["20_4"].throttle == 4 and by["20_4"].node is None
    assert by["12"].start_time == local("2026-12-06T23:01:02")
    assert by["12"].end_time == local("2026-12-06T23:01:05")


def test_sacct_skips_steps_and_noise_and_reads_truncated_states() -> None:
    text = ("12.batch|12.batch|batch|COMPLETED|0:0|host|x|y|\n"
            "garbage\n"
            "30|30|n|OUT_OF_ME+|0:125|host|Unknown|Unknown|00:01:00\n")
    states = parse_sacct(text)
    assert [(s.task_id, s.state) for s in states] == [("30", SlurmState.OUT_OF_MEMORY)]


# --------------------------------------------------------------------------- real Slurm text

FIXTURES = Path(__file__).parent / "fixtures" / "slurm"


def fixture(name: str) -> str:
    return (FIXTURES / name).read_text()


@pytest.mark.parametrize(("name", "state", "words", "phase", "exit_code", "signal"), [
    ("completed.txt", SlurmState.COMPLETED, "completed", InstancePhase.EXITED, 0, None),
    ("failed_exit3.txt", SlurmState.FAILED, "failed: exit code 3", InstancePhase.FAILED, 3,
     None),
    ("cancelled.txt", SlurmState.CANCELLED, "cancelled", InstancePhase.STOPPED, 0, 15),
    ("timeout.txt", SlurmState.TIMEOUT, "hit its time limit (00:01:00)", InstancePhase.FAILED,
     0, 15),
    ("over_memory_cgroup.txt", SlurmState.OUT_OF_MEMORY, "ran out of memory",
     InstancePhase.FAILED, 0, 125),
    ("over_memory_jobacct.txt", SlurmState.FAILED, "killed by signal 9", InstancePhase.FAILED,
     0, 9),
    ("running.txt", SlurmState.RUNNING, "running on t7612a810n1", InstancePhase.RUNNING, None,
     None),
    ("pending_dependency.txt", SlurmState.PENDING, "waiting: after its dependencies",
     InstancePhase.QUEUED, None, None),
    ("dependency_never_satisfied.txt", SlurmState.PENDING,
     "waiting: a dependency failed, so it will never start", InstancePhase.QUEUED, None, None),
])
def test_real_scontrol_lines(name: str, state: SlurmState, words: str, phase: InstancePhase,
                             exit_code: int | None, signal: int | None) -> None:
    s = one(fixture(name))
    assert (s.state, s.exit_code, s.signal, s.index) == (state, exit_code, signal, None)
    assert plain_words(s) == words and phase_of(s) is phase
    assert s.job_id.isdigit() and s.task_id == s.job_id
    if state is SlurmState.PENDING:
        assert s.node is None and s.start_time is None and s.end_time is None
    else:
        assert s.node and s.node.endswith("n1") and s.start_time is not None
        assert (s.end_time is not None) == state.finished
        if s.end_time is not None:
            assert s.end_time >= s.start_time


def test_real_timeout_keeps_its_limit_and_times() -> None:
    s = one(fixture("timeout.txt"))
    assert s.time_limit == "00:01:00" and s.restarts == 0
    assert s.end_time is not None and s.start_time is not None
    assert s.end_time - s.start_time == 66  # RunTime=00:01:06


def test_real_memory_kill_without_cgroups_is_told_by_the_output() -> None:
    s = one(fixture("over_memory_jobacct.txt"))
    assert s.reason == "JobLaunchFailure"
    assert plain_words(s, fixture("over_memory_jobacct_output.txt")) == \
        "ran out of memory (killed at its --mem limit)"
    cgroup = one(fixture("over_memory_cgroup.txt"))
    assert plain_words(cgroup, fixture("over_memory_cgroup_output.txt")) == "ran out of memory"
    failed = one(fixture("failed_exit3.txt"))  # an ordinary failure stays what it is
    assert plain_words(failed, "failing\nout of memory? no\n") == "failed: exit code 3"


def test_real_throttled_array() -> None:
    states = parse_scontrol(fixture("array_pending_throttled.txt"))
    by = {s.index: s for s in states}
    assert sorted(by) == list(range(8))
    assert {s.job_id for s in states} == {"3"}
    assert [by[i].state for i in (0, 1)] == [SlurmState.RUNNING] * 2
    assert all(by[i].state is SlurmState.PENDING for i in range(2, 8))
    assert plain_words(by[5]) == "waiting: the array's %2 throttle"
    assert by[5].task_id == "3_5" and by[0].throttle == 2


def test_real_completed_array() -> None:
    states = parse_scontrol(fixture("array_completed.txt"))
    assert sorted(s.index for s in states if s.index is not None) == list(range(8))
    assert {(s.job_id, s.state, s.exit_code) for s in states} == \
        {("3", SlurmState.COMPLETED, 0)}
    assert all(s.time_limit == "UNLIMITED" for s in states)


def test_sacct_refusal_is_no_state() -> None:
    assert parse_sacct(fixture("sacct_disabled.txt")) == []
