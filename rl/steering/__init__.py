"""Inference-time alignment with a critic: value-guided sampling (DPS) and Feynman-Kac steering.

    guides.py   what a steering step needs at z_t: CFG velocity, V(z_t), ∇V(z_t) — per critic, fused where possible
                (SharedHeadGuide: the StitchVM head *is* CFG's unconditional branch up to block i)
    mmdit.py    the SD3 MMDiT forward in pieces (embed, blocks, finish), equal to diffusers' forward
    graphs.py   CUDA-graph replay of the fixed-shape pieces (SharedHeadGuide cuda_graph="tail" / "full")
    dps.py      the guided SDE of the StitchVM paper (Eq. 40) and its ODE variant
    fk.py       FK steering: potentials, ESS-adaptive resampling, proposal scaling
"""

from rl.steering.dps import DPSConfig, DPSResult, dps_sample, dps_step
from rl.steering.fk import FKConfig, FKResult, effective_sample_size, fk_sample, normalized_weights, resample_indices
from rl.steering.guides import CriticGuide, GuideOutput, SharedHeadGuide, TweedieGuide, make_guide

__all__ = [
    "CriticGuide",
    "DPSConfig",
    "DPSResult",
    "FKConfig",
    "FKResult",
    "GuideOutput",
    "SharedHeadGuide",
    "TweedieGuide",
    "dps_sample",
    "dps_step",
    "effective_sample_size",
    "fk_sample",
    "make_guide",
    "normalized_weights",
    "resample_indices",
]
