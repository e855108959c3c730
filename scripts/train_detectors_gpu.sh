#!/usr/bin/env bash
# Train exported detector experiments on a GPU machine that has JAX but no TensorFlow (the lent
# device machines), side by side on the one GPU; see mammo_tf/detector_arrays.py.
#   scripts/train_detectors_gpu.sh DIR OUT DEADLINE_S NAME...
# DIR holds NAME.npz (mammo-tf export-detector-arrays), hed_vgg16.weights.h5 (used as the VGG16
# weights when present) and, where Keras is not installed, its wheels in DIR/whl. Writes
# OUT/NAME_results.npz (rewritten after each fold) and OUT/NAME.log. No fold starts after DEADLINE_S seconds; a run is stopped after $RUN_TIMEOUT
# seconds (520), keeping the folds it finished. For the names in $KEEP_WEIGHTS_FOR, fold 0's
# trained weights come back too, as float16 parts under 16 MiB (four for SSD300-VGG16: mind the
# device's limit of 8 files back per call).
# Mind the device's 64 MiB working-tree limit: the arrays (28 MB for the three-crops recipe) and the
# VGG16 file (29 MB) fit one run a call, and the committed models/ (hundreds of MB) must be moved
# out of the checkout for that call.
set -uo pipefail
dir=$1 out=$2 deadline=$3
shift 3
py=${PYTHON:-python3}
mkdir -p "$out"
if compgen -G "$dir/whl/*.whl" > /dev/null; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$dir"/whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
# Two runs share the GPU: no run takes most of its memory up front; compiled steps are cached
# on disk, so a fold (or the other run) with the same model does not compile it again.
export KERAS_BACKEND=jax PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false \
  JAX_COMPILATION_CACHE_DIR=/tmp/jax_cache JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
"$py" -c "import jax, keras; print('jax', jax.__version__, jax.devices(), 'keras', keras.__version__)" || exit 1
weights=()
[ -f "$dir/hed_vgg16.weights.h5" ] && weights=(--vgg16-weights "$dir/hed_vgg16.weights.h5")
for name in "$@"; do
  keep=()
  [[ " ${KEEP_WEIGHTS_FOR:-} " == *" $name "* ]] && keep=(--keep-weights 0)
  timeout "${RUN_TIMEOUT:-520}" "$py" -m mammo_tf.cli train-detector-arrays "$dir/$name.npz" "${weights[@]}" \
    "${keep[@]}" --deadline "$deadline" --out "$out/${name}_results.npz" > "$out/$name.log" 2>&1 &
done
wait
for name in "$@"; do echo "== $name"; grep -E "^fold|Error|error" "$out/$name.log" | tail -8; tail -c 600 "$out/$name.log"; done
