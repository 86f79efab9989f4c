"""Pictures and viewers for visual QA: static plots, 3D viewers, the review (cases, verdicts, report) and its browser."""
