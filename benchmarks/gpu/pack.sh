#!/usr/bin/env bash
# Packs what a benchmark on the lent GPU machine needs and its image lacks, into two folders that git ignores
# and the device tool carries (64 MiB at most in all; this packs about 48 MB):
#   .gpu/  the MiniLM weights in fp16 (setup.sh expands them to float32 there), its config, tokenizer and
#          sentence-transformers files, STS-B and the NLI triplets, and mirror.yaml mapping the hub ids to them;
#   .whl/  datasets for Python 3.12 with the dill and multiprocess it needs, in two sets: datasets 5.2 (wants
#          pyarrow >= 24) and datasets 4.0 (pyarrow >= 15), as the image's pyarrow version is not known here.
# Run here, in the repository root:  bash benchmarks/gpu/pack.sh [path/to/shared]   (default ../shared)
set -euo pipefail
cd "$(dirname "$0")/../.."
shared=${1:-../shared}
rm -rf .gpu .whl
mkdir -p .gpu/model-fp16/1_Pooling .gpu/data .whl/new .whl/old

model=$shared/models/all-MiniLM-L6-v2
for f in config.json config_sentence_transformers.json modules.json sentence_bert_config.json \
         special_tokens_map.json tokenizer.json tokenizer_config.json vocab.txt 1_Pooling/config.json; do
    cp "$model/$f" ".gpu/model-fp16/$f"
done
python - "$model/model.safetensors" .gpu/model-fp16/model.safetensors <<'PY'
import sys
from safetensors.torch import load_file, save_file
weights = load_file(sys.argv[1])
save_file({k: v.half().contiguous() for k, v in weights.items()}, sys.argv[2], metadata={"format": "pt"})
PY
cp -r "$shared/data/stsb" "$shared/data/nli" .gpu/data/
cat > .gpu/mirror.yaml <<'YAML'
# configs/mirror.yaml for the GPU machine (MRL_MIRROR=.gpu/mirror.yaml): paths relative to this file.
models:
  sentence-transformers/all-MiniLM-L6-v2: model-fp32  # made from model-fp16 by benchmarks/gpu/setup.sh
datasets:
  sentence-transformers/stsb:
    path: csv
    data_files: {train: data/stsb/train.csv, validation: data/stsb/dev.csv, test: data/stsb/test.csv}
    score_max: 5
  sentence-transformers/all-nli:
    path: json
    data_files: {train: [data/nli/triplets.jsonl.gz, data/nli/triplets-extra.jsonl.gz]}
    columns: [anchor, positive, negative]
YAML

download() {  # download DIR SPEC...: wheels for CPython 3.12 on x86-64 Linux, without their dependencies
    local dir=$1; shift
    python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d "$dir" "$@"
}
download .whl/new datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
download .whl/old datasets==4.0.0 dill==0.3.8 multiprocess==0.70.16
du -sh .gpu .whl
