"""pytest settings for the reference helpers."""

# The fixture generator imports neural-tangents 0.6.5, which only its own pinned environment
# provides (see its docstring); it is a script, not a test module.
collect_ignore = ["make_nt_fixtures.py"]
