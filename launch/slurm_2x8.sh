#!/usr/bin/env bash
# Two nodes x 8 GPUs under Slurm: one task per node, each runs accelerate launch with 8 processes.
#   sbatch launch/slurm_2x8.sh stage=pretrain data=lvis_v1 data.root=/data/lvis model=deformable_detr_r50 exp=r50
#SBATCH --job-name=stepwise
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=48:00:00
#SBATCH --output=slurm-%j.out
set -euo pipefail

cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MAIN_IP=$(scontrol show hostnames "${SLURM_JOB_NODELIST}" | head -n 1)
MAIN_PORT=${MAIN_PORT:-29500}
NUM_PROCESSES=$((SLURM_NNODES * GPUS_PER_NODE))

# Single quotes: SLURM_NODEID is expanded by each task on its own node, not here.
srun --kill-on-bad-exit=1 bash -c 'accelerate launch \
    --config_file launch/accelerate_2x8gpu.yaml \
    --num_machines "$0" --num_processes "$1" --machine_rank "$SLURM_NODEID" \
    --main_process_ip "$2" --main_process_port "$3" \
    -m stepwise.run "${@:4}"' \
    "${SLURM_NNODES}" "${NUM_PROCESSES}" "${MAIN_IP}" "${MAIN_PORT}" "$@"
