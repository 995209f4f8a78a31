"""Names read from manifests and listings stay inside their folder."""

import pytest

from retriever.errors import InputError
from retriever.io import store


@pytest.mark.parametrize("part", ["..", "../x", "a/../../b", "a/..", "..\\\\evil"])
def test_join_refuses_parent_segments(part):
    with pytest.raises(InputError, match=r"'\.\.' would leave the folder"):
        store.join("s3://bucket/runs", part)


def test_join_keeps_ordinary_names():
    assert store.join("s3://bucket/runs/", "/a/", "b..c", "part-0.parquet") == \
        "s3://bucket/runs/a/b..c/part-0.parquet"
    assert store.join("../shared/datasets", "scifact") == "../shared/datasets/scifact"
