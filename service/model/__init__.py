"""What runs the model: loading, geometry, imaging, the engine, batching, the runner."""
