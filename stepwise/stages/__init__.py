"""Pipeline stages. Each module ``stepwise.stages.<name>`` has ``run(cfg) -> dict`` and is chosen by
``stage=<name>`` (``python -m stepwise.run stage=pretrain ...``)."""
