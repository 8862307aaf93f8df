# shellcheck shell=bash
#
# scripts/lib/deny.sh: `cargo deny check` (RustSec advisories, licences, duplicate and banned
# crates, sources; the policy is deny.toml) for scripts/test and scripts/deny.
#
# cargo-deny is built from crates.io at a pinned version (nothing else can be downloaded on these
# machines), only when that version is not installed yet, into $CARGO_HOME/bin. The build takes
# minutes, so scripts/test starts it in the background at the lowest CPU priority right after the
# prerequisites (berth_cargo_deny_install_start): it only uses the CPU that clippy, the build and
# the tests leave idle (the e2e tests mostly wait on Docker), and berth_cargo_deny waits for it at
# the end. A failed install fails the run, with its log.
#
# The advisory database cannot be fetched either (GitHub is unreachable): the check reads the
# snapshot committed in deny/advisory-db/ (scripts/advisory-db refreshes it), laid out in a
# temporary directory the way cargo-deny expects its clone, and runs with --offline.
# docs/dependencies.md describes the whole arrangement and every exception in deny.toml.
#
# Usage: source scripts/lib/deny.sh && berth_cargo_deny

set -euo pipefail

if [[ -n ${_BERTH_DENY_LOADED:-} ]]; then
    return 0
fi
_BERTH_DENY_LOADED=1

# shellcheck source=scripts/lib/prereqs.sh
source "$(dirname "${BASH_SOURCE[0]}")/prereqs.sh"

# The cargo-deny release the policy and the snapshot layout were written for (its directory naming
# and its reading of the database are this version's; see _berth_cargo_deny_db_layout).
BERTH_CARGO_DENY_VERSION=0.20.2
# Where the snapshot lives, relative to the repository root.
BERTH_ADVISORY_SNAPSHOT=deny/advisory-db
# cargo install's build directory: a fixed one rather than the workspace's target directory (whose
# lock cargo install would hold against clippy and the build) or a temporary one (a run stopped
# halfway would leave it behind and the next one start from scratch): a stopped build resumes
# here, and a finished one removes it.
BERTH_CARGO_DENY_TARGET=${BERTH_CARGO_DENY_TARGET:-${TMPDIR:-/tmp}/berth-cargo-deny-target}
# Older than this, the check warns that the snapshot should be refreshed (it never fails on age).
BERTH_ADVISORY_MAX_AGE_DAYS=${BERTH_ADVISORY_MAX_AGE_DAYS:-90}

_BERTH_DENY_INSTALL_PID=""
_BERTH_DENY_INSTALL_LOG=""
_BERTH_DENY_INSTALL_START=0

_berth_cargo_deny_installed() {
    local version
    version=$(cargo deny --version 2>/dev/null) || return 1
    [[ $version == "cargo-deny $BERTH_CARGO_DENY_VERSION" ]]
}

# Starts `cargo install cargo-deny` in the background unless the pinned version is installed. Needs
# cargo and a C compiler (berth_prereqs). In its own session (setsid) so that
# berth_cargo_deny_install_stop can end it with every rustc it started; nice 19 so that it never
# slows down the build or the tests in the foreground.
berth_cargo_deny_install_start() {
    if _berth_cargo_deny_installed; then
        echo "==> cargo-deny $BERTH_CARGO_DENY_VERSION: installed"
        return 0
    fi
    _BERTH_DENY_INSTALL_LOG=$(mktemp /tmp/berth-cargo-deny-install.XXXXXX)
    echo "==> cargo-deny $BERTH_CARGO_DENY_VERSION: building from crates.io in the background" \
        "(log: $_BERTH_DENY_INSTALL_LOG)"
    setsid nice -n 19 env CARGO_TARGET_DIR="$BERTH_CARGO_DENY_TARGET" \
        cargo install cargo-deny --locked --version "$BERTH_CARGO_DENY_VERSION" \
        >"$_BERTH_DENY_INSTALL_LOG" 2>&1 </dev/null 9>&- &
    _BERTH_DENY_INSTALL_PID=$!
    _BERTH_DENY_INSTALL_START=$SECONDS
}

# Waits for the background install (or installs in the foreground if none was started and the
# pinned version is missing). Dies, with the end of the install's log, if it failed.
berth_cargo_deny_install_wait() {
    if [[ -z $_BERTH_DENY_INSTALL_PID ]]; then
        _berth_cargo_deny_installed && return 0
        berth_cargo_deny_install_start
    fi
    local pid=$_BERTH_DENY_INSTALL_PID rc=0
    if kill -0 "$pid" 2>/dev/null; then
        echo "==> cargo-deny: waiting for the background build (running for $((SECONDS - _BERTH_DENY_INSTALL_START))s)"
    fi
    wait "$pid" || rc=$?
    _BERTH_DENY_INSTALL_PID=""
    if [[ $rc -ne 0 ]]; then
        echo "==> cargo install cargo-deny failed (exit $rc); last lines of $_BERTH_DENY_INSTALL_LOG:" >&2
        tail -n 40 "$_BERTH_DENY_INSTALL_LOG" >&2 || true
        _berth_die "could not install cargo-deny $BERTH_CARGO_DENY_VERSION, so the dependency check did not run"
    fi
    _berth_cargo_deny_installed ||
        _berth_die "cargo install succeeded but \`cargo deny --version\` is not $BERTH_CARGO_DENY_VERSION (is \$CARGO_HOME/bin on PATH?)"
    echo "==> cargo-deny $BERTH_CARGO_DENY_VERSION: installed in $((SECONDS - _BERTH_DENY_INSTALL_START))s"
    rm -rf "$_BERTH_DENY_INSTALL_LOG" "$BERTH_CARGO_DENY_TARGET"
}

# Ends a background install that is still running (scripts/test calls this on exit, so that a run
# that failed early leaves no build behind).
berth_cargo_deny_install_stop() {
    local pid=$_BERTH_DENY_INSTALL_PID
    [[ -n $pid ]] || return 0
    _BERTH_DENY_INSTALL_PID=""
    if kill -0 "$pid" 2>/dev/null; then
        echo "==> cargo-deny: stopping the background build (pid $pid)" >&2
        # Its session's process group (setsid made pid its leader): cargo and its rustc processes.
        kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
        rm -f "$_BERTH_DENY_INSTALL_LOG"
    fi
}

# A value from the snapshot's SNAPSHOT file (key=value lines written by scripts/advisory-db).
_berth_advisory_snapshot_value() {
    local value
    value=$(sed -n "s/^$1=//p" "$BERTH_ADVISORY_SNAPSHOT/SNAPSHOT")
    [[ -n $value ]] || _berth_die "$BERTH_ADVISORY_SNAPSHOT/SNAPSHOT has no $1="
    echo "$value"
}

# Every crate Cargo.lock names must have been looked up when the snapshot was cut (CRATES):
# otherwise a new dependency would pass the advisory check only because its advisories were never
# copied.
_berth_advisory_snapshot_covers_lock() {
    [[ -f $BERTH_ADVISORY_SNAPSHOT/CRATES ]] || _berth_die "$BERTH_ADVISORY_SNAPSHOT/CRATES is missing"
    local missing
    missing=$(comm -23 \
        <(awk '/^\[\[package\]\]/ { p = 1; next } p && /^name = / { gsub(/"/, "", $3); print $3; p = 0 }' Cargo.lock | sort -u) \
        <(sort -u "$BERTH_ADVISORY_SNAPSHOT/CRATES"))
    if [[ -n $missing ]]; then
        _berth_die "the advisory snapshot ($BERTH_ADVISORY_SNAPSHOT) was not cut for these crates of" \
            "Cargo.lock: $(echo "$missing" | tr '\n' ' ')- refresh it with scripts/advisory-db" \
            "(docs/dependencies.md)"
    fi
}

# Lays the snapshot out under root $1 as cargo-deny 0.20 reads a database it may not fetch
# (src/advisories/helpers/db.rs, src/git.rs of cargo-deny): the directory
# <last segment of the URL>-<xxhash64 of the lowercased URL> for deny.toml's db-urls entry,
# holding crates/<name>/*.md, and .git/FETCH_HEAD, whose modification time cargo-deny takes as
# the time of the last fetch: here the time of the snapshot's commit, so that its staleness check
# measures the snapshot's real age (there is no git repository: the snapshot is plain files).
_berth_cargo_deny_db_layout() {
    local db="$1/advisory-db-3157b0e258782691" commit_date
    commit_date=$(_berth_advisory_snapshot_value commit_date) || exit 1
    mkdir -p "$db/.git" || _berth_die "cannot create $db"
    cp -R "$BERTH_ADVISORY_SNAPSHOT/crates" "$db/crates" || _berth_die "cannot copy the snapshot to $db"
    touch -d "$commit_date" "$db/.git/FETCH_HEAD" || _berth_die "bad commit_date in the snapshot: $commit_date"
}

# Prints where the snapshot comes from and how old it is; warns past BERTH_ADVISORY_MAX_AGE_DAYS.
_berth_advisory_snapshot_report() {
    local commit commit_date advisories age
    commit=$(_berth_advisory_snapshot_value commit) || exit 1
    commit_date=$(_berth_advisory_snapshot_value commit_date) || exit 1
    advisories=$(_berth_advisory_snapshot_value advisories) || exit 1
    local commit_epoch
    commit_epoch=$(date -d "$commit_date" +%s) || _berth_die "bad commit_date in the snapshot: $commit_date"
    age=$((($(date +%s) - commit_epoch) / 86400))
    echo "==> advisories: $advisories from rustsec/advisory-db ${commit:0:12} of $commit_date ($age days old)"
    if ((age > BERTH_ADVISORY_MAX_AGE_DAYS)); then
        echo "==> WARNING: the advisory snapshot is $age days old (more than $BERTH_ADVISORY_MAX_AGE_DAYS):" \
            "advisories published since are not checked; refresh it with scripts/advisory-db" \
            "(docs/dependencies.md)" >&2
    fi
}

# The check itself, with the pinned cargo-deny (installed or waited for first). Dies if anything
# is denied. `--full` first: print all of cargo-deny's output (scripts/deny); otherwise, when the
# check passes, only one line per warning and the summary (the inclusion graphs of the duplicate
# warnings run to a thousand lines), and everything when it fails. Other arguments go to
# `cargo deny check` (e.g. `advisories`, `licenses`).
berth_cargo_deny() {
    local full=0
    if [[ ${1:-} == --full ]]; then
        full=1
        shift
    fi
    berth_cargo_deny_install_wait
    [[ -f deny.toml && -f Cargo.lock ]] || _berth_die "berth_cargo_deny runs in the repository root"
    _berth_advisory_snapshot_covers_lock
    _berth_advisory_snapshot_report

    local root rc=0
    root=$(mktemp -d) || _berth_die "mktemp failed"
    _berth_cargo_deny_db_layout "$root"
    echo "==> cargo deny check $*"
    # --offline: neither the database nor anything else is fetched. --locked: Cargo.lock as it is.
    BERTH_ADVISORY_DBS=$root cargo deny --offline --locked check --show-stats "$@" \
        >"$root/output" 2>&1 || rc=$?
    if [[ $full == 1 || $rc -ne 0 ]]; then
        cat "$root/output"
    else
        grep -E '^(warning|error)\[|^ *[a-z]+ (ok|FAILED): ' "$root/output" || true
        echo "==> cargo deny: passed (details of the warnings: scripts/deny)"
    fi
    rm -rf "$root"
    if [[ $rc -ne 0 ]]; then
        _berth_die "cargo deny check failed (exit $rc): fix what it reports above, or ignore an advisory" \
            "in deny.toml with a reason and a row in docs/dependencies.md"
    fi
}
