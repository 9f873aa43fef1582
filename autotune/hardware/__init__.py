"""What the machine is and what it does: for now all of it in :mod:`autotune.hardware.profile`
(the module hardware.py was, moved as it is so that its history follows), re-exported here."""

from autotune.hardware.profile import *  # noqa: F403
