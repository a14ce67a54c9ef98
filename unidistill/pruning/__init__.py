"""Making students from a teacher: depth and width pruning that records provenance."""
