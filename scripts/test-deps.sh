#!/usr/bin/env bash
# Installs what the test suite's real services need: Redis and PostgreSQL from Debian, and the
# Apache Kafka jars that pom.xml names into .cache/kafka/libs. Idempotent and quick when all is
# there. It never fails because something cannot be installed here (a laptop without root or
# Java): it says what it skipped, and the tests that need it skip (or fail in CI).
set -uo pipefail

cd "$(dirname "$0")/.."

skipped() { echo "test-deps: skipped $1"; }

apt_wait() {
    # Another apt/dpkg run (e.g. unattended upgrades) holds the lock: wait for it, up to 10 min.
    local waited=0
    while fuser /var/lib/dpkg/lock-frontend /var/lib/dpkg/lock /var/lib/apt/lists/lock \
            >/dev/null 2>&1; do
        if ((waited == 0)); then echo "test-deps: waiting for another apt run to finish"; fi
        if ((waited >= 600)); then return 1; fi
        sleep 2
        waited=$((waited + 2))
    done
}

install_debian_packages() {
    local missing=()
    command -v redis-server >/dev/null || missing+=(redis-server)
    command -v initdb >/dev/null || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 \
        || missing+=(postgresql)
    ((${#missing[@]})) || return 0
    if [[ $EUID -ne 0 ]] || ! command -v apt-get >/dev/null; then
        skipped "${missing[*]}: needs root and apt-get; install them with your package manager"
        return 0
    fi
    apt_wait || { skipped "${missing[*]}: apt is locked by another process"; return 0; }
    export DEBIAN_FRONTEND=noninteractive
    # Try the install first; refresh the package lists only if that fails (fresh containers).
    if ! apt-get install -y --no-install-recommends "${missing[@]}" >/dev/null 2>&1; then
        apt_wait && apt-get update -qq >/dev/null 2>&1
        apt_wait && apt-get install -y --no-install-recommends "${missing[@]}" >/dev/null \
            || { skipped "${missing[*]}: apt-get install failed"; return 0; }
    fi
    echo "test-deps: installed ${missing[*]}"
}

fetch_kafka_jars() {
    local libs=.cache/kafka/libs stamp=.cache/kafka/libs/.pom.sha256 want
    if ! command -v java >/dev/null || ! command -v mvn >/dev/null; then
        skipped "Kafka jars: needs java (17+) and mvn on PATH"
        return 0
    fi
    want=$(sha256sum pom.xml | cut -d' ' -f1)
    [[ -f $stamp && $(cat "$stamp") == "$want" ]] && return 0
    # A changed pom may drop or replace jars: start from an empty folder, stamp only on success.
    rm -rf "$libs"
    if mvn -q -B -Dstyle.color=never dependency:copy-dependencies -DoutputDirectory="$libs" -DincludeScope=runtime; then
        echo "$want" >"$stamp"
        echo "test-deps: fetched Kafka jars into $libs"
    else
        rm -rf "$libs"
        skipped "Kafka jars: mvn could not fetch them (offline?)"
    fi
}

install_debian_packages
fetch_kafka_jars
exit 0
