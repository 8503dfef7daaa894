"""Stage 2 — adapters: the config (``config``), the layer family
(``layers``), inserting them into a captured graph (``transform``), their
files (``files``), run directories (``run_dir``), parameter accounting
(``accounting``) and the folded form merge produces (``folded``)."""
