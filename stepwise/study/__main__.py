"""``python -m stepwise.study ...``: :func:`stepwise.study.command.main`."""

from stepwise.study.command import main

main()
