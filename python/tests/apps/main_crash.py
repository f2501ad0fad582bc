"""A worker whose main thread raises after ready(): the hook must announce a Suicide."""
from rr_cluster_worker import Worker

worker = Worker()
worker.ready()
raise RuntimeError("boom in main")
