"""Runtime: driver and worker sides of tasks and actors, ObjectRef, worker pool, function shipping."""
