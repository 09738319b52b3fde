#!/usr/bin/env bash
# Run a study; run again (a retried Kubernetes job, a restarted pod) it resumes instead:
# `--resume` is added when the study's Ray folder (<--checkpoint-storage or --storage/ray>/<--name>)
# already exists on the persistent volume. Flags as `--flag value` (not `--flag=value`).
#   k8s/run_study.sh studies/negprior_shift.py --storage /results --name NAME [flags...]
set -euo pipefail
study=$1
shift
storage=oodlab-results name="" ckpt=""
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  case "${args[i]}" in
    --storage) storage=${args[i + 1]} ;;
    --name) name=${args[i + 1]} ;;
    --checkpoint-storage) ckpt=${args[i + 1]} ;;
  esac
done
if [ -z "$name" ]; then
  echo "run_study.sh: pass --name NAME (the folder a retry resumes)" >&2
  exit 2
fi
if [ -d "${ckpt:-$storage/ray}/$name" ]; then
  echo "[run_study.sh] ${ckpt:-$storage/ray}/$name exists: resuming" >&2
  set -- "$@" --resume
fi
exec "${PYTHON:-python}" "$study" "$@"
