"""Evaluate a QKFormer checkpoint (released or ours) on an ImageFolder val split.

    python imagenet/test.py --checkpoint checkpoint-191.pth --data-dir /data/imagenet
"""
from qkformer.evaluate import main

if __name__ == "__main__":
    main()
