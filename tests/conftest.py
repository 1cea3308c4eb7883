"""Suite-wide defaults. W&B is off unless a test asks for it (`logging.wandb.mode=offline`, `--wandb offline`):
an offline W&B run costs every training run of the suite several seconds of start-up and flushing (its
service process), and the tests that check W&B say so explicitly. Subprocesses inherit the setting."""

from __future__ import annotations

import os

os.environ.setdefault("WANDB_MODE", "disabled")
