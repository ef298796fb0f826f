// Which rate-limit bucket a request falls in, from the API keys file the
// service also reads (service/auth/keyfile.py: "<key id> <sha256 hex>" per line).
//
//   "key:<id>"   a key in the file: limited per key id, wherever it comes from
//   "anonymous"  keys are configured but this request has none that is valid:
//                a small per-address limit, so a flood of bad keys cannot tie
//                up the service
//   "open"       no keys configured (the service runs open): per address
//
// The service stays the authority (it answers 401); this only picks the
// bucket. The file is read on every request it classifies: it is a few lines
// in the page cache, and an added or revoked key counts at once.
// njs 0.7 (Debian bookworm) and later.

var fs = require('fs');
var crypto = require('crypto');

function storedKeys(path) {
    var text;
    try {
        text = fs.readFileSync(path, 'utf8');
    } catch (e) {
        return [];
    }
    var keys = [];
    var lines = text.split('\n');
    for (var i = 0; i < lines.length; i++) {
        var fields = lines[i].trim().split(/\s+/);
        if (fields.length === 2 && fields[0][0] !== '#' && /^[0-9a-f]{64}$/.test(fields[1])) {
            keys.push(fields);
        }
    }
    return keys;
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
    var keys = storedKeys(r.variables.api_keys_file);
    if (keys.length === 0) {
        return 'open';
    }
    var key = presentedKey(r);
    if (!key) {
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
