"""Worker of tests/test_token_weighting.py (run under torchrun): for each (engine, micro) split given on the
command line, build the run's model + engine + data exactly as the loop does, take ONE optimizer step with
the loop's own `train_step`, and save the consolidated weights (rank 0) to OUT/<split>.safetensors.

One process group serves every split, so the multi-process part of the test pays for its start-up once.
Usage: torchrun --nproc_per_node 2 tests/token_weight_worker.py OUT zero2:2 zero2:1 zero3:2 zero3:1 -- OVERRIDES
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    from train.distributed import prepare_env

    prepare_env(None)
    from safetensors.torch import save_file

    from train import distributed
    from train.build import build_model, build_train_data
    from train.config import load_config
    from train.engine import build_engine
    from train.loop import next_window, train_step

    sep = sys.argv.index("--")
    out, splits, overrides = Path(sys.argv[1]), sys.argv[2:sep], sys.argv[sep + 1:]
    for split in splits:
        engine_name, micro = split.split(":")
        cfg = load_config([*overrides, f"engine={engine_name}", f"train.micro_batch_size={micro}"])
        info = distributed.init(cfg.engine.kind, "cpu")
        engine = build_engine(cfg, build_model(cfg, info), info)
        train_step(engine, next_window(iter(build_train_data(cfg, info)), engine.grad_accum), info)
        state = engine.full_state_dict()  # collective under ZeRO-3
        if info.is_main:
            save_file({k: v.detach().contiguous().cpu() for k, v in state.items()},
                      str(out / f"{engine_name}-m{micro}.safetensors"))
        distributed.barrier()


if __name__ == "__main__":
    main()
