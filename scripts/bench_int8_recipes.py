"""Which int8 recipe the ONNX backend ships: accuracy of each on the dev queries (SciFact *train* qrels), test unread.

    python scripts/bench_int8_recipes.py
    python scripts/bench_int8_recipes.py --max-docs 200 --max-queries 20 --recipes qattention_first_fp32 \\
        --out /tmp/int8_smoke.json   # smoke

The recipes, all from one fp32 export through eager attention (``embtune.retrieval.onnx.export_onnx``), weights
int8 per channel, activations quantized at run time:

- ``matmul_only``: attention left unfused, every MatMul quantized;
- ``qattention_all``: attention fused (one op per layer), MatMuls and every layer's Attention quantized;
- ``qattention_first_fp32``: the same with the first layer's Attention left fp32 (the shipped recipe,
  ``quantize_int8``'s default).

Each encodes the whole SciFact corpus and the 809 train queries; nDCG@10 beside the torch model's, the docs/s of that
one pass (indicative only: the timed comparison is scripts/bench_encode_speed.py) and the worst / mean cosine of the
document embeddings to torch's. nDCG@10 is scored by eval's entry (``embtune.eval.evaluate``: each encoder's queries
one per batch by role, exact search through the core ``Retriever``). Writes ``benchmarks/results/int8_recipes.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from benchlib import bench_command, write_result  # noqa: E402  (scripts/benchlib.py)

from embtune.dataio import document_text, load_beir  # noqa: E402
from embtune.eval import evaluate  # noqa: E402
from embtune.manifest import Provenance  # noqa: E402
from embtune.models import resolve_model  # noqa: E402
from embtune.retrieval.onnx import OnnxEncoder, export_onnx, quantize_int8  # noqa: E402
from embtune.retrieval.spec import DenseSpec, Retriever, RetrieverSpec  # noqa: E402

# name -> quantize_int8's ``attention``
RECIPES = {"matmul_only": "unfused", "qattention_all": "int8", "qattention_first_fp32": "int8_after_first"}


def build_recipes(model_dir: Path, out: Path, names: list[str] | None = None) -> dict[str, Path]:
    """The int8 files (see the module docstring; ``names``, default all three) from one fp32 export."""
    from transformers import AutoConfig

    fp32 = export_onnx(model_dir, out)["fp32"]
    config = AutoConfig.from_pretrained(model_dir)
    paths = {}
    for name, attention in RECIPES.items():
        if names is not None and name not in names:
            continue
        paths[name] = quantize_int8(fp32, out / f"{name}.onnx", config.num_attention_heads, config.hidden_size,
                                    attention)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "beir" / "scifact"))
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-docs", type=int, default=0, help="first N documents only (smoke runs; 0 = all)")
    parser.add_argument("--max-queries", type=int, default=0, help="first N queries only (smoke runs; 0 = all)")
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "int8_recipes.json"))
    args = parser.parse_args()
    provenance = Provenance.start(bench_command(sys.argv))
    torch.set_num_threads(args.threads)
    from sentence_transformers import SentenceTransformer

    data = load_beir(args.data, "train")
    doc_ids = list(data.corpus)[: args.max_docs or None]
    doc_texts = [document_text(data.corpus[d]) for d in doc_ids]
    query_ids = sorted(data.qrels)[: args.max_queries or None]
    queries = {q: data.queries[q] for q in query_ids}

    def score(model, encode) -> tuple[float, float, np.ndarray]:
        """nDCG@10 through eval's entry (``model`` encodes the queries one per batch by role), the docs/s of
        ``encode`` over the corpus, and the corpus embeddings."""
        start = time.perf_counter()
        doc_emb = encode(doc_texts)  # (n_docs, dim), normalized
        docs_per_s = len(doc_texts) / (time.perf_counter() - start)
        retriever = Retriever(RetrieverSpec(dense=DenseSpec()), doc_ids, doc_texts, doc_emb)
        row = evaluate(retriever, queries, data.qrels, model=model, k=100)
        return row.percent()["ndcg@10"], round(docs_per_s, 1), doc_emb

    plain = SentenceTransformer(resolve_model(args.model), device="cpu")
    torch_ndcg, torch_rate, torch_emb = score(plain, lambda t: plain.encode(t, batch_size=64,
                                                                           normalize_embeddings=True))
    rows = {"torch": {"ndcg@10": torch_ndcg, "docs_per_s_one_pass": torch_rate}}
    print(json.dumps(rows), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        shutil.copytree(resolve_model(args.model), model_dir)
        for name, path in build_recipes(model_dir, Path(tmp) / "onnx", args.recipes).items():
            encoder = OnnxEncoder(model_dir, path, threads=args.threads)
            ndcg, rate, emb = score(encoder, lambda t: encoder.encode(t, 64, normalize_embeddings=True))
            cos = (emb * torch_emb).sum(1)
            rows[name] = {"attention": RECIPES[name], "ndcg@10": ndcg, "ndcg_delta": round(ndcg - torch_ndcg, 2),
                          "docs_per_s_one_pass": rate,
                          "doc_cosine_to_torch": {"min": round(float(cos.min()), 4),
                                                  "mean": round(float(cos.mean()), 5)}}
            print(json.dumps({name: rows[name]}), flush=True)
    out = {"benchmark": "int8_recipes", "split": "dev (SciFact qrels/train.tsv, all 809 queries; test unread)",
           "num_documents": len(doc_ids), "num_queries": len(query_ids), "model": args.model,
           "threads": args.threads, "results": rows, "shipped": "qattention_first_fp32",
           **provenance.record()}
    write_result(args.out, out)  # the previous run goes under other_runs


if __name__ == "__main__":
    main()
