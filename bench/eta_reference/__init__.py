"""Reference implementation of the ETA model, kept to pin behaviour.

A frozen copy of ``shared/domain/{geo,speeds,eta}.py`` as of commit b0a0e4d, before
their hot path was optimised (projection memo, prefix-sum integration, compact
per-route tables). Only imports were rewired, and what the ETA path does not use was
cut (``Fix`` is the production class, so both implementations see the same objects;
the speed learner and delay conditions were dropped). Do not "fix" or modernise this
code: ``test_eta_reference.py`` asserts that the production model gives the same
estimates as this one, and ``bench/micro_eta.py`` measures one against the other.

When it is retired: with the ETA work of the issue after #13, which changes the model
(the planned trigger was the one fix type of #13, wall 5; that change kept everything
this copy reads of a fix, ``at``, ``t``, ``lat``, ``lon`` and ``speed_mps``, and moved
the memos into a caller-owned ``TrackMemo``, so the two still see the same objects and
the comparison still holds bit for bit). At that change, record the estimates this
copy gives for the 160 seeded scenarios as golden values beside
``test_eta_reference.py``, compare the new code against those, and delete this
package. Until then it only pins models without the learner's area level
(``bench/micro_eta.py`` strips it before building this model).
"""
