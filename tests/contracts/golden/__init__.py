"""Golden records: the bytes and headers each released version wrote, and what they fold to.

`python -m tests.contracts.golden.record VERSION` adds a version (see record.py);
tests/contracts/test_golden.py decodes and folds every version's records with today's
code and compares the result with the expected state stored beside them.
"""
