#!/usr/bin/env bash
# A one-node Slurm cluster of its own on loopback, for the tests: its config, munge key and
# socket, state, spool, logs and pid files all under DIR; ports chosen free. Needs root (slurmd
# runs jobs as their user) and Debian's slurmd slurmctld slurm-client munge.
#   scripts/slurm_cluster.sh start DIR [--owner PID]   writes DIR/slurm.conf, starts munged,
#                                                       slurmctld and slurmd, waits until the node
#                                                       is idle; with --owner, stops the cluster
#                                                       and removes DIR once PID has exited (a
#                                                       test killed midway, or tests sharing one
#                                                       cluster for their process's life)
#   scripts/slurm_cluster.sh stop DIR                   stops them by their pid files
# Then: SLURM_CONF=DIR/slurm.conf salloc -N1 -n2 ...   (start prints that line)
# SLURM_CLUSTER_CPUS=N declares N CPUs on the node (default: this machine's), so that more tasks
# than cores can be allocated. SLURM_CLUSTER_AUTH=none skips munge (auth/none).
set -euo pipefail

die() { echo "slurm_cluster: $*" >&2; exit 1; }
usage() { die "usage: $0 start DIR [--owner PID] | stop DIR"; }

(( $# >= 2 )) || usage
action=$1 dir=$2
shift 2
owner=
while (( $# )); do
    case "$1" in
        --owner) owner=${2:?--owner needs a pid}; shift ;;
        *) usage ;;
    esac
    shift
done

# SIGKILLs PID and everything below it (each stopped first, so that none forks meanwhile).
kill_tree() {
    local child
    kill -STOP "$1" 2>/dev/null || return 0
    for child in $(pgrep -P "$1"); do kill_tree "$child"; done
    kill -KILL "$1" 2>/dev/null || true
}

# Stops the cluster: first its job steps and its clients with their tasks (slurmstepd, srun and
# salloc keep SLURM_CONF=DIR/slurm.conf in their environment), then what DIR's pid files name,
# all at once, waiting until each is gone: a daemon that outlives SIGTERM for 5 s gets SIGKILL.
stop_cluster() {
    local dir=$1 name pid i pids=()
    for pid in $(pgrep -x slurmstepd; pgrep -x srun; pgrep -x salloc); do
        if { tr '\0' '\n' <"/proc/$pid/environ"; } 2>/dev/null | grep -qxF "SLURM_CONF=$dir/slurm.conf"; then
            kill_tree "$pid"
        fi
    done
    for name in watch slurmd slurmctld munged; do
        [[ -s "$dir/$name.pid" ]] || continue
        pid=$(<"$dir/$name.pid")
        rm -f "$dir/$name.pid"
        if [[ "$pid" =~ ^[0-9]+$ ]] && kill -TERM "$pid" 2>/dev/null; then
            pids+=("$pid")
        fi
    done
    for (( i = 0; i < 50 && ${#pids[@]}; i++ )); do
        for pid in "${!pids[@]}"; do
            kill -0 "${pids[$pid]}" 2>/dev/null || unset "pids[$pid]"
        done
        (( ${#pids[@]} )) && sleep 0.1
    done
    for pid in "${pids[@]}"; do
        kill -KILL "$pid" 2>/dev/null || true
    done
}

if [[ "$action" == stop ]]; then
    [[ -d "$dir" ]] || exit 0
    stop_cluster "$dir"
    exit 0
fi
[[ "$action" == start ]] || usage

# What is missing, said once, for the tests to show.
missing=()
for tool in slurmctld slurmd sinfo salloc srun scontrol; do
    command -v "$tool" >/dev/null 2>&1 || PATH=$PATH:/usr/sbin:/sbin command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
auth=${SLURM_CLUSTER_AUTH:-munge}
if [[ "$auth" == munge ]]; then
    for tool in munged mungekey; do
        PATH=$PATH:/usr/sbin:/sbin command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
    done
fi
if (( ${#missing[@]} )); then
    die "missing ${missing[*]}: install slurmd slurmctld slurm-client munge (scripts/setup.sh --test does, as root)"
fi
(( EUID == 0 )) || die "slurmd must run as root to start jobs (this is uid $EUID): run the Slurm tests as root"
export PATH=$PATH:/usr/sbin:/sbin

mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
[[ ! -s "$dir/slurmctld.pid" ]] || ! kill -0 "$(<"$dir/slurmctld.pid")" 2>/dev/null ||
    die "a cluster already runs in $dir (scripts/slurm_cluster.sh stop $dir)"
# Anything half-started stops again if this script fails.
trap 'rc=$?; if (( rc != 0 )); then stop_cluster "$dir"; fi' EXIT
# A fresh cluster each time: no state, jobs or logs of a previous one.
rm -rf "$dir/state" "$dir/spool" "$dir"/*.log "$dir"/*.err
mkdir -p "$dir/state" "$dir/spool" "$dir/munge"
chmod 700 "$dir" "$dir/munge"

# Free loopback ports: the kernel's choice (python3), else the first that nothing answers on.
free_ports() {
    if command -v python3 >/dev/null 2>&1 && python3 -c 'pass' 2>/dev/null; then
        python3 - "$1" <<'EOF'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
    else
        local port=$(( 20000 + RANDOM % 20000 )) found=()
        while (( ${#found[@]} < $1 )); do
            (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null || found+=("$port")
            port=$(( port + 1 ))
        done
        echo "${found[*]}"
    fi
}
read -r ctld_port slurmd_port < <(free_ports 2)

host=$(hostname -s)
cpus=${SLURM_CLUSTER_CPUS:-$(nproc)}
authinfo=
if [[ "$auth" == munge ]]; then
    # Its own munged: key, socket, pid, log and seed under DIR (munged wants them private).
    [[ -s "$dir/munge/munge.key" ]] || mungekey --create --keyfile="$dir/munge/munge.key" 2>/dev/null ||
        dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none
    chmod 600 "$dir/munge/munge.key"
    munged --socket="$dir/munge/munge.sock" --key-file="$dir/munge/munge.key" --pid-file="$dir/munged.pid" \
        --log-file="$dir/munge/munged.log" --seed-file="$dir/munge/munged.seed" --force 2>"$dir/munge/start.err" ||
        die "munged did not start: $(cat "$dir/munge/start.err" "$dir/munge/munged.log" 2>/dev/null | tail -5) (SLURM_CLUSTER_AUTH=none runs without munge)"
    authinfo="AuthInfo=socket=$dir/munge/munge.sock"
fi

cat >"$dir/slurm.conf" <<EOF
# Written by scripts/slurm_cluster.sh: a one-node cluster on loopback, all of it under $dir.
ClusterName=zt$$
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/$auth
CredType=cred/$auth
$authinfo
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups in a container: processes tracked by their parent, no binding, no accounting.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
MpiDefault=none
# The declared CPUs count, not the hardware's (SLURM_CLUSTER_CPUS may exceed it).
SlurmdParameters=config_overrides
ReturnToService=2
KillWait=2
MinJobAge=2
SlurmdTimeout=30
InactiveLimit=0
NodeName=$host NodeAddr=127.0.0.1 NodeHostname=$host CPUs=$cpus RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF

# The last lines a daemon wrote, on one line, for the message that says why it failed.
said() {
    sleep 0.3 # a daemon that failed after forking may still be writing
    cat "$dir/$1.err" "$dir/$1.log" 2>/dev/null | grep -v '^$' | tail -4 | tr '\n' ' '
}
alive() { [[ -s "$dir/$1.pid" ]] && kill -0 "$(<"$dir/$1.pid")" 2>/dev/null; }

export SLURM_CONF=$dir/slurm.conf
slurmctld -f "$SLURM_CONF" -c -i 2>"$dir/slurmctld.err" || die "slurmctld did not start: $(said slurmctld)"
slurmd -f "$SLURM_CONF" -N "$host" 2>"$dir/slurmd.err" || die "slurmd did not start: $(said slurmd)"

# Bounded wait for the node to take jobs.
state=
for (( i = 0; i < 300; i++ )); do
    state=$(sinfo -h -n "$host" -o %T 2>/dev/null || true)
    [[ "$state" == idle ]] && break
    for daemon in slurmctld slurmd; do
        (( i < 5 )) || alive "$daemon" || die "$daemon stopped: $(said "$daemon")"
    done
    sleep 0.1
done
if [[ "$state" != idle ]]; then
    die "node $host is not idle after 30 s (state: ${state:-no answer}); slurmctld: $(said slurmctld); slurmd: $(said slurmd)"
fi

if [[ -n "$owner" ]]; then
    # Stops the cluster once the owner has gone, if nobody stopped it before.
    (
        trap - EXIT
        while kill -0 "$owner" 2>/dev/null && [[ -s "$dir/slurmctld.pid" ]]; do sleep 1; done
        rm -f "$dir/watch.pid"
        stop_cluster "$dir"
        kill -0 "$owner" 2>/dev/null || rm -rf "$dir"
    ) </dev/null >/dev/null 2>&1 &
    echo $! >"$dir/watch.pid"
fi
echo "SLURM_CONF=$SLURM_CONF"
