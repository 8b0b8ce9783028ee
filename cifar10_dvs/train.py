"""Train QKFormer on CIFAR10-DVS (docs/original.md §6.3).

Recipe: the bundled qkformer/configs/cifar10_dvs.yml (``--config`` takes another); flags override it.

    python cifar10_dvs/train.py --data-dir DATA [--epochs N ...]
"""
from qkformer.train import main

if __name__ == "__main__":
    main(default_config="cifar10_dvs", description=__doc__.splitlines()[0])
