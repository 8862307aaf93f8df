# shellcheck shell=bash
#
# scripts/lib/sweep.sh: removes what earlier, killed e2e runs left behind.
#
# A test that fails cleans up after itself (its Drop guards run); a test process that is killed
# (timeout, Ctrl-C twice, OOM, a CI runner cancelled) runs no Drop, and leaves Swarm services,
# secrets, configs, networks, volumes, images, berth/nats-server/docker-registry processes and temp
# dirs. Sourced by scripts/test, which calls berth_sweep_e2e before the tests start.
#
# Only what the e2e harness (tests/src/lib.rs) marks as its own is touched:
#   - Swarm objects named after a test prefix, `e2e-<test>-<5 ULID chars>` or the engine tests'
#     `{net,svc,ing}test-<10 ULID chars>` (berth names every Swarm
#     object after its object, and tests name every object after their prefix; a test
#     installation's default network is `e2e-net-<5>`), with `-`, `_` or `.` after it or nothing;
#   - labels `nodetest-<10 ULID chars>...` on the local node (the Node engine tests);
#   - images `berth-test/e2e-*` (local tags made by tests) and images of the test registries
#     recorded in /tmp/berth-e2e-registry-*/host;
#   - processes whose environment has BERTH_E2E_OWNER=<pid> (the harness sets it on what it starts)
#     when that test process is gone;
#   - directories /tmp/berth-e2e-*, after `scripts/demo down` for the demo test's installation;
#   - the 3-node lab (scripts/lab, scripts/lib/lab.sh): its two extra engines outlive a killed lab
#     test by design (they run detached), and a run must start from no lab.
# Nothing else on the engine is looked at twice. And while another e2e run is active (a process
# with BERTH_E2E=1 or a live BERTH_E2E_OWNER in its environment, berth-bench, or a test binary of
# this workspace that cargo runs) only stray processes are stopped: that run's objects are not
# leftovers.
#
# Usage: source scripts/lib/sweep.sh && berth_sweep_e2e

set -euo pipefail

if [[ -n ${_BERTH_SWEEP_LOADED:-} ]]; then
    return 0
fi
_BERTH_SWEEP_LOADED=1

# shellcheck source=scripts/lib/lab.sh
source "$(dirname "${BASH_SOURCE[0]}")/lab.sh"

# The names test prefixes give: e2e-<test>-<5 lower-case Crockford base32 chars> (`prefix` in
# tests/src/lib.rs) and, for the controllers' engine tests (controllers/tests/*_engine.rs),
# nettest-, svctest- or ingtest-<10 such chars>; then the end or a separator.
BERTH_E2E_NAME_RE='^(e2e-[a-z0-9-]+-[0-9a-hjkmnp-tv-z]{5}|(net|svc|ing)test-[0-9a-hjkmnp-tv-z]{10})($|[-_.])'

# The value of variable $2 in the environment of process $1, or nothing.
_berth_env_of() {
    { tr '\0' '\n' <"/proc/$1/environ"; } 2>/dev/null | sed -n "s/^$2=//p" | head -n 1 || true
}

# This shell and its ancestors: never counted as another run, never stopped.
_berth_own_chain() {
    local pid=$$
    while [[ -n $pid && $pid != 0 && $pid != 1 ]]; do
        echo "$pid"
        pid=$(awk '/^PPid:/ { print $2 }' "/proc/$pid/status" 2>/dev/null || true)
    done
    return 0
}

# Stops processes started by a test process that no longer exists.
_berth_sweep_processes() {
    local dir pid owner comm
    local -a strays=()
    for dir in /proc/[0-9]*; do
        pid=${dir#/proc/}
        owner=$(_berth_env_of "$pid" BERTH_E2E_OWNER)
        [[ -n $owner ]] || continue
        if ! kill -0 "$owner" 2>/dev/null; then
            comm=$(cat "$dir/comm" 2>/dev/null || echo '?')
            echo "==> sweep: stopping $comm (pid $pid), left by test process $owner which is gone"
            strays+=("$pid")
        fi
    done
    [[ ${#strays[@]} -gt 0 ]] || return 0
    kill -TERM "${strays[@]}" 2>/dev/null || true
    local i
    for ((i = 0; i < 50; i++)); do
        local alive=0
        for pid in "${strays[@]}"; do
            kill -0 "$pid" 2>/dev/null && alive=1
        done
        [[ $alive == 0 ]] && return 0
        sleep 0.1
    done
    kill -KILL "${strays[@]}" 2>/dev/null || true
}

# Prints the pids of processes of another e2e run that is still going.
_berth_active_runs() {
    local own dir pid owner
    own=" $(_berth_own_chain | tr '\n' ' ') "
    for dir in /proc/[0-9]*; do
        pid=${dir#/proc/}
        [[ $own == *" $pid "* ]] && continue
        if [[ $(_berth_env_of "$pid" BERTH_E2E) == 1 ]]; then
            echo "$pid"
            continue
        fi
        owner=$(_berth_env_of "$pid" BERTH_E2E_OWNER)
        if [[ -n $owner ]] && kill -0 "$owner" 2>/dev/null; then
            echo "$pid"
            continue
        fi
        if [[ $(cat "$dir/comm" 2>/dev/null) == berth-bench ]]; then
            echo "$pid"
            continue
        fi
        # A test binary of this workspace that cargo runs without BERTH_E2E (say the controllers'
        # engine tests, `cargo test -p berth-controllers --test ingress_engine`): cargo gives it
        # CARGO_PKG_NAME, and test binaries live in a target's deps/ directory.
        if [[ $(_berth_env_of "$pid" CARGO_PKG_NAME) == berth* && $(readlink "$dir/exe" 2>/dev/null) == */deps/* ]]; then
            echo "$pid"
        fi
    done
}

# "ID NAME" lines of one family whose NAME is a test name. grep, not awk: Debian's awk is mawk,
# whose regexes have no `{5}` repetition, so no test name ever matched and nothing was swept.
_berth_test_objects() {
    docker "$1" ls --format '{{.ID}} {{.Name}}' 2>/dev/null | grep -E "^[^ ]+ ${BERTH_E2E_NAME_RE#^}" || true
}

# Node labels the Node engine tests (controllers/tests/node_engine.rs) put on the local node: keys
# starting with `nodetest-<10 ULID chars>`.
_berth_sweep_node_labels() {
    local key self
    # `docker node inspect` takes `self`, `docker node update` only the ID.
    self=$(docker info --format '{{.Swarm.NodeID}}' 2>/dev/null) || return 0
    [[ -n $self ]] || return 0
    while read -r key; do
        [[ -n $key ]] || continue
        echo "==> sweep: node label $key"
        docker node update --label-rm "$key" "$self" >/dev/null 2>&1 || true
    done < <(docker node inspect "$self" --format '{{range $k, $v := .Spec.Labels}}{{$k}}{{"\n"}}{{end}}' 2>/dev/null |
        grep -E '^nodetest-[0-9a-hjkmnp-tv-z]{10}' || true)
}

# Swarm services: scaled to zero first and removed once their tasks are gone (engine 20.10 crashes
# when a service is removed while the task reaper deletes its tasks; see tests/src/lib.rs).
_berth_sweep_services() {
    local -a ids=() names=()
    local id name
    while read -r id name; do
        ids+=("$id")
        names+=("$name")
    done < <(_berth_test_objects service)
    [[ ${#ids[@]} -gt 0 ]] || return 0
    echo "==> sweep: ${#ids[@]} service(s): ${names[*]}"
    local -a scale=()
    for id in "${ids[@]}"; do
        scale+=("$id=0")
    done
    docker service scale -d "${scale[@]}" >/dev/null 2>&1 || true
    local i
    for ((i = 0; i < 60; i++)); do
        [[ -z $(docker service ps -q "${ids[@]}" 2>/dev/null) ]] && break
        sleep 0.5
    done
    docker service rm "${ids[@]}" >/dev/null 2>&1 || true
}

# Secrets, configs, networks, volumes: tried again for a while, since a network or volume is held
# until the containers of a removed service are gone.
_berth_sweep_family() {
    local family=$1 i id name
    local -a ids=() names=()
    for ((i = 0; i < 60; i++)); do
        ids=()
        names=()
        if [[ $family == volume ]]; then
            while read -r name; do
                ids+=("$name")
                names+=("$name")
            done < <(docker volume ls -q 2>/dev/null | grep -E "$BERTH_E2E_NAME_RE" || true)
        else
            while read -r id name; do
                ids+=("$id")
                names+=("$name")
            done < <(_berth_test_objects "$family")
        fi
        [[ ${#ids[@]} -gt 0 ]] || return 0
        [[ $i -eq 0 ]] && echo "==> sweep: ${#ids[@]} ${family}(s): ${names[*]}"
        docker "$family" rm "${ids[@]}" >/dev/null 2>&1 || true
        sleep 0.5
    done
    echo "==> sweep: could not remove ${family}(s) ${names[*]}; continuing" >&2
}

_berth_sweep_images() {
    local -a refs=()
    local ref hostfile host
    while read -r ref; do
        refs+=("$ref")
    done < <(docker images --format '{{.Repository}}:{{.Tag}}' --filter 'reference=berth-test/e2e-*' \
        2>/dev/null | grep -v ':<none>$' || true)
    for hostfile in /tmp/berth-e2e-registry-*/host; do
        [[ -f $hostfile ]] || continue
        host=$(head -n 1 "$hostfile")
        [[ $host =~ ^127\.0\.0\.1:[0-9]+$ ]] || continue
        while read -r ref; do
            refs+=("$ref")
        done < <(docker images --digests --format '{{.Repository}}:{{.Tag}} {{.Repository}}@{{.Digest}}' \
            --filter "reference=$host/*/*" 2>/dev/null | tr ' ' '\n' | grep -v -e ':<none>$' -e '@<none>$' || true)
    done
    [[ ${#refs[@]} -gt 0 ]] || return 0
    echo "==> sweep: ${#refs[@]} image reference(s): ${refs[*]}"
    # Untag only: the layers are shared with the test images scripts/test builds.
    docker rmi --no-prune "${refs[@]}" >/dev/null 2>&1 || true
}

# The demo test (tests/tests/demo.rs) runs scripts/demo, whose objects have the demo's fixed names;
# its data dir records the installation, and `scripts/demo down` removes what carries its label.
_berth_sweep_demo() {
    local dir
    for dir in /tmp/berth-e2e-demo-*/data; do
        [[ -s $dir/instance ]] || continue
        echo "==> sweep: the demo installation in $dir"
        BERTH_DEMO_DIR=$dir "$(dirname "${BASH_SOURCE[0]}")/../demo" down >/dev/null 2>&1 ||
            echo "==> sweep: scripts/demo down failed for $dir; continuing" >&2
    done
}

berth_sweep_e2e() {
    echo "==> sweep: leftovers of killed e2e runs"
    _berth_sweep_processes
    local active
    active=$(_berth_active_runs | tr '\n' ' ')
    if [[ -n ${active// /} ]]; then
        echo "==> sweep: another e2e run is active (pids ${active% }); leaving Swarm objects, images and temp dirs alone"
        return 0
    fi
    # The lab first: services a killed lab test left may be bound to its nodes; once the nodes
    # are gone the services below are removed like any other.
    if berth_lab_exists; then
        if berth_lab_lock_free; then
            echo "==> sweep: a 3-node lab is up (left by a killed run or by hand); taking it down"
            berth_lab_down
        else
            echo "==> sweep: a lab test run holds the 3-node lab ($BERTH_LAB_LOCK); leaving it"
        fi
    fi
    if docker info >/dev/null 2>&1; then
        _berth_sweep_demo
        _berth_sweep_services
        local family
        for family in secret config network volume; do
            _berth_sweep_family "$family"
        done
        _berth_sweep_images
        _berth_sweep_node_labels
    fi
    local dirs
    dirs=$(find /tmp -maxdepth 1 -name 'berth-e2e-*' -type d 2>/dev/null | wc -l)
    if [[ $dirs -gt 0 ]]; then
        echo "==> sweep: $dirs temp dir(s) /tmp/berth-e2e-*"
        find /tmp -maxdepth 1 -name 'berth-e2e-*' -type d -exec rm -rf {} +
    fi
}
