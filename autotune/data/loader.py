"""Loading batches: what the training loop reads.

The loader (:class:`Batches`) draws the offsets of a step's whole global batch from
``np.random.default_rng([seed, step])`` and gives each (rank, micro-batch) its slice: the
samples a step trains on depend on nothing else, neither on how the global batch is split
into processes and accumulated micro-batches nor on when the run started, so a resumed run
sees exactly the batches an uninterrupted run would, and any two plans of one recipe (seed
and global batch) train on the same samples in the same steps.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Protocol

import numpy as np
import torch
from numpy.lib.stride_tricks import sliding_window_view

from autotune import devices
from autotune.errors import UserError


class BatchSource(Protocol):
    """What the training loop reads batches from."""

    def get(self, step: int, micro: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y): int64 (batch_size, seq_len) on the device, y = x shifted by one token."""
        ...

    def close(self) -> None: ...


def _to_device(windows: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T+1) small ints on the host -> x, y int64 (B, T) on the device, converted there."""
    w = windows.to(device, non_blocking=True)
    x = w[:, :-1].to(torch.int64, memory_format=torch.contiguous_format)
    y = w[:, 1:].to(torch.int64, memory_format=torch.contiguous_format)
    return x, y


def _check_shape(n_tokens: int, batch_size: int, seq_len: int) -> None:
    if batch_size < 1 or seq_len < 1:
        raise ValueError(f"batch_size {batch_size} and seq_len {seq_len} must be positive")
    if n_tokens < seq_len + 1:
        raise UserError(f"{n_tokens} tokens of data are too few for sequences of {seq_len} (+1 target)")


def _check_rank(rank: int, world_size: int) -> None:
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")


def _check_step(step: int, micro: int) -> None:
    if step < 0 or micro < 0:
        raise ValueError(f"step {step} and micro {micro} must not be negative")


class Batches:
    """Random windows of a token array: a step's global batch is a pure function of
    (seed, step); (rank, micro) picks its slice.

    The global batch of a step has ``batch_size * micro_batches * world_size`` rows; rank r's
    micro-batch m is rows ``(r * micro_batches + m) * batch_size`` onwards. So the samples a
    step sees are the same however that product is split (the plain reference of a plan
    trains on the plan's very batches).

    ``get(step, micro)`` returns x, y of shape (batch_size, seq_len), int64 on ``device``.
    A background thread gathers the next ``prefetch`` (step, micro) batches into pinned
    int32 host buffers, in the order ``for step: for micro in range(micro_batches)``; the
    caller only pays the non-blocking copy and the int64 conversion on the device. Asking
    for any other batch of the step works too (computed there and then). Not for concurrent
    callers. Close it (or use ``with``) to stop the thread.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        *,
        batch_size: int,
        seq_len: int,
        seed: int,
        device: torch.device | str,
        rank: int = 0,
        world_size: int = 1,
        micro_batches: int = 1,
        pin_memory: bool | None = None,
        prefetch: int = 2,
    ) -> None:
        _check_shape(len(tokens), batch_size, seq_len)
        _check_rank(rank, world_size)
        if micro_batches < 1 or prefetch < 0:
            raise ValueError(f"micro_batches {micro_batches} must be >= 1 and prefetch {prefetch} >= 0")
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.micro_batches = micro_batches
        self.device = torch.device(device)
        self.pin_memory = (
            "pinned_memory" in devices.of(self.device).features(None) if pin_memory is None else pin_memory
        )
        self.prefetch = prefetch
        self._tokens = tokens
        self._windows = sliding_window_view(tokens, seq_len + 1)  # (N - T, T+1), a view
        self._pending: dict[tuple[int, int], Future[torch.Tensor]] = {}
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="autotune-batches") if prefetch else None
        self._closed = False

    def get(self, step: int, micro: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        if self._closed:
            raise RuntimeError("Batches.get after close()")
        _check_step(step, micro)
        key = (step, micro)
        future = self._pending.pop(key, None)
        windows = future.result() if future is not None else self._host_windows(key)
        batch = _to_device(windows, self.device)  # launch the copy before waking the thread
        self._prefetch_after(key)
        return batch

    def offsets(self, step: int, micro: int = 0) -> np.ndarray:
        """Start of each row of batch (step, micro) in the token array: this rank's slice of
        the step's global batch."""
        if micro >= self.micro_batches:
            raise ValueError(f"micro {micro} is out of range: a step has {self.micro_batches} micro-batches")
        rows = self.batch_size * self.micro_batches * self.world_size
        starts = np.random.default_rng([self.seed, step]).integers(0, len(self._tokens) - self.seq_len, size=rows)
        first = (self.rank * self.micro_batches + micro) * self.batch_size
        return starts[first : first + self.batch_size]

    def _host_windows(self, key: tuple[int, int]) -> torch.Tensor:
        """Batch ``key`` as (B, T+1) int32 on the host, pinned if asked: one vectorized gather."""
        out = torch.empty((self.batch_size, self.seq_len + 1), dtype=torch.int32, pin_memory=self.pin_memory)
        out.numpy()[...] = self._windows[self.offsets(*key)]
        return out

    def _next_keys(self, key: tuple[int, int]) -> Iterator[tuple[int, int]]:
        step, micro = key
        while True:
            step, micro = (step, micro + 1) if micro + 1 < self.micro_batches else (step + 1, 0)
            yield step, micro

    def _prefetch_after(self, key: tuple[int, int]) -> None:
        if self._pool is None:
            return
        wanted = list(itertools.islice(self._next_keys(key), self.prefetch))
        for stale in [k for k in self._pending if k not in wanted]:
            self._pending.pop(stale).cancel()  # one already running just finishes unread
        for k in wanted:
            if k not in self._pending:
                self._pending[k] = self._pool.submit(self._host_windows, k)

    def close(self) -> None:
        """Stop the prefetch thread and drop prefetched batches. Idempotent."""
        self._closed = True
        for future in self._pending.values():
            future.cancel()
        self._pending.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> Batches:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class RandomBatches:
    """Uniformly random tokens made on the device: for throughput-only runs, opt-in.

    Same ``get`` as :class:`Batches`; the tokens are a pure function of
    (seed, step, micro, rank). The loss on them says nothing about learning.
    """

    def __init__(
        self,
        vocab_size: int,
        *,
        batch_size: int,
        seq_len: int,
        seed: int,
        device: torch.device | str,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        _check_shape(seq_len + 1, batch_size, seq_len)
        _check_rank(rank, world_size)
        self.vocab_size = vocab_size
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.seed = seed
        self.rank = rank
        self.device = torch.device(device)

    def get(self, step: int, micro: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        _check_step(step, micro)
        seed = np.random.SeedSequence([self.seed, step, micro, self.rank]).generate_state(1, np.uint64)[0]
        generator = torch.Generator(device=self.device).manual_seed(int(seed))
        shape = (self.batch_size, self.seq_len + 1)
        w = torch.randint(0, self.vocab_size, shape, generator=generator, device=self.device)
        return w[:, :-1].contiguous(), w[:, 1:].contiguous()

    def close(self) -> None:
        """Nothing to release; here so both sources are used alike."""

    def __enter__(self) -> RandomBatches:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def val_batches(
    tokens: np.ndarray, *, batch_size: int, seq_len: int, n_batches: int, device: torch.device | str
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A fixed list of (x, y) batches for validation loss: windows spread evenly over
    ``tokens`` (the val file), the same on every rank and every call."""
    _check_shape(len(tokens), batch_size, seq_len)
    starts = np.linspace(0, len(tokens) - seq_len - 1, n_batches * batch_size).round().astype(np.int64)
    windows = sliding_window_view(tokens, seq_len + 1)[starts].astype(np.int32)
    host = torch.from_numpy(windows).view(n_batches, batch_size, seq_len + 1)
    return [_to_device(w, torch.device(device)) for w in host]


def val_loss(model: torch.nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Mean of ``model(x, y)`` (the workload's scalar mean loss) over ``batches``, in eval
    mode without gradients; the model's training mode is restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            losses = torch.stack([model(x, y).float() for x, y in batches])
    finally:
        model.train(was_training)
    return losses.mean().item()
