"""Cost models: storage, MACs/params, latency, energy, accuracy (see DESIGN.md)."""
