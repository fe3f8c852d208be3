"""Entry point: ``python -m stepwise.select_exemplars checkpoint=runs/<exp>/pretrain [data=...] [key=value ...]``
(or ``accelerate launch -m stepwise.select_exemplars ...`` on several processes).

The same as ``python -m stepwise.run stage=select ...``: scores every training instance with the pretrained
model and writes ``scores.jsonl``, ``d_head.json`` and ``d_tail.json`` into ``runs/<exp>/select/`` (see
``stepwise.stages.select`` and ``configs/stage/select.yaml`` for the options).
"""

from __future__ import annotations

import sys
from typing import Any, Sequence

from stepwise.run import main as run_main


def main(argv: Sequence[str] | None = None) -> Any:
    """Run ``stage=select`` with ``argv`` (default ``sys.argv[1:]``) as further overrides."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a.startswith("stage=") for a in argv):
        print("stepwise.select_exemplars: do not pass stage=, this entry point is stage=select", file=sys.stderr)
        raise SystemExit(2)
    return run_main(["stage=select", *argv])


if __name__ == "__main__":
    main()
