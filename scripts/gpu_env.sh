# Sourced by the scripts run on a lent GPU machine (the device tool), from the repo root, with .gpu/ carried:
#   .gpu/whl/*.whl       packages the machine lacks (datasets, pytrec_eval, bm25s, PyStemmer, ...; faiss left out)
#   .gpu/minilm16/       all-MiniLM-L6-v2 in fp16 (45 MB: the carry limit is 64 MiB), cast back to fp32 there
#   .gpu/scifact.tar.gz  BEIR SciFact, unpacked to ../shared/data/beir/scifact as the scripts expect
# Leaves the fp32 model at /tmp/minilm and PYTHONPATH set.
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false WANDB_MODE=disabled PYTHONUNBUFFERED=1
# The supervised run's process held 105 of the 140 GB outside PyTorch (75%: what XLA preallocates by default, so
# likely a JAX in the machine's image, initialized by some import) and concurrent sweeps ran out of memory; these
# make XLA and TensorFlow allocate on demand.
export XLA_PYTHON_CLIENT_PREALLOCATE=false TF_FORCE_GPU_ALLOW_GROWTH=true
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .gpu/whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
mkdir -p ../shared/data/beir && tar -xzf .gpu/scifact.tar.gz -C ../shared/data/beir
python3 - <<'PY'
from sentence_transformers import SentenceTransformer
model = SentenceTransformer(".gpu/minilm16", device="cpu").float()
model.save("/tmp/minilm")
PY
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
