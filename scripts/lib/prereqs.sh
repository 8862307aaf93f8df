# shellcheck shell=bash
#
# scripts/lib/prereqs.sh: machine prerequisites for berth's tests and demo.
#
# Sourced by scripts/test and scripts/demo. Brings a Debian bookworm machine (fresh, or reused
# from an earlier run) to the state the e2e tests need:
#   - packages: docker.io, nats-server, busybox-static, docker-registry and apache2-utils
#     (htpasswd) for the private-registry tests, caddy (copied into the ingress test image),
#     a C toolchain for crates like ring, plus curl, openssl, python3 and iproute2 used by these
#     scripts and the ingress tests; restic (the backup driver's tests run Debian's 0.14) with
#     openssh-server and openssh-client (its SFTP test starts its own sshd on loopback);
#   - a running dockerd (started by hand: these machines have no systemd);
#   - the lab bridge (berthlab0, 10.99.0.1/24) and a healthy single-node Swarm advertising
#     10.99.0.1 on it, so the 3-node lab (scripts/lab) can join nodes to it;
#   - local test images built FROM scratch (nothing can be pulled): berth-test/busybox:1,
#     berth-test/app:2 (a second image to deploy), berth-test/broken:1 (fails at once),
#     berth-demo/web:1 and :2 (the demo's page) and berth-test/caddy:1 (the ingress proxy,
#     Debian's caddy binary);
#   - cargo on PATH.
# Every function is idempotent: whatever is already in place is kept.
# nats-server is only installed, never started: the e2e harness starts its own on free ports.
#
# Usage: source scripts/lib/prereqs.sh && berth_prereqs

set -euo pipefail

# Sourcing twice is harmless.
if [[ -n ${_BERTH_PREREQS_LOADED:-} ]]; then
    return 0
fi
_BERTH_PREREQS_LOADED=1

BERTH_DOCKERD_LOG=${BERTH_DOCKERD_LOG:-/var/log/berth-dockerd.log}
# The swarm advertises an address on berth's own lab bridge, not 127.0.0.1: the extra nodes of the
# 3-node lab (scripts/lab) live in network namespaces and must reach the manager (Raft on 2377,
# gossip on 7946, VXLAN on 4789). The bridge carries only addresses the lab itself made.
BERTH_LAB_BRIDGE=${BERTH_LAB_BRIDGE:-berthlab0}
BERTH_LAB_SUBNET_PREFIX=${BERTH_LAB_SUBNET_PREFIX:-10.99.0}
BERTH_SWARM_ADDR=${BERTH_SWARM_ADDR:-$BERTH_LAB_SUBNET_PREFIX.1}

_berth_die() {
    echo "==> ERROR: $*" >&2
    exit 1
}

_berth_require_root() {
    if [[ $EUID -ne 0 ]]; then
        _berth_die "$1 needs root; run this script as root"
    fi
}

# ---------------------------------------------------------------------------------------------
# Packages
# ---------------------------------------------------------------------------------------------

# Installs, in one apt-get call, only the packages whose commands/files are missing.
berth_install_packages() {
    local -a missing=()

    if ! command -v dockerd >/dev/null 2>&1 || ! command -v docker >/dev/null 2>&1; then
        missing+=(docker.io)
    fi
    command -v nats-server >/dev/null 2>&1 || missing+=(nats-server)
    # Only the *static* busybox can be copied into a FROM-scratch image: the plain `busybox`
    # package also provides /bin/busybox, so ask dpkg rather than looking for the file.
    dpkg -s busybox-static >/dev/null 2>&1 || missing+=(busybox-static)
    # Its binary and libraries go into the ingress proxy test image (no image can be pulled).
    dpkg -s caddy >/dev/null 2>&1 || missing+=(caddy)
    # C toolchain for build scripts (ring, ...): compiler, libc headers, pkg-config.
    command -v cc >/dev/null 2>&1 || missing+=(gcc)
    [[ -e /usr/include/stdio.h ]] || missing+=(libc6-dev)
    command -v pkg-config >/dev/null 2>&1 || missing+=(pkg-config)
    # A private registry with htpasswd auth for the registry and deploy e2e tests.
    command -v docker-registry >/dev/null 2>&1 || missing+=(docker-registry)
    command -v htpasswd >/dev/null 2>&1 || missing+=(apache2-utils)
    # Used by these scripts themselves; openssl also by the ingress e2e (certificates) and the
    # deploy e2e (it signs webhook calls with the openssl recipe in docs/deploy.md).
    command -v curl >/dev/null 2>&1 || missing+=(curl)
    command -v openssl >/dev/null 2>&1 || missing+=(openssl)
    command -v python3 >/dev/null 2>&1 || missing+=(python3)
    # scripts/test lints the shell scripts.
    command -v shellcheck >/dev/null 2>&1 || missing+=(shellcheck)
    command -v ip >/dev/null 2>&1 || missing+=(iproute2)
    # Backups are restic repositories written by Debian's restic; the SFTP test runs its own sshd
    # (its own config and keys, 127.0.0.1 only): the package's service is never started here.
    command -v restic >/dev/null 2>&1 || missing+=(restic)
    [[ -x /usr/sbin/sshd ]] || missing+=(openssh-server)
    command -v ssh >/dev/null 2>&1 || missing+=(openssh-client)
    # The dashboard's browser tests: Debian's Chromium, driven by playwright-core from Node.js
    # (tests/browser; its npm packages are installed by berth_browser_deps).
    command -v chromium >/dev/null 2>&1 || missing+=(chromium)
    command -v node >/dev/null 2>&1 || missing+=(nodejs)
    command -v npm >/dev/null 2>&1 || missing+=(npm)

    if [[ ${#missing[@]} -eq 0 ]]; then
        echo "==> packages: all present"
        return 0
    fi

    _berth_require_root "installing ${missing[*]}"
    # NEEDRESTART_SUSPEND: docker.io recommends needrestart, whose apt hook would try to
    # restart services (there is no systemd here) or prompt.
    local -a apt_env=(env DEBIAN_FRONTEND=noninteractive NEEDRESTART_SUSPEND=1)
    if [[ -z ${_BERTH_APT_UPDATED:-} ]]; then
        echo "==> apt-get update"
        "${apt_env[@]}" apt-get update -q
        _BERTH_APT_UPDATED=1
    fi
    echo "==> apt-get install ${missing[*]}"
    "${apt_env[@]}" apt-get install -y -q "${missing[@]}"
}

# ---------------------------------------------------------------------------------------------
# Docker engine
# ---------------------------------------------------------------------------------------------

# The lab bridge and the manager's address on it. It must exist before dockerd starts: a swarm
# whose advertised address is missing never becomes healthy. Idempotent.
berth_lab_bridge() {
    if ! ip link show "$BERTH_LAB_BRIDGE" >/dev/null 2>&1; then
        _berth_require_root "creating the lab bridge $BERTH_LAB_BRIDGE"
        echo "==> network: bridge $BERTH_LAB_BRIDGE with $BERTH_SWARM_ADDR/24"
        ip link add "$BERTH_LAB_BRIDGE" type bridge
    fi
    # Read first, then match: `ip | grep -q` fails under pipefail when grep stops reading early.
    local addrs
    addrs=$(ip -o addr show dev "$BERTH_LAB_BRIDGE")
    if [[ $addrs != *" $BERTH_SWARM_ADDR/"* ]]; then
        ip addr add "$BERTH_SWARM_ADDR/24" dev "$BERTH_LAB_BRIDGE"
    fi
    ip link set "$BERTH_LAB_BRIDGE" up
}

# Is the dockerd named in the default pidfile alive? (Then it is starting up: do not start
# another one next to it.)
_berth_dockerd_pidfile_alive() {
    local pid
    pid=$(cat /var/run/docker.pid 2>/dev/null) || return 1
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    [[ $(cat "/proc/$pid/comm" 2>/dev/null) == dockerd ]]
}

# Starts dockerd in the background unless the engine already answers.
berth_start_docker() {
    if docker info >/dev/null 2>&1; then
        echo "==> docker: engine already running"
        return 0
    fi

    local pid=""
    if _berth_dockerd_pidfile_alive; then
        echo "==> docker: dockerd (pid $(cat /var/run/docker.pid)) is running but not answering yet; waiting"
    else
        _berth_require_root "starting dockerd"
        command -v dockerd >/dev/null 2>&1 || _berth_die "dockerd not found (is docker.io installed?)"
        echo "==> docker: starting dockerd (log: $BERTH_DOCKERD_LOG)"
        # setsid + nohup: dockerd must outlive this script and its terminal. --wait keeps $!
        # alive exactly as long as dockerd, even when setsid has to fork.
        # 9>&-: a daemon must not inherit the lab lock (scripts/lab holds it on fd 9 and may start
        # the engine): it would keep the lab locked for as long as the engine runs.
        setsid --wait nohup dockerd >>"$BERTH_DOCKERD_LOG" 2>&1 </dev/null 9>&- &
        pid=$!
    fi

    local i
    for ((i = 0; i < 60; i++)); do
        if docker info >/dev/null 2>&1; then
            echo "==> docker: engine up after ${i}s"
            return 0
        fi
        if [[ -n $pid ]] && ! kill -0 "$pid" 2>/dev/null; then
            break # the dockerd we started has exited: waiting longer is pointless
        fi
        sleep 1
    done

    echo "==> docker: the engine did not come up; last lines of $BERTH_DOCKERD_LOG:" >&2
    tail -n 40 "$BERTH_DOCKERD_LOG" >&2 || true
    _berth_die "dockerd is not answering (docker info fails)"
}

# ---------------------------------------------------------------------------------------------
# Swarm
# ---------------------------------------------------------------------------------------------

# Prints why the local swarm is unusable, or nothing if it is healthy. Returns 0 when healthy,
# 1 for a problem that may clear up by itself (engine just restarted), 2 for one that will not.
_berth_swarm_problem() {
    local info state addr control err
    info=$(docker info --format '{{.Swarm.LocalNodeState}}|{{.Swarm.NodeAddr}}|{{.Swarm.ControlAvailable}}|{{.Swarm.Error}}') ||
        { echo "docker info fails"; return 1; }
    IFS='|' read -r state addr control err <<<"$info"

    if [[ $state != active ]]; then
        echo "LocalNodeState is '$state'${err:+ ($err)}"
        # 'error' (a failed join) and 'locked' (autolock, and we have no key) stay that way;
        # 'pending' may still turn into 'active'.
        [[ $state == error || $state == locked ]] && return 2
        return 1
    fi
    if [[ -n $err ]]; then
        echo "swarm error: $err"
        return 1
    fi
    # A swarm initialised on an address that has since gone away (say a removed veth) never
    # becomes healthy again.
    if ! ip -o addr show | awk '{ split($4, a, "/"); print a[1] }' | grep -Fx -- "$addr" >/dev/null; then
        echo "it advertises $addr, which is not an address of this machine"
        return 2
    fi
    # A swarm from before the lab bridge (advertising 127.0.0.1) cannot take the lab's nodes.
    if [[ $addr != "$BERTH_SWARM_ADDR" ]]; then
        echo "it advertises $addr, not $BERTH_SWARM_ADDR"
        return 2
    fi
    if [[ $control != true ]]; then
        echo "this node is not a manager"
        return 2
    fi
    local out
    if ! out=$(timeout 30 docker node ls -q 2>&1); then
        # "The swarm does not have a leader": the Raft quorum is lost (berth_swarm_recover).
        echo "docker node ls fails: $(tail -n 1 <<<"$out")"
        return 1
    fi
    local node_state
    node_state=$(docker node inspect self --format '{{.Status.State}}' 2>/dev/null) || node_state="?"
    if [[ $node_state != ready ]]; then
        echo "this node's status is '$node_state'"
        return 1
    fi
    return 0
}

# Waits up to $1 seconds for the swarm to be healthy. Sets _BERTH_SWARM_PROBLEM to the last
# problem seen; returns as soon as a problem is known to be permanent.
_berth_wait_swarm_healthy() {
    local timeout=$1 i rc
    for ((i = 0; ; i++)); do
        rc=0
        _BERTH_SWARM_PROBLEM=$(_berth_swarm_problem) || rc=$?
        if [[ $rc -eq 0 ]]; then
            return 0
        fi
        if [[ $rc -eq 2 || $i -ge $timeout ]]; then
            return 1
        fi
        sleep 1
    done
}

# Prints what keeps this engine from being the one healthy manager and Raft leader of its swarm,
# or nothing. Beyond _berth_swarm_problem: this node is the leader, no other node is a Raft member
# (a manager), and a write commits (a config created and removed again; a leader whose store is
# stuck in a Raft commit still answers reads). For a swarm that must have no other manager, as
# after the 3-node lab went down.
_berth_swarm_sole_leader_problem() {
    local problem rc=0
    problem=$(_berth_swarm_problem) || rc=$?
    if [[ $rc -ne 0 ]]; then
        echo "$problem"
        return 1
    fi
    local nodes self="" others
    nodes=$(timeout 30 docker node ls --format '{{.Self}} {{.ID}} {{.Hostname}} {{.ManagerStatus}}' 2>&1) ||
        { echo "docker node ls fails: $(tail -n 1 <<<"$nodes")"; return 1; }
    self=$(awk '$1 == "true" { print $4 }' <<<"$nodes")
    if [[ $self != Leader ]]; then
        echo "this node is not the Raft leader (manager status '${self:-none}')"
        return 1
    fi
    others=$(awk '$1 != "true" && $4 != "" { printf "%s%s (%s, %s)", sep, $2, $3, $4; sep = ", " }' <<<"$nodes")
    if [[ -n $others ]]; then
        echo "other nodes are still managers (Raft members): $others"
        return 1
    fi
    local probe="berth-swarm-probe-$$-$RANDOM" out
    if ! out=$(timeout 30 docker config create "$probe" - <<<"probe" 2>&1); then
        timeout 30 docker config rm "$probe" >/dev/null 2>&1 || true
        echo "a write does not commit (docker config create: $(tail -n 1 <<<"$out"))"
        return 1
    fi
    timeout 30 docker config rm "$probe" >/dev/null 2>&1 || true
    return 0
}

# Waits up to $1 seconds for _berth_swarm_sole_leader_problem to clear (an election after a
# demotion takes a few seconds). Sets _BERTH_SWARM_PROBLEM to the last problem seen.
_berth_wait_swarm_sole_leader() {
    local timeout=$1 start=$SECONDS
    while true; do
        _BERTH_SWARM_PROBLEM=$(_berth_swarm_sole_leader_problem) && return 0
        ((SECONDS - start < timeout)) || return 1
        sleep 1
    done
}

# Docker's disaster recovery for a swarm that lost its Raft quorum (or whose leader cannot commit):
# `docker swarm init --force-new-cluster` on this manager. It keeps this manager's copy of the
# swarm's state (services, tasks, secrets, configs, networks, the node list) and makes it the only
# manager; every other manager is dropped from Raft (their node entries stay, as down nodes, for
# the caller to remove). Chosen over `leave --force` + `init`, which would throw all of that away,
# including what other test runs on this engine are using. $1: why, printed. Dies if the swarm is
# not healthy afterwards.
berth_swarm_recover() {
    local reason=$1 start=$SECONDS out
    echo "==> swarm: RECOVERING the host's swarm: $reason" >&2
    echo "==> swarm: docker swarm init --force-new-cluster --advertise-addr $BERTH_SWARM_ADDR" \
        "(keeps this manager's services, secrets, configs and networks; drops every other manager)" >&2
    if ! out=$(timeout 120 docker swarm init --force-new-cluster --advertise-addr "$BERTH_SWARM_ADDR" 2>&1); then
        _berth_die "docker swarm init --force-new-cluster failed: $out"
    fi
    if ! _berth_wait_swarm_healthy 60; then
        _berth_die "the swarm is still unhealthy after --force-new-cluster: $_BERTH_SWARM_PROBLEM"
    fi
    echo "==> swarm: recovered in $((SECONDS - start))s: $(docker info --format '{{.Swarm.Managers}} manager(s), {{.Swarm.Nodes}} node(s)')" >&2
}

_berth_swarm_init() {
    echo "==> swarm: docker swarm init --advertise-addr $BERTH_SWARM_ADDR"
    docker swarm init --advertise-addr "$BERTH_SWARM_ADDR" >/dev/null
    if ! _berth_wait_swarm_healthy 30; then
        _berth_die "swarm still unhealthy right after init: $_BERTH_SWARM_PROBLEM"
    fi
}

# Makes sure this engine is the healthy manager of a swarm: inactive -> init; active and
# healthy -> keep; a manager without a leader -> berth_swarm_recover (keeps the state); broken
# otherwise (error/pending/locked, stale advertise address, not a manager) -> leave --force and
# init again.
berth_init_swarm() {
    # Right after dockerd starts, LocalNodeState can be empty for a moment.
    local state i
    for ((i = 0; i < 10; i++)); do
        state=$(docker info --format '{{.Swarm.LocalNodeState}}')
        [[ -z $state ]] || break
        sleep 1
    done
    if [[ $state == inactive ]]; then
        _berth_swarm_init
        return 0
    fi

    # An engine that just restarted may need a few seconds before its swarm is ready again.
    if _berth_wait_swarm_healthy 20; then
        echo "==> swarm: active and healthy ($(docker info --format '{{.Swarm.NodeAddr}}')); keeping it"
        return 0
    fi

    # A manager that is in the right place but has no leader (a killed run left a second manager,
    # now gone, in Raft) keeps its state with Docker's recovery: the services, secrets and
    # networks other test runs on this engine use survive, and the sweep removes a killed run's
    # own. Everything else (wrong address, not a manager, error, locked) starts again.
    if [[ $(docker info --format '{{.Swarm.LocalNodeState}} {{.Swarm.ControlAvailable}} {{.Swarm.NodeAddr}}') == "active true $BERTH_SWARM_ADDR" ]] &&
        ! timeout 30 docker node ls -q >/dev/null 2>&1; then
        berth_swarm_recover "$_BERTH_SWARM_PROBLEM"
        return 0
    fi

    echo "==> swarm: unusable ($_BERTH_SWARM_PROBLEM); leaving it and starting a new one"
    if ! docker swarm leave --force >/dev/null; then
        echo "==> swarm: leave failed; trying init anyway"
    fi
    _berth_swarm_init
}

# ---------------------------------------------------------------------------------------------
# Test images
# ---------------------------------------------------------------------------------------------

# Builds the test images FROM scratch out of Debian's static busybox, unless present.
# (The body is a subshell so that its EXIT trap removes the build contexts on any exit.)
berth_build_images() (
    local busybox=/bin/busybox
    [[ -x $busybox ]] || _berth_die "$busybox missing (is busybox-static installed?)"

    # Debian's docker.io uses the legacy builder. A newer CLI without the buildx plugin would
    # refuse to build if BuildKit were requested from the environment, so ask for the legacy
    # builder explicitly in that case.
    if ! docker buildx version >/dev/null 2>&1; then
        export DOCKER_BUILDKIT=0
    fi

    local tmp
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT

    # `docker build -q TAG DIR`, quiet unless it fails (a newer CLI warns on stderr that the
    # legacy builder is deprecated).
    build() {
        if ! docker build -q -t "$1" "$2" >/dev/null 2>"$tmp/build.log"; then
            cat "$tmp/build.log" >&2
            _berth_die "docker build of $1 failed"
        fi
    }

    # berth-test/busybox:1: busybox with its applets linked into /bin, no default command.
    if docker image inspect berth-test/busybox:1 >/dev/null 2>&1; then
        echo "==> image berth-test/busybox:1: present"
    else
        echo "==> image berth-test/busybox:1: building"
        mkdir "$tmp/busybox"
        cp "$busybox" "$tmp/busybox/busybox"
        cat >"$tmp/busybox/Dockerfile" <<'EOF'
FROM scratch
COPY busybox /bin/busybox
RUN ["/bin/busybox", "--install", "-s", "/bin"]
EOF
        build berth-test/busybox:1 "$tmp/busybox"
    fi

    # berth-test/app:2: berth-test/busybox:1 plus /version, a different image (digest) to deploy.
    if docker image inspect berth-test/app:2 >/dev/null 2>&1; then
        echo "==> image berth-test/app:2: present"
    else
        echo "==> image berth-test/app:2: building"
        mkdir "$tmp/app2"
        printf 'FROM berth-test/busybox:1\nRUN ["/bin/sh", "-c", "echo 2 > /version"]\n' \
            >"$tmp/app2/Dockerfile"
        build berth-test/app:2 "$tmp/app2"
    fi

    # berth-test/broken:1: busybox without its applets, so any command fails at once: the
    # failing image of the rollback tests.
    if docker image inspect berth-test/broken:1 >/dev/null 2>&1; then
        echo "==> image berth-test/broken:1: present"
    else
        echo "==> image berth-test/broken:1: building"
        mkdir "$tmp/broken"
        cp "$busybox" "$tmp/broken/busybox"
        printf 'FROM scratch\nCOPY busybox /bin/busybox\n' >"$tmp/broken/Dockerfile"
        build berth-test/broken:1 "$tmp/broken"
    fi

    # berth-demo/web:1 and :2: busybox httpd on port 8080 running fixtures/images/demo-web/index.cgi
    # for `/` (the page scripts/demo shows); the two differ only in /version, so a deploy of :2
    # is visible on the page. Rebuilt when the page or busybox changes (a hash label), so a
    # machine that built an older demo image gets the current one.
    local demo_src version hash
    demo_src="$(dirname "${BASH_SOURCE[0]}")/../../fixtures/images/demo-web"
    hash=$(cat "$demo_src/index.cgi" "$busybox" | sha256sum | cut -c1-16)
    for version in 1 2; do
        if [[ $(docker image inspect -f '{{index .Config.Labels "io.berth.image-hash"}}' \
            "berth-demo/web:$version" 2>/dev/null) == "$hash" ]]; then
            echo "==> image berth-demo/web:$version: present"
            continue
        fi
        echo "==> image berth-demo/web:$version: building"
        mkdir -p "$tmp/web$version/www/cgi-bin"
        cp "$busybox" "$tmp/web$version/busybox"
        cp "$demo_src/index.cgi" "$tmp/web$version/www/cgi-bin/index.cgi"
        chmod 0755 "$tmp/web$version/www/cgi-bin/index.cgi"
        echo "$version" >"$tmp/web$version/version"
        cat >"$tmp/web$version/Dockerfile" <<EOF
FROM scratch
COPY busybox /bin/busybox
RUN ["/bin/busybox", "--install", "-s", "/bin"]
COPY www/ /www/
COPY version /version
LABEL io.berth.image-hash=$hash
EXPOSE 8080
CMD ["httpd", "-f", "-p", "8080", "-h", "/www"]
EOF
        build "berth-demo/web:$version" "$tmp/web$version"
    done

    # berth-test/caddy:1: Debian's caddy with the libraries it links, standing in for the official
    # caddy:2 image that the ingress controller uses by default.
    if docker image inspect berth-test/caddy:1 >/dev/null 2>&1; then
        echo "==> image berth-test/caddy:1: present"
    else
        echo "==> image berth-test/caddy:1: building"
        local root="$tmp/caddy/rootfs" lib
        [[ -x /usr/bin/caddy ]] || _berth_die "/usr/bin/caddy missing (is caddy installed?)"
        mkdir -p "$root/usr/bin" "$root/lib/x86_64-linux-gnu" "$root/lib64" "$root/etc" "$root/tmp" \
            "$root/data" "$root/config"
        cp /usr/bin/caddy "$root/usr/bin/caddy"
        for lib in libzstd.so.1 libc.so.6; do
            cp -L "/lib/x86_64-linux-gnu/$lib" "$root/lib/x86_64-linux-gnu/$lib"
        done
        cp -L /lib64/ld-linux-x86-64.so.2 "$root/lib64/ld-linux-x86-64.so.2"
        echo 'root:x:0:0:root:/tmp:/usr/bin/caddy' >"$root/etc/passwd"
        chmod 1777 "$root/tmp"
        cat >"$tmp/caddy/Dockerfile" <<'EOF'
FROM scratch
COPY rootfs/ /
ENV HOME=/tmp XDG_DATA_HOME=/data XDG_CONFIG_HOME=/config
EXPOSE 80 443
CMD ["/usr/bin/caddy", "run"]
EOF
        build berth-test/caddy:1 "$tmp/caddy"
    fi
)

# berth-test/agent:1: the berth binary $1 (just built) with the shared libraries it links, FROM
# scratch: the image of the agents berth starts on other nodes (volume transfers, exec; see
# controllers/src/swarm/agent_task.rs). Production uses berth's own image (scripts/image,
# --agent-image). Built after every `cargo build` (scripts/test): the binary changes.
berth_build_agent_image() {
    berth_build_berth_image "$1" berth-test/agent:1 agent
}

# Builds image $2 from the berth binary $1, FROM scratch: the binary stripped of its debug info
# (~200 MB -> ~40 MB: the agent image is loaded into every lab node) with every shared library it
# links, at its own path. Kind $3: `agent` (that and nothing more) or `server` (what `berth up`
# needs in a container: restic for backups with its libraries, the CA bundle for registries,
# /tmp, and `up` on 0.0.0.0:7474 as its command; see scripts/image). An unchanged binary gives
# the same image (fixed file times; the build cache keeps the layer), so the lab does not load it
# again.
berth_build_berth_image() (
    local bin=$1 tag=$2 kind=${3:-agent}
    [[ -x $bin ]] || _berth_die "berth binary $bin missing"
    if ! docker buildx version >/dev/null 2>&1; then
        export DOCKER_BUILDKIT=0
    fi
    local tmp
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    local root="$tmp/rootfs"
    mkdir -p "$root/usr/local/bin" "$root/volume" "$root/tmp"
    chmod 1777 "$root/tmp"
    strip --strip-debug -o "$root/usr/local/bin/berth" "$bin"
    _berth_image_libs "$bin" "$root"
    local cmd='[]'
    if [[ $kind == server ]]; then
        local restic
        restic=$(command -v restic) || _berth_die "restic is not installed (berth_install_packages)"
        cp -L "$restic" "$root/usr/local/bin/restic"
        _berth_image_libs "$restic" "$root"
        mkdir -p "$root/etc/ssl/certs" "$root/var/lib/berth" "$root/var/lib/berth-backups"
        cp -L /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/"
        echo 'root:x:0:0:root:/var/lib/berth:/usr/local/bin/berth' >"$root/etc/passwd"
        echo 'root:x:0:' >"$root/etc/group"
        cmd='["up", "--listen", "0.0.0.0:7474", "--tls", "internal"]'
    fi
    # Fixed times: the same binary gives the same layer, whatever day it is built.
    find "$root" -exec touch -h -d @0 {} +
    cat >"$tmp/Dockerfile" <<DOCKERFILE
FROM scratch
COPY rootfs/ /
ENV PATH=/usr/local/bin HOME=/var/lib/berth SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt
ENTRYPOINT ["/usr/local/bin/berth"]
CMD $cmd
DOCKERFILE
    if ! docker build -q -t "$tag" "$tmp" >/dev/null 2>"$tmp/build.log"; then
        cat "$tmp/build.log" >&2
        _berth_die "docker build of $tag failed"
    fi
    echo "==> image $tag: $(docker image inspect --format '{{.Id}}' "$tag" | cut -c1-19) from $bin"
)

# Copies every shared library binary $1 links (libc, libm, libgcc_s and the loader) into root $2,
# at its own path.
_berth_image_libs() {
    local lib
    for lib in $(ldd "$1" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }'); do
        mkdir -p "$2$(dirname "$lib")"
        cp -L "$lib" "$2$lib"
    done
}

# ---------------------------------------------------------------------------------------------
# Rust
# ---------------------------------------------------------------------------------------------

# Makes sure cargo is on PATH (rustup's env file is sourced if needed). Toolchains cannot be
# downloaded on these machines, so a missing one is an error, not something to install.
berth_ensure_rust() {
    if ! command -v cargo >/dev/null 2>&1 && [[ -f ${HOME:-/root}/.cargo/env ]]; then
        # shellcheck source=/dev/null
        source "${HOME:-/root}/.cargo/env"
    fi
    if ! command -v cargo >/dev/null 2>&1; then
        _berth_die "cargo not found on PATH nor in ~/.cargo/env: this machine needs the Rust toolchain (rustup) preinstalled; it cannot be downloaded here"
    fi
    echo "==> rust: $(cargo --version)"
}

# ---------------------------------------------------------------------------------------------

# The browser tests' npm packages (playwright-core, pinned by tests/browser/package-lock.json),
# installed again only when the lock file changed.
berth_browser_deps() {
    local dir
    dir="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)/tests/browser"
    local stamp="$dir/node_modules/.berth-lock"
    if [[ -f $stamp ]] && cmp -s "$stamp" "$dir/package-lock.json"; then
        echo "==> browser test packages: present"
        return 0
    fi
    echo "==> npm ci (tests/browser)"
    (cd "$dir" && npm ci --no-audit --no-fund --loglevel=error) || return 1
    cp "$dir/package-lock.json" "$stamp"
}

berth_prereqs() {
    berth_install_packages
    berth_lab_bridge
    berth_start_docker
    berth_init_swarm
    berth_build_images
    berth_ensure_rust
    berth_browser_deps
}
