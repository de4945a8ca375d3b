"""The retrieval core: the one copy of each retrieval piece that data_prep, train, eval and serve share.

- ``encoder``: texts -> embeddings, cached on disk by model and text (one cache key for every stage);
- ``index``: FAISS search, returning ``(scores, indices)`` as FAISS does; ``to_run`` makes a pytrec_eval run;
- ``bm25``: exact BM25Okapi as a sparse matrix (``FastBM25``), its tokenizer and the ``bm25`` config section;
- ``fusion``: the one fusion formula (weighted, over whole-corpus z-scores by default) and reciprocal-rank fusion;
- ``rerank``: cross-encoder rescoring of a run's head, with an on-disk score cache;
- ``onnx``: the ONNX export and runtime encoder;
- ``spec``: ``RetrieverSpec`` (which retrieval system: members, fusion, rerank; JSON) and the ``Retriever`` that runs
  one, which eval's rows and the server's ``/search`` both call.

The core imports no stage package; an import-linter contract in pyproject.toml keeps it so.
"""
