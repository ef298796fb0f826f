-- The replicas behind an upstream, changed in place: no reload.
--
-- A reload makes the old workers close every idle client keep-alive
-- connection, and a client that sends on one at that moment gets no answer
-- (a POST is not retried by clients). So the set of replicas is not in
-- nginx.conf: entrypoint.sh resolves the service name and writes one
-- "address:port" a line to CONF_DIR/peers/<name>, and each worker re-reads that
-- file at most once a second, from the request path. Client connections and
-- the pooled connections to the replicas (the upstream's `keepalive`) stay
-- open across a rolling update, a scale or a replaced replica.
--
-- The canary's share of requests (make stack-canary) is read the same way,
-- from CONF_DIR/canary.share ("PERCENT STICKY", canary.sh writes it), so a
-- change of weight does not reload nginx either.
--
-- As nginx's round robin with `max_fails=1 fail_timeout=5s`: requests go to
-- the replicas in turn; a replica that failed a try (connection refused or
-- reset, timeout) is skipped for FAIL_TIMEOUT seconds, unless every replica
-- is; a retry (proxy_next_upstream) goes to a replica not tried yet.
local balancer = require("ngx.balancer")

local FAIL_TIMEOUT = 5
local RELOAD_EVERY = 1

local M = {}

local conf_dir = nil
local files = {} -- path -> {value, read_at, text}
local failed_until = {} -- "host:port" -> ngx.now() before which it is skipped
local turn = {} -- name -> the round robin's position

function M.init(dir)
    conf_dir = dir
end

local function parse_peers(text)
    local peers = {}
    for line in text:gmatch("[^\r\n]+") do
        local host, port = line:match("^%s*([%d%.]+):(%d+)%s*$")
        if host then
            peers[#peers + 1] = { host, tonumber(port), host .. ":" .. port }
        end
    end
    if #peers == 0 then
        return nil
    end
    return peers
end

local function parse_share(text)
    local percent, sticky = text:match("^%s*(%d+)%s+([01])%s*$")
    if not percent or tonumber(percent) > 100 then
        return nil
    end
    return { percent = tonumber(percent), sticky = sticky == "1" }
end

-- The file's value, re-read at most once every RELOAD_EVERY seconds. A file
-- missing or holding nothing usable keeps the last value (an address set
-- that resolved to nothing for a moment does not take every replica away),
-- else `default`.
local function cached(path, parse, default)
    local now = ngx.now()
    local entry = files[path]
    if entry and now - entry.read_at < RELOAD_EVERY then
        return entry.value
    end
    local file = io.open(path, "r")
    local text = file and file:read("*a") or nil
    if file then
        file:close()
    end
    -- Nothing new to parse (no file, the same text) or nothing usable in it.
    local value = text and text ~= (entry and entry.text) and parse(text) or nil
    if value == nil then
        if entry then
            entry.read_at = now
            return entry.value
        end
        value = default
    end
    files[path] = { value = value, read_at = now, text = text }
    return value
end

local NO_PEERS = {}
local NO_CANARY = { percent = 0, sticky = false }

local function current(name)
    return cached(conf_dir .. "/peers/" .. name, parse_peers, NO_PEERS)
end

-- $ml_api_upstream: the upstream this request goes to. PERCENT % of requests
-- go to the canary, split on nginx's random request id, or with STICKY on
-- the API key (Authorization / X-API-Key), so a client stays on one side.
function M.side()
    local share = cached(conf_dir .. "/canary.share", parse_share, NO_CANARY)
    if share.percent == 0 then
        return "ml_api"
    end
    local key
    if share.sticky then
        key = (ngx.var.http_authorization or "") .. (ngx.var.http_x_api_key or "")
    else
        key = ngx.var.request_id
    end
    if ngx.crc32_long(key) % 100 < share.percent then
        return "ml_api_canary"
    end
    return "ml_api"
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
        ngx.log(ngx.ERR, "no address for upstream ", name, " in ", conf_dir, "/peers")
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
