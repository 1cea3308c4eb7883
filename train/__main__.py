"""Entry point: `python -m train recipe=NAME [hydra overrides...]`.

Works unchanged under `torchrun --nproc_per_node N`, `deepspeed --num_gpus N` (its `--local_rank=K`
is stripped before Hydra sees argv) and multi-node launchers (MASTER_ADDR/PORT, RANK, WORLD_SIZE,
LOCAL_RANK from the environment). `--cfg` prints the composed config and exits; `-h`/`--help` lists
the recipes, config groups and every key (train/cli_help.py).
"""

from __future__ import annotations

import logging
import sys
import warnings

from train.config import ConfigError, load_config, strip_launcher_args, to_yaml
from train.distributed import destroy, env_world, prepare_env


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    argv, local_rank = strip_launcher_args(argv)
    if "-h" in argv or "--help" in argv:
        return _help(argv)
    prepare_env(local_rank)  # before anything imports deepspeed
    show = "--cfg" in argv
    argv = [a for a in argv if a != "--cfg"]
    _, _, world = env_world()
    try:
        cfg = load_config(argv, world_size=world, check=not show)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        print("(python -m train --help lists the recipes, config groups and every key)", file=sys.stderr)
        return 2
    if show:
        print(to_yaml(cfg))
        return 0
    # DeepSpeed's ZeRO code calls a torch.distributed API that now warns on every call
    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.*deprecated", category=FutureWarning)
    warnings.filterwarnings("ignore", message=r".*reduce_scatter_tensor.*deprecated", category=FutureWarning)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from train.checkpoint import CheckpointError
    from train.loop import DataStreamError, EmptyHeldout, NonFiniteRun, train

    try:
        summary = train(cfg)
        # tear the process group down here, not in the interpreter's exit: gloo's C++ threads destroyed
        # during exit can abort a rank after a finished run ("terminate called without an active exception")
        destroy()
    except ConfigError as err:  # an input path checked at start-up (before the model is built)
        print(f"config error: {err}", file=sys.stderr)
        return 2
    except NonFiniteRun as err:
        print(f"[train] error: {err}", file=sys.stderr)
        return 3
    except (EmptyHeldout, DataStreamError) as err:  # the data gave nothing to train / evaluate on
        print(f"[train] error: {err}", file=sys.stderr)
        return 2
    except CheckpointError as err:  # unreadable / unwritable checkpoint (disk full): the message names the file
        print(f"[train] checkpoint error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("[train] aborted by a second Ctrl-C: no checkpoint written for the current step", file=sys.stderr)
        return 130
    return int(summary.get("exit_code", 0))  # 130 after a first Ctrl-C (checkpointed), else 0


def _help(argv: list[str]) -> int:
    """`-h`/`--help` anywhere: the help text, with `recipe=NAME` (and overrides) as the default column."""
    from train.cli_help import render_help

    recipe, overrides = None, []
    for a in argv:
        if a.startswith("recipe=") or a.startswith("--config-name="):
            recipe = a.split("=", 1)[1]
        elif not a.startswith("-"):
            overrides.append(a)
    try:
        print(render_help(recipe, overrides), end="")
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
