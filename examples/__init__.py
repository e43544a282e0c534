"""Examples of asyncstreams; see README.md. A package so `examples.task_queue:app` imports."""
