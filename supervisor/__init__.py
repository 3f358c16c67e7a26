"""pmxd, the pmx daemon: owns every managed process. Entry point: pmx.supervisor.pmxd:main.

The modules, one responsibility each (imports flow downwards in this list):

    pmxd.py       the program: keeps ssl out of pmxd, then launch.main
    launch.py     the command line: arguments, detaching, pmxd's log, `main`
    daemon.py     wiring, lifecycle, signals; the instances' Runtime
    commands.py   the request handlers, each docstring its spec; the command table
    arguments.py  reading a request's arguments (typed, else bad_args) and app tables
    registry.py   the apps by name, instance ids, target resolution, the rows of `list`
    recovery.py   the spawn journal and state.json snapshots, crash recovery
    handover.py   `pmx update`: the running apps carried across pmxd's exec, adopted again
    control.py    the ZeroMQ server: ROUTER for requests, (X)PUB for events, stats and logs
    quick.py      list and ping on a plain Unix socket, for a CLI that skips pyzmq's import
    monitor.py    CPU and memory sampling from /proc (off the loop), memory-limit restarts
    watch.py      reload on file changes: one watchfiles thread, debounce (watch_delay)
    cron.py       cron_restart's one timer (croniter); the Reloader that both go through
    app.py        AppGroup: an app's instances; start, stop, scale, one-by-one reload
    process.py    Instance: one slot's process and its state machine
    spawn.py      creating a process: argv, env, credentials, inherited sockets (posix_spawn)
    exec_format.py  whether execve runs a file as it is (ELF of this machine, #! chains)
    sockets.py    cluster mode's listening sockets, bound by pmxd
    readiness.py  when an instance counts as ready: notify socket, probes
    accepting.py  whether a process tree waits for connections on a socket (/proc)
    dropin.py     drop-in cluster mode: the preloads' contract, learned ports, Node's IPC
    reaper.py     exits through pidfds; SIGCHLD for strays; escaped children swept
    cgroups.py    each instance in its own cgroup v2 where one is delegated (cgroup.kill)
    logs.py       pipe readers, log files with rotation, output routing
    safe_files.py opening, rotating, emptying log files never through a planted symlink
    date_format.py  log_date_format: PM2's day.js tokens or strftime, stamped per second
    dump.py       `pmx save` / `pmx resurrect` (the dump is an ecosystem file)
    config.py     ecosystem TOML -> AppSpec, errors naming file, app and key
    pm2.py        PM2's ecosystem files (.js via node, .json, .yml) -> app tables, with notes
    procfile.py   Procfiles -> app tables
    options.py    the option table and the parsers of option values
    protocol.py   the wire format both sides import
    states.py     the state names and moves both sides import
    home.py       PMX_HOME: checks, the lock, every file name (the CLI imports them)
    procfs.py     /proc/PID/stat
    sdnotify.py   systemd's notify protocol, for pmxd and for Python apps
    errors.py     the exception tree and exit codes
    preload/      data files loaded into cluster children: node/pmx_cluster.js,
                  python/sitecustomize.py (no dependencies)

The path of `pmx reload api`: cli/main.py -> cli/client.py + protocol.py -> commands.py
(Commands.reload) -> app.py (AppGroup.reload, replace) -> process.py (Instance).
"""

__version__ = "0.1.0"
