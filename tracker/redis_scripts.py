"""Lua scripts for the Redis backend: each state change is one script, so it is atomic.

Why Lua rather than WATCH/MULTI: a lease claim reads every lease of a blob and
writes some; under contention from many trackers an optimistic transaction
would retry over and over, while a script runs once and serialises for free.
Time comes from Redis (`TIME`), not from the tracker hosts, so two trackers
with skewed clocks still agree on when a lease expires.

Key layout (P = prefix; digest and node ids are validated, so no separators leak in):
  P:blob:<digest>        hash  size seg piece ver, m<i> metainfo, n<i> publisher, h<i> info-hash
  P:lease:<digest>       hash  <i> -> "<node> <expires-ms>"
  P:holders:<digest>     hash  <node> -> "*" | "0,3,5"
  P:nodes                zset  node -> liveness expiry (ms)
  P:node:<node>          msgpack Node (host, port, http, labels)
  P:nodeblobs:<node>     set   digests the node holds (to drop them when it leaves or dies)
  P:nodeleases:<node>    set   digests the node leased (to release them when it leaves)
  P:fetchers:<digest>    set   nodes downloading the blob (swarm peers without whole segments)
  P:nodefetch:<node>     set   digests the node downloads (replaced by every announce)
  P:blobs                zset  digest -> last use (ms), for the blobs gauge
  P:ev:<digest>          pub/sub channel, message = new version
Keys are built inside the scripts, so this needs standalone Redis (or
Sentinel), not Redis Cluster.
"""

from __future__ import annotations

_PRELUDE = r"""
local P = ARGV[1]
local function k(kind, id) return P .. ':' .. kind .. ':' .. id end
local function num(x) return string.format('%.0f', x) end
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function segment_count(blob)
  local f = redis.call('HMGET', blob, 'size', 'seg')
  local size, seg = tonumber(f[1]), tonumber(f[2])
  return math.floor((size + seg - 1) / seg)
end
local function split_lease(v)
  local sp = string.find(v, ' ', 1, true)
  return string.sub(v, 1, sp - 1), tonumber(string.sub(v, sp + 1))
end
local function parse_set(s)
  local out = {}
  for x in string.gmatch(s, '%d+') do out[#out + 1] = tonumber(x) end
  return out
end
local function touch(blob, digest, blob_ttl, now)
  redis.call('PEXPIRE', blob, num(blob_ttl))
  redis.call('ZADD', P .. ':blobs', num(now), digest)
end
local function out_of_range(list, n)
  for _, i in ipairs(list) do if i >= n then return {-1, i, n} end end
  return nil
end
local function unfetch(node)
  local nf = k('nodefetch', node)
  for _, d in ipairs(redis.call('SMEMBERS', nf)) do redis.call('SREM', k('fetchers', d), node) end
  redis.call('DEL', nf)
end
local function forget(node)
  local nb = k('nodeblobs', node)
  for _, d in ipairs(redis.call('SMEMBERS', nb)) do redis.call('HDEL', k('holders', d), node) end
  unfetch(node)
  redis.call('DEL', nb, k('node', node))
  return redis.call('ZREM', P .. ':nodes', node)
end
"""

# ARGV: P, digest, size, seg, piece, blob_ttl_ms  -> 1 if created, 0 if it existed
REGISTER = _PRELUDE + r"""
local blob = k('blob', ARGV[2])
local created = 0
if redis.call('EXISTS', blob) == 0 then
  redis.call('HSET', blob, 'size', ARGV[3], 'seg', ARGV[4], 'piece', ARGV[5], 'ver', 0)
  created = 1
end
touch(blob, ARGV[2], tonumber(ARGV[6]), now_ms())
return created
"""

# ARGV: P, digest, blob_ttl_ms  -> flat HGETALL (empty if unknown)
GET = _PRELUDE + r"""
local blob = k('blob', ARGV[2])
local flat = redis.call('HGETALL', blob)
if #flat > 0 then touch(blob, ARGV[2], tonumber(ARGV[3]), now_ms()) end
return flat
"""

# ARGV: P, digest, node, lease_ttl_ms, count, blob_ttl_ms, want ("*" or "3,1,2" in priority order),
#       lease limit per blob (0 = none)
# -> false | {-1, i, n} | {1, granted, renewed, reclaimed, {{i, holder}...}, version,
#     ms until the soonest of other nodes' live leases ends (-1: none)}
CLAIM = _PRELUDE + r"""
local digest, node = ARGV[2], ARGV[3]
local ttl, count, blob_ttl = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local blob, lkey = k('blob', digest), k('lease', digest)
if redis.call('EXISTS', blob) == 0 then return false end
local n = segment_count(blob)
local want = {}
if ARGV[7] == '*' then
  for i = 0, n - 1 do want[#want + 1] = i end
else
  want = parse_set(ARGV[7])
  local bad = out_of_range(want, n)
  if bad then return bad end
end
local now = now_ms()
local lease = {}
local flat = redis.call('HGETALL', lkey)
for j = 1, #flat, 2 do lease[tonumber(flat[j])] = flat[j + 1] end
local function published(i) return redis.call('HEXISTS', blob, 'h' .. i) == 1 end
local granted, renewed, reclaimed, mine = {}, {}, {}, {}
for _, i in ipairs(want) do
  local v = lease[i]
  if v and not mine[i] and not published(i) and split_lease(v) == node then
    redis.call('HSET', lkey, i, node .. ' ' .. num(now + ttl))
    granted[#granted + 1] = i; renewed[#renewed + 1] = i; mine[i] = true
  end
end
local limit, others, soonest = tonumber(ARGV[8]), 0, -1
for i, v in pairs(lease) do
  local holder, exp = split_lease(v)
  if holder ~= node and exp > now and not published(i) then
    others = others + 1
    if soonest < 0 or exp - now < soonest then soonest = exp - now end
  end
end
for _, i in ipairs(want) do
  if #granted >= count or (limit > 0 and others + #granted >= limit) then break end
  if not mine[i] and not published(i) then
    local v = lease[i]
    local free, expired = true, false
    if v then
      local holder, exp = split_lease(v)
      if holder == node or exp > now then free = false else expired = true end
    end
    if free then
      redis.call('HSET', lkey, i, node .. ' ' .. num(now + ttl))
      granted[#granted + 1] = i; mine[i] = true
      if expired then reclaimed[#reclaimed + 1] = i end
    end
  end
end
local holders = {}
for i, v in pairs(lease) do
  if not mine[i] then
    local holder, exp = split_lease(v)
    if exp > now and not published(i) then holders[#holders + 1] = {i, holder} end
  end
end
if #granted > 0 then
  local nl = k('nodeleases', node)
  redis.call('SADD', nl, digest)
  redis.call('PEXPIRE', nl, num(blob_ttl))
  redis.call('PEXPIRE', lkey, num(blob_ttl))
end
touch(blob, digest, blob_ttl, now)
return {1, granted, renewed, reclaimed, holders, tonumber(redis.call('HGET', blob, 'ver')), soonest}
"""

# ARGV: P, digest, node, lease_ttl_ms, segments "1,2"  -> false | {-1,i,n} | {1, renewed, lost}
RENEW = _PRELUDE + r"""
local digest, node, ttl = ARGV[2], ARGV[3], tonumber(ARGV[4])
local blob, lkey = k('blob', digest), k('lease', digest)
if redis.call('EXISTS', blob) == 0 then return false end
local segs = parse_set(ARGV[5])
local bad = out_of_range(segs, segment_count(blob))
if bad then return bad end
local now = now_ms()
local renewed, lost = {}, {}
for _, i in ipairs(segs) do
  local v = redis.call('HGET', lkey, i)
  if v and split_lease(v) == node and redis.call('HEXISTS', blob, 'h' .. i) == 0 then
    redis.call('HSET', lkey, i, node .. ' ' .. num(now + ttl))
    renewed[#renewed + 1] = i
  else
    lost[#lost + 1] = i
  end
end
return {1, renewed, lost}
"""

# ARGV: P, digest, node, segments ("*" = all of the caller's)  -> false | {-1,i,n} | {1, released}
RELEASE = _PRELUDE + r"""
local digest, node = ARGV[2], ARGV[3]
local blob, lkey = k('blob', digest), k('lease', digest)
if redis.call('EXISTS', blob) == 0 then return false end
local segs = {}
if ARGV[4] == '*' then
  local flat = redis.call('HGETALL', lkey)
  for j = 1, #flat, 2 do segs[#segs + 1] = tonumber(flat[j]) end
else
  segs = parse_set(ARGV[4])
  local bad = out_of_range(segs, segment_count(blob))
  if bad then return bad end
end
local released = {}
for _, i in ipairs(segs) do
  local v = redis.call('HGET', lkey, i)
  if v and split_lease(v) == node then
    redis.call('HDEL', lkey, i)
    released[#released + 1] = i
  end
end
return {1, released}
"""

# ARGV: P, digest, index, node, metainfo, info_hash, blob_ttl_ms, announce_ttl_ms
# -> false | {-1,i,n} | {1, version} published | {2} same bytes already | {3, current_hash} conflict
PUBLISH = _PRELUDE + r"""
local digest, node = ARGV[2], ARGV[4]
local blob = k('blob', digest)
if redis.call('EXISTS', blob) == 0 then return false end
local n, i = segment_count(blob), tonumber(ARGV[3])
if i >= n then return {-1, i, n} end
local cur = redis.call('HGET', blob, 'h' .. i)
if cur then
  if cur == ARGV[6] then return {2} end
  return {3, cur}
end
redis.call('HSET', blob, 'm' .. i, ARGV[5], 'n' .. i, node, 'h' .. i, ARGV[6])
local ver = redis.call('HINCRBY', blob, 'ver', 1)
redis.call('HDEL', k('lease', digest), i)
local hkey = k('holders', digest)
local h = redis.call('HGET', hkey, node)
if h ~= '*' then
  local set, seen = {}, {}
  if h then
    for _, x in ipairs(parse_set(h)) do
      if not seen[x] then seen[x] = true; set[#set + 1] = x end
    end
  end
  if not seen[i] then set[#set + 1] = i end
  if #set >= n then h = '*' else table.sort(set); h = table.concat(set, ',') end
  redis.call('HSET', hkey, node, h)
end
local nb = k('nodeblobs', node)
redis.call('SADD', nb, digest)
if redis.call('PTTL', nb) < 0 then redis.call('PEXPIRE', nb, num(2 * tonumber(ARGV[8]))) end
touch(blob, digest, tonumber(ARGV[7]), now_ms())
redis.call('PUBLISH', k('ev', digest), ver)
return {1, ver}
"""

# ARGV: P, digest, index, expected info_hash or ""
# -> false | {-1,i,n} | {1, version} withdrawn | {2} was not published | {3, current_hash}
WITHDRAW = _PRELUDE + r"""
local digest = ARGV[2]
local blob = k('blob', digest)
if redis.call('EXISTS', blob) == 0 then return false end
local n, i = segment_count(blob), tonumber(ARGV[3])
if i >= n then return {-1, i, n} end
local cur = redis.call('HGET', blob, 'h' .. i)
if not cur then return {2} end
if ARGV[4] ~= '' and cur ~= ARGV[4] then return {3, cur} end
redis.call('HDEL', blob, 'm' .. i, 'n' .. i, 'h' .. i)
local ver = redis.call('HINCRBY', blob, 'ver', 1)
local hkey = k('holders', digest)
local flat = redis.call('HGETALL', hkey)
for j = 1, #flat, 2 do
  local node, h = flat[j], flat[j + 1]
  local set = {}
  if h == '*' then
    for x = 0, n - 1 do if x ~= i then set[#set + 1] = x end end
  else
    for _, x in ipairs(parse_set(h)) do if x ~= i then set[#set + 1] = x end end
  end
  if #set == 0 then redis.call('HDEL', hkey, node)
  else redis.call('HSET', hkey, node, table.concat(set, ',')) end
end
redis.call('PUBLISH', k('ev', digest), ver)
return {1, ver}
"""

# ARGV: P, node, info, announce_ttl_ms, full "0"/"1", nblobs, nremoved,
#       (digest, holding) * nblobs, removed digest * nremoved, fetching digests...
# -> 1 if the node must resync (was not live and this was not a full announce), else 0
ANNOUNCE = _PRELUDE + r"""
local node, ttl, full = ARGV[2], tonumber(ARGV[4]), ARGV[5] == '1'
local nblobs, nremoved = tonumber(ARGV[6]), tonumber(ARGV[7])
local now = now_ms()
local nodes = P .. ':nodes'
local prev = redis.call('ZSCORE', nodes, node)
local was_live = prev and tonumber(prev) > now
redis.call('ZADD', nodes, num(now + ttl), node)
redis.call('SET', k('node', node), ARGV[3], 'PX', num(2 * ttl))
local nb = k('nodeblobs', node)
if full then
  local keep = {}
  for j = 0, nblobs - 1 do keep[ARGV[8 + 2 * j]] = true end
  for _, d in ipairs(redis.call('SMEMBERS', nb)) do
    if not keep[d] then redis.call('HDEL', k('holders', d), node) end
  end
  redis.call('DEL', nb)
end
for j = 0, nblobs - 1 do
  local d, h = ARGV[8 + 2 * j], ARGV[9 + 2 * j]
  if h == '' then
    redis.call('HDEL', k('holders', d), node); redis.call('SREM', nb, d)
  else
    redis.call('HSET', k('holders', d), node, h); redis.call('SADD', nb, d)
  end
end
local first_removed = 8 + 2 * nblobs
for j = first_removed, first_removed + nremoved - 1 do
  redis.call('HDEL', k('holders', ARGV[j]), node); redis.call('SREM', nb, ARGV[j])
end
redis.call('PEXPIRE', nb, num(2 * ttl))
local nf = k('nodefetch', node)
unfetch(node)
for j = first_removed + nremoved, #ARGV do
  redis.call('SADD', k('fetchers', ARGV[j]), node); redis.call('SADD', nf, ARGV[j])
  redis.call('PEXPIRE', k('fetchers', ARGV[j]), num(2 * ttl))
end
redis.call('PEXPIRE', nf, num(2 * ttl))
if was_live or full then return 0 end
return 1
"""

# ARGV: P, node  -> 1 if the node was known
LEAVE = _PRELUDE + r"""
local node = ARGV[2]
local nl = k('nodeleases', node)
for _, d in ipairs(redis.call('SMEMBERS', nl)) do
  local lkey = k('lease', d)
  local flat = redis.call('HGETALL', lkey)
  for j = 1, #flat, 2 do
    if split_lease(flat[j + 1]) == node then redis.call('HDEL', lkey, flat[j]) end
  end
end
redis.call('DEL', nl)
return forget(node)
"""

# ARGV: P, digest, caller ("" = none), segment (-1 = any)
# -> {caller info or "", segment count or -1, (node, holding, fetching "0"/"1", info) ...}
PEERS = _PRELUDE + r"""
local digest, caller, seg = ARGV[2], ARGV[3], tonumber(ARGV[4])
local now = now_ms()
local nodes, hkey, blob = P .. ':nodes', k('holders', digest), k('blob', digest)
local me = ''
if caller ~= '' then me = redis.call('GET', k('node', caller)) or '' end
local n = -1
if redis.call('EXISTS', blob) == 1 then n = segment_count(blob) end
local out = {me, n}
local fkey = k('fetchers', digest)
local fetching = {}
for _, node in ipairs(redis.call('SMEMBERS', fkey)) do fetching[node] = true end
local function live(node)
  local score = redis.call('ZSCORE', nodes, node)
  return score and tonumber(score) > now and node ~= caller, score
end
local function emit(node, h, f)
  local info = redis.call('GET', k('node', node))
  if info then out[#out + 1] = node; out[#out + 1] = h; out[#out + 1] = f; out[#out + 1] = info end
end
local flat = redis.call('HGETALL', hkey)
for j = 1, #flat, 2 do
  local node, h = flat[j], flat[j + 1]
  local ok, score = live(node)
  local f = fetching[node] and '1' or '0'
  fetching[node] = nil
  if not score then
    redis.call('HDEL', hkey, node)
  elseif ok and (f == '1' or seg < 0 or h == '*'
                 or string.find(',' .. h .. ',', ',' .. seg .. ',', 1, true)) then
    emit(node, h, f)
  end
end
for node in pairs(fetching) do
  local ok, score = live(node)
  if not score then redis.call('SREM', fkey, node)
  elseif ok then emit(node, '', '1') end
end
return out
"""

# ARGV: P, blob_ttl_ms, limit  -> number of dead nodes forgotten
SWEEP = _PRELUDE + r"""
local now = now_ms()
local dead = redis.call('ZRANGEBYSCORE', P .. ':nodes', '-inf', num(now), 'LIMIT', 0, tonumber(ARGV[3]))
for _, node in ipairs(dead) do forget(node) end
redis.call('ZREMRANGEBYSCORE', P .. ':blobs', '-inf', num(now - tonumber(ARGV[2])))
return #dead
"""

# ARGV: P, blob_ttl_ms  -> {live nodes, known blobs}
STATS = _PRELUDE + r"""
local now = now_ms()
return {redis.call('ZCOUNT', P .. ':nodes', '(' .. num(now), '+inf'),
        redis.call('ZCOUNT', P .. ':blobs', num(now - tonumber(ARGV[2])), '+inf')}
"""
