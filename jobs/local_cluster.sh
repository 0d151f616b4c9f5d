#!/usr/bin/env bash
# A real two-node Slurm cluster on this one machine, for tests and for trying `tokscale submit` locally.
#
#   sudo jobs/local_cluster.sh install     # Debian packages: slurmctld slurmd slurm-client munge (once;
#                                          # without root: a warning and exit 0, or exit 1 under CI=true)
#   sudo jobs/local_cluster.sh start       # munged + slurmctld + `slurmd -N node1` + `slurmd -N node2`
#   export SLURM_CONF=/tmp/tokscale-slurm/slurm.conf   # printed by `start`; every Slurm client needs it
#   sinfo; tokscale submit tokenizer ...
#   sudo jobs/local_cluster.sh stop        # cancels jobs, stops only the daemons this script started
#
# Needs root (the daemons run as root, munged as the munge user). State, logs and slurm.conf live in
# $TOKSCALE_SLURM_DIR (default /tmp/tokscale-slurm); `stop` deletes that folder's state so job ids restart at 1.
# Both fake nodes run on this host: ONE NodeName line with two ports, daemons started with -N (Slurm refuses
# two NodeName lines with the same NodeHostname). submitit and torch.distributed use the first node's name as
# the rendezvous address, so node1/node2 must resolve: `start` adds them to /etc/hosts (127.0.0.1) when they
# don't, and `stop` removes exactly that line.
#
# Tuned for fast tests (see `slurm.conf` below): a requeued job waits `cred_expire` seconds before it may start
# again (Slurm's default is 120 s), and the scheduler looks at pending jobs every 2 s instead of 60 s.
set -euo pipefail

DIR="${TOKSCALE_SLURM_DIR:-/tmp/tokscale-slurm}"
CONF="$DIR/slurm.conf"
CTLD_PORT="${TOKSCALE_SLURM_PORT:-16817}"
NODE_CPUS="${TOKSCALE_SLURM_CPUS:-2}"
HOSTS_MARK="# tokscale-local-cluster"
PACKAGES=(slurmctld slurmd slurm-client munge)

log() { echo "local_cluster: $*" >&2; }
die() { log "error: $*"; exit 1; }

need_root() {
    [ "$(id -u)" -eq 0 ] || die "must run as root (it starts slurmctld, slurmd and munged); try: sudo $0 $1"
}

installed() {
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
        && command -v munged >/dev/null
}

install_packages() {
    installed && return 0
    if [ "$(id -u)" -ne 0 ]; then
        # `make test` calls this: without root the Slurm tests skip (and say so), except under CI=true.
        log "not root: cannot install ${PACKAGES[*]}; the Slurm tests will skip (run as root to include them)"
        case "${CI:-}" in 1 | true | TRUE | yes) exit 1 ;; esac
        return 0
    fi
    log "installing ${PACKAGES[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    apt-get install -y -q --no-install-recommends "${PACKAGES[@]}" >/dev/null
}

write_conf() {
    local host
    host="$(hostname -s)"
    mkdir -p "$DIR/state" "$DIR/spool"
    cat >"$CONF" <<EOF
# Written by jobs/local_cluster.sh: two fake nodes on one host, no cgroups, no accounting.
ClusterName=tokscale
SlurmctldHost=${host}(127.0.0.1)
SlurmctldPort=${CTLD_PORT}
SlurmUser=root
AuthType=auth/munge
# A requeued job may restart after cred_expire seconds (default 120); 10 keeps preemption tests short.
AuthInfo=cred_expire=10
StateSaveLocation=${DIR}/state
SlurmdSpoolDir=${DIR}/spool/%n
SlurmctldPidFile=${DIR}/slurmctld.pid
SlurmdPidFile=${DIR}/slurmd-%n.pid
SlurmctldLogFile=${DIR}/slurmctld.log
SlurmdLogFile=${DIR}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
JobRequeue=1
KillWait=5
MinJobAge=600
InactiveLimit=0
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
NodeName=node[1-2] NodeHostname=${host} NodeAddr=127.0.0.1 Port=17001-17002 CPUs=${NODE_CPUS} RealMemory=4000 Feature=local State=UNKNOWN
PartitionName=debug Nodes=node[1-2] Default=YES MaxTime=60 State=UP
EOF
}

ensure_hosts() {
    if getent hosts node1 >/dev/null && getent hosts node2 >/dev/null; then
        return 0
    fi
    echo "127.0.0.1 node1 node2 ${HOSTS_MARK}" >>/etc/hosts
}

remove_hosts() {
    if grep -q "${HOSTS_MARK}" /etc/hosts 2>/dev/null; then
        # /etc/hosts may be a bind mount (containers): rewrite in place instead of replacing the file.
        local kept
        kept="$(grep -v "${HOSTS_MARK}" /etc/hosts)"
        printf '%s\n' "$kept" >/etc/hosts
    fi
}

munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

start_munge() {
    if munge_ok; then
        return 0
    fi
    [ -s /etc/munge/munge.key ] || die "/etc/munge/munge.key is missing; reinstall munge (sudo $0 install)"
    mkdir -p /run/munge /var/lib/munge /var/log/munge
    chown munge:munge /run/munge /var/lib/munge /var/log/munge
    chmod 0755 /run/munge
    runuser -u munge -- /usr/sbin/munged
    for _ in $(seq 50); do
        munge_ok && break
        sleep 0.1
    done
    munge_ok || die "munged did not start (see /var/log/munge/munged.log)"
    # Remember that we started it, so that `stop` stops it and nothing else.
    cp /run/munge/munged.pid "$DIR/munged.pid"
}

wait_idle() {
    local states
    for _ in $(seq 150); do
        states="$(SLURM_CONF="$CONF" sinfo -h -N -o '%N %T' 2>/dev/null | sort -u || true)"
        if [ "$(grep -c ' idle$' <<<"$states")" -ge 2 ]; then
            return 0
        fi
        sleep 0.2
    done
    die "nodes did not become idle within 30 s (sinfo: ${states:-no answer}); logs in $DIR"
}

start() {
    need_root start
    install_packages
    installed || die "Slurm packages missing after install"
    if [ -f "$DIR/slurmctld.pid" ] && kill -0 "$(cat "$DIR/slurmctld.pid")" 2>/dev/null; then
        log "already running (state in $DIR)"
        echo "export SLURM_CONF=$CONF"
        return 0
    fi
    rm -rf "$DIR/state" "$DIR/spool"
    write_conf
    ensure_hosts
    start_munge
    export SLURM_CONF="$CONF"
    slurmctld -f "$CONF"
    slurmd -f "$CONF" -N node1
    slurmd -f "$CONF" -N node2
    wait_idle
    log "two nodes idle (partition debug); logs in $DIR"
    echo "export SLURM_CONF=$CONF"
}

kill_pidfile() {
    local f="$1" pid
    [ -f "$f" ] || return 0
    pid="$(cat "$f")"
    if kill -0 "$pid" 2>/dev/null; then
        kill "$pid"
        for _ in $(seq 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
    fi
    rm -f "$f"
}

stop() {
    need_root stop
    export SLURM_CONF="$CONF"
    if [ -f "$DIR/slurmctld.pid" ] && kill -0 "$(cat "$DIR/slurmctld.pid")" 2>/dev/null; then
        # Job processes outlive slurmd (they run under slurmstepd): cancel them and let them finish first.
        squeue -h -o %i 2>/dev/null | xargs -r scancel --full 2>/dev/null || true
        for _ in $(seq 100); do
            [ -z "$(squeue -h -t PENDING,RUNNING,COMPLETING,SUSPENDED -o %i 2>/dev/null)" ] && break
            sleep 0.2
        done
    fi
    kill_pidfile "$DIR/slurmd-node1.pid"
    kill_pidfile "$DIR/slurmd-node2.pid"
    kill_pidfile "$DIR/slurmctld.pid"
    kill_pidfile "$DIR/munged.pid"
    remove_hosts
    rm -rf "$DIR/state" "$DIR/spool"
    log "stopped"
}

case "${1:-}" in
install) install_packages ;;
start) start ;;
stop) stop ;;
status) SLURM_CONF="$CONF" sinfo ;;
env) echo "export SLURM_CONF=$CONF" ;;
*)
    echo "usage: $0 {install|start|stop|status|env}" >&2
    exit 2
    ;;
esac
