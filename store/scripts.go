package store

import "github.com/redis/go-redis/v9"

// The Lua scripts below are all the broker runs against keys, so the Redis
// ACL of its user can be exact (see README "Sharing tokens across replicas").
// Scripts never trust what they find: a key of the wrong type counts as
// absent, and nothing they compare decides which token wins — the broker
// decides on sealed values it has opened, and a script only checks that
// Redis still holds what the broker read (compare and swap, by SHA-1).

// luaHelpers are shared by the scripts that read or swap an entry.
const luaHelpers = `
local function cur(k, kind, field)
  if redis.call('TYPE', k).ok ~= kind then return '' end
  if field then return redis.call('HGET', k, field) or '' end
  return redis.call('GET', k) or ''
end
local function digest(s)
  if s == '' then return '' end
  return redis.sha1hex(s)
end
`

// readScript returns an entry's fields and its tombstone:
// {v, fp, exp, iat, tombstone}, each "" when absent or not of the right type.
var readScript = redis.NewScript(`
local v, fp, exp, iat, t = '', '', '', '', ''
if redis.call('TYPE', KEYS[1]).ok == 'hash' then
  local f = redis.call('HMGET', KEYS[1], 'v', 'fp', 'exp', 'iat')
  v, fp, exp, iat = f[1] or '', f[2] or '', f[3] or '', f[4] or ''
end
if redis.call('TYPE', KEYS[2]).ok == 'string' then t = redis.call('GET', KEYS[2]) or '' end
return {v, fp, exp, iat, t}`)

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
