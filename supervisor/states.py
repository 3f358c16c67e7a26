"""The instance states and the moves between them: the one vocabulary of pmx.

Standard library only, because both sides import it: the daemon's state machine
(`process.Instance`) and the CLI's table colours and monitor. The values are the words
users see in `pmx list`.

    (new) stopped ──start──> starting ──ready──> online ──stop──> stopping ──exit──> stopped
                               │   │                │ exit (crash)
                               │   └──exit──┐       v
                               │            └──> waiting ──delay over──> starting
                               └── spawn failed, or too many unstable restarts ──> errored
    launching: a reload's replacement before it is ready -> online, or stopping/stopped
    (or errored) when it fails; the old instance keeps serving meanwhile.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping


class State(enum.StrEnum):
    STARTING = "starting"
    LAUNCHING = "launching"
    ONLINE = "online"
    STOPPING = "stopping"
    STOPPED = "stopped"
    WAITING = "waiting"
    ERRORED = "errored"


MOVES: Mapping[State, frozenset[State]] = {
    State.STOPPED: frozenset({State.STARTING, State.LAUNCHING, State.ERRORED}),
    State.STARTING: frozenset({State.ONLINE, State.STOPPING, State.WAITING, State.ERRORED,
                               State.STOPPED}),
    State.LAUNCHING: frozenset({State.ONLINE, State.STOPPING, State.STOPPED, State.ERRORED}),
    State.ONLINE: frozenset({State.STOPPING, State.WAITING, State.ERRORED, State.STOPPED}),
    State.STOPPING: frozenset({State.STOPPED}),
    State.WAITING: frozenset({State.STARTING, State.STOPPED, State.ERRORED}),
    State.ERRORED: frozenset({State.STARTING, State.STOPPED, State.LAUNCHING}),
}
# States in which a process exists and may be signalled.
RUNNING: frozenset[State] = frozenset({State.STARTING, State.LAUNCHING, State.ONLINE,
                                       State.STOPPING})
# States that change by themselves; everything else is at rest.
TRANSITIONAL: frozenset[State] = frozenset({State.STARTING, State.LAUNCHING, State.STOPPING,
                                            State.WAITING})
# At rest with no process: what `start` acts on, and what "ended" means in container mode.
ENDED: frozenset[State] = frozenset({State.STOPPED, State.ERRORED})
# Ready to serve: the only state a readiness wait is satisfied by.
READY: frozenset[State] = frozenset({State.ONLINE})
