"""The campaign queue (order, dependencies, budget, fail_fast) and progress: pure functions.

Table tests pin the documented behaviour; property tests check it on random task sets
against small oracles written here independently of ``infra.campaign.queue``.
"""

from __future__ import annotations

import dataclasses
import itertools
import random
from collections.abc import Sequence

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from infra.campaign.progress import Progress, format_eta, render_bar, render_bar_text
from infra.campaign.queue import (
    DepDecision,
    DepKind,
    TaskView,
    budget,
    dependencies,
    fail_fast_victims,
    in_flight,
    order,
)
from infra.state.store import InstancePhase

P = InstancePhase
PROPS = settings(max_examples=150, deadline=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

NOT_OK = (P.FAILED, P.STOPPED, P.LOST, P.CANCELLED, P.SKIPPED)
PENDING = (P.PLANNED, P.QUEUED, P.DISPATCHED, P.DEPLOYING, P.STARTING, P.RUNNING,
           P.RESTARTING, P.MOVING, P.PAUSED)
IN_FLIGHT = (P.PLANNED, P.DISPATCHED, P.DEPLOYING, P.STARTING, P.RUNNING, P.RESTARTING,
             P.MOVING)


def task(tid: str, phase: InstancePhase = P.QUEUED, *, run: str = "r-1", seq: int = 1,
         template: str | None = None, index: int | None = None, priority: int = 0,
         after: Sequence[str] = (), after_any: Sequence[str] = (),
         ended_ok: bool | None = None) -> TaskView:
    return TaskView(instance_id=tid, run_id=run, run_seq=seq, template_id=template,
                    task_index=index, priority=priority, phase=phase, after=tuple(after),
                    after_any=tuple(after_any), ended_ok=ended_ok)


def sweep(name: str, phases: Sequence[InstancePhase], **kw: object) -> list[TaskView]:
    """The tasks of template ``name`` (``name.0000``...) in the given phases."""
    return [task(f"{name}.{i:04d}", ph, template=name, index=i, **kw)  # type: ignore[arg-type]
            for i, ph in enumerate(phases)]


def kinds(decisions: dict[str, DepDecision]) -> dict[str, str]:
    return {tid: d.kind.value for tid, d in decisions.items()}


# --------------------------------------------------------------------------- order

def test_order_priority_then_first_come_then_index_then_id() -> None:
    tasks = [
        task("late", seq=3),
        task("b.0001", seq=2, template="b", index=1),
        task("b.0000", seq=2, template="b", index=0),
        task("urgent", seq=9, priority=5),
        task("low", seq=0, priority=-1),
        task("a-plain", seq=2),
        task("z-plain", seq=2),
    ]
    assert [t.instance_id for t in order(tasks)] == [
        "urgent", "b.0000", "b.0001", "a-plain", "z-plain", "late", "low"]


def test_order_tells_same_ids_of_two_runs_apart_deterministically() -> None:
    a, b = task("x", run="r-b", seq=1), task("x", run="r-a", seq=1)
    assert order([a, b]) == order([b, a]) == (b, a)


# --------------------------------------------------------------------------- dependencies

@pytest.mark.parametrize(("dep_phase", "ended_ok", "after_kind", "any_kind"), [
    (P.EXITED, None, "ready", "ready"),
    (P.EXITED, True, "ready", "ready"),
    (P.EXITED, False, "skip", "ready"),    # ended_ok vetoes a clean exit
    (P.FAILED, None, "skip", "ready"),
    (P.STOPPED, None, "skip", "ready"),
    (P.LOST, None, "skip", "ready"),
    (P.CANCELLED, None, "skip", "ready"),
    (P.SKIPPED, None, "skip", "ready"),
    (P.QUEUED, None, "wait", "wait"),
    (P.DISPATCHED, None, "wait", "wait"),
    (P.RUNNING, None, "wait", "wait"),
    (P.RESTARTING, None, "wait", "wait"),
    (P.PAUSED, None, "wait", "wait"),     # may come back with its node
    (P.MOVING, None, "wait", "wait"),
])
def test_after_and_after_any_by_dependency_phase(dep_phase: InstancePhase,
                                                 ended_ok: bool | None, after_kind: str,
                                                 any_kind: str) -> None:
    tasks = [task("a", dep_phase, ended_ok=ended_ok), task("ok", after=["a"]),
             task("any", after_any=["a"])]
    got = kinds(dependencies(tasks))
    assert (got["ok"], got["any"]) == (after_kind, any_kind)


def test_reasons_name_the_dependency() -> None:
    tasks = [task("prep", P.FAILED), task("train", after=["prep"]),
             task("slow", P.RUNNING), task("eval", after=["slow"]),
             task("report", after_any=["slow"])]
    got = dependencies(tasks)
    assert got["train"] == DepDecision(DepKind.SKIP, "dependency prep failed", "prep")
    assert got["eval"] == DepDecision(DepKind.WAIT, "waiting for slow", "slow")
    assert got["report"] == DepDecision(DepKind.WAIT, "waiting for slow", "slow")
    assert got["prep"].ready and got["slow"].ready


def test_template_name_means_every_task_of_the_sweep() -> None:
    running = sweep("train", [P.EXITED, P.RUNNING, P.QUEUED, P.EXITED])
    got = dependencies([*running, task("eval", after=["train"])])
    assert got["eval"] == DepDecision(DepKind.WAIT, "waiting for train (2 of 4 tasks)", "train")

    ended = sweep("train", [P.EXITED] * 4)
    assert dependencies([*ended, task("eval", after=["train"])])["eval"].ready

    one_failed = sweep("train", [P.EXITED, P.RUNNING, P.FAILED, P.LOST])
    got = dependencies([*one_failed, task("eval", after=["train"]),
                        task("summary", after_any=["train"])])
    assert got["eval"] == DepDecision(DepKind.SKIP, "dependency train.0002 failed", "train")
    assert got["summary"].kind is DepKind.WAIT  # train.0001 still runs

    all_over = sweep("train", [P.EXITED, P.STOPPED, P.FAILED, P.CANCELLED])
    assert dependencies([*all_over, task("summary", after_any=["train"])])["summary"].ready


def test_after_may_name_one_task_of_a_sweep() -> None:
    tasks = [*sweep("train", [P.FAILED, P.EXITED]), task("a", after=["train.0001"]),
             task("b", after=["train.0000"])]
    got = kinds(dependencies(tasks))
    assert (got["a"], got["b"]) == ("ready", "skip")


def test_skip_propagates_along_a_chain_in_one_call() -> None:
    tasks = [task("a", P.FAILED), task("b", after=["a"]), task("c", after=["b"]),
             task("d", after_any=["c"]), task("e", after=["d"])]
    got = dependencies(tasks)
    assert got["b"].reason == "dependency a failed"
    assert got["c"] == DepDecision(DepKind.SKIP, "dependency a failed (via b)", "b")
    # after_any: a skipped predecessor has ended, so d may run, and e waits for d
    assert got["d"].ready
    assert got["e"] == DepDecision(DepKind.WAIT, "waiting for d", "d")


def test_stored_skip_and_fresh_skip_give_the_same_reason() -> None:
    fresh = dependencies([task("a", P.FAILED), task("b", after=["a"]), task("c", after=["b"])])
    stored = dependencies([task("a", P.FAILED), task("b", P.SKIPPED, after=["a"]),
                           task("c", after=["b"])])
    assert fresh["c"] == stored["c"]


def test_a_running_task_is_not_skipped_by_its_own_decision() -> None:
    # b started before a failed (e.g. a rerun): b is running, so c waits for b, not skipped
    tasks = [task("a", P.FAILED), task("b", P.RUNNING, after=["a"]), task("c", after=["b"])]
    got = dependencies(tasks)
    assert got["c"].kind is DepKind.WAIT


def test_skip_wins_over_wait_and_first_failed_name_decides() -> None:
    tasks = [task("slow", P.RUNNING), task("x", P.FAILED), task("y", P.LOST),
             task("t", after=["slow", "y", "x"])]
    assert dependencies(tasks)["t"] == DepDecision(DepKind.SKIP, "dependency y was lost", "y")


def test_unknown_name_and_cycle_wait_without_hanging() -> None:
    tasks = [task("u", after=["nobody"]), task("c1", after=["c2"]), task("c2", after=["c1"]),
             task("self", template="grp", after=["grp"]), task("d", after=["c1"])]
    got = dependencies(tasks)
    assert got["u"] == DepDecision(DepKind.WAIT, "waiting for nobody (no such task)", "nobody")
    assert {got[t].kind for t in ("c1", "c2", "self", "d")} == {DepKind.WAIT}
    assert "cycle" in got["c1"].reason or "cycle" in got["c2"].reason
    assert "cycle" in got["self"].reason


def test_a_failed_task_on_a_cycle_still_skips_its_dependents() -> None:
    tasks = [task("a", P.FAILED, after=["b"]), task("b", after=["a"])]
    got = dependencies(tasks)
    assert got["b"].kind is DepKind.SKIP


def test_long_chain_and_wide_fan_in_are_linear_and_iterative() -> None:
    n = 20_000  # far beyond the recursion limit
    chain = [task("t0", P.FAILED), *(task(f"t{i}", after=[f"t{i - 1}"]) for i in range(1, n))]
    got = dependencies(chain)
    assert got[f"t{n - 1}"] == DepDecision(DepKind.SKIP, "dependency t0 failed (via t19998)",
                                           "t19998")
    fan = [*sweep("train", [P.EXITED] * 3000),
           *(task(f"eval{i}", after=["train"]) for i in range(3000))]
    assert all(d.ready for d in dependencies(fan).values())


def test_dependencies_refuse_two_tasks_with_one_id() -> None:
    with pytest.raises(ValueError, match="twice"):
        dependencies([task("a", run="r-1"), task("a", run="r-2")])


# --------------------------------------------------------------------------- budget, fail_fast

@pytest.mark.parametrize(("phases", "max_parallel", "expect"), [
    ([P.QUEUED] * 5, 3, 3),
    ([P.QUEUED] * 5, None, 5),
    ([P.QUEUED] * 2, 3, 2),
    ([P.RUNNING, P.DISPATCHED, P.QUEUED, P.QUEUED], 3, 1),  # dispatched holds its place
    ([P.RUNNING, P.STARTING, P.PLANNED, P.QUEUED], 3, 0),
    ([P.RUNNING] * 4 + [P.QUEUED], 3, 0),                  # over the cap: never negative
    ([P.EXITED, P.FAILED, P.PAUSED, P.SKIPPED, P.QUEUED, P.QUEUED], 1, 1),
    ([P.EXITED] * 3, 2, 0),
])
def test_budget(phases: list[InstancePhase], max_parallel: int | None, expect: int) -> None:
    assert budget(sweep("s", phases), max_parallel) == expect


def test_fail_fast_cancels_every_unfinished_task_after_a_failure() -> None:
    phases = [P.EXITED, P.FAILED, P.RUNNING, P.DISPATCHED, P.QUEUED, P.SKIPPED, P.PAUSED,
              P.STOPPED]
    victims = fail_fast_victims(sweep("s", phases))
    assert [v.instance_id for v in victims] == ["s.0002", "s.0003", "s.0004", "s.0006"]


@pytest.mark.parametrize(("phase", "ended_ok", "trips"), [
    (P.FAILED, None, True),
    (P.LOST, None, True),
    (P.EXITED, False, True),
    (P.EXITED, None, False),
    (P.STOPPED, None, False),
    (P.CANCELLED, None, False),
    (P.SKIPPED, None, False),
])
def test_what_trips_fail_fast(phase: InstancePhase, ended_ok: bool | None, trips: bool) -> None:
    tasks = [task("a", phase, ended_ok=ended_ok), task("b", P.QUEUED)]
    assert bool(fail_fast_victims(tasks)) is trips


# --------------------------------------------------------------------------- properties

ids = st.text(alphabet="abcxyz.0123", min_size=1, max_size=6)


@st.composite
def task_sets(draw: st.DrawFn) -> list[TaskView]:
    keys = draw(st.lists(st.tuples(ids, st.sampled_from(["r-1", "r-2"])), unique=True,
                         max_size=25))
    return [TaskView(instance_id=tid, run_id=run, run_seq=draw(st.integers(0, 3)),
                     template_id=draw(st.none() | st.just("tmpl")),
                     task_index=draw(st.none() | st.integers(0, 5)),
                     priority=draw(st.integers(-2, 2)), phase=draw(st.sampled_from(list(P))))
            for tid, run in keys]


@PROPS
@given(task_sets(), st.randoms(use_true_random=False))
def test_order_is_total_and_independent_of_input_order(tasks: list[TaskView],
                                                       rnd: random.Random) -> None:
    shuffled = tasks[:]
    rnd.shuffle(shuffled)
    first, second = order(tasks), order(shuffled)
    assert first == second
    assert sorted(first, key=id) == sorted(tasks, key=id)  # a permutation: nothing lost
    for a, b in itertools.pairwise(first):
        assert a.priority >= b.priority
        if a.priority == b.priority:
            assert a.run_seq <= b.run_seq


@PROPS
@given(st.lists(st.sampled_from(list(P)), max_size=40), st.none() | st.integers(1, 12))
def test_budget_never_exceeds_the_cap_minus_what_is_in_flight(
        phases: list[InstancePhase], max_parallel: int | None) -> None:
    tasks = sweep("s", phases)
    got = budget(tasks, max_parallel)
    queued = phases.count(P.QUEUED)
    active = sum(ph in IN_FLIGHT for ph in phases)
    assert 0 <= got <= queued
    assert active == in_flight(tasks)
    if max_parallel is not None:
        assert got <= max(0, max_parallel - active)
        assert got == min(queued, max(0, max_parallel - active))  # and no smaller
    else:
        assert got == queued


@st.composite
def dags(draw: st.DrawFn) -> list[TaskView]:
    """Tasks t0..tN where t_i depends (after / after_any) only on earlier tasks."""
    n = draw(st.integers(1, 18))
    out = []
    for i in range(n):
        earlier = [f"t{j}" for j in range(i)]
        after = draw(st.lists(st.sampled_from(earlier), unique=True, max_size=3)) if i else []
        after_any = (draw(st.lists(st.sampled_from(earlier), unique=True, max_size=2))
                     if i else [])
        phase = draw(st.sampled_from([P.QUEUED, P.QUEUED, P.EXITED, *NOT_OK, *PENDING]))
        out.append(task(f"t{i}", phase, index=i, after=after, after_any=after_any))
    return out


def oracle(tasks: Sequence[TaskView]) -> dict[str, str]:
    """Independent reference, in index order (dependencies come earlier)."""
    outcome: dict[str, str] = {}  # ok / bad / pending, as dependents see each task
    decision: dict[str, str] = {}
    for t in tasks:
        if any(outcome[d] == "bad" for d in t.after):
            decision[t.instance_id] = "skip"
        elif any(outcome[d] == "pending" for d in (*t.after, *t.after_any)):
            decision[t.instance_id] = "wait"
        else:
            decision[t.instance_id] = "ready"
        if t.phase is P.EXITED:
            outcome[t.instance_id] = "ok"
        elif t.phase in NOT_OK or (t.phase in (P.QUEUED, P.PLANNED)
                                   and decision[t.instance_id] == "skip"):
            outcome[t.instance_id] = "bad"
        else:
            outcome[t.instance_id] = "pending"
    return decision


@PROPS
@given(dags(), st.randoms(use_true_random=False))
def test_dependencies_match_the_oracle_whatever_the_input_order(tasks: list[TaskView],
                                                                rnd: random.Random) -> None:
    shuffled = tasks[:]
    rnd.shuffle(shuffled)
    got = dependencies(shuffled)
    assert kinds(got) == oracle(tasks)
    assert got == dependencies(tasks)


@PROPS
@given(st.integers(2, 30), st.integers(0, 29), st.sampled_from(NOT_OK))
def test_skip_propagates_transitively_along_after(n: int, failed_at: int,
                                                  bad: InstancePhase) -> None:
    failed_at %= n
    tasks = [task(f"t{i}", bad if i == failed_at else P.QUEUED,
                  after=[f"t{i - 1}"] if i else []) for i in range(n)]
    got = dependencies(tasks)
    for i in range(failed_at + 1, n):
        assert got[f"t{i}"].kind is DepKind.SKIP
        assert got[f"t{i}"].reason.startswith(f"dependency t{failed_at} ")
    for i in range(1, failed_at):
        assert got[f"t{i}"].kind is DepKind.WAIT


@PROPS
@given(st.integers(1, 12).flatmap(lambda n: st.tuples(
    st.just(n),
    st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, n - 1)), max_size=3 * n),
    st.lists(st.sampled_from([P.QUEUED, P.EXITED, P.FAILED, P.RUNNING]), min_size=n,
             max_size=n))))
def test_any_graph_even_with_cycles_gets_a_decision_for_every_task(
        graph: tuple[int, list[tuple[int, int]], list[InstancePhase]]) -> None:
    n, edges, phases = graph
    tasks = [task(f"t{i}", phases[i], template="all" if i % 2 else None,
                  after=sorted({f"t{b}" for a, b in edges if a == i}),
                  after_any=["all"] if i == 0 and n > 1 else []) for i in range(n)]
    got = dependencies(tasks)
    assert set(got) == {t.instance_id for t in tasks}
    for t in tasks:  # SKIP only with a dependency that ended badly or is skipped itself
        if got[t.instance_id].kind is DepKind.SKIP:
            on = got[t.instance_id].on
            assert on is not None and on in t.after


@PROPS
@given(st.lists(st.sampled_from(list(P)), max_size=30))
def test_fail_fast_victims_are_exactly_the_unfinished_after_a_failure(
        phases: list[InstancePhase]) -> None:
    victims = fail_fast_victims(sweep("s", phases))
    tripped = any(ph in (P.FAILED, P.LOST) for ph in phases)
    unfinished = [ph for ph in phases if ph not in (P.EXITED, *NOT_OK)]
    assert len(victims) == (len(unfinished) if tripped else 0)
    assert all(v.phase not in (P.EXITED, *NOT_OK) for v in victims)


# --------------------------------------------------------------------------- progress

def test_progress_counts_rate_and_eta() -> None:
    now = 10_000.0
    tasks = [
        *[(P.EXITED, now - 60 + i) for i in range(12)],  # 12 ended in the last minute
        (P.EXITED, now - 3600),                        # long ago: outside the window
        (P.FAILED, now - 30), (P.LOST, now - 20),
        (P.SKIPPED, now - 10), (P.CANCELLED, None), (P.STOPPED, now - 5),
        (P.RUNNING, None), (P.STARTING, None), (P.RESTARTING, None),
        *[(P.QUEUED, None)] * 20, (P.DISPATCHED, None), (P.PAUSED, None),
    ]
    p = Progress.of(tasks, started_at=now - 7200, now=now, window=120.0)
    assert (p.done, p.failed, p.skipped, p.cancelled, p.running, p.queued) == (
        13, 2, 1, 2, 3, 22)
    assert p.total == len(tasks) == p.ended + p.remaining
    assert p.rate == pytest.approx(14 / 2.0)  # 12 done + 2 failed in 2 minutes
    assert p.eta == pytest.approx(25 / 7.0 * 60)


def test_progress_rate_window_starts_at_the_campaign_start() -> None:
    p = Progress.of([(P.EXITED, 95.0), (P.EXITED, 99.0), (P.QUEUED, None)],
                    started_at=90.0, now=100.0)
    assert p.rate == pytest.approx(12.0)  # 2 tasks in 10 s
    assert p.eta == pytest.approx(5.0)


def test_progress_eta_unknown_without_rate_and_zero_when_through() -> None:
    assert Progress.of([(P.QUEUED, None)], started_at=None, now=5.0).eta is None
    assert Progress.of([(P.EXITED, 4.0)], started_at=None, now=5.0).eta == 0.0
    empty = Progress.of([], started_at=5.0, now=5.0)
    assert (empty.total, empty.rate, empty.eta) == (0, 0.0, 0.0)


@pytest.mark.parametrize(("seconds", "text"), [
    (None, "?"), (0, "0s"), (44.2, "45s"), (59.5, "1m"), (360, "6m"), (389, "6m"),
    (391, "7m"), (3569, "59m"), (3600, "1h00m"), (3599, "1h00m"), (7500, "2h05m"),
])
def test_format_eta(seconds: float | None, text: str) -> None:
    assert format_eta(seconds) == text


def test_render_bar_line() -> None:
    p = Progress(done=12, running=3, queued=25, failed=0, skipped=0, cancelled=0,
                 rate=4.1, eta=366.0)
    line = render_bar(p, 40)
    assert line == ("[" + "#" * 3 + "." * 7 + "] 12/40 done · 3 running · 25 queued · "
                    "0 failed · 4.1/min · ETA 6m")
    assert len(line) == 77  # too narrow: the bar keeps its 10 cells, the line runs over
    wide = render_bar(p, 120)
    assert len(wide) == 120 and wide.startswith("[" + "#" * 15 + ".")
    styled = render_bar_text(p, 120)
    assert styled.plain == wide


def test_render_bar_shows_failed_skipped_cancelled_and_unknown_eta() -> None:
    p = Progress(done=5, running=0, queued=1, failed=2, skipped=1, cancelled=1, rate=0.0,
                 eta=None)
    line = render_bar(p, 100)
    assert line.endswith("5/10 done · 0 running · 1 queued · 2 failed · 1 skipped · "
                         "1 cancelled · 0.0/min · ETA ?")
    cells = line[1:line.index("]")]
    assert cells.count("#") == len(cells) // 2
    assert cells.count("x") == len(cells) * 9 // 10 - len(cells) // 2


@PROPS
@given(st.lists(st.tuples(st.sampled_from(list(P)), st.none() | st.floats(0, 1000)),
                max_size=60),
       st.floats(0, 1000), st.integers(20, 200))
def test_progress_partitions_every_task_and_the_bar_fits(
        tasks: list[tuple[InstancePhase, float | None]], now: float, width: int) -> None:
    p = Progress.of(tasks, started_at=0.0, now=now)
    assert p.total == len(tasks) == p.ended + p.remaining
    assert p.rate >= 0
    assert p.eta is None or p.eta >= 0
    line = render_bar(p, width)
    text = line[line.index("]") + 2:]
    assert len(line) == max(width, len(text) + 13)
    cells = line[1:line.index("]")]
    assert cells.count("#") <= len(cells) * p.done / max(p.total, 1)
    assert set(cells) <= {"#", "x", "."}


def test_task_view_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        task("a").phase = P.RUNNING  # type: ignore[misc]
