"""Restart back-off, the state transition table and wait-status wording: pure functions."""

from __future__ import annotations

import os
import pathlib
import signal

import pytest
from pmx.supervisor.config import AppSpec, parse_app
from pmx.supervisor.process import BACKOFF_CAP_S, BACKOFF_FACTOR, describe_status, next_restart_delay
from pmx.supervisor.states import MOVES, RUNNING, TRANSITIONAL, State


def spec(**options: object) -> AppSpec:
    table = {"name": "t", "script": "t.py", **options}
    return parse_app(table, source="t", index=0, base_dir=pathlib.Path("/"))


def exited(code: int) -> int:
    """The wait status of a process that exited with `code`."""
    status = code << 8
    assert os.waitstatus_to_exitcode(status) == code
    return status


def killed(sig: int) -> int:
    """The wait status of a process killed by signal `sig`."""
    assert os.waitstatus_to_exitcode(sig) == -sig
    return sig


# ---------------------------------------------------------------- next_restart_delay


def test_factor_and_cap_are_pm2s() -> None:
    assert BACKOFF_FACTOR == 1.5
    assert BACKOFF_CAP_S == 15.0


def test_default_restarts_at_once() -> None:
    default = spec()
    assert [next_restart_delay(n, default) for n in range(3)] == [0.0, 0.0, 0.0]


def test_restart_delay_is_constant() -> None:
    constant = spec(restart_delay=250, max_restarts=5)
    assert [next_restart_delay(n, constant) for n in range(6)] == [0.25] * 6


def test_exp_backoff_grows_by_one_and_a_half() -> None:
    backoff = spec(exp_backoff_restart_delay=100, max_restarts=100)
    delays = [next_restart_delay(n, backoff) for n in range(1, 8)]
    assert delays == pytest.approx([0.1 * 1.5**k for k in range(7)])


def test_exp_backoff_is_capped_at_fifteen_seconds() -> None:
    backoff = spec(exp_backoff_restart_delay="1s", max_restarts=1000)
    delays = [next_restart_delay(n, backoff) for n in range(1, 1001)]
    assert all(d is not None for d in delays)
    assert delays[5] == pytest.approx(1.5**5)  # 7.59 s: not capped yet
    assert delays[6] == pytest.approx(11.390625)
    assert delays[7] == BACKOFF_CAP_S
    assert max(d for d in delays if d is not None) == BACKOFF_CAP_S
    assert delays[-1] == BACKOFF_CAP_S  # no overflow for a long run of crashes
    assert delays == sorted(delays)  # type: ignore[type-var]


def test_exp_backoff_never_goes_below_restart_delay() -> None:
    both = spec(exp_backoff_restart_delay=100, restart_delay="1s", max_restarts=100)
    assert next_restart_delay(1, both) == 1.0
    assert next_restart_delay(6, both) == 1.0  # 0.1 * 1.5**5 = 0.76
    assert next_restart_delay(7, both) == pytest.approx(0.1 * 1.5**6)


def test_exp_backoff_does_not_apply_to_a_stable_exit() -> None:
    backoff = spec(exp_backoff_restart_delay=100, restart_delay=20)
    assert next_restart_delay(0, backoff) == 0.02


def test_gives_up_after_max_restarts() -> None:
    limited = spec(max_restarts=3, restart_delay=10)
    assert [next_restart_delay(n, limited) for n in range(6)] == [0.01, 0.01, 0.01, 0.01, None, None]


def test_gives_up_after_max_restarts_with_backoff() -> None:
    limited = spec(max_restarts=2, exp_backoff_restart_delay=100)
    assert next_restart_delay(2, limited) == pytest.approx(0.15)
    assert next_restart_delay(3, limited) is None


def test_max_restarts_zero_gives_up_on_the_first_unstable_exit() -> None:
    never = spec(max_restarts=0)
    assert next_restart_delay(0, never) == 0.0
    assert next_restart_delay(1, never) is None


def test_default_max_restarts_is_sixteen() -> None:
    default = spec()
    assert next_restart_delay(16, default) == 0.0
    assert next_restart_delay(17, default) is None


# ---------------------------------------------------------------- the transition table


def test_every_state_has_an_entry() -> None:
    assert set(MOVES) == set(State)


def test_every_target_is_a_state() -> None:
    for source, targets in MOVES.items():
        assert targets, f"{source} has no way out"
        for target in targets:
            assert isinstance(target, State), f"{source} -> {target!r}"


def test_no_state_moves_to_itself() -> None:
    assert [s for s, targets in MOVES.items() if s in targets] == []


def test_every_state_is_reachable_from_stopped() -> None:
    reached, frontier = {State.STOPPED}, [State.STOPPED]
    while frontier:
        for target in MOVES[frontier.pop()]:
            if target not in reached:
                reached.add(target)
                frontier.append(target)
    assert reached == set(State)


def test_every_state_can_get_back_to_stopped() -> None:
    for start in State:
        reached, frontier = {start}, [start]
        while frontier:
            for target in MOVES[frontier.pop()]:
                if target not in reached:
                    reached.add(target)
                    frontier.append(target)
        assert State.STOPPED in reached or start is State.STOPPED, start


def test_stopping_only_ends_in_stopped() -> None:
    assert MOVES[State.STOPPING] == frozenset({State.STOPPED})


def test_running_and_transitional_are_states() -> None:
    assert set(RUNNING) <= set(State)
    assert set(TRANSITIONAL) <= set(State)
    assert State.STOPPED not in RUNNING and State.ERRORED not in RUNNING


# ---------------------------------------------------------------- describe_status


@pytest.mark.parametrize("code", [0, 1, 3, 127, 255])
def test_describe_exit_code(code: int) -> None:
    assert describe_status(exited(code)) == f"exit code {code}"


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGSEGV, signal.SIGINT])
def test_describe_signal(sig: signal.Signals) -> None:
    assert describe_status(killed(sig)) == f"killed by {sig.name}"


def test_describe_sigkill() -> None:
    assert describe_status(killed(signal.SIGKILL)) == "killed by SIGKILL"


def test_describe_signal_with_core_dump() -> None:
    assert describe_status(0x80 | signal.SIGSEGV) == "killed by SIGSEGV"


def test_describe_unknown_signal_number() -> None:
    number = 100  # above SIGRTMAX on Linux: no Signals member
    with pytest.raises(ValueError):
        signal.Signals(number)
    assert describe_status(killed(number)) == "killed by signal 100"
