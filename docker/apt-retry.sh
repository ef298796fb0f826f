# Sourced by the container scripts. apt may be busy with another install on a
# shared machine: wait for its locks instead of failing. Callers define log().
apt_() {
    local i
    for i in $(seq 1 60); do
        if DEBIAN_FRONTEND=noninteractive "$@" -o DPkg::Lock::Timeout=120; then return 0; fi
        log "apt busy or failed (try $i); retrying in 5 s"; sleep 5
    done
    return 1
}
