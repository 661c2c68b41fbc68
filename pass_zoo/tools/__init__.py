"""Commands built on the pipeline: bench grids, architecture checks, cost measurements, transfer."""
