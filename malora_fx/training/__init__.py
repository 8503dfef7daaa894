"""Stage 3 — training: JSONL data and built-in task suites (``data``,
``suites``), the hyper-parameters (``args``), one optimizer step (``step``),
the optimizer and schedule (``schedule``), checkpoints (``checkpoint``),
progress bar, metrics file and loss plot (``logs``), data parallelism
(``distributed``), the loop (``loop``: ``train`` of a run directory or of an
adapted GraphModule held in Python), evaluation (``evaluate``) and the routing
report (``routing_report``)."""
