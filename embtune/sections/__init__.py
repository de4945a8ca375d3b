"""The recipe's sections as typed dataclasses, one module per stage that reads them.

They live in the core, beside the schema that composes them (``embtune/schema.py``), so that a stage's command
line can load a whole recipe without importing another stage. Each stage reads its own section (and the core's:
``bm25``, ``llm``, ``tracking``).
"""
