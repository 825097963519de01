"""Coverage-guided fuzzing (atheris/libFuzzer) of the parts that take hostile input. See targets.py and
docs/robustness.md; `python -m tests.fuzz.run --help` for long runs."""
