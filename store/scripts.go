package store

import (
	"strconv"

	"github.com/redis/go-redis/v9"
)

// The Lua scripts below are all the broker runs against keys, so the Redis
// ACL of its user can be exact (see README "Sharing tokens across replicas").
// Scripts never trust what they find: a key of the wrong type counts as
// absent, and nothing they compare decides which token wins — the broker
// decides on sealed values it has opened, and a script only checks that
// Redis still holds what the broker read (compare and swap, by SHA-1).

// maxStoredValue bounds each value the scripts read (a field of an entry's
// hash, a tombstone): one larger is treated as absent, like a value of the
// wrong type, and replaced by the next valid token. No value the broker
// writes comes near it (a token response is at most 1 MiB, and its sealed
// record at most a few times that); without it, one huge value planted in
// Redis was read in full on every miss, outlasted the read timeout, and
// marked Redis down for every key.
const maxStoredValue = 8 << 20

// luaHelpers are shared by the scripts: cur reads a value that is of the
// right type and within maxStoredValue, else ”; digest hashes it.
var luaHelpers = `
local MAX = ` + strconv.Itoa(maxStoredValue) + `
local function cur(k, kind, field)
  if redis.call('TYPE', k).ok ~= kind then return '' end
  if field then
    if redis.call('HSTRLEN', k, field) > MAX then return '' end
    return redis.call('HGET', k, field) or ''
  end
  if redis.call('STRLEN', k) > MAX then return '' end
  return redis.call('GET', k) or ''
end
local function digest(s)
  if s == '' then return '' end
  return redis.sha1hex(s)
end
`

// readScript returns an entry's fields and its tombstone:
// {v, fp, exp, iat, tombstone}, each "" when absent, not of the right type,
// or larger than maxStoredValue.
var readScript = redis.NewScript(luaHelpers + `
return {cur(KEYS[1], 'hash', 'v'), cur(KEYS[1], 'hash', 'fp'), cur(KEYS[1], 'hash', 'exp'),
  cur(KEYS[1], 'hash', 'iat'), cur(KEYS[2], 'string')}`)

// swapScript replaces the entry if Redis still holds what the broker read
// (ARGV[1], ARGV[2]: SHA-1 of the sealed entry and tombstone, "" for none);
// otherwise it returns -1 and the broker reads again.
var swapScript = redis.NewScript(luaHelpers + `
if digest(cur(KEYS[1], 'hash', 'v')) ~= ARGV[1] or digest(cur(KEYS[2], 'string')) ~= ARGV[2] then return -1 end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'v', ARGV[3], 'fp', ARGV[4], 'exp', ARGV[5], 'iat', ARGV[6])
redis.call('PEXPIRE', KEYS[1], ARGV[7])
return 1`)

// buryScript deletes the entry and, when ARGV[3] is set, writes the
// tombstone with a TTL of ARGV[4] ms, if Redis still holds what the broker
// read; otherwise it returns -1.
var buryScript = redis.NewScript(luaHelpers + `
if digest(cur(KEYS[1], 'hash', 'v')) ~= ARGV[1] or digest(cur(KEYS[2], 'string')) ~= ARGV[2] then return -1 end
redis.call('DEL', KEYS[1])
if ARGV[3] ~= '' then
  redis.call('DEL', KEYS[2])
  redis.call('SET', KEYS[2], ARGV[3], 'PX', ARGV[4])
end
return 1`)

// lockScript takes the lease KEYS[1] for owner ARGV[1] for ARGV[2] ms, the
// lease bound. It returns 1 when taken, 0 when another owner holds a lease
// within the bound, and 2 when it broke a stale lease: one without a TTL,
// with a TTL above the bound, or not a string — no replica sets such a lease,
// so it was left by someone else and would stall every replica.
var lockScript = redis.NewScript(`
local t = redis.call('TYPE', KEYS[1]).ok
if t == 'none' then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
if t == 'string' then
  local ttl = redis.call('PTTL', KEYS[1])
  if ttl >= 0 and ttl <= tonumber(ARGV[2]) then return 0 end
end
redis.call('DEL', KEYS[1])
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 2`)

// unlockScript releases the lease if owner ARGV[1] still holds it.
var unlockScript = redis.NewScript(`
if redis.call('TYPE', KEYS[1]).ok == 'string' and redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0`)
