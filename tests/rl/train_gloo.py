"""``torchrun --nproc_per_node 2 tests/rl/train_gloo.py <rl/train.py arguments>`` with ``ACCELERATE_USE_DEEPSPEED=true``
(and ``ACCELERATE_DEEPSPEED_ZERO_STAGE``): rl/train.py under DeepSpeed in several CPU processes.

accelerate gives DeepSpeed a process group only on accelerators (on CPUs every process believes it is rank 0 of 1,
and ``accelerate launch`` with DeepSpeed keeps one process; docs: shared environment notes), so this test entry
point asks for the gloo backend explicitly. Real multi-GPU runs use ``accelerate launch --config_file
configs/accelerate/zero3_2gpu.yaml rl/train.py``.
"""

import functools
import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path[0] = str(Path(__file__).resolve().parents[2])  # the repository root, as rl/train.py does

    import accelerate
    from accelerate.utils import InitProcessGroupKwargs

    accelerate.Accelerator.__init__ = functools.partialmethod(
        accelerate.Accelerator.__init__, kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")])

    from rl import train

    sys.exit(train.main())
