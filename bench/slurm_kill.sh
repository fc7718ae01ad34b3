#!/usr/bin/env bash
# How long a job takes to end after one of its two CPU ranks is SIGKILLed at step 3: under a real
# one-node Slurm (scripts/slurm_cluster.sh; salloc -N1 --ntasks-per-node=2, --launcher slurm)
# and, as the baseline, over the ssh launcher with a stand-in remote shell on this machine (two
# "hosts"), each RUNS times on the tiny fixture. Prints one table: launcher, build, each run's
# seconds from the kill to the coordinator's exit, and their median.
#   RUNS=5   BASELINE_BIN=DIR: also run DIR/coordinator (another build, e.g. one from before a fix)
# Needs root and Debian's slurmd slurmctld slurm-client munge (scripts/setup.sh --test installs
# them), and the fixtures (scripts/test.sh makes them).
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-5}
cargo build -q --workspace --bins
[ -d target/fixtures/tiny ] || .venv/bin/python tests/fixtures/make_fixtures.py target/fixtures >/dev/null
WORK=$(mktemp -d)
cluster=$WORK/cluster
trap 'bash scripts/slurm_cluster.sh stop "$cluster"; rm -rf "$WORK"' EXIT
bash scripts/slurm_cluster.sh start "$cluster" >/dev/null
export SLURM_CONF=$cluster/slurm.conf
printf '#!/bin/sh\nexec sh -c "$2"\n' >"$WORK/fake-ssh"
chmod +x "$WORK/fake-ssh"
printf 'node-a slots=1\nnode-b slots=1\n' >"$WORK/hostfile"

flags=(train --device cpu --model_name_or_path target/fixtures/tiny --train_file coordinator/src --do_train
  --per_device_train_batch_size 1 --gradient_accumulation_steps 2 --block_size 32 --max_steps 400 --save_steps 0
  --logging_steps 1 --master_addr 127.0.0.1 --master_port 0 --cache_dir "$WORK/cache" --worker_bin "$PWD/target/debug/worker")

# One run: prints the seconds from the kill of rank 1 (at step 3) to the job's exit.
# $1 = slurm|ssh, $2 = the coordinator binary.
one_run() {
    local out=$WORK/out-$RANDOM pid= killed_at= line
    local -a cmd
    if [[ $1 == slurm ]]; then
        cmd=(salloc -N1 --ntasks-per-node=2 "$2" "${flags[@]}" --launcher slurm --output_dir "$out")
    else
        cmd=("$2" "${flags[@]}" --hostfile "$WORK/hostfile" --ssh_command "$WORK/fake-ssh" --output_dir "$out")
    fi
    while IFS= read -r line; do
        case $line in
            "rank 1 joined: "*) pid=${line##* pid }; pid=${pid%% *} ;;
            "step 3/"*) if [[ -n $pid && -z $killed_at ]]; then kill -KILL "$pid"; killed_at=$(date +%s.%N); fi ;;
        esac
    done < <("${cmd[@]}" 2>&1 || true)
    [[ -n $killed_at ]] || { echo "no kill happened ($1, $2)" >&2; exit 1; }
    python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.2f}')" "$killed_at" "$(date +%s.%N)"
}

builds=("this build=target/debug/coordinator")
[[ -n ${BASELINE_BIN:-} ]] && builds+=("baseline=$BASELINE_BIN/coordinator")
echo "| launcher | build | kill to exit, s (each run) | median |"
echo "|---|---|---|---|"
for launcher in slurm ssh; do
    for build in "${builds[@]}"; do
        times=()
        for _ in $(seq "$RUNS"); do times+=("$(one_run "$launcher" "${build#*=}")"); done
        median=$(printf '%s\n' "${times[@]}" | sort -n | awk '{a[NR]=$1} END {print a[int((NR + 1) / 2)]}')
        echo "| $launcher | ${build%%=*} | ${times[*]} | $median |"
    done
done
