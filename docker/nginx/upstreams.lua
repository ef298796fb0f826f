-- The replicas behind an upstream, changed in place: no reload.
--
-- A reload makes the old workers close every idle client keep-alive
-- connection, and a client that sends on one at that moment gets no answer
-- (a POST is not retried by clients). So the set of replicas is not in
-- nginx.conf: entrypoint.sh resolves the service name and writes one
-- "address:port" a line to PEERS_DIR/<name>, and each worker re-reads that
-- file at most once a second, from the request path. Client connections and
-- the pooled connections to the replicas (the upstream's `keepalive`) stay
-- open across a rolling update, a scale or a replaced replica.
--
-- As nginx's round robin with `max_fails=1 fail_timeout=5s`: requests go to
-- the replicas in turn; a replica that failed a try (connection refused or
-- reset, timeout) is skipped for FAIL_TIMEOUT seconds, unless every replica
-- is; a retry (proxy_next_upstream) goes to a replica not tried yet.
local balancer = require("ngx.balancer")

local FAIL_TIMEOUT = 5
local RELOAD_EVERY = 1

local M = {}

local peers_dir = nil
local sets = {} -- name -> {peers = {{host, port, key}...}, read_at, text}
local failed_until = {} -- "host:port" -> ngx.now() before which it is skipped
local turn = {} -- name -> the round robin's position

function M.init(dir)
    peers_dir = dir
end

local function parse(text)
    local peers = {}
    for line in text:gmatch("[^\r\n]+") do
        local host, port = line:match("^%s*([%d%.]+):(%d+)%s*$")
        if host then
            peers[#peers + 1] = { host, tonumber(port), host .. ":" .. port }
        end
    end
    return peers
end

local function current(name)
    local now = ngx.now()
    local set = sets[name]
    if set and now - set.read_at < RELOAD_EVERY then
        return set.peers
    end
    local file = io.open(peers_dir .. "/" .. name, "r")
    if not file then
        -- Not written yet, or removed: keep what was known.
        if set then
            set.read_at = now
            return set.peers
        end
        return {}
    end
    local text = file:read("*a") or ""
    file:close()
    if set and set.text == text then
        set.read_at = now
        return set.peers
    end
    local peers = parse(text)
    if #peers == 0 and set then
        -- An empty file (the name resolved to nothing for a moment) does not
        -- take every replica away: the tries find out which still answer.
        set.read_at = now
        return set.peers
    end
    sets[name] = { peers = peers, read_at = now, text = text }
    return peers
end

-- The next replica in turn that this request has not tried, preferring those
-- not failed recently.
local function pick(name, peers, tried)
    local now = ngx.now()
    local count = #peers
    local start = (turn[name] or 0) % count
    local fallback = nil
    for i = 0, count - 1 do
        local index = (start + i) % count + 1
        local peer = peers[index]
        if not tried[peer[3]] then
            if (failed_until[peer[3]] or 0) <= now then
                turn[name] = index
                return peer
            end
            fallback = fallback or peer
        end
    end
    turn[name] = start + 1
    return fallback
end

function M.balance(name)
    local peers = current(name)
    local ctx = ngx.ctx
    local tried = ctx.upstream_tried
    if tried == nil then
        tried = {}
        ctx.upstream_tried = tried
        if #peers > 1 then
            -- proxy_next_upstream_tries still caps the total.
            balancer.set_more_tries(#peers - 1)
        end
    elseif ctx.upstream_last then
        -- Called again: the last try failed.
        failed_until[ctx.upstream_last] = ngx.now() + FAIL_TIMEOUT
    end
    if #peers == 0 then
        ngx.log(ngx.ERR, "no address for upstream ", name, " in ", peers_dir)
        return ngx.exit(502)
    end
    local peer = pick(name, peers, tried)
    if peer == nil then
        return ngx.exit(502)
    end
    tried[peer[3]] = true
    ctx.upstream_last = peer[3]
    local ok, err = balancer.set_current_peer(peer[1], peer[2])
    if not ok then
        ngx.log(ngx.ERR, "upstream ", name, ": cannot use ", peer[3], ": ", err)
        return ngx.exit(502)
    end
end

return M
