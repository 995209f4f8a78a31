import pytest

pytest_plugins = ["tests.s3server"]

# Suites of features still being finished: their tests run with `-m wip` and stay
# out of the default run (and CI) until they are green on a clean machine. Remove a file from
# this set in the commit that makes it green.
# Today: none (issue 11's 2-node read-task suite, test_encode_scale.py, joined CI once its
# ~80 s fitted the 30-minute budget).
WIP_FILES: set[str] = set()


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name in WIP_FILES:
            item.add_marker(pytest.mark.wip)
