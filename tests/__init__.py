"""The test suite. A package, so that helpers shared by several test directories import by name,
`from tests.helpers.models import make_palm`, with no `sys.path` edits (pytest puts the repository
root on the import path for it). Fixtures for every directory are in `tests/conftest.py`.

A directory's own helpers sit next to its tests under a unique `*_testing.py` name and import
by that name (`from feedback_testing import ...`): the subdirectories are not packages, so pytest
imports their test files with the directory on the import path.
"""
