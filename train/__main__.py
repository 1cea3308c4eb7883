"""Entry point: `python -m train recipe=NAME [hydra overrides...]`.

Works unchanged under `torchrun --nproc_per_node N`, `deepspeed --num_gpus N` (its `--local_rank=K`
is stripped before Hydra sees argv) and multi-node launchers (MASTER_ADDR/PORT, RANK, WORLD_SIZE,
LOCAL_RANK from the environment). `--cfg` prints the composed config and exits.
"""

from __future__ import annotations

import logging
import sys
import warnings

from train.config import ConfigError, load_config, strip_launcher_args, to_yaml
from train.distributed import env_world, prepare_env


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    argv, local_rank = strip_launcher_args(argv)
    prepare_env(local_rank)  # before anything imports deepspeed
    show = "--cfg" in argv
    argv = [a for a in argv if a != "--cfg"]
    _, _, world = env_world()
    try:
        cfg = load_config(argv, world_size=world)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    if show:
        print(to_yaml(cfg))
        return 0
    # DeepSpeed's ZeRO code calls a torch.distributed API that now warns on every call
    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.*deprecated", category=FutureWarning)
    warnings.filterwarnings("ignore", message=r".*reduce_scatter_tensor.*deprecated", category=FutureWarning)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from train.loop import train

    train(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
