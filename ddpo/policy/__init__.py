"""The maths of the policy, as pure functions of tensors: per-step log-probs (:mod:`.schedulers`), sampling and
the training-time recomputation of stored steps (:mod:`.sampling`), which (trajectory, timestep) pairs to train on
(:mod:`.pairs`), advantages (:mod:`.advantages`) and losses (:mod:`.losses`).

The bottom layer of ``ddpo``: it imports neither :mod:`ddpo.training` nor :mod:`ddpo.tools`.
"""
