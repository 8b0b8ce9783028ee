"""Train QKFormer on ImageNet-1K (docs/original.md §6.1).

Recipe: the bundled qkformer/configs/imagenet.yml (``--config`` takes another); flags override it.

    torchrun --nproc_per_node=8 imagenet/train.py --data-dir /data/imagenet --model qkformer_10_384
"""
from qkformer.train import main

if __name__ == "__main__":
    main(default_config="imagenet", description=__doc__.splitlines()[0])
