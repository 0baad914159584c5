"""``python -m visor_vllm.training RECIPE.yaml``: the form ``accelerate launch -m`` needs.

    accelerate launch --config_file deploy/accelerate/ddp.yaml -m visor_vllm.training RECIPE.yaml
"""

import argparse
import sys

from visor_vllm.training.trainer import _cli_train, _train_args


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m visor_vllm.training", description=__doc__)
    _train_args(p)
    return _cli_train(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
