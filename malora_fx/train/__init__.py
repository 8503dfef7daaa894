"""Stage 3 — training: JSONL data and built-in task suites (``data``,
``suites``), the step (``step``), the optimizer and schedule (``schedule``),
checkpoints (``checkpoint``), logging (``logs``), data parallelism
(``distributed``), the loop (``loop``), evaluation (``evaluate``) and the
routing report (``routing_report``)."""
