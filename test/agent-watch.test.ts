import t from 'tap'
import { once } from 'node:events'
import { AgentClient, withAgentStatus } from '../lib/agent/client'
import { resolveAgentConfig } from '../lib/agent/config'
import { BlockingWatch } from '../lib/agent/watch'
import type { WatchFetchQuery, WatchOptions } from '../lib/agent/watch'
import type { IssuedCert } from '../lib/agent/wire'
import { AgentInvalidResponseError, AgentResponseError, AgentUnreachableError, InvalidOptionError } from '../lib/errors'
import { FakeAgent, RecordingLogger, captured } from './helpers/agent-fixtures'
import type { LogCall, Reply } from './helpers/agent-fixtures'

interface Poll { q: WatchFetchQuery, at: number, resolve: (r: { index: number | null, value: string }) => void, reject: (e: unknown) => void }

/**
 * A watch whose fetch is driven by the test: every poll is queued, and the test answers it with
 * `answer()`/`fail()`. Backoff and rate limit are tiny so nothing waits on wall-clock time.
 */
function harness (tt: tap.Test, opts: Partial<WatchOptions<string>> = {}): {
  watch: BlockingWatch<string>,
  log: RecordingLogger,
  polls: Poll[],
  nextPoll: () => Promise<Poll>,
  answer: (index: number | null, value: string) => Promise<Poll>,
  fail: (err: unknown) => Promise<Poll>
} {
  const log = new RecordingLogger()
  const polls: Poll[] = []
  const waiting: Array<(p: Poll) => void> = []
  const watch = new BlockingWatch<string>({
    name: 'test',
    log,
    waitMs: 1000,
    minIntervalMs: 1,
    burst: 2,
    backoff: { initialMs: 1, maxMs: 4 },
    fetch: async (q) => await new Promise((resolve, reject) => {
      const poll = { q, at: performance.now(), resolve, reject }
      polls.push(poll)
      waiting.shift()?.(poll)
    }),
    ...opts
  })
  tt.teardown(() => watch.stop())
  // The watch's timers are unref()'d (an app's server keeps the process alive); here, the test must.
  const keepAlive = setInterval(() => {}, 1000)
  tt.teardown(() => clearInterval(keepAlive))
  let served = 0
  const nextPoll = async (): Promise<Poll> => {
    const p = polls[served] ?? await new Promise<Poll>((resolve) => waiting.push(resolve))
    served++
    return p
  }
  return {
    watch,
    log,
    polls,
    nextPoll,
    // Answers the oldest unanswered poll and returns the poll that follows it.
    answer: async (index, value) => { (await nextPoll()).resolve({ index, value }); return await peek() },
    fail: async (err) => { (await nextPoll()).reject(err); return await peek() }
  }
  async function peek (): Promise<Poll> {
    return polls[served] ?? await new Promise<Poll>((resolve) => waiting.push(resolve))
  }
}

t.test('the first answer is accepted; the same index is no change; a higher one is', async (t) => {
  const accepted: string[] = []
  const changes: string[] = []
  const h = harness(t, { accept: (v) => { accepted.push(v) } })
  h.watch.on('change', (v) => changes.push(v))
  t.equal(h.watch.index, 0)
  t.equal(h.watch.value, undefined)
  h.watch.start()
  h.watch.start()

  let next = await h.answer(5, 'v5')
  t.equal(await h.watch.ready(), 'v5')
  t.same(h.polls[0]!.q, { index: 0, waitMs: 1000, signal: h.polls[0]!.q.signal }, 'the first poll does not block')
  t.equal(next.q.index, 5, 'then it blocks on the index it got')
  t.equal(h.watch.value, 'v5')
  t.ok(h.watch.lastSuccess instanceof Date)

  next = await h.answer(5, 'v5 again')
  t.equal(next.q.index, 5)
  next = await h.answer(9, 'v9')
  t.equal(next.q.index, 9)
  t.same(accepted, ['v5', 'v9'], 'accept sees only new indexes')
  t.same(changes, ['v5', 'v9'])
  t.equal(h.watch.failures, 0)
  t.equal(h.watch.lastError, null)
})

t.test('differs: a different value under an unchanged index is a change (agent restarted without its state)', async (t) => {
  const accepted: string[] = []
  const h = harness(t, { accept: (v) => { accepted.push(v) }, differs: (a, b) => a !== b })
  h.watch.start()
  await h.answer(7, 'old agent')
  await h.answer(7, 'old agent')
  t.same(accepted, ['old agent'], 'the same value at the same index is no change')
  await h.answer(7, 'new agent')
  t.same(accepted, ['old agent', 'new agent'])
  t.equal(h.watch.value, 'new agent')
})

t.test('an index that goes backwards resets to a fresh non-blocking read', async (t) => {
  const h = harness(t)
  h.watch.start()
  await h.answer(40, 'v40')
  const next = await h.answer(12, 'restored snapshot')
  t.equal(next.q.index, 0, 're-read without an index')
  t.equal(h.watch.value, 'v40', 'the out-of-order answer itself is not accepted')
  t.match(h.log.at('info'), [{ event: 'watch-index-reset', fields: { watch: 'test', index: 12, previousIndex: 40 }, msg: 'fastify-consul-native: test: Consul index went backwards; re-reading' }])
  const after = await h.answer(12, 'v12')
  t.equal(h.watch.value, 'v12', 'the fresh read is accepted even at the lower index')
  t.equal(after.q.index, 12)
})

t.test('a missing or zero index is an invalid answer: backoff, then a non-blocking read', async (t) => {
  const h = harness(t)
  h.watch.start()
  await h.answer(7, 'v7')
  let next = await h.answer(null, 'no index')
  t.equal(next.q.index, 0)
  t.equal(h.watch.value, 'v7')
  t.ok(h.watch.lastError instanceof AgentInvalidResponseError)
  t.match(h.watch.lastError?.message, 'X-Consul-Index is missing or not an integer')
  next = await h.answer(0, 'zero index')
  t.equal(next.q.index, 0)
  t.match(h.watch.lastError?.message, 'X-Consul-Index is 0; expected an integer of at least 1')
  t.equal(h.log.at('error').length, 2, 'each distinct cause is logged once, at error: a broken answer needs an operator')
  t.equal(h.watch.failures, 2)
  await h.answer(8, 'v8')
  t.equal(h.watch.value, 'v8')
  t.equal(h.watch.failures, 0)
  t.match(h.log.at('info').at(-1), { event: 'watch-recovered', fields: { watch: 'test', index: 8 } })
})

t.test('a rejected value keeps the last good one and polling goes on from its index', async (t) => {
  const h = harness(t, {
    accept: (v) => { if (v.startsWith('bad')) throw new Error(`cannot compile ${v.split(':')[1]!}`) }
  })
  h.watch.start()
  await h.answer(1, 'good')
  const next = await h.answer(2, 'bad:/a(')
  t.equal(next.q.index, 2, 'the next poll blocks on the rejected index, so only a new change wakes it')
  t.equal(h.watch.value, 'good')
  t.match(h.watch.lastError?.message, 'cannot compile /a(')
  t.match(h.log.at('error'), [{ event: 'watch-rejected', fields: { watch: 'test', index: 2, previousIndex: 1 }, msg: /new value rejected; keeping the last good one$/ }])

  await h.answer(2, 'bad:/a(')
  t.equal(h.log.at('error').length, 1, 'the same index is not re-judged')
  t.match(h.watch.lastError?.message, 'cannot compile /a(', 'still failing')
  await h.answer(3, 'bad:/a(')
  t.equal(h.log.at('error').length, 1, 'the same cause is logged once...')
  t.match(h.log.at('debug').at(-1), { event: 'watch-rejected', msg: /value rejected again$/ }, '...then at debug')
  await h.answer(4, 'bad:(?=x)')
  t.equal(h.log.at('error').length, 2, 'a new cause is logged')
  await h.answer(5, 'fixed')
  t.equal(h.watch.value, 'fixed')
  t.equal(h.watch.lastError, null)
  t.match(h.log.at('info'), [{ event: 'watch-recovered' }])
})

t.test('fetch failures: logged once per cause, then debug; recovery logged once', async (t) => {
  const h = harness(t)
  h.watch.start()
  await h.answer(3, 'v3')
  const down = new AgentUnreachableError('http://127.0.0.1:8500', 'connect ECONNREFUSED 127.0.0.1:8500')
  const next = await h.fail(down)
  t.equal(next.q.index, 0, 'a retry after a failure reads without blocking (the agent may have restarted)')
  await h.fail(new AgentUnreachableError('http://127.0.0.1:8500', 'connect ECONNREFUSED 127.0.0.1:8500'))
  await h.fail(new AgentUnreachableError('http://127.0.0.1:8500', 'connect ECONNREFUSED 127.0.0.1:8500'))
  t.equal(h.log.at('warn').length, 1)
  t.match(h.log.at('warn')[0], { event: 'watch-failed', fields: { watch: 'test', index: 3, failures: 1 }, obj: { err: down }, msg: /poll failed; keeping the last good value$/ })
  t.equal(h.log.at('debug').filter((c) => c.event === 'watch-failed' && c.msg.endsWith('poll failed again')).length, 2)
  t.equal(h.watch.failures, 3)
  t.equal(h.watch.value, 'v3', 'the last good value stays')

  await h.fail('a string, not an Error')
  t.equal(h.log.at('warn').length, 2, 'a different cause is logged')
  t.equal(h.watch.lastError?.message, 'a string, not an Error')

  await h.answer(3, 'v3')
  t.equal(h.watch.failures, 0, 'after a transport failure, any answer is a recovery (the agent is back)')
  t.equal(h.watch.lastError, null)
  t.equal(h.log.at('info').filter((c) => c.event === 'watch-recovered').length, 1)
  await h.answer(3, 'v3')
  t.equal(h.log.at('info').filter((c) => c.event === 'watch-recovered').length, 1, 'recovery is logged once')
})

t.test('the same cause with a different text is the same cause: an error status by its code, a timeout by its kind', async (t) => {
  const h = harness(t)
  h.watch.start()
  await h.answer(3, 'v3')
  // Consul's error bodies may carry a request id or a time; the wait a timeout names differs between a poll and a re-read.
  for (const id of ['a1', 'b2', 'c3']) await h.fail(withAgentStatus(new AgentResponseError('GET', '/v1/x', 503, `No cluster leader (request ${id})`), 503))
  t.equal(h.log.at('warn').length, 1, 'one 503 cause')
  const timeout = (ms: number): Error => new AgentUnreachableError('http://127.0.0.1:8500', `no response within ${ms} ms`, { cause: Object.assign(new Error('Headers Timeout Error'), { code: 'UND_ERR_HEADERS_TIMEOUT' }) })
  await h.fail(timeout(7125))
  await h.fail(timeout(10000))
  t.equal(h.log.at('warn').length, 2, 'one timeout cause')
  await h.fail(withAgentStatus(new AgentResponseError('GET', '/v1/x', 500, 'rpc error'), 500))
  t.equal(h.log.at('warn').length, 3, 'another status is another cause')
})

t.test('an agent cut off from its servers: cached answers between refused blocking polls are no recovery', async (t) => {
  // What a Consul agent does when its cache cannot refresh: a read without an index gets the
  // cached value, a blocking read gets the refresh's error (agent/cache/cache.go, getWithIndex).
  const agent = await FakeAgent.start()
  t.teardown(() => agent.close())
  const client = new AgentClient(resolveAgentConfig({ address: agent.origin }, {}))
  t.teardown(() => client.close())
  let cutOff = true
  agent.handler = (req) => {
    if (Number(req.query.get('index') ?? 0) === 0 || !cutOff) return { status: 200, headers: { 'X-Consul-Index': '7' }, body: JSON.stringify({ v: 'cached' }) }
    return { status: 500, body: 'rpc error making call: No cluster leader' }
  }
  const log = new RecordingLogger()
  const watch = new BlockingWatch({
    name: 'roots',
    log,
    waitMs: 50,
    minIntervalMs: 1,
    backoff: { initialMs: 1, maxMs: 8 },
    fetch: async (q) => {
      const r = await client.request('GET', '/v1/agent/connect/ca/roots', { blocking: { index: q.index, waitMs: q.waitMs }, signal: q.signal })
      return { index: r.index, value: r.body }
    }
  })
  t.teardown(() => watch.stop())
  const failed = log.calls.filter.bind(log.calls)
  watch.start()
  await watch.ready()
  const lastGood = watch.lastSuccess
  while (watch.failures < 6) await once(log, 'log')
  t.ok(watch.lastError instanceof AgentResponseError, 'the failure stays visible between the cached answers')
  t.equal(watch.lastSuccess, lastGood, 'a cached answer is no success either')
  t.same(failed((c) => c.event === 'watch-failed' && c.level !== 'debug').map((c) => c.level), ['warn'], 'one line for the whole outage')
  t.equal(failed((c) => c.event === 'watch-recovered').length, 0)
  const retries = failed((c) => c.event === 'watch-failed').map((c) => c.fields.failures)
  t.same(retries.slice(0, 6), [1, 2, 3, 4, 5, 6], 'failures keep counting, so the backoff keeps growing')
  t.ok(agent.requests.filter((r) => r.query.get('index') === null || r.query.get('index') === '0').length >= 6, 'each failure is followed by a cached re-read')

  cutOff = false
  while (watch.failures > 0) await once(log, 'log')
  t.equal(watch.lastError, null, 'a blocking poll that succeeds ends the outage')
  t.equal(failed((c) => c.event === 'watch-recovered').length, 1)

  // A 4xx (here a rate limit) is not the agent's cache standing in for its servers: the re-read's
  // answer is a recovery at once.
  let limited = true
  agent.handler = (req) => {
    if (Number(req.query.get('index') ?? 0) > 0 && limited) { limited = false; return { status: 429, body: 'rate limit exceeded' } }
    return Number(req.query.get('index') ?? 0) === 0 ? { status: 200, headers: { 'X-Consul-Index': '7' }, body: JSON.stringify({ v: 'cached' }) } : { hang: true }
  }
  // The poll in flight ends at its wait (50 ms), and the next one meets the rate limit.
  while (failed((c) => c.event === 'watch-recovered').length < 2) await once(log, 'log')
  t.equal(watch.failures, 0)
  const limitedLines = failed((c) => c.event === 'watch-failed' && (c.obj as { err?: Error } | undefined)?.err?.message.includes('429') === true)
  t.same(limitedLines.map((c) => c.fields.failures), [1], 'the 429 was one failure, followed at once by the recovery')
})

t.test('a re-read after a failure that finds a new index or another value is a recovery at once', async (t) => {
  const h = harness(t, { differs: (a, b) => a !== b })
  h.watch.start()
  await h.answer(3, 'v3')
  await h.fail(new Error('down'))
  await h.answer(2, 'v2')
  t.equal(h.watch.failures, 0, 'a lower index: the agent restarted')
  t.equal(h.watch.lastError, null)
  await h.answer(2, 'v2')
  t.equal(h.watch.value, 'v2')
  await h.fail(new Error('down'))
  await h.answer(2, 'restarted without its data')
  t.equal(h.watch.value, 'restarted without its data', 'the same index with another value')
  t.equal(h.watch.failures, 0)
  t.equal(h.log.calls.filter((c) => c.event === 'watch-recovered').length, 2)
})

t.test('a higher index with the same value moves the index and changes nothing else', async (t) => {
  const accepted: string[] = []
  const changes: string[] = []
  const h = harness(t, { accept: (v) => { if (v.startsWith('bad')) throw new Error('cannot compile'); accepted.push(v) } })
  h.watch.on('change', (v) => changes.push(v))
  h.watch.start()
  await h.answer(10, 'v')
  let next = await h.answer(11, 'v')
  t.equal(next.q.index, 11, 'the next poll blocks on the new index')
  t.same(accepted, ['v'], 'nothing to accept')
  t.same(changes, ['v'], 'nothing to announce')
  t.equal(h.log.calls.filter((c) => c.event === 'watch-updated').length, 1)

  await h.answer(12, 'bad')
  t.match(h.watch.lastError?.message, 'cannot compile')
  next = await h.answer(13, 'v')
  t.equal(next.q.index, 13)
  t.equal(h.watch.lastError, null, 'back to the accepted value: the rejection no longer stands')
  t.same(accepted, ['v'])
  t.equal(h.log.calls.filter((c) => c.event === 'watch-recovered').length, 1)

  const custom = harness(t, { same: () => false, accept: (v) => { accepted.push(`custom ${v}`) } })
  custom.watch.start()
  await custom.answer(1, 'w')
  await custom.answer(2, 'w')
  t.same(accepted.slice(1), ['custom w', 'custom w'], 'option same: decides what counts as the same value')
})

t.test('agent answers that need an operator log at error; transient ones at warn', async (t) => {
  const agent = await FakeAgent.start()
  t.teardown(() => agent.close())
  const client = new AgentClient(resolveAgentConfig({ address: agent.origin }, {}))
  t.teardown(() => client.close())
  const statuses = [403, 429, 404, 500, 400]
  agent.handler = () => ({ status: statuses.shift() ?? 200, body: 'nope' })
  const log = new RecordingLogger()
  const watch = new BlockingWatch({
    name: 'roots',
    log,
    waitMs: 1000,
    backoff: { initialMs: 1, maxMs: 2 },
    fetch: async (q) => { const r = await client.roots(q); return { index: r.index, value: r.body } }
  })
  t.teardown(() => watch.stop())
  const levels: string[] = []
  log.on('log', (c: LogCall) => { if (c.event === 'watch-failed' && c.level !== 'debug') levels.push(c.level) })
  watch.start()
  while (levels.length < 5) await once(log, 'log')
  t.same(levels, ['error', 'warn', 'warn', 'warn', 'error'], '403 and 400 need an operator; 429, 404 and 500 may pass')
})

t.test('backoff: full jitter, doubling from initialMs, capped at maxMs', async (t) => {
  const h = harness(t, { backoff: { initialMs: 10, maxMs: 40 }, random: () => 1 })
  h.watch.start()
  const delays: number[] = []
  for (let i = 0; i < 5; i++) {
    await h.fail(new Error(`failure ${i}`))
    delays.push(h.log.calls.at(-1)!.fields.retryInMs as number)
  }
  t.same(delays, [10, 20, 40, 40, 40])

  const low = harness(t, { backoff: { initialMs: 10, maxMs: 40 }, random: () => 0.5 })
  low.watch.start()
  await low.fail(new Error('x'))
  await low.fail(new Error('y'))
  t.same(low.log.calls.map((c) => c.fields.retryInMs), [5, 10], 'a random share of the ceiling')
})

t.test('rate limit: a burst of quick polls, then one per minIntervalMs', async (t) => {
  const h = harness(t, { minIntervalMs: 60, burst: 2 })
  h.watch.start()
  for (let i = 1; i <= 3; i++) await h.answer(i, `v${i}`)
  const [p1, p2, p3, p4] = h.polls.map((p) => p.at) as [number, number, number, number]
  t.ok(p2 - p1 < 40, `the burst (first poll and one more) is not delayed (${Math.round(p2 - p1)} ms)`)
  t.ok(p3 - p2 >= 45, `then polls wait for a token (${Math.round(p3 - p2)} ms)`)
  t.ok(p4 - p3 >= 45, `one per interval (${Math.round(p4 - p3)} ms)`)
})

t.test('stop(): aborts the poll in flight, rejects ready(), is idempotent, and start() cannot revive it', async (t) => {
  const h = harness(t)
  h.watch.start()
  const poll = await h.nextPoll()
  const ready = h.watch.ready()
  h.watch.stop()
  h.watch.stop()
  t.ok(poll.q.signal.aborted, 'the in-flight poll is aborted')
  await t.rejects(ready, { message: 'watch test stopped before its first value' })
  poll.reject(new Error('aborted'))
  poll.resolve({ index: 1, value: 'late' })
  h.watch.start()
  await new Promise((resolve) => setImmediate(resolve))
  t.equal(h.polls.length, 1, 'no poll after stop')
  t.equal(h.watch.value, undefined)
})

t.test('stop() during a backoff wakes the loop and keeps the failure as the cause of ready()', async (t) => {
  const h = harness(t, { backoff: { initialMs: 60_000, maxMs: 60_000 }, random: () => 1 })
  h.watch.start()
  const first = await h.nextPoll()
  first.reject(new AgentUnreachableError('x', 'down'))
  await h.log.next('warn')
  h.watch.stop()
  const err = await h.watch.ready().catch((e: Error) => e)
  t.equal((err as Error & { cause?: Error }).cause?.message, 'Consul agent unreachable at x: down')
  t.equal(h.polls.length, 1)
})

t.test('stop() when a poll answers after it: the answer is ignored', async (t) => {
  const h = harness(t)
  h.watch.start()
  const poll = await h.nextPoll()
  h.watch.stop()
  poll.resolve({ index: 4, value: 'late' })
  await new Promise((resolve) => setImmediate(resolve))
  t.equal(h.watch.value, undefined)
})

t.test('stop() between an answer and the next poll', async (t) => {
  const h = harness(t, { minIntervalMs: 60_000, burst: 1 })
  h.watch.start()
  const poll = await h.nextPoll()
  h.watch.on('change', () => h.watch.stop())
  poll.resolve({ index: 4, value: 'v4' })
  t.equal(await h.watch.ready(), 'v4')
  await new Promise((resolve) => setImmediate(resolve))
  t.equal(h.polls.length, 1, 'the loop ends instead of waiting for a token')
})

t.test('a throwing change listener is logged and does not stop the watch', async (t) => {
  const h = harness(t)
  const seen: string[] = []
  const boom = (): void => { throw new Error('listener bug') }
  h.watch.on('change', boom).on('change', (v) => seen.push(v))
  h.watch.start()
  await h.answer(1, 'v1')
  t.match(h.log.at('error'), [{ event: 'listener-failed', fields: { watch: 'test', listenerEvent: 'change' }, obj: { err: { message: 'listener bug' } } }])
  h.watch.off('change', boom)
  await h.answer(2, 'v2')
  t.same(seen, ['v1', 'v2'])
  t.equal(h.log.at('error').length, 1, 'removed listeners are not called')
  t.throws(() => h.watch.on('error' as 'change', () => {}), TypeError)
  h.watch.off('other' as 'change', () => {})
})

t.test('failure listeners hear every failed poll; a throwing one is logged and the watch goes on', async (t) => {
  const h = harness(t)
  const heard: string[] = []
  h.watch.onFailure(() => { throw new Error('listener bug') }).onFailure((err) => heard.push(err.message))
  h.watch.start()
  await h.answer(1, 'v1')
  await h.fail(new AgentUnreachableError('http://127.0.0.1:8500', 'connect ECONNREFUSED'))
  t.same(heard, ['Consul agent unreachable at http://127.0.0.1:8500: connect ECONNREFUSED'])
  t.match(h.log.at('error'), [{ event: 'listener-failed', fields: { watch: 'test', listenerEvent: 'failure' }, obj: { err: { message: 'listener bug' } } }])
  await h.answer(2, 'v2')
  t.equal(h.watch.value, 'v2', 'still polling')
})

t.test('a logger that throws stops the watch instead of spinning', async (t) => {
  const log = new RecordingLogger()
  log.warn = () => { throw new Error('logger down') }
  let polls = 0
  const watch = new BlockingWatch({ name: 'x', log, fetch: async () => { polls++; throw new Error('agent down') } })
  const ready = watch.ready()
  watch.start()
  await t.rejects(ready, { message: 'watch x stopped before its first value', cause: { message: 'logger down' } })
  t.equal(polls, 1)
})

t.test('options: waitMs is clamped to 10 minutes and validated; defaults', async (t) => {
  const seen: WatchFetchQuery[] = []
  const log = new RecordingLogger()
  const watch = new BlockingWatch<number>({ name: 'w', log, waitMs: 900_000, fetch: async (q) => { seen.push(q); return { index: 1, value: 1 } } })
  watch.start()
  await watch.ready()
  watch.stop()
  t.equal(seen[0]!.waitMs, 600_000)
  const defaults = new BlockingWatch<number>({ name: 'd', log, fetch: async (q) => { seen.push(q); return { index: 1, value: 1 } } })
  defaults.start()
  await defaults.ready()
  defaults.stop()
  t.equal(seen[1]!.waitMs, 300_000)
  t.throws(() => new BlockingWatch({ name: 'bad', log, waitMs: -1, fetch: async () => ({ index: 1, value: 1 }) }), InvalidOptionError)
})

t.test('with a real agent: leaf rotation, failures in between, prompt stop with a long poll in flight', async (t) => {
  const agent = await FakeAgent.start()
  t.teardown(() => agent.close())
  const client = new AgentClient(resolveAgentConfig({ address: agent.origin, token: 'tok' }, {}))
  t.teardown(() => client.close())
  const first = captured('ca-leaf-api')
  const rotated = { ...captured('ca-leaf-api-after-rotation', 'ca-leaf-api') }
  rotated.headers = { ...rotated.headers, 'x-consul-index': '28' }
  const script: Array<() => Reply> = [
    () => first,
    () => ({ status: 500, body: 'rpc error: No cluster leader' }),
    () => ({ body: '{garbage', headers: { 'x-consul-index': '20' } }),
    () => first,
    () => rotated
  ]
  agent.handler = () => (script.shift() ?? (() => ({ hang: true })))()

  const log = new RecordingLogger()
  const certs: IssuedCert[] = []
  const watch = new BlockingWatch<IssuedCert>({
    name: 'leaf',
    log,
    waitMs: 30_000,
    minIntervalMs: 1,
    backoff: { initialMs: 1, maxMs: 5 },
    accept: (cert) => { certs.push(cert) },
    fetch: async ({ index, waitMs, signal }) => {
      const res = await client.leaf('api', { index, waitMs, signal })
      return { index: res.index, value: res.body }
    }
  })
  t.teardown(() => watch.stop())
  const changed = new Promise<IssuedCert>((resolve) => watch.on('change', (c) => { if (c.ModifyIndex === 28) resolve(c) }))
  watch.start()
  t.equal((await watch.ready()).SerialNumber, '08')
  t.equal((await changed).SerialNumber, '0b')
  t.same(certs.map((c) => c.SerialNumber), ['08', '0b'])
  t.match(log.at('warn'), [{ fields: { watch: 'leaf' }, obj: { err: { message: /with 500: rpc error: No cluster leader/ } } }])
  t.match(log.at('error'), [{ fields: { watch: 'leaf' }, obj: { err: { message: /not JSON/ } } }])
  t.equal(log.at('info').filter((c) => c.event === 'watch-recovered').length, 1)

  const hanging = agent.requests[5] ?? await agent.nextRequest()
  t.equal(hanging.query.get('index'), '28')
  t.equal(hanging.query.get('wait'), '30s')
  t.equal(hanging.headers['x-consul-token'], 'tok')
  const started = performance.now()
  watch.stop()
  await hanging.aborted
  t.ok(performance.now() - started < 1000, 'the agent sees the poll closed at once')
  t.equal(watch.value?.SerialNumber, '0b')
})
