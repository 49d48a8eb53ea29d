# Sourced on the GPU machine, in the repository root, at the start of each command there, with .gpu and .whl
# carried (made by benchmarks/gpu/pack.sh):  source benchmarks/gpu/setup.sh && python3 benchmarks/...
# Installs datasets (the set that fits the image's pyarrow) into /tmp/site, expands the fp16 MiniLM to float32
# (mrl and sentence-transformers then load the weights the CPU runs use, to fp16 rounding), and points
# MRL_MIRROR at .gpu/mirror.yaml.
arrow_major=$(python3 -c "import pyarrow; print(pyarrow.__version__.split('.')[0])")
wheels=.whl/old; [ "$arrow_major" -ge 24 ] && wheels=.whl/new
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$wheels"/*.whl \
    || return 1
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} MRL_MIRROR=$PWD/.gpu/mirror.yaml PYTHONUNBUFFERED=1
if [ ! -f .gpu/model-fp32/model.safetensors ]; then
    cp -r .gpu/model-fp16 .gpu/model-fp32
    python3 - <<'PY' || return 1
from safetensors.torch import load_file, save_file
weights = load_file(".gpu/model-fp16/model.safetensors")
save_file({k: v.float() for k, v in weights.items()}, ".gpu/model-fp32/model.safetensors", metadata={"format": "pt"})
PY
fi
echo "setup: pyarrow $arrow_major -> $wheels; datasets $(python3 -c 'import datasets; print(datasets.__version__)'); mirror $MRL_MIRROR"
