"""Launch configurations of the Triton selective scan (`mambakit.ops.selective_scan.triton`): block shapes per
d_state, measured with benchmarks/sweep_selective_scan.py."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from mambakit.errors import MambaKitError
from mambakit.ops.triton.grid import next_power_of_2


@dataclass(frozen=True)
class ScanConfig:
    """Block shapes. The state dim is padded to NP = NH * NL (powers of two); NL lanes share one channel (the
    backward's own split of NP when bwd_NH / bwd_NL are given)."""
    NH: int
    NL: int
    fwd_block_d: int
    fwd_block_t: int
    fwd_warps: int
    bwd_block_d: int
    bwd_block_t: int
    bwd_warps: int
    chunk: int
    bwd_NH: Optional[int] = None
    bwd_NL: Optional[int] = None
    # the sequence spans run at once (0: enough to fill the GPU, see triton_spans.span_split; 1: none)
    fwd_spans: int = 0
    bwd_spans: int = 0

    @property
    def bwd_split(self) -> tuple[int, int]:
        return (self.bwd_NH or self.NH, self.bwd_NL or self.NL)


def pick_config(d_state: int, dim: int, dim_per_group: int, ngroups: int, chunk: Optional[int] = None,
                fwd_block_t: Optional[int] = None, bwd_block_t: Optional[int] = None) -> ScanConfig:
    NP = next_power_of_2(d_state)
    # lanes per channel: a few for the usual small states (the state sum is then mostly in-thread), a whole warp for
    # large ones (registers); each thread holds BT steps x NH states x d_per_thread channels
    NL = min(NP, 4) if NP <= 32 else 32
    NH = NP // NL
    lanes_d = 32 // NL
    d_per_thread = max(1, min(2, (8 if NP <= 32 else 4) // NH))
    cap = next_power_of_2(dim)
    if ngroups > 1:  # a channel block must not straddle two groups of B/C
        cap = min(cap, dim_per_group & -dim_per_group)
    fwd_bd = min(lanes_d * d_per_thread, cap)
    bwd_bd = fwd_bd
    fbt = fwd_block_t or (8 if NP <= 32 else 4)
    bbt = bwd_block_t or (4 if NP <= 32 and NH <= 4 else 2)
    bwd_split: tuple = ()
    if NP == 16:  # measured best (benchmarks/sweep_selective_scan.py): the forward with 2 lanes per channel
        bwd_split = (NH, NL)
        NL, NH = 2, 8
        fwd_bd = min(16, cap)
    ch = chunk or 64
    if ch % fbt or ch % bbt:
        raise MambaKitError(f"chunk ({ch}) must be a multiple of the time tiles ({fbt}, {bbt})")
    return ScanConfig(NH, NL, fwd_bd, fbt, 1, bwd_bd, bbt, 1, ch, *bwd_split)
