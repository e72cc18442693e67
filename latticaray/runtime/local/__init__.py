"""The local parts of a runtime node: objects, tasks, streams, actors, workers (see node.py)."""
