"""The pmx command line client and the live monitor. Entry point: pmx.cli.main:main."""
