// The log limiter on its own (docs/semantics.md#log-limits), with the clock passed in: first lines
// always written, repeats sampled and rate-limited, the left-out count reported.
import t from 'tap'
import { once } from 'node:events'
import { EventEmitter } from 'node:events'
import { LogLimiter, SUPPRESS } from '../lib/log-limiter'

const never = (): void => { throw new Error('no summary expected') }

t.test('the first line of every key is written; repeats at most perSecond per second', async (t) => {
  const limiter = new LogLimiter({ sample: 1, perSecond: 2 }, { onSummary: never })
  t.teardown(() => limiter.close())
  const now = 1_000_000
  t.equal(limiter.admit('denied web /a', now), 0, 'first of its key')
  t.equal(limiter.admit('denied web /a', now), 0, 'a repeat: first token')
  t.equal(limiter.admit('denied web /a', now), 0, 'second token')
  t.equal(limiter.admit('denied web /a', now), SUPPRESS, 'bucket empty')
  t.equal(limiter.admit('denied web /a', now + 100), SUPPRESS, 'a fifth of a token back')
  t.equal(limiter.admit('denied db /a', now + 100), 2, 'a new key is written during the flood, and reports the 2 left out')
  t.equal(limiter.admit('denied web /a', now + 500), 0, 'a token back after half a second')
  t.equal(limiter.admit('denied web /a', now + 500), SUPPRESS)
  t.equal(limiter.admit('denied web /a', now + 10_000), 1, 'the bucket holds at most perSecond tokens')
  t.equal(limiter.admit('denied web /a', now + 10_000), 0)
  t.equal(limiter.admit('denied web /a', now + 10_000), SUPPRESS, '...so a long pause buys perSecond lines, not more')
})

t.test('one repeat in `sample` is eligible, then rated', async (t) => {
  const limiter = new LogLimiter({ sample: 3, perSecond: 1000 }, { onSummary: never })
  t.teardown(() => limiter.close())
  const written: number[] = []
  for (let i = 0; i < 10; i++) if (limiter.admit('k', 5_000 + i) !== SUPPRESS) written.push(i)
  t.same(written, [0, 3, 6, 9], 'the first, then every third repeat')
})

t.test('perSecond 0: only first lines', async (t) => {
  const limiter = new LogLimiter({ sample: 1, perSecond: 0 }, { onSummary: never })
  t.teardown(() => limiter.close())
  t.equal(limiter.admit('k', 1), 0)
  for (let i = 0; i < 100; i++) t.equal(limiter.admit('k', 1 + i * 1000), SUPPRESS)
  t.equal(limiter.admit('k2', 200_000), 100)
})

t.test('keys are remembered in a bounded LRU: a forgotten key is new again', async (t) => {
  const limiter = new LogLimiter({ sample: 1, perSecond: 0 }, { onSummary: never, maxKeys: 2 })
  t.teardown(() => limiter.close())
  limiter.admit('a', 1)
  limiter.admit('b', 1)
  t.equal(limiter.admit('a', 1), SUPPRESS, 'a is remembered (and now the most recent)')
  limiter.admit('c', 1)
  t.equal(limiter.admit('a', 1), SUPPRESS, 'a stays')
  t.equal(limiter.admit('b', 1), 1, 'b, the least recently seen, was forgotten: new again (reporting the a left out)')
})

t.test('lines left out and not reported by a later line are reported by a summary, once', async (t) => {
  const summaries = new EventEmitter()
  // The limiter's timer is unref()'d (it must not hold a closing app open): keep this test alive.
  const alive = setInterval(() => {}, 1000)
  t.teardown(() => clearInterval(alive))
  const limiter = new LogLimiter({ sample: 1, perSecond: 0 }, { onSummary: (n) => summaries.emit('summary', n), summaryDelayMs: 1 })
  t.teardown(() => limiter.close())
  limiter.admit('k', 1)
  const first = once(summaries, 'summary')
  for (let i = 0; i < 5; i++) limiter.admit('k', 1)
  t.same(await first, [5])

  // Reported by a later line before the summary is due: the summary has nothing left to say.
  const quiet = new LogLimiter({ sample: 1, perSecond: 0 }, { onSummary: never, summaryDelayMs: 1 })
  quiet.admit('k', 1)
  quiet.admit('k', 1)
  t.equal(quiet.admit('other', 1), 1)
  await new Promise((resolve) => setTimeout(resolve, 5))
  quiet.close()

  // close() drops a pending summary.
  const closed = new LogLimiter({ sample: 1, perSecond: 0 }, { onSummary: never, summaryDelayMs: 1 })
  closed.admit('k', 1)
  closed.admit('k', 1)
  closed.close()
  closed.close()
  await new Promise((resolve) => setTimeout(resolve, 5))
})
