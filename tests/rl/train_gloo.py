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

    import os

    from rl import train

    rc = train.main()
    # Everything is written and the process group is torn down (rl/train.py). Skip the interpreter's teardown: on
    # CPUs DeepSpeed's shared-memory comm op can leave a joinable thread that aborts a rank in the C++ destructors
    # ("terminate called without an active exception", SIGABRT) after a run that finished fine -- rarely, once in a
    # fresh-clone CI of session 5 -- and torchrun then fails the whole launch.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)
