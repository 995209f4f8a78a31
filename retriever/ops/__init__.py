"""Operations: the local Ray cluster, job submission and the capacity plan."""
