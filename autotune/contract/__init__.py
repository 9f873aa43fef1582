"""The contract: everything a strategy (``strategies/``) may import from the core.

``strategy`` (the declaration: Strategy, Knob, Needs, Facts, Chosen), ``context`` (TrainContext,
what ``apply`` changes), ``engine`` (the step a strategy may replace), ``grads`` (AdamW's groups,
gradients over meshes and process groups), ``cost`` (the cost terms a strategy's ``cost``
changes), ``mesh`` (the device mesh and its checks) and ``order`` (the phases of application,
and the one place of the core that names strategies). Importing this package imports none of
them: ``strategy``, ``cost``, ``mesh`` and ``order`` load without torch, ``context``, ``engine``
and ``grads`` with it.
"""
