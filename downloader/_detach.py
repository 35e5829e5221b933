"""Imported by the forkserver only (see ``children.mp_context``): moves it, and so every pool
worker and local server it forks, out of the terminal's foreground process group.

A terminal's Ctrl-C goes to the whole foreground group. A worker that is still starting
has not yet run ``child_init`` (which ignores SIGINT), so a Ctrl-C then would kill it, break
the pool and lose the images it held. Out of the group, only the parent hears Ctrl-C and
stops the run in order; the workers stop when the parent shuts the pool or exits.
"""

from __future__ import annotations

import contextlib
import os

with contextlib.suppress(OSError):
    os.setpgrp()
