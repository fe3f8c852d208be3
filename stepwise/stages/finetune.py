"""Step 2, ``stage=finetune``: the head-class expert. Starts from the pretrained model (``stage.init_from``),
trains only ``stage.trainable`` (``input_proj`` and every class head) on the replay set ``stage.train_ann``
(D_head) with step-wise RFS inside it, evaluates, and writes ``runs/<exp>/finetune/`` like pretrain.

Sampling inside the replay set is step-wise RFS (``stage.rfs``, rules ``stepwise.rfs[stage.replay_set]``,
see :mod:`stepwise.data.samplers`); the factors used are written to ``<run_dir>/repeat_factors.json``.

With ``stage.train_ann='${data.train_ann}' stage.trainable=[class_embed] stage.reinit=[class_embed]`` the
same stage is the decoupled classifier re-training of the BAGS paper (any ``head=``).

The body, shared with ``stage=distill``, is :func:`stepwise.stages.parts.replay.build_replay_stage`; it reads
the stage as :class:`stepwise.stage_settings.ReplaySettings`.
"""

from __future__ import annotations

from typing import Any

from stepwise.stages.parts import build_replay_stage, make_trainer


def run(cfg: Any) -> dict[str, Any] | None:
    """Fine-tune and evaluate; returns the final val metrics."""
    return make_trainer(build_replay_stage(cfg)).fit()
