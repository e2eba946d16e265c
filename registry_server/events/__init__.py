"""Events: the replication worker that ships local changes to peers, and its status."""
