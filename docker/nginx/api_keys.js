// Which rate-limit bucket a request falls in, from the API keys file the
// service also reads (service/auth/keyfile.py: "<key id> <sha256 hex>" per line).
//
//   "key:<id>"   a key in the file: limited per key id, wherever it comes from
//   "anonymous"  keys are required (AUTH=keys) but this request has none that
//                is valid, or the file cannot be trusted right now: a small
//                per-address limit, so a flood of bad keys cannot tie up the
//                service
//   "open"       AUTH=off (the service runs open): per address
//
// As in the service, whether keys are required is configuration ($api_auth,
// rendered from AUTH), never the file's content: a missing, empty or cut file
// is a write in progress, not "no keys". The service stays the authority (it
// answers 401); this only picks the bucket. The file is read on every request
// it classifies: it is a few lines in the page cache, and an added or revoked
// key counts at once. njs keeps nothing between requests, so unlike the
// service it cannot fall back on the keys it read before.
// njs 0.7 (Debian bookworm) and later.

var fs = require('fs');
var crypto = require('crypto');

var END_MARKER = '# end of ml-api API keys';
var STABLE_READ_ATTEMPTS = 5;

// The content as two consecutive reads agree on it, or null.
function stableText(path) {
    try {
        var previous = fs.readFileSync(path, 'utf8');
        for (var i = 0; i < STABLE_READ_ATTEMPTS; i++) {
            var current = fs.readFileSync(path, 'utf8');
            if (current === previous) {
                return current;
            }
            previous = current;
        }
    } catch (e) {
        return null;
    }
    return null;
}

// [[id, digest], ...] of a complete file, or null (service.auth.keyfile.read_complete).
function storedKeys(path) {
    var text = stableText(path);
    if (text === null) {
        return null;
    }
    var marked = text.endsWith(END_MARKER + '\n');
    if (text.split(END_MARKER).length - 1 > (marked ? 1 : 0)) {
        return null;
    }
    var keys = [];
    var lines = text.split('\n');
    for (var i = 0; i < lines.length; i++) {
        var line = lines[i].trim();
        if (line === '' || line[0] === '#') {
            continue;
        }
        var fields = line.split(/\s+/);
        if (fields.length !== 2 || !/^[0-9a-f]{64}$/.test(fields[1])) {
            return null;
        }
        keys.push(fields);
    }
    return keys.length === 0 && !marked ? null : keys;
}

// The same rule as service.auth.middleware.presented_key: Bearer wins; another scheme
// falls through to X-API-Key.
function presentedKey(r) {
    var authorization = r.headersIn['Authorization'];
    var apiKey = r.headersIn['X-API-Key'];
    if (authorization !== undefined) {
        var text = authorization.trim();
        var space = text.indexOf(' ');
        var scheme = space < 0 ? text : text.slice(0, space);
        var token = space < 0 ? '' : text.slice(space + 1).trim();
        if (scheme.toLowerCase() === 'bearer') {
            return token && token.indexOf(' ') < 0 ? token : null;
        }
        if (apiKey === undefined) {
            return null;
        }
    }
    if (apiKey !== undefined) {
        apiKey = apiKey.trim();
        return apiKey && apiKey.indexOf(' ') < 0 ? apiKey : null;
    }
    return null;
}

function keyClass(r) {
    if (r.variables.api_auth !== 'keys') {
        return 'open';
    }
    var key = presentedKey(r);
    if (!key) {
        return 'anonymous';
    }
    var keys = storedKeys(r.variables.api_keys_file);
    if (keys === null) {
        return 'anonymous';
    }
    var digest = crypto.createHash('sha256').update(key).digest('hex');
    for (var i = 0; i < keys.length; i++) {
        if (keys[i][1] === digest) {
            return 'key:' + keys[i][0];
        }
    }
    return 'anonymous';
}

export default { keyClass };
