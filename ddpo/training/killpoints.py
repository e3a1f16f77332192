"""Testing hook: a deterministic SIGKILL at a named point of a run, to prove that resume is exact after a crash.

``DDPO_KILL_AT=<point>:<n>`` kills the process (``SIGKILL``: no cleanup, no ``finally``, as a power cut or the OOM
killer) at the ``n``-th passage of ``<point>``; ``DDPO_KILL_AT=<point>:<n>@<rank>`` only on process ``<rank>``
(``RANK`` of torchrun / accelerate). ``DDPO_KILL_SIGNAL=INT`` sends another signal instead (``SIGINT``: Ctrl-C).
Unset, each point costs one dictionary lookup. The points (one call each, in the training modules: epoch_sampling,
scoring, optimise, reporting, checkpoint, checkpoint_state, trainer) are listed in :data:`POINTS`;
``tests/test_kill_resume.py`` and ``scripts/kill_soak.py`` use them. Not for production use.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

POINTS = (
    "sample",  # after each sampling batch
    "score",  # after a batch's reward (in the scoring thread)
    "old_log_probs",  # after the old log-probs were recomputed in the training shapes
    "backward",  # after a minibatch's backward pass, before the optimiser step
    "optimizer_step",  # after an optimiser step
    "metrics",  # after an epoch's line was appended to metrics.jsonl
    "checkpoint_payload",  # a checkpoint's tensors written into its temporary folder, not yet committed
    "checkpoint_manifest",  # state.json and the manifest written, the folder not yet renamed into place
    "replace_dir",  # just before a finished temporary folder is renamed into place (checkpoint or final/)
    "checkpoint_prune",  # a checkpoint renamed into place, older ones not yet pruned
    "final_payload",  # final/'s weights written into a temporary folder, not yet renamed
    "run_end",  # after final/ was written, before the run's summary
)

_passages: Counter[str] = Counter()


def kill_point(name: str) -> None:
    """Count a passage of ``name``; SIGKILL this process at the passage ``DDPO_KILL_AT`` names."""
    spec = os.environ.get("DDPO_KILL_AT")
    if not spec:
        return
    target, _, rest = spec.partition(":")
    if target != name:
        return
    count, _, rank = rest.partition("@")
    if rank and rank != os.environ.get("RANK", "0"):
        return
    _passages[name] += 1
    if _passages[name] == int(count):
        os.kill(os.getpid(), getattr(signal, "SIG" + os.environ.get("DDPO_KILL_SIGNAL", "KILL").upper()))


def reset() -> None:
    """Forget the passages counted so far (a forked test process starts counting from zero)."""
    _passages.clear()
