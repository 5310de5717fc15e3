#!/usr/bin/env bash
# Direct 8B memory measurement (bench_memory.py --direct-8b) on a lent GPU machine (no network there).
#
#   bash bench/mem8b_device.sh prepare   # here, in the repo root: wheels for Python 3.12 + the tokenizer folder
#   bash bench/mem8b_device.sh run       # there, in the repo root; carry .whl and .bench_tok; results in $OUT
#
# prepare: pydantic and its dependencies as cp312 manylinux wheels into .whl/ (the device image lacks them), the
# default model's tokenizer files (no weights, ~3 MB) into .bench_tok/; both ignored via .git/info/exclude.
# run: a random Llama-3-8B-shaped model built on the GPU in bf16; seq 256 at batch 2 and 8 (512 and 2048 tokens);
# writes $OUT/mem8b.json (rewritten after every run), $OUT/log.txt and $OUT/machine.txt. About 5-7 minutes:
# give it timeout_s 420 or more. No run starts after DEADLINE_S seconds (default 300).
# Check here on CPU first (tiny 2-layer copy, this venv, no wheels):
#   OUT=/tmp/m NO_WHEELS=1 PYTHON=../.venv/bin/python DEVICE=cpu \
#   EXTRA="--direct-config num_hidden_layers=2,hidden_size=256,intermediate_size=896,num_attention_heads=4,num_key_value_heads=1 --seq 64 --batches 1 2 --gen-new 8" \
#   bash bench/mem8b_device.sh run
set -euo pipefail
case "${1:-}" in
prepare)
    for p in /.whl/ /.bench_tok/; do grep -qxF "$p" .git/info/exclude 2>/dev/null || echo "$p" >> .git/info/exclude; done
    PY=${PYTHON:-.venv/bin/python}
    "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
        pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 typing_extensions==4.16.0
    src=$(PYTHONPATH=src "$PY" -c "from safeunits.models.loading import resolve_model; print(resolve_model('smollm2-135m-instruct'))")
    mkdir -p .bench_tok
    cp "$src"/{chat_template.jinja,tokenizer.json,tokenizer_config.json,generation_config.json} .bench_tok/
    ;;
run)
    : "${OUT:?OUT must name the folder for the results}"
    [ -n "${NO_WHEELS:-}" ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl
    export PYTHONPATH=$PWD/src:/tmp/site PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
    export SAFEUNITS_DATA_DIR=/tmp/safeunits-data
    (nvidia-smi; free -g; nproc; df -h /tmp) > "$OUT/machine.txt" 2>&1 || true
    cd bench
    # shellcheck disable=SC2086  # EXTRA is a list of arguments (later ones override the defaults)
    timeout "${LIMIT_S:-395}" "${PYTHON:-python3}" bench_memory.py --direct-8b --device "${DEVICE:-cuda}" \
        --tokenizer ../.bench_tok --seq 256 --batches 2 8 --gen-new 64 --derive-no-save \
        --deadline-s "${DEADLINE_S:-300}" --steps load,scores,generate,snip,train_full,train_masked,derive,merge,apply \
        --json "$OUT/mem8b.json" ${EXTRA:-} 2>&1 | tee "$OUT/log.txt"
    ;;
*)
    echo "usage: bash bench/mem8b_device.sh prepare|run" >&2; exit 2 ;;
esac
