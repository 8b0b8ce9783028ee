"""Train QKFormer on DVS128 Gesture (docs/original.md §6.4).

Recipe: the bundled qkformer/configs/dvs128_gesture.yml (``--config`` takes another); flags override it.

    python dvs128_gesture/train.py --data-dir DATA [--epochs N ...]
"""
from qkformer.train import main

if __name__ == "__main__":
    main(default_config="dvs128_gesture", description=__doc__.splitlines()[0])
