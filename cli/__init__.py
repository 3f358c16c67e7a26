"""The pmx command line client, the live monitor, `pmx import`, `pmx export` and the
`pmx web` command. Entry point: pmx.cli.entry:main.

    entry.py           the `pmx` program: list/ls/status (--json) and ping without click
                       or rich; every other command line goes to main.py
    table.py           the plain aligned table `pmx list` draws (no rich)
    main.py            the click group, the app commands (start, stop, reload, ...), main
    usage.py           one-line usage errors, options anywhere, `--` for the app
    outcome.py         how a command ends: what it did per target, one-line errors, codes
    client.py          requests to pmxd and the publish stream (pyzmq)
    render.py          replies for people and scripts: describe (rich), --json, formatters
    log_commands.py    logs (--json, --timestamp) and flush
    daemon_commands.py ping, kill, update, save, resurrect, startup, unstartup
    startup.py         the systemd and launchd service files
    habit_commands.py  PM2's habits: reset, signal/sendSignal, show/info, jlist/prettylist,
                       start's watch, cron and autorestart options
    import_command.py  pmx import; reading any ecosystem file (PM2's too) for start/reload
    export_command.py  pmx export kubernetes|systemd|compose (click)
    export_common.py   what every target shares: the apps, the options set, reports, writing
    export_kubernetes.py, export_systemd.py, export_compose.py   one module per target
    export_cron.py     cron_restart -> OnCalendar= and CronJob schedules
    web_command.py     pmx web (the server is the pmx.web package; aiohttp only when serving)
    monit.py           pmx monit: the Textual app, keys to requests
    monit_board.py     its model (no textual)     monit_feed.py  the threads that talk to pmxd
    monit_format.py    its text                   monit_widgets.py  its widgets
"""
