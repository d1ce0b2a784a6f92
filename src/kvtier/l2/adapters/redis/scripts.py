"""The Lua scripts of the Redis adapter: its accounting (bytes used, sizes, recency) is updated atomically on the
server, next to the records. See :mod:`kvtier.l2.adapters.redis.adapter` for the layout of the keys they touch."""

# KEYS: used, sizes, lru, clock. ARGV: capacity (-1: none), local (1: records share this node, 0: a cluster),
# n, then n pairs (record key, size). Accounts the records the same pipeline just SET (on one node: those that
# landed; a cluster script may not touch keys of other slots, and it runs only after every SET succeeded), then
# evicts least recently used records (never one of this batch) until the bound holds (one node only).
# Returns {records evicted, bytes used}.
ACCOUNT_SCRIPT = """
local used_k, sizes_k, lru_k, clock_k = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local cap = tonumber(ARGV[1])
local here = ARGV[2] == '1'
local n = tonumber(ARGV[3])
local clock = redis.call('INCRBY', clock_k, n) - n
local batch = {}
for i = 0, n - 1 do
  local key, size = ARGV[4 + 2 * i], tonumber(ARGV[5 + 2 * i])
  local old = redis.call('HGET', sizes_k, key)
  if old then redis.call('DECRBY', used_k, old) end
  if not here or redis.call('EXISTS', key) == 1 then
    redis.call('HSET', sizes_k, key, size)
    redis.call('INCRBY', used_k, size)
    redis.call('ZADD', lru_k, clock + i + 1, key)
    batch[key] = true
  elseif old then
    redis.call('HDEL', sizes_k, key)
    redis.call('ZREM', lru_k, key)
  end
end
local evicted = 0
if cap >= 0 and here then
  while tonumber(redis.call('GET', used_k) or '0') > cap do
    local victim = redis.call('ZRANGE', lru_k, 0, 0)[1]
    if not victim or batch[victim] then break end
    redis.call('ZREM', lru_k, victim)
    local size = redis.call('HGET', sizes_k, victim)
    if size then
      redis.call('HDEL', sizes_k, victim)
      redis.call('DECRBY', used_k, size)
    end
    redis.call('UNLINK', victim)
    evicted = evicted + 1
  end
end
return {evicted, tonumber(redis.call('GET', used_k) or '0')}
"""

# KEYS: used, sizes, lru. ARGV: unlink (1: delete the records too, 0: only their accounting, as a cluster must),
# then record keys. Returns the bytes used.
DELETE_SCRIPT = """
local used_k, sizes_k, lru_k = KEYS[1], KEYS[2], KEYS[3]
local unlink = ARGV[1] == '1'
for i = 2, #ARGV do
  local key = ARGV[i]
  if unlink then redis.call('UNLINK', key) end
  local size = redis.call('HGET', sizes_k, key)
  if size then
    redis.call('HDEL', sizes_k, key)
    redis.call('DECRBY', used_k, size)
  end
  redis.call('ZREM', lru_k, key)
end
return tonumber(redis.call('GET', used_k) or '0')
"""

# KEYS: used, sizes, lru, clock. ARGV: record keys just loaded. A present record becomes the most recently used;
# the accounting of an absent one (evicted by the server's own policy, deleted by hand) is dropped. Returns the
# bytes used.
TOUCH_SCRIPT = """
local used_k, sizes_k, lru_k, clock_k = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local clock = redis.call('INCRBY', clock_k, #ARGV) - #ARGV
for i, key in ipairs(ARGV) do
  if redis.call('EXISTS', key) == 1 then
    redis.call('ZADD', lru_k, 'XX', clock + i, key)
  else
    local size = redis.call('HGET', sizes_k, key)
    if size then
      redis.call('HDEL', sizes_k, key)
      redis.call('DECRBY', used_k, size)
      redis.call('ZREM', lru_k, key)
    end
  end
end
return tonumber(redis.call('GET', used_k) or '0')
"""
