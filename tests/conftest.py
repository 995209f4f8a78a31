import pytest

pytest_plugins = ["tests.s3server"]

# Suites of features still being finished: their tests run with `-m wip` and stay
# out of the default run (and CI) until they are green on a clean machine. Remove a file from
# this set in the commit that makes it green.
# Today: the new suites of the still-open issues 11 (scale), 13 (search service) and 14 (LLM
# retrievers), out of CI only because CI's 30-minute budget is spent; they passed on the dev
# machine (`make test ARGS="-m wip"`). Issue 14's GradCache and Matryoshka tests in
# test_train.py carry the marker themselves.
WIP_FILES: set[str] = {
    "test_encode_scale.py", "test_mmap_shards.py",  # issue 11
    "test_hybrid.py", "test_compressed_shards.py", "test_serve_docs.py",  # issue 13
    "test_st_layout.py",  # issue 13
    "test_code_collection.py",  # issue 14
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name in WIP_FILES:
            item.add_marker(pytest.mark.wip)
