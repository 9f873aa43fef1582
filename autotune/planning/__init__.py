"""Planning: the search for the fastest way to train a workload here."""
