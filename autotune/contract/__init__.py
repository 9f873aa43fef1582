"""The contract: everything a strategy (``strategies/``) may import from the core.

``strategy`` (the declaration: Strategy, Knob, Needs, Facts), ``context`` (TrainContext, what
``apply`` changes), ``engine`` (the step a strategy may replace), ``mesh`` (the device mesh and
its checks) and ``order`` (the phases of application). Importing this package imports none of
them: ``strategy`` and ``mesh`` load without torch, ``context`` and ``engine`` with it.
"""
