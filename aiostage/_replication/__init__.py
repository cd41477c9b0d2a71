"""Replication: the frame format (``wire``), frames over a ProcessGroup (``transport``), receive
buffers, the replica store and ``ReplicationStager``."""
