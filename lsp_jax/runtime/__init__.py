"""Run-time plumbing: local or remote paths, device meshes and logical-axis sharding,
checkpoints of a run's workdir, metrics output."""
