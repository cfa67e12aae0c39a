#!/usr/bin/env bash
# Two-node example for SLURM (cannot run on the single machine this project is developed on; kept
# correct by reading the torchrun and DeepSpeed launcher documentation):
#   sbatch launch/slurm_multinode.sh                      # torchrun, 8 GPUs per node
#   LAUNCHER=deepspeed sbatch launch/slurm_multinode.sh   # DeepSpeed's launcher, no ssh needed
#   CONFIG=configs/sst2_mezo.yaml sbatch launch/slurm_multinode.sh model.name_or_path=facebook/opt-13b
# Extra arguments are config overrides. One SLURM task per node; each task starts the node's ranks.
#SBATCH --job-name=zofsdp
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --output=%x-%j.out
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
source .venv/bin/activate

LAUNCHER=${LAUNCHER:-torchrun}
CONFIG=${CONFIG:-configs/sst2_mezo.yaml}
BACKEND=${BACKEND:-deepspeed}   # or fsdp2 (torchrun only)
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
NUM_NODES=${SLURM_NNODES:-2}
# The first node of the allocation hosts the rendezvous (torchrun) / the master (DeepSpeed).
HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
PORT=${MASTER_PORT:-29500}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
ARGS=(train -c "$CONFIG" "parallel.backend=$BACKEND" "$@")

case "$LAUNCHER" in
  torchrun)
    # c10d rendezvous: every node runs the same command; the job id names the rendezvous.
    srun --kill-on-bad-exit=1 torchrun \
      --nnodes "$NUM_NODES" --nproc_per_node "$GPUS_PER_NODE" \
      --rdzv_id "$SLURM_JOB_ID" --rdzv_backend c10d --rdzv_endpoint "$HEAD:$PORT" \
      -m zofsdp "${ARGS[@]}"
    ;;
  deepspeed)
    [ "$BACKEND" = deepspeed ] || { echo "the deepspeed launcher runs parallel.backend=deepspeed" >&2; exit 2; }
    # DeepSpeed's hostfile: one line per node, "hostname slots=<processes on it>", in node-rank order.
    HOSTFILE=${HOSTFILE:-hostfile.$SLURM_JOB_ID}
    scontrol show hostnames "$SLURM_JOB_NODELIST" | sed "s/\$/ slots=$GPUS_PER_NODE/" > "$HOSTFILE"
    # --no_ssh: instead of ssh-ing from the head to every node (pdsh, the default), srun starts the
    # launcher on each node and --node_rank tells it which line of the hostfile it is. The single quotes
    # keep $SLURM_NODEID for the task on each node to expand.
    srun --kill-on-bad-exit=1 bash -c 'deepspeed --hostfile "$0" --no_ssh --node_rank "$SLURM_NODEID" \
      --master_addr "$1" --master_port "$2" --num_nodes "$3" --num_gpus "$4" --module zofsdp "${@:5}"' \
      "$HOSTFILE" "$HEAD" "$PORT" "$NUM_NODES" "$GPUS_PER_NODE" "${ARGS[@]}"
    ;;
  *)
    echo "LAUNCHER must be torchrun or deepspeed, got $LAUNCHER" >&2
    exit 2
    ;;
esac
