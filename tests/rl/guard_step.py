"""The non-finite guard of one optimizer step under whatever backend the process was launched with (a plain run,
DDP, DeepSpeed ZeRO-2/3): ``check_guard()`` in-process, or ``accelerate launch --config_file ... guard_step.py``
(prints "guard ok"). A NaN loss must leave the weights exactly as they were; a finite one must move them."""

import math
import sys
from pathlib import Path

import torch

if __name__ == "__main__":
    sys.path[0] = str(Path(__file__).resolve().parents[2])

from policies import lora  # noqa: E402
from rl import common, distributed  # noqa: E402


def _weights(model: torch.nn.Module) -> list[torch.Tensor]:
    params = list(model.parameters())
    with lora.gathered(params):  # ZeRO-3: parameters are partitioned outside a forward
        return [p.detach().float().clone() for p in params]


def check_guard() -> None:
    from accelerate import Accelerator

    accelerator = Accelerator()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    distributed.configure_deepspeed(accelerator, max_grad_norm=1.0, micro_batch_size=2)
    model, optimizer = accelerator.prepare(model, optimizer)
    params = [p for p in model.parameters() if p.requires_grad]
    x = torch.randn(2, 4, device=accelerator.device)

    for poison, should_step in ((math.nan, False), (1.0, True)):
        before = _weights(model)
        optimizer.zero_grad(set_to_none=True)
        finite = True
        for micro in range(2):  # two accumulated micro-batches, the first unsynchronised
            with distributed.gradient_sync(accelerator, model, sync=micro == 1):
                loss = model(x[micro:micro + 1]).float().pow(2).mean() * (poison if micro == 1 else 1.0)
                finite = distributed.backward(accelerator, loss) and finite
        norm, stepped = common.clipped_step(accelerator, optimizer, params, 1.0, finite)
        after = _weights(model)
        moved = any(not torch.equal(a, b) for a, b in zip(before, after))
        assert stepped == should_step and moved == should_step, (poison, norm, stepped, moved)
        assert math.isfinite(norm) == should_step, norm
        assert all(torch.isfinite(w).all() for w in after)
    accelerator.print(f"guard ok ({distributed.backend_name(accelerator)})")


if __name__ == "__main__":
    check_guard()
