"""Train QKFormer on CIFAR-100 (docs/original.md §6.2).

Recipe: the bundled qkformer/configs/cifar100.yml (``--config`` takes another); flags override it.

    python cifar100/train.py --data-dir DATA [--epochs N ...]
"""
from qkformer.train import main

if __name__ == "__main__":
    main(default_config="cifar100", description=__doc__.splitlines()[0])
