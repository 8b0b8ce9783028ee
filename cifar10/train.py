"""Train QKFormer on CIFAR-10 (docs/original.md §6.2).

Recipe: the bundled qkformer/configs/cifar10.yml (``--config`` takes another); flags override it.

    python cifar10/train.py --data-dir DATA [--epochs N ...]
"""
from qkformer.train import main

if __name__ == "__main__":
    main(default_config="cifar10", description=__doc__.splitlines()[0])
