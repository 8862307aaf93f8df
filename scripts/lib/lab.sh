# shellcheck shell=bash
#
# scripts/lib/lab.sh: the 3-node Swarm lab on one machine.
#
# Node 1 is the host's own engine, the manager of the single-node swarm that prereqs.sh keeps
# (advertising 10.99.0.1 on the lab bridge berthlab0). Nodes 2 and 3 are extra dockerd instances,
# each in its own network namespace (berth-lab-nN, a veth on berthlab0 with 10.99.0.N), UTS
# namespace (hostname berth-lab-N, so nodes are told apart by name) and mount namespace (a lab
# resolv.conf, see _berth_lab_resolv_conf), joined to the host's swarm as workers:
#
#   node  hostname      address     engine socket
#   1     (the host's)  10.99.0.1   the default one (/var/run/docker.sock)
#   2     berth-lab-2   10.99.0.2   unix:///var/run/berth-lab/n2.sock
#   3     berth-lab-3   10.99.0.3   unix:///var/run/berth-lab/n3.sock
#
# Node N's socket is also reachable as /var/run/berth-lab/berth-lab-N.sock (by hostname, for
# exec agents). Everything of a node lives under names only the lab uses: netns berth-lab-nN, host-side veth
# berthlab-nN, data root /var/lib/berth-lab/nN, exec root /var/run/berth-lab/nN, cgroup
# berth-lab-nN (which holds the node's dockerd, containerd, shims and task containers, so a node
# can be killed whole, like a machine losing power). Nothing else on the machine is touched,
# except one iptables rule in DOCKER-USER that lets the bridge forward between its own ports.
#
# Every function is idempotent. Sourced by scripts/lab (the CLI) and scripts/lib/sweep.sh.
#
# Usage: source scripts/lib/lab.sh && berth_lab_up | berth_lab_down | berth_lab_status

set -euo pipefail

if [[ -n ${_BERTH_LAB_LOADED:-} ]]; then
    return 0
fi
_BERTH_LAB_LOADED=1

# shellcheck source=scripts/lib/prereqs.sh
source "$(dirname "${BASH_SOURCE[0]}")/prereqs.sh"

BERTH_LAB_NODES=(2 3)
# One lab per machine, so one user at a time: the lab test binary holds this lock (flock) for its
# whole run and tells scripts/lab so (BERTH_LAB_LOCK_HELD=1); scripts/lab takes it for every
# change, and the sweep leaves a locked lab alone.
BERTH_LAB_LOCK=${BERTH_LAB_LOCK:-/var/run/berth-lab.lock}
BERTH_LAB_STATE=${BERTH_LAB_STATE:-/var/lib/berth-lab}
BERTH_LAB_RUN=${BERTH_LAB_RUN:-/var/run/berth-lab}
# The images the tests run, loaded into every extra node (nothing can be pulled here).
BERTH_LAB_IMAGES=(berth-test/busybox:1 berth-test/app:2 berth-test/broken:1 berth-demo/web:1 berth-test/caddy:1
    berth-test/agent:1)
# Of those, the images built from the berth binary by scripts/test (berth_build_agent_image), not
# by prereqs: a lab brought up by hand before any test run has none yet, and goes without.
BERTH_LAB_BUILT_IMAGES=(berth-test/agent:1)
# Set to 0 to keep the engines' own DNS (for measuring what the lab resolv.conf saves).
BERTH_LAB_FAST_DNS=${BERTH_LAB_FAST_DNS:-1}

_lab_netns() { echo "berth-lab-n$1"; }
_lab_hostname() { echo "berth-lab-$1"; }
_lab_addr() { echo "$BERTH_LAB_SUBNET_PREFIX.$1"; }
_lab_veth() { echo "berthlab-n$1"; }
_lab_sock() { echo "$BERTH_LAB_RUN/n$1.sock"; }
_lab_pidfile() { echo "$BERTH_LAB_RUN/n$1.pid"; }
_lab_log() { echo "$BERTH_LAB_STATE/n$1.log"; }
_lab_docker() {
    local n=$1
    shift
    docker -H "unix://$(_lab_sock "$n")" "$@"
}

# The node's cgroup in the pids hierarchy (cgroup v1) or the unified one (v2). Its `daemon` child
# holds dockerd and what it forks; task containers go to `<cgroup>/<container id>` (dockerd's
# --cgroup-parent), so the whole node is found, and killed, from here.
_lab_cgroup() {
    if [[ -d /sys/fs/cgroup/pids ]]; then
        echo "/sys/fs/cgroup/pids/berth-lab-n$1"
    else
        echo "/sys/fs/cgroup/berth-lab-n$1"
    fi
}

# The pid of node $1's dockerd if it runs (a zombie, dead but not yet reaped, does not count).
_lab_dockerd_pid() {
    local pid state
    pid=$(cat "$(_lab_pidfile "$1")" 2>/dev/null) || return 1
    [[ $pid =~ ^[0-9]+$ && $(cat "/proc/$pid/comm" 2>/dev/null) == dockerd ]] || return 1
    state=$(awk '/^State:/ { print $2 }' "/proc/$pid/status" 2>/dev/null) || return 1
    [[ -n $state && $state != Z ]] || return 1
    echo "$pid"
}

# _lab_docker for calls that must not hang on a node whose engine is stuck (taking the lab down).
_lab_docker_bounded() {
    local n=$1
    shift
    timeout 30 docker -H "unix://$(_lab_sock "$n")" "$@"
}

# Does node $1's engine answer (within 10 s: a stuck engine counts as down)?
_lab_engine_up() {
    [[ -S $(_lab_sock "$1") ]] &&
        timeout 10 docker -H "unix://$(_lab_sock "$1")" version --format '{{.Server.Version}}' >/dev/null 2>&1
}

# Every process in node $1's cgroup tree (dockerd, containerd, shims, task containers).
_lab_node_pids() {
    local cg
    cg=$(_lab_cgroup "$1")
    [[ -d $cg ]] || return 0
    find "$cg" -name cgroup.procs -exec cat {} + 2>/dev/null || true
}

# ---------------------------------------------------------------------------------------------
# Network
# ---------------------------------------------------------------------------------------------

# With br_netfilter loaded (docker loads it), frames between two ports of a bridge go through
# iptables' FORWARD chain, whose policy docker sets to DROP: node 2 and node 3 could reach the
# host but not each other (gossip on 7946, VXLAN on 4789). DOCKER-USER is the chain docker leaves
# to the administrator for such rules.
_lab_forward_rule=(DOCKER-USER -i "$BERTH_LAB_BRIDGE" -o "$BERTH_LAB_BRIDGE" -j ACCEPT)

_berth_lab_forwarding() {
    command -v iptables >/dev/null 2>&1 || return 0
    iptables -S DOCKER-USER >/dev/null 2>&1 || return 0
    if ! iptables -C "${_lab_forward_rule[@]}" 2>/dev/null; then
        iptables -I "${_lab_forward_rule[@]}"
    fi
}

_berth_lab_forwarding_remove() {
    command -v iptables >/dev/null 2>&1 || return 0
    while iptables -C "${_lab_forward_rule[@]}" 2>/dev/null; do
        iptables -D "${_lab_forward_rule[@]}"
    done
}

# Node $1's network namespace, with one veth to the lab bridge (eth0 inside, 10.99.0.N/24) and
# no default route: the node talks to the other nodes and nothing else.
_berth_lab_netns() {
    local n=$1 ns veth addr
    ns=$(_lab_netns "$n")
    veth=$(_lab_veth "$n")
    addr=$(_lab_addr "$n")
    [[ -e /var/run/netns/$ns ]] || ip netns add "$ns"
    if ! ip link show "$veth" >/dev/null 2>&1; then
        # A veth whose host side is gone left nothing inside; an eth0 inside without its peer
        # cannot exist (veths die in pairs).
        ip link add "$veth" type veth peer name eth0 netns "$ns"
    fi
    ip link set "$veth" master "$BERTH_LAB_BRIDGE"
    ip link set "$veth" up
    nsenter --net="/var/run/netns/$ns" sh -c "
        ip link set lo up
        ip -o addr show dev eth0 | grep -qF ' $addr/' || ip addr add $addr/24 dev eth0
        ip link set eth0 up"
}

# The resolv.conf node $1's dockerd sees (bind-mounted over /etc/resolv.conf in the node's mount
# namespace). Each engine tries to pull a task's image before it falls back to its local copy. With
# the host's resolver, that try waits for a DNS timeout as soon as the node has a route out (as a
# real node has, or one a test adds): tasks started 20.8 s late, measured. (Without a route the
# lookup fails at once, but only by luck of the host's resolver address.) A nameserver on the
# node's own loopback, where nothing listens, is refused at once: 0.9 s either way.
_berth_lab_resolv_conf() {
    local file="$BERTH_LAB_STATE/n$1/resolv.conf"
    mkdir -p "$(dirname "$file")"
    printf '# berth lab node %s: fail DNS fast, see scripts/lib/lab.sh\nnameserver 127.0.0.1\noptions timeout:1 attempts:1\n' \
        "$1" >"$file"
    echo "$file"
}

# ---------------------------------------------------------------------------------------------
# Engines
# ---------------------------------------------------------------------------------------------

# Starts node $1's dockerd (unless it answers) and waits until it does. Its data root is kept
# from an earlier run if there is one: images stay loaded, and the swarm state is checked later.
berth_lab_start_engine() {
    local n=$1
    # The socket by the node's hostname too: an exec agent on the node mounts
    # `$BERTH_LAB_RUN/{{.Node.Hostname}}.sock` (Swarm expands it per node), where a real node has
    # /var/run/docker.sock.
    mkdir -p "$BERTH_LAB_RUN"
    ln -sfn "n$n.sock" "$BERTH_LAB_RUN/$(_lab_hostname "$n").sock"
    if _lab_engine_up "$n"; then
        return 0
    fi
    # A dockerd that is still starting must not get a twin on the same data root.
    local pid
    if pid=$(_lab_dockerd_pid "$n"); then
        echo "==> lab: node $n: dockerd (pid $pid) is running but not answering yet; waiting"
    else
        # Whatever a killed node left (containerd, shims, containers) goes first: a new dockerd
        # would otherwise adopt a containerd living in another mount namespace.
        berth_lab_kill_node "$n"
        _berth_lab_drop_stale_swarm "$n"
        _berth_lab_netns "$n"
        local ns host cg data exec_root resolv mount_resolv=""
        ns=$(_lab_netns "$n")
        host=$(_lab_hostname "$n")
        cg=$(_lab_cgroup "$n")
        data="$BERTH_LAB_STATE/n$n/docker"
        exec_root="$BERTH_LAB_RUN/n$n"
        mkdir -p "$data" "$exec_root" "$cg/daemon"
        resolv=$(_berth_lab_resolv_conf "$n")
        if [[ $BERTH_LAB_FAST_DNS == 1 ]]; then
            mount_resolv="mount --bind $resolv /etc/resolv.conf;"
        fi
        echo "==> lab: node $n: starting dockerd as $host on $(_lab_addr "$n") (log: $(_lab_log "$n"))"
        # The subshell moves itself into the node's cgroup first, so dockerd and all it forks
        # land there. env -i: a test's BERTH_E2E=1 or BERTH_E2E_OWNER must not be inherited, or
        # the sweep would take this long-lived dockerd for a running test (or a stray of one).
        # nsenter --net, not `ip netns exec`: that one remounts /sys, and dockerd then fails with
        # "Devices cgroup isn't mounted". unshare --mount makes the resolv.conf bind and every
        # mount dockerd makes private to the node: they vanish with its last process.
        (
            echo "$BASHPID" >"$cg/daemon/cgroup.procs"
            exec env -i PATH="$PATH" setsid nsenter --net="/var/run/netns/$ns" \
                unshare --uts --mount --propagation private \
                sh -c "hostname $host; $mount_resolv exec dockerd \
                    --data-root $data --exec-root $exec_root \
                    --pidfile $(_lab_pidfile "$n") -H unix://$(_lab_sock "$n") \
                    --bridge none --iptables=false --cgroup-parent /berth-lab-n$n"
        ) >>"$(_lab_log "$n")" 2>&1 </dev/null 9>&- &
    fi
    local i
    for ((i = 0; i < 600; i++)); do
        if _lab_engine_up "$n"; then
            return 0
        fi
        if [[ -z $(_lab_node_pids "$n") ]] && ((i > 10)); then
            break # nothing of the node runs any more: dockerd has exited
        fi
        sleep 0.1
    done
    echo "==> lab: node $n: dockerd did not come up; last lines of $(_lab_log "$n"):" >&2
    tail -n 30 "$(_lab_log "$n")" >&2 || true
    _berth_die "lab node $n: dockerd is not answering"
}

# Removes the swarm state in node $1's data root unless it belongs to a node the manager knows
# in the manager's cluster. dockerd waits ~20 s at start for a swarm that will not have it (a
# node since removed, a swarm since re-initialised) before it answers at all; without the state
# it starts in under a second and joins afresh. The node certificate names both: O = cluster ID,
# CN = node ID.
_berth_lab_drop_stale_swarm() {
    local n=$1 dir subject cluster node
    dir="$BERTH_LAB_STATE/n$n/docker/swarm"
    [[ -d $dir ]] || return 0
    subject=$(openssl x509 -noout -subject -nameopt multiline -in "$dir/certificates/swarm-node.crt" 2>/dev/null || true)
    cluster=$(sed -n 's/^ *organizationName *= *//p' <<<"$subject")
    node=$(sed -n 's/^ *commonName *= *//p' <<<"$subject")
    if [[ -n $cluster && $cluster == "$(docker info --format '{{.Swarm.Cluster.ID}}' 2>/dev/null)" ]] &&
        [[ -n $node && $(docker node inspect "$node" --format '{{.Description.Hostname}}' 2>/dev/null) == "$(_lab_hostname "$n")" ]]; then
        return 0
    fi
    echo "==> lab: node $n: dropping the swarm state of an earlier run (node ${node:-?} of cluster ${cluster:-?})"
    rm -rf "$dir"
}

# Kills everything of node $1 at once (SIGKILL: dockerd, containerd, shims, task containers), as a
# machine losing power. The node's data root stays; its run-time state goes, as /run does in a
# reboot (a stale pidfile would stop dockerd from starting, and the netns files of the old
# mount namespace are dead ends).
berth_lab_kill_node() {
    local n=$1 i
    local -a pids
    for ((i = 0; ; i++)); do
        mapfile -t pids < <(_lab_node_pids "$n")
        [[ ${#pids[@]} -gt 0 ]] || break
        ((i < 100)) || _berth_die "lab node $n: processes ${pids[*]} survive SIGKILL"
        kill -KILL "${pids[@]}" 2>/dev/null || true
        sleep 0.05
    done
    rm -rf "${BERTH_LAB_RUN:?}/n$n" "$(_lab_sock "$n")" "$(_lab_pidfile "$n")"
}

# Loads the test images into node $1, skipping those whose image ID is already there.
_berth_lab_images() {
    local n=$1 img want have
    local -a missing=()
    for img in "${BERTH_LAB_IMAGES[@]}"; do
        if ! want=$(docker image inspect --format '{{.Id}}' "$img" 2>/dev/null); then
            if [[ " ${BERTH_LAB_BUILT_IMAGES[*]} " == *" $img "* ]]; then
                echo "==> lab: node $n: no $img on the host yet (scripts/test builds it); not loaded"
                continue
            fi
            _berth_die "image $img missing on the host (prereqs.sh builds it)"
        fi
        have=$(_lab_docker "$n" image inspect --format '{{.Id}}' "$img" 2>/dev/null || true)
        [[ $want == "$have" ]] || missing+=("$img")
    done
    [[ ${#missing[@]} -gt 0 ]] || return 0
    echo "==> lab: node $n: loading ${missing[*]}"
    # One stream: the images share their busybox layer.
    docker save "${missing[@]}" | _lab_docker "$n" load -q >/dev/null
}

# ---------------------------------------------------------------------------------------------
# Swarm
# ---------------------------------------------------------------------------------------------

# The manager's node IDs with hostname $1 (the lab's hostnames are its own: any such node is a
# lab node, current or from an earlier run).
_lab_nodes_named() {
    docker node ls --format '{{.ID}} {{.Hostname}}' 2>/dev/null | awk -v h="$1" '$2 == h { print $1 }'
}

# Node $1 as a worker of the host's swarm: kept if its engine is already a member the manager
# knows; otherwise made to leave whatever swarm its data root remembers (an earlier run's, maybe
# of a swarm that has since been re-initialised) and joined afresh. Earlier nodes of the same
# hostname are removed from the manager's list.
_berth_lab_join() {
    local n=$1 info state node_id host addr
    host=$(_lab_hostname "$n")
    addr=$(_lab_addr "$n")
    info=$(_lab_docker "$n" info --format '{{.Swarm.LocalNodeState}} {{.Swarm.NodeID}}')
    read -r state node_id <<<"$info"

    local member=0
    if [[ $state == active && -n $node_id ]] &&
        [[ $(docker node inspect "$node_id" --format '{{.Description.Hostname}}' 2>/dev/null) == "$host" ]]; then
        member=1
    fi
    if [[ $member == 0 ]]; then
        if [[ $state != inactive ]]; then
            # `swarm leave --force` takes ~20 s here while the engine keeps trying to reach a
            # manager that no longer knows it; dropping its swarm state while it is stopped is
            # instant, and the engine's images stay.
            echo "==> lab: node $n: dropping a stale swarm state ($state${node_id:+, node $node_id})"
            berth_lab_kill_node "$n"
            rm -rf "$BERTH_LAB_STATE/n$n/docker/swarm"
            berth_lab_start_engine "$n"
        fi
        echo "==> lab: node $n: joining the swarm at $BERTH_SWARM_ADDR:2377 as $host ($addr)"
        _lab_docker "$n" swarm join --token "$(docker swarm join-token -q worker)" \
            --advertise-addr "$addr" --listen-addr "$addr:2377" "$BERTH_SWARM_ADDR:2377" >/dev/null
        node_id=$(_lab_docker "$n" info --format '{{.Swarm.NodeID}}')
    fi

    local old
    for old in $(_lab_nodes_named "$host"); do
        [[ $old == "$node_id" ]] && continue
        echo "==> lab: node $n: removing $old, an earlier node named $host"
        # Its engine is gone: a demotion that does not complete means a Raft member that will
        # never answer again. Recovering the swarm here, under the other node's feet, is not
        # safe: fail, and the caller's `down` recovers it.
        _berth_lab_demote "$old" ||
            _berth_die "lab node $n: $old, an earlier node named $host, is still a Raft member; scripts/lab down recovers the host's swarm"
        docker node rm --force "$old" >/dev/null 2>&1 || true
    done

    # A killed test may have left the node promoted or drained: the lab starts as 1 manager and
    # 2 active workers.
    _berth_lab_demote "$node_id" ||
        _berth_die "lab node $n ($node_id) is still a manager; scripts/lab down recovers the host's swarm"
    if [[ $(docker node inspect "$node_id" --format '{{.Spec.Availability}}') != active ]]; then
        docker node update --availability active "$node_id" >/dev/null
    fi
}

# How long a lab node's demotion may take before the lab gives up on it (seconds). A demotion is
# a Raft membership change; it usually takes under a second, but engine 20.10 has been seen to
# stall in it for minutes (docs/nodes.md; "The 3-node lab" in docs/contributing.md). The host's
# swarm is then recovered instead.
BERTH_LAB_DEMOTE_WAIT=${BERTH_LAB_DEMOTE_WAIT:-45}

_lab_is_manager() {
    [[ -n $(timeout 30 docker node inspect "$1" --format '{{if .ManagerStatus}}manager{{end}}' 2>/dev/null) ]]
}

# Demotes node $1 if it is a manager and waits (up to $2 seconds, BERTH_LAB_DEMOTE_WAIT by
# default) until it no longer is: out of Raft. A lab node must never be removed or stopped as a
# manager: with two managers, losing one loses the Raft quorum and the host's swarm with it.
# Returns 1, saying so, when the demotion does not complete in time: the caller must then recover
# the host's swarm (_berth_lab_ensure_sole_manager) once the node is gone.
_berth_lab_demote() {
    local id=$1 wait=${2:-$BERTH_LAB_DEMOTE_WAIT} start=$SECONDS out
    _lab_is_manager "$id" || return 0
    echo "==> lab: demoting $id to worker"
    if ! out=$(timeout 30 docker node demote "$id" 2>&1); then
        echo "==> lab: docker node demote $id: $out"
    fi
    while ((SECONDS - start < wait)); do
        if ! _lab_is_manager "$id"; then
            echo "==> lab: $id demoted in $((SECONDS - start))s"
            return 0
        fi
        sleep 0.2
    done
    echo "==> lab: $id is still a manager (a Raft member) ${wait}s after its demotion: Swarm did not complete it" >&2
    return 1
}

# Ends with the host's engine as the one healthy manager and Raft leader of its swarm, no lab node
# a manager, and writes committing; recovers the swarm with Docker's disaster recovery
# (berth_swarm_recover: force-new-cluster, which keeps its state) when it is not, then removes the
# lab's stale node entries. $1: why a recovery may be needed (a demotion that did not complete),
# or empty. For after the lab's nodes are gone; dies when the swarm cannot be made healthy.
_berth_lab_ensure_sole_manager() {
    local why=$1
    # An election after a demotion takes a few seconds; a demotion that did not complete will not
    # complete now that the node is gone.
    if [[ -z $why ]] && _berth_wait_swarm_sole_leader 15; then
        return 0
    fi
    [[ -n $why ]] || why=$_BERTH_SWARM_PROBLEM
    berth_swarm_recover "after taking the lab down: $why"
    local n id
    for n in "${BERTH_LAB_NODES[@]}"; do
        for id in $(_lab_nodes_named "$(_lab_hostname "$n")"); do
            echo "==> lab: node $n: removing $id, a node of the lab that the recovered swarm still lists" >&2
            timeout 30 docker node demote "$id" >/dev/null 2>&1 || true
            timeout 30 docker node rm --force "$id" >/dev/null 2>&1 || true
        done
    done
    if ! _berth_wait_swarm_sole_leader 30; then
        _berth_die "the host's swarm is still not healthy after its recovery: $_BERTH_SWARM_PROBLEM"
    fi
    echo "==> lab: the host's swarm is healthy again: this engine is its only manager and leader, and writes commit" >&2
}

# Fails when stopping node $1 would cost the swarm its Raft quorum: a lab node a test promoted
# counts as a manager, and with two managers either one going away stops the host's swarm.
berth_lab_check_stop() {
    local n=$1 id total reachable
    id=$(_lab_nodes_named "$(_lab_hostname "$n")" | head -n 1)
    [[ -n $id ]] || return 0
    [[ -n $(docker node inspect "$id" --format '{{if .ManagerStatus}}manager{{end}}' 2>/dev/null) ]] || return 0
    total=$(docker node ls --filter role=manager -q | wc -l)
    reachable=$(docker node ls --filter role=manager --format '{{.ManagerStatus}}' | grep -cE '^(Leader|Reachable)$' || true)
    if ((reachable - 1 < total / 2 + 1)); then
        _berth_die "stopping node $n ($(_lab_hostname "$n"), a manager) would leave $((reachable - 1)) of $total managers: no Raft majority, and the host's swarm would stop; demote it first"
    fi
}

# A node promoted to manager must first receive the Raft log since the last snapshot, and until it
# has caught up every write (which needs its acknowledgement) waits. Docker snapshots every 10,000
# entries; a test machine's swarm writes thousands of large ones (every e2e run's services, tasks
# and configs), and replaying them to a new manager in the lab took minutes: the promoted node
# was "reachable", yet `docker node demote` timed out, the leader logged `data store lock held too
# long`, and the demoted node rejoined Raft under a new ID when its worker certificate never came
# (moby/swarmkit#1991). A snapshot every 200 entries keeps a new manager's catch-up to a small
# snapshot plus a few hundred entries: demotions then complete in under a second.
BERTH_LAB_SNAPSHOT_INTERVAL=${BERTH_LAB_SNAPSHOT_INTERVAL:-200}
_berth_lab_snapshot_interval() {
    local have
    have=$(docker info --format '{{.Swarm.Cluster.Spec.Raft.SnapshotInterval}}' 2>/dev/null || true)
    [[ $have == "$BERTH_LAB_SNAPSHOT_INTERVAL" ]] && return 0
    echo "==> lab: docker swarm update --snapshot-interval $BERTH_LAB_SNAPSHOT_INTERVAL (was ${have:-unknown})"
    docker swarm update --snapshot-interval "$BERTH_LAB_SNAPSHOT_INTERVAL" >/dev/null
}

# Waits until the manager reports node $1 Ready.
_berth_lab_wait_ready() {
    local n=$1 id i
    id=$(_lab_docker "$n" info --format '{{.Swarm.NodeID}}')
    for ((i = 0; i < 600; i++)); do
        [[ $(docker node inspect "$id" --format '{{.Status.State}}' 2>/dev/null) == ready ]] && return 0
        sleep 0.1
    done
    _berth_die "lab node $n ($id) is not Ready after 60 s: $(docker node inspect "$id" --format '{{.Status.State}} {{.Status.Message}}' 2>&1)"
}

# ---------------------------------------------------------------------------------------------

berth_lab_up() {
    _berth_require_root "scripts/lab up"
    local start=$SECONDS n
    berth_install_packages
    berth_lab_bridge
    berth_start_docker
    berth_init_swarm
    _berth_lab_snapshot_interval
    berth_build_images
    _berth_lab_forwarding
    mkdir -p "$BERTH_LAB_STATE" "$BERTH_LAB_RUN"
    # The nodes come up in parallel: each mostly waits (for its engine, the image load, the
    # manager), and a lab test pays for this in every CI run.
    local -a waits=()
    for n in "${BERTH_LAB_NODES[@]}"; do
        (
            berth_lab_start_engine "$n"
            _berth_lab_images "$n"
            _berth_lab_join "$n"
            _berth_lab_wait_ready "$n"
        ) &
        waits+=($!)
    done
    local w failed=0
    for w in "${waits[@]}"; do
        wait "$w" || failed=1
    done
    [[ $failed == 0 ]] || _berth_die "a lab node did not come up (see above)"
    echo "==> lab: up in $((SECONDS - start))s"
    berth_lab_status
}

berth_lab_down() {
    _berth_require_root "scripts/lab down"
    local start=$SECONDS n id host manager=0 stuck=""
    docker info >/dev/null 2>&1 && manager=1
    for n in "${BERTH_LAB_NODES[@]}"; do
        host=$(_lab_hostname "$n")
        # A lab node that a test promoted must be demoted while it still runs (see
        # _berth_lab_demote): its sudden end would otherwise cost the swarm its quorum. A
        # demotion Swarm does not complete in time is given up (once: the others would wait on
        # the same stuck Raft), and the swarm recovered after the nodes are gone.
        if [[ $manager == 1 && -z $stuck ]] && _lab_engine_up "$n"; then
            for id in $(_lab_nodes_named "$host"); do
                _berth_lab_demote "$id" ||
                    stuck="the demotion of lab node $n ($id) did not complete within ${BERTH_LAB_DEMOTE_WAIT}s"
            done
        fi
        # Then it leaves the swarm, so that the others' gossip (memberlist, on 7946) records a
        # leave: a node that just vanishes stays a failed member for hours, and the next lab's
        # node at the same address is then pinged under the old name ("Got ping for unexpected
        # node"); after a few such cycles, tasks on node 2 and node 3 could not reach each other.
        # Its containers are removed first with SIGKILL: a leave waits for every task to stop,
        # up to 10 s for each that ignores SIGTERM (busybox `sleep` as PID 1 does).
        if _lab_engine_up "$n"; then
            local containers
            containers=$(_lab_docker_bounded "$n" ps -aq || true)
            if [[ -n $containers ]]; then
                # shellcheck disable=SC2086 # one ID per word
                _lab_docker_bounded "$n" rm -f $containers >/dev/null 2>&1 || true
            fi
            _lab_docker_bounded "$n" swarm leave --force >/dev/null 2>&1 || true
        fi
        berth_lab_kill_node "$n"
        if [[ $manager == 1 ]]; then
            for id in $(_lab_nodes_named "$host"); do
                echo "==> lab: node $n: docker node rm --force $id"
                timeout 30 docker node rm --force "$id" >/dev/null 2>&1 || true
            done
        fi
        local ns veth cg
        ns=$(_lab_netns "$n")
        veth=$(_lab_veth "$n")
        if ip link show "$veth" >/dev/null 2>&1; then
            ip link del "$veth"
        fi
        if [[ -e /var/run/netns/$ns ]]; then
            ip netns del "$ns"
        fi
        # The node's cgroups: its own, and the per-container ones dockerd made in every v1
        # hierarchy (children first: rmdir only takes empty ones).
        for cg in /sys/fs/cgroup/*/berth-lab-n"$n" /sys/fs/cgroup/berth-lab-n"$n"; do
            if [[ -d $cg ]]; then
                find "$cg" -depth -type d -exec rmdir {} + 2>/dev/null || true
            fi
        done
        rm -rf "${BERTH_LAB_STATE:?}/n$n" "$(_lab_log "$n")"
    done
    _berth_lab_forwarding_remove
    rmdir "$BERTH_LAB_STATE" "$BERTH_LAB_RUN" 2>/dev/null || true
    # Whatever happened above, the host's swarm is left as every other test expects it: one
    # healthy manager, the leader, taking writes.
    if [[ $manager == 1 ]]; then
        _berth_lab_ensure_sole_manager "$stuck"
    fi
    echo "==> lab: down in $((SECONDS - start))s"
}

# Takes the lab lock on fd 9 for the rest of this shell (no-op when the caller holds it). Fails at
# once when someone else holds it: a lab test run owns the lab until it ends.
berth_lab_lock() {
    [[ ${BERTH_LAB_LOCK_HELD:-0} == 1 ]] && return 0
    exec 9>>"$BERTH_LAB_LOCK"
    if ! flock -n 9; then
        _berth_die "the lab is in use by a lab test run (it holds $BERTH_LAB_LOCK); wait until it ends"
    fi
}

# Is the lab lock free (nobody running lab tests)? Leaves it free.
berth_lab_lock_free() {
    [[ -e $BERTH_LAB_LOCK ]] || return 0
    flock -n "$BERTH_LAB_LOCK" true
}

# Is any part of a lab there (engines, namespaces, data)? For the sweep.
berth_lab_exists() {
    local n
    for n in "${BERTH_LAB_NODES[@]}"; do
        [[ -e /var/run/netns/$(_lab_netns "$n") || -d $BERTH_LAB_STATE/n$n || -n $(_lab_node_pids "$n") ]] &&
            return 0
    done
    return 1
}

berth_lab_status() {
    local n
    echo "==> lab: the swarm as its manager (node 1, this host's engine) sees it"
    docker node ls
    for n in "${BERTH_LAB_NODES[@]}"; do
        local engine="down"
        _lab_engine_up "$n" && engine="up"
        printf '==> lab: node %s: %s %s engine %s, DOCKER_HOST=unix://%s\n' "$n" "$(_lab_hostname "$n")" \
            "$(_lab_addr "$n")" "$engine" "$(_lab_sock "$n")"
    done
}
