"""The task broker on Redis: ``redis://host:6379/0?prefix=riverbed&result_ttl=86400&dead_ttl=604800``.

Every state change is one Lua script, so it is atomic: a task is in exactly one place at any
moment, whatever crashes between two calls. Sorted sets and scripts, not Streams consumer groups,
because what the task layer needs is direct with them and awkward with a stream:

- strict priority, then FIFO: one sorted set per queue scored ``(9 - priority) * 2**48 + seq``;
  a stream has one order, its append order, so priorities would need a stream each, polled in
  turn;
- delayed tasks and retries: a sorted set by eta per queue, moved to the queue atomically by the
  fetch that finds them due; a stream has no delivery time, so it would need such a set anyway;
- per-task cancel and inspection: a task is a hash addressed by id, and a queued one leaves its
  queue with one ZREM, in the same script that records it cancelled;
- leases: a sorted set of deadlines per queue gives each task its own lease, extended by a ZADD
  and found expired by a range read; a consumer group knows only idle times, so expiry would be
  an ``XAUTOCLAIM`` scan with one idle threshold for every task.

Keys (``P`` is ``{prefix}``: the hash tag keeps one broker's keys in one slot, which scripts that
compute key names from ids need; the broker itself targets a single Redis node):

- ``P:t:<id>`` hash per task: ``message`` (msgpack), ``state``, ``queue``, ``priority``, ``seq``,
  ``key``, ``chord``, ``worker``, ``started``, ``finished``, ``result``, ``error``, ``cancel``.
  Finished tasks expire after ``result_ttl``, failed ones after ``dead_ttl``;
- ``P:q:<queue>`` ready tasks by priority and seq; ``P:s:<queue>`` scheduled tasks by eta;
  ``P:l:<queue>`` leased tasks by lease deadline; ``P:queues`` the queue names; ``P:seq``;
- ``P:ready:<queue>`` a list holding one token while the queue has work: blocked fetchers BLPOP it;
- ``P:w:<id>`` a list holding one token once the task finished: ``wait`` BLPOPs it;
- ``P:finished`` and ``P:dead`` finished tasks by finish time, trimmed as their hashes expire;
- ``P:k:<key>`` idempotency keys, ``P:chord:<id>`` chords, ``P:rl:<name>`` token buckets,
  ``P:leader`` the leader lease, ``P:tick:<schedule>`` last ticks, ``P:workers`` last-seen times.

Times are the caller's clock (``now_ms``), passed to every script, so SQLite and Redis brokers
agree on etas and leases; only key TTLs run on the server's clock.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from string import Template
from typing import Any, cast
from urllib.parse import urlsplit

import msgspec

from riverbed.errors import InvalidUrlError, MissingExtraError
from riverbed.tasks.brokers.api import (
    CANCELLED_AFTER_LEASE,
    CANCELLED_BEFORE_RETRY,
    CANCELLED_BEFORE_START,
    CHORD_HEADER_PURGED,
    COMMON_OPTIONS,
    PURGED_BEFORE_START,
    WORKER_SEEN_MS,
    chain_failure,
    chord_failure,
    decoded_messages,
    id_and_name,
    never_ran_in_chain,
    purged_messages,
    stand_in,
    ttl_options,
    undecodable,
)
from riverbed.tasks.errors import BrokerUnavailableError
from riverbed.tasks.messages import (
    ENCODER,
    MAX_PRIORITY,
    MESSAGE_DECODER,
    BrokerStats,
    ChordSpec,
    ErrorInfo,
    Heartbeat,
    Outcome,
    QueueStats,
    TaskInfo,
    TaskMessage,
    TaskState,
    now_ms,
)
from riverbed.urls import BackendUrl

try:
    import redis
    from redis.backoff import ExponentialBackoff, NoBackoff
    from redis.commands.core import Script
    from redis.retry import Retry
except ImportError as error:  # connect_broker imports this module only for redis:// URLs
    raise MissingExtraError("the redis:// task broker", "redis", "redis") from error

URL_OPTIONS = {**COMMON_OPTIONS, "prefix": "riverbed"}
# An unreachable server fails the constructor within this time, not after the retries.
logger = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 2.0
# A command unanswered this long counts as a dropped connection (and is retried).
SOCKET_TIMEOUT_S = 10.0
# A command that meets a dropped connection or a timeout is retried this often, backing off
# exponentially up to the cap, before the call raises BrokerUnavailableError. Every script is
# safe to run twice: a retried enqueue finds its ids stored, a retried finish finds the tasks no
# longer running; a retried fetch leaves the first attempt's tasks leased until their lease runs
# out, and they are delivered again then (at least once).
RETRIES = 3
RETRY_BASE_S = 0.05
RETRY_CAP_S = 1.0
# A blocking call (fetch, wait) blocks at most this long per command, so a vanished server is
# noticed by the socket timeout instead of hanging the caller.
BLOCK_SLICE_S = 5.0
# Redis rounds a blocking timeout down to milliseconds, and 0 means forever.
MIN_BLOCK_S = 0.01
# Due scheduled tasks and lapsed leases moved per queue by one fetch, so that a backlog of
# millions is moved over several fetches instead of blocking the server in one script.
MOVE_BATCH = 1000
# Ids read, purged or requeued per round trip.
PAGE = 500
# A worker unseen for this long is left out of ``stats`` (as in the SQLite broker).
# The seq occupies the low 48 bits of a ready score, so priority orders first and FIFO second;
# scores stay below 2**53, where doubles are exact.
PRIORITY_SPAN = 2**48

_ERROR_DECODER = msgspec.msgpack.Decoder(ErrorInfo)
_INFO_FIELDS = (
    "message",
    "state",
    "worker",
    "started",
    "finished",
    "result",
    "error",
    "cancel",
    "seq",
)
_CANCELLED = ENCODER.encode(CANCELLED_BEFORE_START)
_CANCELLED_AFTER_LEASE = ENCODER.encode(CANCELLED_AFTER_LEASE)
_CANCELLED_BEFORE_RETRY = ENCODER.encode(CANCELLED_BEFORE_RETRY)
_HEADER_PURGED = ENCODER.encode(CHORD_HEADER_PURGED)
_CHORD_HEADER_CANCELLED = ENCODER.encode(
    ErrorInfo("ChordHeaderFailed", "a header task of the chord was cancelled")
)

# Every script starts with these helpers; ARGV 1-4 are the key prefix, the caller's clock and the
# two TTLs, and a script's own arguments follow from ARGV 5.
_PRELUDE = Template("""
local P = ARGV[1]
local NOW = tonumber(ARGV[2])
local RESULT_TTL = tonumber(ARGV[3])
local DEAD_TTL = tonumber(ARGV[4])

local function key(kind, name)
  if name == nil then return P .. ':' .. kind end
  return P .. ':' .. kind .. ':' .. name
end

-- Redis 6 passes a Lua number to a command as '%.14g', which turns ready scores (16 digits) into
-- exponents; spell integers out (Redis 7 keeps 17 digits, so both agree).
local function int(n)
  return string.format('%.0f', n)
end

-- Wake one fetcher blocked on the queue. One token is enough: a fetch that leaves tasks behind
-- passes it on to the next.
local function signal(queue)
  local ready = key('ready', queue)
  if redis.call('LLEN', ready) == 0 then
    redis.call('RPUSH', ready, '1')
  end
end

-- An empty queue keeps no token, so that nothing wakes for it and no key is left behind.
local function settle(queue)
  if redis.call('EXISTS', key('q', queue)) == 0 then
    redis.call('DEL', key('ready', queue))
  end
end

-- Put a stored task in its queue, or in the queue's scheduled set while its eta is ahead.
local function place(id, queue, priority, seq, eta)
  local task = key('t', id)
  redis.call('SADD', key('queues'), queue)
  if eta > NOW then
    local scheduled = key('s', queue)
    redis.call('HSET', task, 'state', 'scheduled')
    redis.call('ZADD', scheduled, int(eta), id)
    -- A new earliest eta shortens the sleep of the fetchers blocked on this queue.
    if redis.call('ZRANK', scheduled, id) == 0 then
      signal(queue)
    end
  else
    redis.call('HSET', task, 'state', 'queued')
    local score = ($MAX_PRIORITY - priority) * $PRIORITY_SPAN + seq
    redis.call('ZADD', key('q', queue), int(score), id)
    signal(queue)
  end
end

-- Store a new task. A message whose idempotency key is taken is not stored: the id holding the
-- key is returned instead. An id already stored is a retried call and is left as it is.
local function store(id, message, queue, priority, eta, idem, chord)
  local task = key('t', id)
  if redis.call('EXISTS', task) == 1 then
    return id
  end
  if idem ~= '' then
    local holder = redis.call('GET', key('k', idem))
    if holder then
      return holder
    end
    redis.call('SET', key('k', idem), id) -- until the task finishes: finish_task
  end
  local seq = redis.call('INCR', key('seq'))
  redis.call('HSET', task, 'message', message, 'queue', queue, 'priority', priority,
    'seq', seq, 'key', idem, 'chord', chord)
  place(id, queue, tonumber(priority), seq, tonumber(eta))
  return id
end

-- A task reached a finished state: keep it for its TTL, index it and wake its waiters.
local function finish_task(id, state, result, err)
  local task = key('t', id)
  local ttl, index = RESULT_TTL, key('finished')
  if state == 'failed' then
    ttl, index = DEAD_TTL, key('dead')
  end
  redis.call('HSET', task, 'state', state, 'finished', int(NOW), 'result', result, 'error', err)
  redis.call('HDEL', task, 'cancel')
  redis.call('PEXPIRE', task, int(ttl))
  local idem = redis.call('HGET', task, 'key')
  if idem and idem ~= '' and redis.call('GET', key('k', idem)) == id then
    redis.call('PEXPIRE', key('k', idem), int(ttl)) -- kept as long as the task's outcome
  end
  redis.call('ZADD', index, int(NOW), id)
  local waiters = key('w', id)
  redis.call('RPUSH', waiters, '1')
  redis.call('PEXPIRE', waiters, int(ttl))
end

-- Record a task that can never run (a chord's callback, a chain's later step) as failed.
local function never_run(id, message, queue, priority, reason)
  redis.call('HSET', key('t', id), 'message', message, 'queue', queue, 'priority', priority,
    'seq', redis.call('INCR', key('seq')), 'key', '', 'chord', '')
  finish_task(id, 'failed', '', reason)
end

-- A chain's later step recorded as failed without running: forgotten, as its step before runs
-- again (requeued), and so that step can enqueue it (succeeded).
local function forget_never_run(id)
  local task = key('t', id)
  local n = redis.call('HMGET', task, 'state', 'started')
  if n[1] == 'failed' and not n[2] then
    redis.call('DEL', task)
    redis.call('ZREM', key('dead'), id)
  end
end

-- A chord header finished: count a success, enqueue the callback after the last one, or record
-- the callback as failed (``failure`` names the header) when a header did not succeed.
local function chord_progress(chord, state, failure)
  local spec = key('chord', chord)
  if redis.call('EXISTS', spec) == 0 then
    return -- an earlier header failed and settled the chord
  end
  if state == 'succeeded' and redis.call('HINCRBY', spec, 'remaining', -1) > 0 then
    return
  end
  local c = redis.call('HMGET', spec, 'id', 'message', 'queue', 'priority', 'eta', 'key')
  redis.call('DEL', spec)
  if state == 'succeeded' then
    store(c[1], c[2], c[3], c[4], c[5], c[6], '')
    return
  end
  never_run(c[1], c[2], c[3], c[4], failure)
end

-- Index entries outlive their hashes by at most one call: drop those whose TTL has passed.
local function trim()
  redis.call('ZREMRANGEBYSCORE', key('finished'), '-inf', int(NOW - RESULT_TTL))
  redis.call('ZREMRANGEBYSCORE', key('dead'), '-inf', int(NOW - DEAD_TTL))
  redis.call('ZREMRANGEBYSCORE', key('workers'), '-inf', int(NOW - $WORKER_SEEN_MS))
end
""").substitute(
    MAX_PRIORITY=MAX_PRIORITY, PRIORITY_SPAN=PRIORITY_SPAN, WORKER_SEEN_MS=WORKER_SEEN_MS
)

# ARGV 5: chord id ('' for none), 6: its size, 7-13: its callback, then 7 fields per message.
# A retried call (its first task already stored) must not reset a chord already counting down.
_ENQUEUE = """
local ids = {}
local retried = #ARGV >= 14 and redis.call('EXISTS', key('t', ARGV[14])) == 1
for i = 14, #ARGV, 7 do
  ids[#ids + 1] = store(ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4],
    ARGV[i + 5], ARGV[i + 6])
end
if ARGV[5] ~= '' and not retried then
  redis.call('HSET', key('chord', ARGV[5]), 'remaining', ARGV[6], 'id', ARGV[7],
    'message', ARGV[8], 'queue', ARGV[9], 'priority', ARGV[10], 'eta', ARGV[11], 'key', ARGV[12])
end
return ids
"""

# ARGV 5: worker, 6: limit, 7: lease ms, 8: move batch, 9: the error of a task cancelled while
# its worker went away, 10: the error of a chord whose header was so cancelled, 11...: queues.
# Returns the leased messages and when the next scheduled task or lease falls due (0: none).
_FETCH = """
local worker, limit, lease, batch = ARGV[5], tonumber(ARGV[6]), tonumber(ARGV[7]), ARGV[8]
local queues = {}
for i = 11, #ARGV do
  queues[#queues + 1] = ARGV[i]
end
-- Due tasks and lapsed leases join their queues with their seq, so they keep their place.
for _, queue in ipairs(queues) do
  local scheduled, leased = key('s', queue), key('l', queue)
  local due = redis.call('ZRANGEBYSCORE', scheduled, '-inf', int(NOW), 'LIMIT', 0, batch)
  for _, id in ipairs(due) do
    redis.call('ZREM', scheduled, id)
    local t = redis.call('HMGET', key('t', id), 'priority', 'seq')
    place(id, queue, tonumber(t[1]), tonumber(t[2]), 0)
  end
  local lapsed = redis.call('ZRANGEBYSCORE', leased, '-inf', '(' .. int(NOW), 'LIMIT', 0, batch)
  for _, id in ipairs(lapsed) do
    redis.call('ZREM', leased, id)
    local t = redis.call('HMGET', key('t', id), 'priority', 'seq', 'cancel', 'chord', 'later',
      'broken')
    if t[3] == '1' then
      -- A cancel asked of a task whose worker went away holds: it is not run again.
      finish_task(id, 'cancelled', '', ARGV[9])
      if t[4] and t[4] ~= '' then
        chord_progress(t[4], 'cancelled', ARGV[10])
      end
      if t[5] and t[5] ~= '' then -- a chain's step: its later steps never run
        for _, step in ipairs(cmsgpack.unpack(t[5])) do
          never_run(step[1], step[2], step[3], step[4], t[6])
        end
      end
    else
      redis.call('HDEL', key('t', id), 'worker')
      place(id, queue, tonumber(t[1]), tonumber(t[2]), 0)
    end
  end
end
-- The heads of the queues merged by score: priority first, then seq.
local heads = {}
if limit > 0 then
  for _, queue in ipairs(queues) do
    local head = redis.call('ZRANGE', key('q', queue), 0, limit - 1, 'WITHSCORES')
    for j = 1, #head, 2 do
      heads[#heads + 1] = {tonumber(head[j + 1]), head[j], queue}
    end
  end
end
table.sort(heads, function(a, b) return a[1] < b[1] end)
local messages = {}
local deadline = int(NOW + lease)
for j = 1, math.min(limit, #heads) do
  local id, queue = heads[j][2], heads[j][3]
  local task = key('t', id)
  redis.call('ZREM', key('q', queue), id)
  redis.call('ZADD', key('l', queue), deadline, id)
  redis.call('HSET', task, 'state', 'running', 'worker', worker, 'started', int(NOW))
  messages[#messages + 1] = redis.call('HGET', task, 'message')
end
local next_due = nil
for _, queue in ipairs(queues) do
  if redis.call('EXISTS', key('q', queue)) == 1 then
    signal(queue)
  else
    settle(queue)
  end
  for _, set in ipairs({key('s', queue), key('l', queue)}) do
    local first = redis.call('ZRANGE', set, 0, 0, 'WITHSCORES')
    if first[2] and (next_due == nil or tonumber(first[2]) < next_due) then
      next_due = tonumber(first[2])
    end
  end
end
trim()
return {messages, int(next_due or 0)}
"""

# ARGV 5: worker, 6: lease ms, 7...: ids. Returns the cancelled ids and the lost ones.
_EXTEND = """
local worker, deadline = ARGV[5], int(NOW + tonumber(ARGV[6]))
redis.call('ZADD', key('workers'), int(NOW), worker)
local cancelled, lost = {}, {}
for i = 7, #ARGV do
  local id = ARGV[i]
  local t = redis.call('HMGET', key('t', id), 'state', 'worker', 'queue', 'cancel')
  if t[1] == 'running' and t[2] == worker then
    redis.call('ZADD', key('l', t[3]), deadline, id)
    if t[4] == '1' then
      cancelled[#cancelled + 1] = id
    end
  else
    lost[#lost + 1] = id
  end
end
trim()
return {cancelled, lost}
"""

# ARGV 5: worker, 6: the error of a task cancelled while it ran and then retried, then per
# outcome: id, state, message, queue, priority, eta, result, error, chord, chord failure,
# chain failure, follow-up count, and 7 fields per follow-up: a chain's next step after a
# success, its later steps otherwise (recorded as failed for the chain failure, unless a retry
# goes on).
_FINISH = """
local worker = ARGV[5]
local i = 7
while i <= #ARGV do
  local id, state, message, queue = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  local priority, eta, result, err = ARGV[i + 4], ARGV[i + 5], ARGV[i + 6], ARGV[i + 7]
  local chord, failure, broken, follow = ARGV[i + 8], ARGV[i + 9], ARGV[i + 10], i + 12
  i = follow + 7 * tonumber(ARGV[i + 11])
  local task = key('t', id)
  local t = redis.call('HMGET', task, 'state', 'worker', 'queue', 'seq')
  if t[1] == 'running' and t[2] == worker then
    redis.call('ZREM', key('l', t[3]), id)
    redis.call('HSET', task, 'message', message)
    if state == 'scheduled' and redis.call('HGET', task, 'cancel') == '1' then
      -- Cancelled while it ran, and it failed before its worker heard of it.
      finish_task(id, 'cancelled', '', ARGV[6])
      if chord ~= '' then
        chord_progress(chord, 'cancelled', failure)
      end
      for j = follow, i - 1, 7 do
        never_run(ARGV[j], ARGV[j + 1], ARGV[j + 2], ARGV[j + 3], broken)
      end
    elseif state == 'scheduled' then
      redis.call('HSET', task, 'queue', queue, 'priority', priority, 'error', err)
      redis.call('HDEL', task, 'worker', 'started')
      place(id, queue, tonumber(priority), tonumber(t[4]), tonumber(eta))
    else
      finish_task(id, state, result, err)
      for j = follow, i - 1, 7 do
        if state == 'succeeded' then
          forget_never_run(ARGV[j]) -- a chain step requeued from the dead letters succeeded
          store(ARGV[j], ARGV[j + 1], ARGV[j + 2], ARGV[j + 3], ARGV[j + 4], ARGV[j + 5],
            ARGV[j + 6])
        else
          never_run(ARGV[j], ARGV[j + 1], ARGV[j + 2], ARGV[j + 3], broken)
        end
      end
      if chord ~= '' then
        chord_progress(chord, state, failure)
      end
    end
  end
end
trim()
"""

# ARGV 5: worker, 6: eta ms (0: now), 7...: ids.
_RELEASE = """
local worker, eta = ARGV[5], tonumber(ARGV[6])
for i = 7, #ARGV do
  local id = ARGV[i]
  local task = key('t', id)
  local t = redis.call('HMGET', task, 'state', 'worker', 'queue', 'priority', 'seq')
  if t[1] == 'running' and t[2] == worker then
    redis.call('ZREM', key('l', t[3]), id)
    redis.call('HDEL', task, 'worker', 'started')
    place(id, t[3], tonumber(t[4]), tonumber(t[5]), eta)
  end
end
"""

# ARGV 5: id, 6: the error of a task cancelled before it started, 7: the error of its chord's
# callback, if it is a chord header, 8 and 9: the error of its chain's later steps if it is
# cancelled before it started and if its worker goes away while it runs, 10...: those later
# steps, 7 fields each. Returns the state after.
_CANCEL = """
local id = ARGV[5]
local task = key('t', id)
local broken = ARGV[8]
local t = redis.call('HMGET', task, 'state', 'queue', 'chord')
local state, queue = t[1], t[2]
if state == 'queued' or state == 'scheduled' then
  if state == 'queued' then
    redis.call('ZREM', key('q', queue), id)
    settle(queue)
  else
    redis.call('ZREM', key('s', queue), id)
  end
  finish_task(id, 'cancelled', '', ARGV[6])
  if t[3] and t[3] ~= '' then
    chord_progress(t[3], 'cancelled', ARGV[7])
  end
  for j = 10, #ARGV, 7 do
    never_run(ARGV[j], ARGV[j + 1], ARGV[j + 2], ARGV[j + 3], broken)
  end
  trim()
  return 'cancelled'
end
if state == 'running' then
  redis.call('HSET', task, 'cancel', '1')
  if #ARGV >= 10 then
    -- Kept for fetch, which finishes the task if its worker goes away before interrupting it.
    local later = {}
    for j = 10, #ARGV, 7 do
      later[#later + 1] = {ARGV[j], ARGV[j + 1], ARGV[j + 2], ARGV[j + 3]}
    end
    redis.call('HSET', task, 'later', cmsgpack.pack(later), 'broken', ARGV[9])
  end
end
return state
"""

# ARGV 5...: per task, its id, its message with attempts reset, and the count and ids of its
# chain's later steps. A dead entry whose task is no longer failed (its hash expired) is
# dropped. Returns the requeued ids.
_REQUEUE = """
local requeued = {}
local i = 5
while i <= #ARGV do
  local id, later = ARGV[i], i + 3
  i = later + tonumber(ARGV[i + 2])
  local task = key('t', id)
  redis.call('ZREM', key('dead'), id)
  local t = redis.call('HMGET', task, 'state', 'queue', 'priority', 'seq', 'key')
  if t[1] == 'failed' then
    redis.call('PERSIST', task)
    -- Its idempotency key is held again until it finishes, as when it was first enqueued.
    if t[5] and t[5] ~= '' and redis.call('GET', key('k', t[5])) == id then
      redis.call('PERSIST', key('k', t[5]))
    end
    redis.call('DEL', key('w', id))
    redis.call('HDEL', task, 'worker', 'started', 'finished', 'result', 'error', 'cancel',
      'later', 'broken')
    redis.call('HSET', task, 'message', ARGV[later - 2])
    place(id, t[2], tonumber(t[3]), tonumber(t[4]), 0)
    requeued[#requeued + 1] = id
    -- Its chain's later steps, recorded as failed when it failed, wait for it again.
    for j = later, i - 1 do
      forget_never_run(ARGV[j])
    end
  end
end
return requeued
"""

# ARGV 5: queue, 6: batch. Deletes up to a batch of queued and of scheduled tasks with their
# idempotency keys and chords; returns how many it deleted.
_PURGE = """
local queue, batch = ARGV[5], tonumber(ARGV[6])
local deleted = {}
for _, set in ipairs({key('q', queue), key('s', queue)}) do
  for _, id in ipairs(redis.call('ZRANGE', set, 0, batch - 1)) do
    local task = key('t', id)
    local t = redis.call('HMGET', task, 'key', 'chord', 'message')
    if t[1] and t[1] ~= '' and redis.call('GET', key('k', t[1])) == id then
      redis.call('DEL', key('k', t[1]))
    end
    redis.call('DEL', task)
    redis.call('ZREM', set, id)
    if t[2] and t[2] ~= '' then
      chord_progress(t[2], 'purged', ARGV[7]) -- its callback can never run: it fails
    end
    deleted[#deleted + 1] = t[3] or ''
  end
end
settle(queue)
return deleted
"""

# ARGV 5: worker, 6: id, 7: the message stored in its place, 8: reason. A leased task whose
# message does not decode: dead.
_BURY = """
local worker, id = ARGV[5], ARGV[6]
local t = redis.call('HMGET', key('t', id), 'state', 'worker', 'queue')
if t[1] == 'running' and t[2] == worker then
  redis.call('ZREM', key('l', t[3]), id)
  redis.call('HSET', key('t', id), 'message', ARGV[7])
  finish_task(id, 'failed', '', ARGV[8])
end
"""

# ARGV 5: the reason, 6...: the tasks (4 arguments each) recorded as failed, never to run.
_NEVER_RUN = """
for j = 6, #ARGV, 4 do
  never_run(ARGV[j], ARGV[j + 1], ARGV[j + 2], ARGV[j + 3], ARGV[5])
end
"""

# ARGV 5: bucket name, 6: rate per second, 7: capacity, 8: tokens wanted.
# Returns the tokens granted and those left (a string: Lua numbers reply as integers).
_TAKE_TOKENS = """
local bucket = key('rl', ARGV[5])
local rate, capacity, wanted = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
local t = redis.call('HMGET', bucket, 'tokens', 'updated')
local tokens, updated = capacity, NOW
if t[1] then
  updated = math.max(NOW, tonumber(t[2]))
  tokens = math.min(capacity, tonumber(t[1]) + (updated - tonumber(t[2])) * rate / 1000)
end
local granted = math.max(0, math.min(wanted, math.floor(tokens)))
tokens = tokens - granted
redis.call('HSET', bucket, 'tokens', string.format('%.17g', tokens), 'updated', int(updated))
-- Once refilled, a bucket is the same as a missing one: let it expire then.
redis.call('PEXPIRE', bucket, int(math.max(1, math.ceil((capacity - tokens) * 1000 / rate))))
return {granted, string.format('%.17g', tokens)}
"""

# ARGV 5: worker, 6: ttl ms. The lease key expires on the server's clock when not renewed.
_LEAD = """
local leader = key('leader')
local holder = redis.call('GET', leader)
if holder and holder ~= ARGV[5] then
  return 0
end
redis.call('SET', leader, ARGV[5], 'PX', ARGV[6])
return 1
"""

# ARGV 5: worker.
_LEAVE = """
if redis.call('GET', key('leader')) == ARGV[5] then
  redis.call('DEL', key('leader'))
end
redis.call('ZREM', key('workers'), ARGV[5])
"""

# ARGV 5: schedule, 6: tick ms, 7-13: the message.
_CLAIM_TICK = """
local tick = key('tick', ARGV[5])
local last = redis.call('GET', tick)
if last and tonumber(last) >= tonumber(ARGV[6]) then
  return 0
end
redis.call('SET', tick, ARGV[6])
store(ARGV[7], ARGV[8], ARGV[9], ARGV[10], ARGV[11], ARGV[12], ARGV[13])
return 1
"""

_HOUSEKEEP = """
trim()
"""

# ARGV 5: id. A waiter took the task's wakeup token; put it back for the other waiters, unless
# the task expired meanwhile (the list would then outlive it).
_REWAKE = """
local ttl = redis.call('PTTL', key('t', ARGV[5]))
if ttl > 0 then
  local waiters = key('w', ARGV[5])
  redis.call('RPUSH', waiters, '1')
  redis.call('PEXPIRE', waiters, ttl)
end
"""


# Replies of a server that cannot take writes for now (redis-py's own classes, and the replies
# it leaves as plain ResponseErrors: a failing RDB save, a running script, no replicas).
_SERVER_STATES = (
    redis.exceptions.OutOfMemoryError,
    redis.exceptions.ReadOnlyError,
    redis.exceptions.MasterDownError,
    redis.exceptions.TryAgainError,
)
_STATE_REPLIES = ("OOM", "READONLY", "MISCONF", "BUSY", "NOREPLICAS", "LOADING", "MASTERDOWN")


class RedisBroker:
    """``redis://[user:password@]host:6379/0?prefix=riverbed&result_ttl=86400&dead_ttl=604800``
    (``rediss://`` for TLS)."""

    def __init__(self, url: BackendUrl) -> None:
        options = url.pop_options(URL_OPTIONS)
        self.url = url.raw
        self.result_ttl_ms, self.dead_ttl_ms = ttl_options(url.shown, options)
        if not options["prefix"]:
            raise InvalidUrlError(f"prefix= in {url.shown!r} is empty; name a key prefix")
        self._prefix = "{" + options["prefix"] + "}"
        parts = urlsplit(url.raw)
        # redis-py reads "/abc" as database 0 and "/1/2" as 12: only "/N" is a database.
        if parts.path not in ("", "/") and not re.fullmatch(r"/\d{1,5}", parts.path):
            raise InvalidUrlError(
                f"{parts.path!r} in {url.shown!r} is not a database number: write "
                "redis://host:6379/0 (or no path, for database 0)"
            )
        server = parts._replace(query="").geturl()
        retry = Retry(ExponentialBackoff(cap=RETRY_CAP_S, base=RETRY_BASE_S), RETRIES)
        transient: list[type[Exception]] = [redis.ConnectionError, redis.TimeoutError]
        try:
            # Error messages name the server, never its password.
            self._where = f"{parts.scheme}://{parts.hostname}:{parts.port or 6379}{parts.path}"
            self._redis = redis.Redis.from_url(
                server,
                socket_connect_timeout=CONNECT_TIMEOUT_S,
                socket_timeout=SOCKET_TIMEOUT_S,
                retry=retry,
                retry_on_error=transient,
            )
            # Blocking calls get their own connections, so that they hold up no other call.
            self._blocking = redis.Redis.from_url(
                server,
                socket_connect_timeout=CONNECT_TIMEOUT_S,
                socket_timeout=SOCKET_TIMEOUT_S + BLOCK_SLICE_S,
                retry=retry,
                retry_on_error=transient,
            )
        except ValueError as error:
            raise InvalidUrlError(f"invalid Redis URL {url.shown!r}: {error}") from error
        self._probe(server)
        script = self._redis.register_script
        self._enqueue = script(_PRELUDE + _ENQUEUE)
        self._fetch = script(_PRELUDE + _FETCH)
        self._extend = script(_PRELUDE + _EXTEND)
        self._finish = script(_PRELUDE + _FINISH)
        self._release = script(_PRELUDE + _RELEASE)
        self._cancel = script(_PRELUDE + _CANCEL)
        self._requeue = script(_PRELUDE + _REQUEUE)
        self._purge = script(_PRELUDE + _PURGE)
        self._never_run = script(_PRELUDE + _NEVER_RUN)
        self._bury = script(_PRELUDE + _BURY)
        self._take_tokens = script(_PRELUDE + _TAKE_TOKENS)
        self._lead = script(_PRELUDE + _LEAD)
        self._leave = script(_PRELUDE + _LEAVE)
        self._claim_tick = script(_PRELUDE + _CLAIM_TICK)
        self._housekeep = script(_PRELUDE + _HOUSEKEEP)
        self._rewake = script(_PRELUDE + _REWAKE)

    def _probe(self, server: str) -> None:
        """PING once, without the retries, so that a wrong URL fails within the connect
        timeout."""
        probe = redis.Redis.from_url(
            server,
            socket_connect_timeout=CONNECT_TIMEOUT_S,
            socket_timeout=CONNECT_TIMEOUT_S,
            retry=Retry(NoBackoff(), 0),
        )
        try:
            probe.ping()
            self._check_durability(probe)
        except redis.RedisError as error:
            self.close()
            raise BrokerUnavailableError(
                f"cannot reach the Redis task broker at {self._where} ({error}); "
                "check that redis-server runs there and the URL is right"
            ) from error
        finally:
            probe.close()

    def _check_durability(self, probe: redis.Redis) -> None:
        """Warn, once per server and process, of a server configured to lose tasks: one that
        evicts keys when full, or keeps no append-only file (a restart loses what was written
        since its last snapshot). A server that refuses CONFIG (a managed one) is trusted."""
        if self._where in _checked_servers:
            return
        _checked_servers.add(self._where)
        try:
            config = probe.config_get("maxmemory-policy", "appendonly")
        except redis.ResponseError:
            return
        policy = _text(config.get("maxmemory-policy") or b"noeviction")
        if policy != "noeviction":
            logger.warning(
                "the Redis task broker at %s evicts keys when its memory is full "
                "(maxmemory-policy %s): it may drop queued tasks and their results; set "
                "maxmemory-policy noeviction",
                self._where,
                policy,
            )
        if _text(config.get("appendonly") or b"yes") == "no":
            logger.warning(
                "the Redis task broker at %s keeps no append-only file (appendonly no): a "
                "restart loses the tasks written since its last snapshot; set appendonly yes "
                "(appendfsync everysec loses at most a second of them, always none)",
                self._where,
            )

    @contextmanager
    def _reachable(self) -> Iterator[None]:
        try:
            yield
        except (redis.ConnectionError, redis.TimeoutError) as error:
            raise BrokerUnavailableError(
                f"the Redis task broker at {self._where} did not answer after {RETRIES} "
                f"retries ({error})"
            ) from error
        except redis.ResponseError as error:
            # A server out of memory, a replica, or one that cannot persist refuses writes
            # until it recovers: an outage to wait out, as a lost connection is.
            if not isinstance(error, _SERVER_STATES) and not str(error).startswith(_STATE_REPLIES):
                raise
            raise BrokerUnavailableError(
                f"the Redis task broker at {self._where} refuses writes for now ({error})"
            ) from error

    def _run(self, script: Script, *args: str | bytes | int | float) -> Any:
        with self._reachable():
            return script(
                args=[self._prefix, now_ms(), self.result_ttl_ms, self.dead_ttl_ms, *args]
            )

    def _key(self, kind: str, name: str = "") -> str:
        return f"{self._prefix}:{kind}:{name}" if name else f"{self._prefix}:{kind}"

    def _block(self, keys: Sequence[str], seconds: float) -> str | None:
        """BLPOP one of ``keys`` for up to ``seconds`` (one slice); the key popped, if any."""
        with self._reachable():
            popped = self._blocking.blpop(
                list(keys), timeout=max(MIN_BLOCK_S, min(seconds, BLOCK_SLICE_S))
            )
        return None if popped is None else _text(popped[0])

    # Enqueueing

    def enqueue(self, messages: Sequence[TaskMessage], chord: ChordSpec | None = None) -> list[str]:
        spec: list[str | int | bytes] = ["", 0, *[""] * 7]
        if chord is not None:
            spec = [chord.id, chord.size, *_message_args(chord.callback)]
        ids = self._run(self._enqueue, *spec, *[a for m in messages for a in _message_args(m)])
        return [_text(task_id) for task_id in ids]

    # Leasing

    def fetch(
        self, worker: str, queues: Sequence[str], limit: int, lease_ms: int, timeout: float = 0.0
    ) -> list[TaskMessage]:
        deadline = time.monotonic() + timeout
        ready = [self._key("ready", queue) for queue in queues]
        while True:
            encoded, due = self._run(
                self._fetch,
                worker,
                limit,
                lease_ms,
                MOVE_BATCH,
                _CANCELLED_AFTER_LEASE,
                _CHORD_HEADER_CANCELLED,
                *queues,
            )
            remaining = deadline - time.monotonic()
            if encoded or remaining <= 0:
                return self._decoded(worker, encoded)
            if int(due):
                remaining = min(remaining, (int(due) - now_ms() + 1) / 1000)
            # Woken by an enqueue's token, or the next due task's time: fetch again either way.
            self._block(ready, remaining)

    def _decoded(self, worker: str, encoded: Sequence[bytes]) -> list[TaskMessage]:
        """The leased messages; one that does not decode is dead-lettered, not handed on."""

        def bury(message: bytes, error: msgspec.DecodeError) -> None:
            found = id_and_name(message)
            if found is None:  # its lease lapses: logged each time it comes round
                logger.error("a leased task's message does not decode, nor its id: %s", error)
                return
            reason = ENCODER.encode(undecodable(message, error))
            self._run(self._bury, worker, found[0], stand_in(*found), reason)

        return decoded_messages(encoded, bury)

    def extend(self, worker: str, ids: Sequence[str], lease_ms: int) -> Heartbeat:
        cancelled, lost = self._run(self._extend, worker, lease_ms, *ids)
        return Heartbeat(
            cancelled=frozenset(map(_text, cancelled)), lost=frozenset(map(_text, lost))
        )

    def release(self, worker: str, ids: Sequence[str], eta_ms: int = 0) -> None:
        self._run(self._release, worker, eta_ms, *ids)

    # Finishing

    def finish(self, worker: str, outcomes: Sequence[Outcome]) -> None:
        args: list[str | int | bytes] = [worker, _CANCELLED_BEFORE_RETRY]
        for outcome in outcomes:
            message = outcome.message
            failure = b""
            if message.chord and outcome.state is TaskState.SCHEDULED:  # if cancelled meanwhile
                failure = ENCODER.encode(
                    chord_failure(message, TaskState.CANCELLED, CANCELLED_BEFORE_RETRY)
                )
            elif message.chord and outcome.state is not TaskState.SUCCEEDED:
                failure = ENCODER.encode(
                    chord_failure(outcome.message, outcome.state, outcome.error)
                )
            args += [
                message.id,
                outcome.state.value,
                ENCODER.encode(message),
                message.queue,
                message.priority,
                message.eta_ms,
                outcome.result,
                b"" if outcome.error is None else ENCODER.encode(outcome.error),
                message.chord,
                failure,
            ]
            # A success's next step; a failure's, none but the later steps it breaks.
            follow_ups: Sequence[TaskMessage] = (
                outcome.follow_ups if outcome.state is TaskState.SUCCEEDED else ()
            )
            broken = b""
            if outcome.state is not TaskState.SUCCEEDED and message.link:
                # Its chain's later steps never run (a retry: if it was cancelled meanwhile):
                # they are recorded as failed.
                ended, error = outcome.state, outcome.error
                if ended is TaskState.SCHEDULED:
                    ended, error = TaskState.CANCELLED, CANCELLED_BEFORE_RETRY
                broken = ENCODER.encode(chain_failure(message, ended, error))
                follow_ups = [msgspec.structs.replace(later, link=()) for later in message.link]
            args += [broken, len(follow_ups)]
            args += [a for follow_up in follow_ups for a in _message_args(follow_up)]
        self._run(self._finish, *args)

    # Reading

    def info(self, ids: Sequence[str]) -> dict[str, TaskInfo]:
        return {task_id: info for task_id, (_, info) in self._read(ids).items()}

    def _read(self, ids: Sequence[str]) -> dict[str, tuple[int, TaskInfo]]:
        """The stored tasks among ``ids`` with their seq, in one round trip."""
        with self._reachable():
            pipe = self._redis.pipeline(transaction=False)
            for task_id in ids:
                pipe.hmget(self._key("t", task_id), _INFO_FIELDS)
            rows: list[list[bytes | None]] = pipe.execute()
        return {
            task_id: (int(row[8] or 0), _info(row))
            for task_id, row in zip(ids, rows, strict=True)
            if row[0] is not None
        }

    def wait(self, ids: Sequence[str], timeout: float) -> dict[str, TaskInfo]:
        deadline = time.monotonic() + timeout
        pending = list(dict.fromkeys(ids))
        done: dict[str, TaskInfo] = {}
        while True:
            known = self.info(pending)
            done.update((i, info) for i, info in known.items() if info.state.finished)
            pending = [i for i in pending if i not in done]
            remaining = deadline - time.monotonic()
            if not pending or remaining <= 0:
                return done
            # An unknown id's token list is pushed when the task, enqueued later, finishes.
            tokens = {self._key("w", task_id): task_id for task_id in pending}
            woken = self._block(list(tokens), remaining)
            if woken is not None:
                self._run(self._rewake, tokens[woken])

    def list_tasks(
        self, state: TaskState | None = None, queue: str | None = None, limit: int = 100
    ) -> list[TaskInfo]:
        """Up to ``limit`` matching tasks of each index (queues, scheduled sets, leases, finished,
        dead) are gathered and ordered by seq: every match when there are fewer than ``limit``,
        otherwise the oldest of each index's first ones."""
        queues = [queue] if queue is not None else self._queues()
        indexes: list[str] = []
        for kind, listed in (
            ("q", TaskState.QUEUED),
            ("s", TaskState.SCHEDULED),
            ("l", TaskState.RUNNING),
        ):
            if state in (None, listed):
                indexes += [self._key(kind, name) for name in queues]
        if state is None or state is TaskState.FAILED:
            indexes.append(self._key("dead"))
        if state is None or (state.finished and state is not TaskState.FAILED):
            indexes.append(self._key("finished"))
        found: dict[str, tuple[int, TaskInfo]] = {}
        for index in indexes:
            matched = 0
            start = 0
            while matched < limit:
                page = self._page(index, start)
                for task_id, (seq, info) in self._read(page).items():
                    if (state is None or info.state is state) and (
                        queue is None or info.message.queue == queue
                    ):
                        found[task_id] = (seq, info)
                        matched += 1
                if len(page) < PAGE:
                    break
                start += PAGE
        ordered = sorted(found.values(), key=lambda seq_info: seq_info[0])
        return [info for _, info in ordered[:limit]]

    def _page(self, index: str, start: int) -> list[str]:
        """One page of a sorted set's members, in score order."""
        with self._reachable():
            members = cast(list[bytes], self._redis.zrange(index, start, start + PAGE - 1))
        return [member.decode() for member in members]

    def _queues(self) -> list[str]:
        with self._reachable():
            return sorted(_text(name) for name in self._redis.smembers(self._key("queues")))

    def dead(self, limit: int = 100) -> list[TaskInfo]:
        return self.list_tasks(TaskState.FAILED, limit=limit)

    def stats(self) -> BrokerStats:
        queues = self._queues()
        with self._reachable():
            pipe = self._redis.pipeline(transaction=False)
            for queue in queues:
                for kind in ("q", "s", "l"):
                    pipe.zcard(self._key(kind, queue))
            pipe.zcard(self._key("dead"))
            pipe.zrangebyscore(self._key("workers"), f"({now_ms() - WORKER_SEEN_MS}", "+inf")
            *counts, dead, workers = pipe.execute()
        by_queue = {
            queue: QueueStats(*counts[3 * n : 3 * n + 3])
            for n, queue in enumerate(queues)
            if any(counts[3 * n : 3 * n + 3])
        }
        return BrokerStats(queues=by_queue, dead=dead, workers=sorted(map(_text, workers)))

    # Control

    def cancel(self, task_id: str) -> TaskState | None:
        header_cancelled = ErrorInfo(
            "ChordHeaderFailed", f"header task [{task_id}] of the chord was cancelled"
        )
        args: list[str | int | bytes] = [task_id, _CANCELLED, ENCODER.encode(header_cancelled)]
        # A chain's step: its later steps, never to run if it is cancelled, end failed then.
        info = self.info([task_id]).get(task_id)
        if info is not None and info.message.link:
            for reason in (CANCELLED_BEFORE_START, CANCELLED_AFTER_LEASE):
                broken = chain_failure(info.message, TaskState.CANCELLED, reason)
                args.append(ENCODER.encode(broken))
            for later in info.message.link:
                args += _message_args(msgspec.structs.replace(later, link=()))
        else:
            args += [b"", b""]
        state = self._run(self._cancel, *args)
        return None if state is None else TaskState(_text(state))

    def requeue(self, ids: Sequence[str] | None = None) -> list[str]:
        if ids is not None:
            pages = (ids[start : start + PAGE] for start in range(0, len(ids), PAGE))
            return [task_id for page in pages for task_id in self._revive(page)[0]]
        requeued: list[str] = []
        kept = 0  # dead letters left in the index (never-run chain steps), ahead of the rest
        while True:
            page = self._page(self._key("dead"), kept)
            if not page:
                return requeued
            revived, skipped = self._revive(page)
            requeued += revived
            kept += skipped

    def _revive(self, ids: Sequence[str]) -> tuple[list[str], int]:
        """Requeue these dead tasks with attempts reset; drop dead entries of expired ones.
        The ids requeued, and how many were left as they are (never-run chain steps)."""
        found = self.info(ids)
        args: list[str | bytes | int] = []
        skipped = 0
        for task_id in ids:
            info = found.get(task_id)
            if info is not None and never_ran_in_chain(info.error):
                skipped += 1
                continue
            if info is None:
                args += [task_id, b"", 0]
                continue
            message = ENCODER.encode(msgspec.structs.replace(info.message, attempt=0, eta_ms=0))
            args += [task_id, message, len(info.message.link)]
            args += [later.id for later in info.message.link]
        return [_text(task_id) for task_id in self._run(self._requeue, *args)], skipped

    def purge(self, queue: str) -> int:
        purged = 0
        while deleted := self._run(self._purge, queue, PAGE, _HEADER_PURGED):
            purged += len(deleted)
            # A chain's purged step: its later steps can never run, and end failed.
            for step in purged_messages(message for message in deleted if message):
                if step.link:
                    broken = chain_failure(step, TaskState.CANCELLED, PURGED_BEFORE_START)
                    args = [
                        a
                        for later in step.link
                        for a in _message_args(msgspec.structs.replace(later, link=()))[:4]
                    ]
                    self._run(self._never_run, ENCODER.encode(broken), *args)
        return purged

    def take_tokens(
        self, name: str, rate: float, capacity: float, wanted: int
    ) -> tuple[int, float]:
        granted, left = self._run(self._take_tokens, name, rate, capacity, wanted)
        return int(granted), max(0.0, (1 - float(left)) / rate)

    def lead(self, worker: str, ttl_ms: int) -> bool:
        return bool(self._run(self._lead, worker, ttl_ms))

    def leave(self, worker: str) -> None:
        self._run(self._leave, worker)

    def claim_tick(self, schedule: str, tick_ms: int, message: TaskMessage) -> bool:
        return bool(self._run(self._claim_tick, schedule, tick_ms, *_message_args(message)))

    def last_tick(self, schedule: str) -> int:
        with self._reachable():
            last = self._redis.get(self._key("tick", schedule))
        return int(last) if last is not None else 0

    def housekeep(self) -> None:
        """Keys expire by themselves; this trims the indexes of those that did."""
        self._run(self._housekeep)

    def footprint(self) -> int:
        pattern = "".join("\\" + c if c in "*?[]\\" else c for c in self._prefix) + ":*"
        with self._reachable():
            return sum(1 for _ in self._redis.scan_iter(match=pattern, count=1000))

    def close(self) -> None:
        self._redis.close()
        self._blocking.close()


def _message_args(message: TaskMessage) -> list[str | int | bytes]:
    """A message as the scripts' ``store`` takes it: 7 arguments."""
    return [
        message.id,
        ENCODER.encode(message),
        message.queue,
        message.priority,
        message.eta_ms,
        message.key,
        message.chord,
    ]


# The servers whose configuration this process has checked (``_check_durability``).
_checked_servers: set[str] = set()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _info(row: Sequence[bytes | None]) -> TaskInfo:
    message, state, worker, started, finished, result, error, cancel, _ = row
    assert message is not None and state is not None
    return TaskInfo(
        message=MESSAGE_DECODER.decode(message),
        state=TaskState(state.decode()),
        worker=worker.decode() if worker else "",
        started_ms=int(started or 0),
        finished_ms=int(finished or 0),
        result=result or b"",
        error=_ERROR_DECODER.decode(error) if error else None,
        cancel_requested=cancel == b"1",
    )
