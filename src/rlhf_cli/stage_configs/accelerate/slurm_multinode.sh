#!/bin/bash
# Multi-node: one task per node, each starting its node's GPU processes with accelerate launch.
#   sbatch stage_configs/accelerate/slurm_multinode.sh sft --config stage_configs/hh_sft.yaml --preset 20B
#SBATCH --job-name=rlhf
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gres=gpu:8
#SBATCH --cpus-per-task=64
#SBATCH --time=48:00:00
set -euo pipefail
GPUS_PER_NODE=8
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT=29500
# --resume: a requeued job continues from its last checkpoint instead of starting over
srun bash -c "accelerate launch \
  --config_file stage_configs/accelerate/zero3.yaml \
  --num_machines $SLURM_NNODES --num_processes $((SLURM_NNODES * GPUS_PER_NODE)) \
  --machine_rank \$SLURM_NODEID --main_process_ip $MASTER_ADDR --main_process_port $MASTER_PORT \
  -m rlhf_cli.cli $* --set distributed.deepspeed_config=stage_configs/accelerate/ds_zero3.json --resume"
