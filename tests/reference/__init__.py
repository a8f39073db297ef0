"""Reference data from neural-tangents 0.6.5 and helpers shared with the tests."""
