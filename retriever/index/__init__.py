"""Search structures: FAISS shards, exact search, BM25 and trec_eval-ordered rankings."""
