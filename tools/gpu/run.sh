#!/usr/bin/env bash
# Measurements on a lent NVIDIA machine (which has no Rust toolchain and no network).
# Binaries are built elsewhere with `tools/gpu/build.sh` into .gpu/ and carried with the
# working tree; PyTorch is already there, diffusers travels as a wheel in .whl/.
#
#   tools/gpu/run.sh info|parity|parity-quick|fused|sanitize|graphs|blocks|cudnn|tape|tracking|bench|invert-f16|invert-f32|pytorch-fp16|pytorch-fp32|sdxl-invert|pytorch-sdxl-fp16 ...
#   (results under $OUT)
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
BIN=/tmp/nt-bin
NV=/opt/torch/.venv/lib/python3.12/site-packages/nvidia
CUDA_LIBS=/usr/local/cuda/lib64:$NV/cu13/lib:$NV/cudnn/lib
export LD_LIBRARY_PATH=$CUDA_LIBS:${LD_LIBRARY_PATH:-}
mkdir -p $BIN
for f in .gpu/*.xz; do
  [ -e "$f" ] || continue
  b="$BIN/$(basename "${f%.xz}")"
  [ -x "$b" ] || { python3 -c "import lzma,sys,shutil; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2],'wb'))" "$f" "$b" && chmod +x "$b"; }
done
NT=$BIN/nulltext
MODEL=/tmp/sd15-random
IMG=/tmp/chelsea512.png
need_model() {
  [ -d $MODEL ] || $NT -q random-model --preset sd15 --out $MODEL
  [ -f $IMG ] || python3 -c "from PIL import Image; Image.open('tests/fixtures/inputs/chelsea256.png').resize((512,512), Image.LANCZOS).save('$IMG')"
}
SDXL=/tmp/sdxl-random
IMG_XL=/tmp/chelsea1024.png
need_sdxl() {
  [ -d $SDXL ] || $NT -q random-model --preset sdxl --out $SDXL
  [ -f $IMG_XL ] || python3 -c "from PIL import Image; Image.open('tests/fixtures/inputs/chelsea256.png').resize((1024,1024), Image.LANCZOS).save('$IMG_XL')"
}
gpu_mem_watch() { nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 > "$1" & echo $!; }
peak_of() { sort -n "$1" | tail -1; }

for stage in "$@"; do
  echo "=== $stage $(date +%T)"
  case $stage in
    info)
      nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv ;;
    parity)
      # The golden tests, on the GPU, with the CPU tolerances.
      for t in $BIN/golden $BIN/inversion_golden $BIN/edit_golden $BIN/context_tape; do
        [ -x "$t" ] || continue
        NULLTEXT_TEST_DEVICE=cuda RAYON_NUM_THREADS=4 $t --include-ignored --test-threads 1 --nocapture 2>&1 | grep -E "max\||worst|cosine|MSE|deviation|test result|panicked|FAILED|row 0" | tee -a "$OUT/parity.txt"
      done ;;
    parity-quick)
      # The golden tests on the GPU, without the ignored 500-iteration one.
      for t in $BIN/golden $BIN/inversion_golden $BIN/edit_golden $BIN/context_tape; do
        [ -x "$t" ] || continue
        NULLTEXT_TEST_DEVICE=cuda RAYON_NUM_THREADS=4 $t --test-threads 1 --nocapture 2>&1 | grep -E "max\||worst|cosine|MSE|deviation|test result|panicked|FAILED|row 0" | tee -a "$OUT/parity.txt"
      done ;;
    tracking)
      # cudarc's cross-stream event tracking on (candle's default) and off (nulltext's).
      need_model
      for tr in 1 0; do
        echo "NULLTEXT_CUDA_EVENT_TRACKING=$tr" | tee -a "$OUT/tracking.txt"
        NULLTEXT_CUDA_EVENT_TRACKING=$tr $NT --device cuda --dtype f16 bench --model $MODEL --size 512 --repeat 5 --warmup 2 \
          --only unet_b1,unet_b2,nti_iter,edit_step --json "$OUT/tracking-$tr.json" 2>&1 | tee -a "$OUT/tracking.txt"
      done ;;
    fused)
      # nulltext's fused CUDA kernels against their tensor formulas in f32, f16 and bf16
      # (the library's unit tests), then the UNet, the null-text iteration and an edit step
      # with and without them and with the memory pool releasing its memory at every
      # synchronization (the driver's default) or keeping it, alternating.
      NULLTEXT_TEST_DEVICE=cuda $BIN/nulltext_models fused::tests --test-threads 1 --nocapture 2>&1 \
        | grep -E "group norm|layer norm|geglu|test result|panicked" | tee -a "$OUT/fused.txt"
      need_model
      for round in 1 2; do
        for cfg in "on keep" "off keep" "on release" "off release"; do
          read -r fk pool <<< "$cfg"
          echo "fused kernels $fk, pool $pool (round $round)" | tee -a "$OUT/fused.txt"
          NULLTEXT_FUSED_KERNELS=$fk NULLTEXT_CUDA_POOL=$pool $NT --device cuda --dtype f16 bench --model $MODEL --size 512 \
            --repeat 10 --warmup 2 --only unet_b1,unet_b2,nti_iter,edit_step --json "$OUT/fused-$fk-$pool-$round.json" 2>&1 | tee -a "$OUT/fused.txt"
        done
      done ;;
    sanitize)
      # The fused kernels' GPU tests under compute-sanitizer's memcheck (it runs on the
      # Firecracker machines; gVisor's refuse the device).
      if command -v compute-sanitizer >/dev/null; then
        NULLTEXT_TEST_DEVICE=cuda compute-sanitizer --tool memcheck --error-exitcode 1 $BIN/nulltext_models fused::tests \
          --test-threads 1 2>&1 | tail -15 | tee -a "$OUT/sanitize.txt"
      else
        echo "no compute-sanitizer on this machine" | tee -a "$OUT/sanitize.txt"
      fi ;;
    graphs)
      # A step's iterations replayed as a CUDA graph against the same iterations as they
      # are (the golden test, on the GPU), then the null-text iteration (f16, 512²) and a
      # whole f16 inversion with NULLTEXT_CUDA_GRAPHS on and off, alternating.
      NULLTEXT_TEST_DEVICE=cuda $BIN/inversion_golden iterations_replayed --test-threads 1 --nocapture 2>&1 \
        | grep -E "losses|after 5|test result|panicked|WARN" | tee -a "$OUT/graphs.txt"
      need_model
      for round in 1 2; do
        for g in on off; do
          echo "NULLTEXT_CUDA_GRAPHS=$g (round $round)" | tee -a "$OUT/graphs.txt"
          NULLTEXT_CUDA_GRAPHS=$g $NT --device cuda --dtype f16 bench --model $MODEL --size 512 --repeat 10 --warmup 2 \
            --only nti_iter --json "$OUT/graphs-$g-$round.json" 2>&1 | tee -a "$OUT/graphs.txt"
        done
      done
      for g in on off; do
        w=$(gpu_mem_watch /tmp/mem-graphs-$g.txt)
        NULLTEXT_CUDA_GRAPHS=$g /usr/bin/time -f "wall %e s, host peak %M KiB" $NT --device cuda --dtype f16 invert --model $MODEL \
          --image $IMG --prompt "a close up photo of a cat" --out /tmp/cat-graphs-$g.nti.safetensors --early-stop=-1 \
          --reconstruction "$OUT/rec-graphs-$g.png" 2>&1 | tail -4 | tee -a "$OUT/graphs.txt"
        kill $w; echo "NULLTEXT_CUDA_GRAPHS=$g: peak GPU memory used (MiB, nvidia-smi): $(peak_of /tmp/mem-graphs-$g.txt)" | tee -a "$OUT/graphs.txt"
      done ;;
    blocks)
      # The attention's queries in blocks of at most 2^25 scores (the default) and all at
      # once (NULLTEXT_ATTENTION_SCORES=0), f16, 512², alternating, twice.
      need_model
      for round in 1 2; do
        for n in default 0; do
          echo "NULLTEXT_ATTENTION_SCORES=$n (round $round)" | tee -a "$OUT/blocks.txt"
          env $([ $n = 0 ] && echo NULLTEXT_ATTENTION_SCORES=0) $NT --device cuda --dtype f16 bench --model $MODEL --size 512 \
            --repeat 10 --warmup 2 --only unet_b1,unet_b2,nti_iter,edit_step --json "$OUT/blocks-$n-$round.json" 2>&1 | tee -a "$OUT/blocks.txt"
        done
      done ;;
    cudnn)
      # candle's convolutions against cuDNN's (the build with `--features cudnn`), f16, 512²,
      # alternating, twice.
      need_model
      for round in 1 2; do
        for b in nulltext nulltext-cudnn; do
          echo "$b (round $round)" | tee -a "$OUT/cudnn.txt"
          $BIN/$b --device cuda --dtype f16 bench --model $MODEL --size 512 --repeat 10 --warmup 2 \
            --only unet_b1,unet_b2,nti_iter,edit_step,vae_decode --json "$OUT/$b-$round.json" 2>&1 | tee -a "$OUT/cudnn.txt"
        done
      done ;;
    tape)
      # The null-text iteration both ways (the context tape, as inversions run it, and
      # candle's graph), f16 and f32, at 512² and 256².
      need_model
      for dt in f16 f32; do
        for size in 512 256; do
          $NT --device cuda --dtype $dt bench --model $MODEL --size $size --repeat 10 --warmup 2 \
            --only nti_iter,nti_iter_graph --json "$OUT/tape-$dt-$size.json" 2>&1 | tee -a "$OUT/tape.txt"
        done
      done ;;
    bench)
      need_model
      for dt in f32 f16; do
        $NT --device cuda --dtype $dt bench --model $MODEL --size 512 --repeat 5 --warmup 2 --json "$OUT/bench-$dt.json" 2>&1 | tee -a "$OUT/bench.txt"
      done ;;
    invert-f16|invert-f32)
      need_model
      dt=${stage#invert-}
      w=$(gpu_mem_watch /tmp/mem-$dt.txt)
      /usr/bin/time -v $NT --device cuda --dtype $dt invert --model $MODEL --image $IMG --prompt "a close up photo of a cat" \
        --out /tmp/cat-$dt.nti.safetensors --early-stop=-1 --reconstruction "$OUT/rec-$dt.png" 2>&1 | grep -vE "^\s+(Page|Volun|Invol|Swaps|File|Socket|Signals|Average|Exit|Minor|Major|Percent|System|User)" | tee -a "$OUT/invert-$dt.txt"
      kill $w; echo "peak GPU memory used (MiB, nvidia-smi): $(peak_of /tmp/mem-$dt.txt)" | tee -a "$OUT/invert-$dt.txt"
      w=$(gpu_mem_watch /tmp/mem-e-$dt.txt)
      $NT --device cuda --dtype $dt edit --model $MODEL --inversion /tmp/cat-$dt.nti.safetensors --target "a close up photo of a dog" --out-dir /tmp/edits-$dt 2>&1 | tee -a "$OUT/invert-$dt.txt"
      $NT --device cuda --dtype $dt edit --model $MODEL --inversion /tmp/cat-$dt.nti.safetensors --target "a close up photo of a dog" --blend "cat:dog" --out-dir /tmp/edits-$dt 2>&1 | tee -a "$OUT/invert-$dt.txt"
      kill $w; echo "edit peak GPU memory used (MiB, nvidia-smi): $(peak_of /tmp/mem-e-$dt.txt)" | tee -a "$OUT/invert-$dt.txt" ;;
    pytorch-fp32|pytorch-fp16)
      need_model
      dt=${stage#pytorch-}
      python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl >/dev/null 2>&1
      PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 python3 tools/bench_pytorch.py --model $MODEL --device cuda --dtype $dt --size 512 \
        --repeat 5 --warmup 2 --full --no-early-stop --stages unet_b1,unet_b2,nti_iter,vae_encode,vae_decode,text_encoder \
        --json "$OUT/pytorch-$dt.json" 2>&1 | grep -v Warning | tee -a "$OUT/pytorch.txt" ;;
    sdxl-invert)
      # Full-size SDXL (random weights) at 1024², f16: a direct inversion, a whole null-text
      # inversion without early stop, and an edit, each with its peak GPU memory.
      need_sdxl
      for method in direct null-text; do
        w=$(gpu_mem_watch /tmp/mem-xl-$method.txt)
        $NT --device cuda --dtype f16 invert --model $SDXL --image $IMG_XL --prompt "a close up photo of a cat" \
          --method $method --out /tmp/cat-xl-$method.nti.safetensors --early-stop=-1 2>&1 | tee -a "$OUT/sdxl-invert.txt"
        kill $w; echo "$method peak GPU memory used (MiB, nvidia-smi): $(peak_of /tmp/mem-xl-$method.txt)" | tee -a "$OUT/sdxl-invert.txt"
      done
      w=$(gpu_mem_watch /tmp/mem-xl-edit.txt)
      $NT --device cuda --dtype f16 edit --model $SDXL --inversion /tmp/cat-xl-null-text.nti.safetensors --target "a close up photo of a dog" \
        --out-dir /tmp/edits-xl 2>&1 | tee -a "$OUT/sdxl-invert.txt"
      kill $w; echo "edit peak GPU memory used (MiB, nvidia-smi): $(peak_of /tmp/mem-xl-edit.txt)" | tee -a "$OUT/sdxl-invert.txt" ;;
    pytorch-sdxl-fp16)
      need_sdxl
      python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl >/dev/null 2>&1
      PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 python3 tools/bench_pytorch.py --model $SDXL --device cuda --dtype fp16 --size 1024 \
        --repeat 3 --warmup 1 --full --no-early-stop --stages unet_b1,unet_b2,nti_iter \
        --json "$OUT/pytorch-sdxl-fp16.json" 2>&1 | grep -v Warning | tee -a "$OUT/pytorch-sdxl.txt" ;;
    *) echo "unknown stage $stage" ;;
  esac
done
