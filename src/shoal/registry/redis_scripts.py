"""The Redis registry's server-side scripts: every write is one Lua script, so Redis applies
it atomically (no other client's command runs in between) and a refused call changes nothing.

Layout under a key prefix ``P`` (``docs/operations.md``)::

    P:schema        "1": the layout version
    P:ids           sorted set of every device id, all scores 0: id order by ZRANGEBYLEX
                    (bytes, i.e. UTF-8 code-point order, as SQLite and numpy sort)
    P:d:<id>        hash: attributes, capabilities, windows (JSON), enrolled_at, last_seen
                    (Python float reprs: exact round trip), participation
    P:o:<id>        hash: round -> "<ts>\\n<outcome>", the last ``history`` rounds

Numbers are compared in Lua (doubles, like Python floats) but stored as the strings Python
wrote, so what comes back is bit for bit what went in.
"""

from __future__ import annotations

__all__ = ["ENROLL", "ENROLL_MANY", "RECORD", "REMOVE", "SNAPSHOT", "TOUCH"]

#: KEYS: ids, device. ARGV: id, attributes, capabilities, windows, now, and three flags
#: ("1": the field was given). Inserts or updates; returns the stored fields.
ENROLL = """
local fields = {'attributes', 'capabilities', 'windows'}
local empty = {'{}', '{}', '[]'}
if redis.call('EXISTS', KEYS[2]) == 0 then
  local args = {'enrolled_at', ARGV[5], 'last_seen', ARGV[5], 'participation', '0'}
  for i = 1, 3 do
    table.insert(args, fields[i])
    table.insert(args, ARGV[5 + i] == '1' and ARGV[1 + i] or empty[i])
  end
  redis.call('HSET', KEYS[2], unpack(args))
  redis.call('ZADD', KEYS[1], 0, ARGV[1])
else
  for i = 1, 3 do
    if ARGV[5 + i] == '1' then redis.call('HSET', KEYS[2], fields[i], ARGV[1 + i]) end
  end
  if tonumber(ARGV[5]) > tonumber(redis.call('HGET', KEYS[2], 'last_seen')) then
    redis.call('HSET', KEYS[2], 'last_seen', ARGV[5])
  end
end
return redis.call('HMGET', KEYS[2], 'attributes', 'capabilities', 'windows', 'enrolled_at',
                  'last_seen', 'participation')
"""

#: KEYS: ids. ARGV: device key prefix, now, then (id, attributes, windows) per device.
#: Returns the ids already enrolled (and enrols nobody), or an empty list.
ENROLL_MANY = """
local taken = {}
for i = 3, #ARGV, 3 do
  if redis.call('EXISTS', ARGV[1] .. ARGV[i]) == 1 then table.insert(taken, ARGV[i]) end
end
if #taken > 0 then return taken end
for i = 3, #ARGV, 3 do
  redis.call('HSET', ARGV[1] .. ARGV[i], 'attributes', ARGV[i + 1], 'capabilities', '{}',
             'windows', ARGV[i + 2], 'enrolled_at', ARGV[2], 'last_seen', ARGV[2],
             'participation', '0')
  redis.call('ZADD', KEYS[1], 0, ARGV[i])
end
return taken
"""

#: KEYS: device. ARGV: now. Returns 0 if the device is not enrolled.
TOUCH = """
local seen = redis.call('HGET', KEYS[1], 'last_seen')
if not seen then return 0 end
if tonumber(ARGV[1]) > tonumber(seen) then redis.call('HSET', KEYS[1], 'last_seen', ARGV[1]) end
return 1
"""

#: KEYS: ids, device, outcomes. ARGV: id. Returns 1 if the device was enrolled.
REMOVE = """
redis.call('DEL', KEYS[2], KEYS[3])
return redis.call('ZREM', KEYS[1], ARGV[1])
"""

#: ARGV: device key prefix, outcome key prefix, round, outcome, ts, history, then the ids.
#: Returns {-1, id} for the first unknown id (recording nothing), else {changed, ''}.
#: Rules of Registry.record_outcome: the same outcome again is a replay, "accepted" is
#: final for its round, any other outcome is replaced; the ``history`` highest rounds stay.
RECORD = """
for i = 7, #ARGV do
  if redis.call('EXISTS', ARGV[1] .. ARGV[i]) == 0 then return {-1, ARGV[i]} end
end
local history = tonumber(ARGV[6])
local changed = 0
for i = 7, #ARGV do
  local key = ARGV[2] .. ARGV[i]
  local prev = redis.call('HGET', key, ARGV[3])
  local was = prev and string.sub(prev, string.find(prev, '\\n', 1, true) + 1)
  if was ~= ARGV[4] and was ~= 'accepted' then
    redis.call('HSET', key, ARGV[3], ARGV[5] .. '\\n' .. ARGV[4])
    if ARGV[4] == 'accepted' then
      redis.call('HINCRBY', ARGV[1] .. ARGV[i], 'participation', 1)
    end
    local kept = redis.call('HKEYS', key)
    if #kept > history then
      table.sort(kept, function(a, b) return tonumber(a) < tonumber(b) end)
      for j = 1, #kept - history do redis.call('HDEL', key, kept[j]) end
    end
    changed = changed + 1
  end
end
return {changed, ''}
"""

#: KEYS: ids. ARGV: device key prefix. Every device's fields, flattened, in id order: one
#: consistent snapshot (what SQLite's read transaction gives).
SNAPSHOT = """
local out = {}
for _, id in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  local f = redis.call('HMGET', ARGV[1] .. id, 'attributes', 'capabilities', 'windows',
                       'enrolled_at', 'last_seen', 'participation')
  table.insert(out, id)
  for j = 1, 6 do table.insert(out, f[j]) end
end
return out
"""
