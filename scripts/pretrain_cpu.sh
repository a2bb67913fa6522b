#!/usr/bin/env bash
# Pretrain the toy-world recipe on a CPU in resumable chunks of at most CHUNK_MINUTES (default 58), for
# TOTAL_MINUTES of wall time in all (default 150): a chunk that runs out of time is killed and the next one
# resumes from the rolling checkpoint (.pretrain/pretrain_ckpt.pt, rewritten every 2 minutes), so a
# cut-off loses at most those minutes. Once the latents are encoded they are cached beside it
# (.pretrain/pretrain_ckpt_latents.pt, ~0.5 GB, never committed), so a resumed chunk skips rendering and
# encoding 262,144 images (about 20 minutes on 2 cores). Run it in the background, and re-run it with the
# same OUT to go on after a reboot:
#
#   nohup scripts/pretrain_cpu.sh out/heldout_cpu > out/heldout_cpu.log 2>&1 &
#
# The step counts are capped (the --set lines below) so that the result does not depend on how fast each
# chunk happened to run; the time budget only shrinks a phase that would not fit.
set -u
OUT=${1:?usage: scripts/pretrain_cpu.sh OUT_FOLDER}
CHUNK_MINUTES=${CHUNK_MINUTES:-58}
TOTAL_MINUTES=${TOTAL_MINUTES:-150}
PY=${PYTHON:-.venv/bin/python}
CKPT=.pretrain/pretrain_ckpt.pt
SETTINGS=(--set vae.batch_size=64 --set vae.max_steps=2500 --set decoder.batch_size=64 --set decoder.max_steps=800
          --set unet.batch_size=128 --set unet.max_steps=5000 --set unet.warmup_steps=300)
STARTED_FILE="$OUT.started"

[ -f "$STARTED_FILE" ] || date +%s > "$STARTED_FILE"
resume=()
[ -f "$CKPT" ] && [ -f "$OUT.chunks" ] && resume=(--resume)
while :; do
  left=$(( TOTAL_MINUTES - ($(date +%s) - $(cat "$STARTED_FILE")) / 60 ))
  [ "$left" -gt 1 ] || { echo "out of the $TOTAL_MINUTES-minute budget"; exit 1; }
  echo "chunk $(( $(cat "$OUT.chunks" 2>/dev/null || echo 0) + 1 )): $left minutes of the budget left"
  timeout "${CHUNK_MINUTES}m" "$PY" -m sdtune.toyworld.pretrain --device cpu --minutes "$left" \
      --out "$OUT" --ckpt "$CKPT" "${SETTINGS[@]}" "${resume[@]}"
  rc=$?
  echo $(( $(cat "$OUT.chunks" 2>/dev/null || echo 0) + 1 )) > "$OUT.chunks"
  [ "$rc" -eq 124 ] || exit "$rc"   # anything but the chunk's time limit ends the run
  resume=(--resume)
done
