"""Measurements: throughput and timing primitives, the GPU check's sections."""
