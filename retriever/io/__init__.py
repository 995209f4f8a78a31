"""Storage and formats: the object store, dataset and training-data formats, corpus shards, embedding files, query splits."""
