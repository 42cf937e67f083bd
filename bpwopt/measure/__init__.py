"""Measurement: the error every candidate type adds to every tensor, as pure per-tensor tasks."""
