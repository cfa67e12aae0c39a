#!/usr/bin/env bash
# Two-node example for SLURM (cannot run on the single machine this project is developed on; kept
# correct by reading the torchrun and DeepSpeed launcher documentation):
#   sbatch launch/slurm_multinode.sh                      # torchrun, 8 GPUs per node
#   LAUNCHER=deepspeed sbatch launch/slurm_multinode.sh   # DeepSpeed's launcher, no ssh needed
#   CONFIG=configs/sst2_mezo.yaml sbatch launch/slurm_multinode.sh model.name_or_path=facebook/opt-13b
# Extra arguments are config overrides. One SLURM task per node; each task starts the node's ranks.
#
# Preemption and time limits (docs/checkpointing.md): 120 s before the limit SLURM sends SIGUSR1 to the
# tasks (torchrun, which forwards it to every rank); the ranks finish their step, write a checkpoint and
# exit; this script then requeues the job, and the requeued job resumes (train.resume=auto) from the newest
# complete checkpoint in train.output_dir, which must be on a file system every node sees. Raise
# STOP_GRACE_S (and --signal) when a checkpoint takes longer: the ranks are SIGKILLed after it.
#SBATCH --job-name=zofsdp
#SBATCH --requeue
#SBATCH --signal=USR1@120
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
STOP_GRACE_S=${STOP_GRACE_S:-110}   # how long torchrun lets the ranks checkpoint after the signal
MAX_REQUEUES=${MAX_REQUEUES:-20}   # a run that keeps failing is not requeued forever
# resume=auto first, so that an override on the command line can still name a checkpoint to start from.
ARGS=(train -c "$CONFIG" "parallel.backend=$BACKEND" train.resume=auto "$@")
status=0

case "$LAUNCHER" in
  torchrun)
    # c10d rendezvous: every node runs the same command; the job id names the rendezvous.
    # SIGUSR1 is not among the signals torchrun forwards by default.
    srun --kill-on-bad-exit=1 torchrun \
      --nnodes "$NUM_NODES" --nproc_per_node "$GPUS_PER_NODE" \
      --rdzv_id "$SLURM_JOB_ID" --rdzv_backend c10d --rdzv_endpoint "$HEAD:$PORT" \
      --signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 --shutdown-timeout "$STOP_GRACE_S" \
      -m zofsdp "${ARGS[@]}" || status=$?
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
      "$HOSTFILE" "$HEAD" "$PORT" "$NUM_NODES" "$GPUS_PER_NODE" "${ARGS[@]}" || status=$?
    ;;
  *)
    echo "LAUNCHER must be torchrun or deepspeed, got $LAUNCHER" >&2
    exit 2
    ;;
esac
# Stopped before its last step (a signal, a lost node): queue the job again; it resumes on its own.
if [ "$status" -ne 0 ] && [ "${SLURM_RESTART_COUNT:-0}" -lt "$MAX_REQUEUES" ]; then
  echo "zofsdp stopped with status $status: requeueing job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0})" >&2
  scontrol requeue "$SLURM_JOB_ID"
fi
exit "$status"
