"""Sizing before a run: parameter counts from the model code (``params``), memory and time of a
job (``memory``), the ``mocha plan`` command (``cli``) and the generated tables of infra/README.md
(``readme``)."""
