#!/usr/bin/env python
"""Package the weights a training run validated at one step (``checkpoints/step_<N>.pt``).

    python scripts/package_step.py runs/brain_t1_2mm_stage9 600 /tmp/stage9_step600

``sacb train`` packages its best validation by 2 mm Dice; this packages any validated step, for a
held-out comparison by another measure (the fine pass's, say) before one is embedded. The
package's training record is the run's recipe with the step's validation figures.
"""

import argparse
import csv
import json
import sys
from pathlib import Path


def main() -> int:
    import torch

    from SACBRegistrationLib.networks.checkpoints import load_checkpoint
    from SACBRegistrationLib.training.config import config_from_dict
    from SACBRegistrationLib.training.trainer import package_run, validated_checkpoint

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="the run's folder (run.out), holding config.json and checkpoints/")
    parser.add_argument("step", type=int, help="a validated step (checkpoints/step_<N>.pt exists)")
    parser.add_argument("out", type=Path, help="the package folder to write (replaced if it exists)")
    args = parser.parse_args()
    weights = validated_checkpoint(args.run / "checkpoints", args.step)
    if not weights.is_file():
        parser.error(f"{weights} does not exist: the run kept no weights for step {args.step} "
                     f"(steps validated: {sorted(p.stem for p in (args.run / 'checkpoints').glob('step_*.pt'))})")
    config = config_from_dict(json.loads((args.run / "config.json").read_text()))
    config.run.out = str(args.out.parent / (args.out.name + ".run"))  # package_run writes <run.out>/package
    model, meta = load_checkpoint(weights)
    with open(args.run / "train_log.csv", newline="") as handle:  # the run's clock at that step (logged rows)
        elapsed = max((float(r["elapsed_seconds"]) for r in csv.DictReader(handle) if int(r["step"]) <= args.step),
                      default=0.0)
    package = package_run(config, model, {"step": args.step, **{k: v for k, v in meta.items() if k != "step"}},
                          args.step, elapsed, torch.device("cpu"))
    if args.out.exists():
        import shutil
        shutil.rmtree(args.out)
    package.rename(args.out)
    package.parent.rmdir()
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
