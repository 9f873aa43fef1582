"""Loader settings: pinned host buffers and how many batches a background thread gathers
ahead (the keyword arguments of ``autotune.data.Batches``). Each batch is a pure function of
(seed, step) and the batch's place in the step, so the data and the losses are bit-for-bit those of the plain
run: an exact strategy. Random-token runs make their batches on the device and read nothing
of this.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from autotune.contract.strategy import NOTHING_TO_SET, Knob, Needs, Strategy

if TYPE_CHECKING:
    from autotune.contract.context import TrainContext


@dataclass(kw_only=True, slots=True)
class DataloaderConfig:
    pin_memory: bool = True
    """Gather batches into page-locked host memory, so the copy to the GPU runs asynchronously."""
    prefetch: int = 2
    """Batches gathered ahead on the loader thread; 0 gathers each one when it is asked for."""

    def __post_init__(self) -> None:
        # Each prefetched batch is held in memory: a huge queue exhausts the host.
        if not 0 <= self.prefetch <= 64:
            raise ValueError(f"prefetch must be from 0 to 64, got {self.prefetch}")

    def needs(self) -> Needs:
        """Pinned memory exists only beside an accelerator."""
        return Needs(features=frozenset({"pinned_memory"}) if self.pin_memory else frozenset())


def apply_dataloader(ctx: TrainContext, cfg: DataloaderConfig) -> None:
    ctx.check_needs(STRATEGY, cfg, "set pin_memory false on this device")
    ctx.loader_options.update(pin_memory=cfg.pin_memory, prefetch=cfg.prefetch)
    ctx.notes.append(f"loader: pin_memory {cfg.pin_memory}, prefetch {cfg.prefetch}")


STRATEGY = Strategy(
    name="dataloader",
    phase="loop",
    summary="loader settings: pinned host memory, prefetch depth",
    exact=True,
    config=DataloaderConfig,
    apply=apply_dataloader,
    knobs=(Knob(name="pin_memory", choices=(True, False)), Knob(name="prefetch", low=0, high=8, integer=True)),
    # The loader is the run's, not the launcher's.
    exports={"accelerate": NOTHING_TO_SET, "deepspeed": NOTHING_TO_SET},
)
