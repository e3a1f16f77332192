"""Tools built on training and the maths: ablation grids (:mod:`.ablate`), ``ddpo bench`` (:mod:`.bench`), reports
(:mod:`.report`, :mod:`.plots`) and the diagnostics of why a reward does or does not move (:mod:`.diagnostics`).

Tools import :mod:`ddpo.training`, :mod:`ddpo.policy` and :mod:`ddpo.models`; nothing below imports them.
"""
