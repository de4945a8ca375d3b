"""The recipe's sections as typed dataclasses, one module per stage that reads them.

They live in the core, beside the schema that composes them (``embtune/schema.py``), so that a stage's command
line can load a whole recipe without importing another stage. A stage reads its own section, the core's (``bm25``,
``llm``, ``tracking``) and, where it must agree with another stage, that stage's keys (data_prep encodes with
``train.base_model``); each stage fingerprints exactly the keys it reads (tests/test_fingerprints.py).
"""
