"""`torchrun ... -m tip_megatron.train --config run.yaml [key=value ...]`."""
import sys

from tip_megatron.train.main import _main_module

if __name__ == "__main__":  # dist_checkpointing's saver needs the guard
    sys.exit(_main_module())
