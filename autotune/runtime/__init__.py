"""The runtime: what trains, measures and supervises, on the far side of a plan.

- :mod:`~autotune.runtime.trainer`: the executor's ``Trainer`` and the training loop of a full
  run (``run``), one loop for trials and runs alike.
- :mod:`~autotune.runtime.metrics`: tokens per step, MFU against one reference peak, peak memory.
- :mod:`~autotune.runtime.checkpoint`: checkpoints written atomically with their sha256, and
  the resume that checks plan and checkpoint describe the same run.
- :mod:`~autotune.runtime.rundir`: a run's folder: its lock, the checks before a run starts
  there, what a killed run left behind, the JSONL log.
- :mod:`~autotune.runtime.trial`: a trial's parent side (``run_trial``, ``TrialBudget``, the
  device lock); imports no torch.
- :mod:`~autotune.runtime.measure`: a trial's child side, ``python -m autotune.runtime.measure
  PLAN RESULT``.
- :mod:`~autotune.runtime.process`: processes in one place: ``die_with_parent``, a run's stop
  signals, a trial's process group, torchrun under `autotune run`.
"""
