"""pmxd, the pmx daemon: owns every managed process. Entry point: pmx.supervisor.daemon:main."""

__version__ = "0.1.0"
