// Options are validated and defaulted once; these are the cases the plugin tests do not reach.
import t from 'tap'
import { DEFAULT_BLOCKING_WAIT, DEFAULT_HEALTH_URL, DEFAULT_READY_TIMEOUT, resolveOptions } from '../lib/options'

t.test('defaults', async (t) => {
  t.same(resolveOptions({ service: 'api' }), {
    service: 'api',
    agent: undefined,
    datacenter: undefined,
    namespace: undefined,
    partition: undefined,
    readyTimeout: DEFAULT_READY_TIMEOUT,
    defaultPolicy: 'agent',
    health: { url: DEFAULT_HEALTH_URL },
    mode: 'l7',
    blockingWait: DEFAULT_BLOCKING_WAIT,
    register: null,
    certificates: { source: 'agent' },
    recheckUpgrades: false,
    enforcement: 'enforce',
    candidate: null,
    maxRegexProgramSize: 1_048_576,
    logDenials: { sample: 1, perSecond: 10 }
  })
  t.same(resolveOptions({ service: 'api', health: {} }).health, { url: '/health' }, 'health: {} keeps the default url')
  t.equal(resolveOptions({ service: 'api', health: false }).health, null)
  t.equal(resolveOptions({ service: 'api', readyTimeout: 1500.7 }).readyTimeout, 1500)
})

t.test('recheckUpgrades is a boolean', async (t) => {
  t.equal(resolveOptions({ service: 'api', recheckUpgrades: true }).recheckUpgrades, true)
  t.throws(() => resolveOptions({ service: 'api', recheckUpgrades: 'yes' }), { code: 'FST_CONSUL_NATIVE_INVALID_OPTION', message: /recheckUpgrades.*must be true or false/ })
})

t.test('anything but an options object is refused', async (t) => {
  for (const value of [null, 'api', 42]) {
    t.throws(() => resolveOptions(value), { code: 'FST_CONSUL_NATIVE_INVALID_OPTION', message: /must be an object/ }, String(value))
  }
})

t.test('the default https check needs the health route', async (t) => {
  t.throws(() => resolveOptions({ service: 'api', health: false, register: true }), { code: 'FST_CONSUL_NATIVE_INVALID_OPTION', message: /register\.check/ })
  t.equal(resolveOptions({ service: 'api', health: false, register: { check: 'tcp' } }).register?.check, 'tcp')
})

t.test('enforcement and candidate (docs/semantics.md#rollout-shadow, docs/semantics.md#rollout-candidate)', async (t) => {
  t.equal(resolveOptions({ service: 'api', enforcement: 'shadow' }).enforcement, 'shadow')
  t.throws(() => resolveOptions({ service: 'api', enforcement: 'dry-run' }), { code: 'FST_CONSUL_NATIVE_INVALID_OPTION', message: /enforcement: must be one of 'enforce', 'shadow'/ })
  t.equal(resolveOptions({ service: 'api', candidate: '/etc/candidate.json' }).candidate, '/etc/candidate.json')
  const entry = { Kind: 'service-intentions', Name: 'api', Sources: [] }
  t.equal(resolveOptions({ service: 'api', candidate: entry }).candidate, entry)
  for (const bad of ['', 42, null, []]) {
    t.throws(() => resolveOptions({ service: 'api', candidate: bad }), { message: /candidate: must be a service-intentions config entry/ }, JSON.stringify(bad))
  }
  t.throws(() => resolveOptions({ service: 'api', candidate: entry, mode: 'agent' }), { message: /candidate: needs mode 'l7'/ })
})

t.test('logDenials: { sample, perSecond }, each defaulted, validated with the option named (docs/semantics.md#log-limits)', async (t) => {
  t.same(resolveOptions({ service: 'api', logDenials: {} }).logDenials, { sample: 1, perSecond: 10 })
  t.same(resolveOptions({ service: 'api', logDenials: { sample: 100 } }).logDenials, { sample: 100, perSecond: 10 })
  t.same(resolveOptions({ service: 'api', logDenials: { perSecond: 0 } }).logDenials, { sample: 1, perSecond: 0 }, '0: only first lines')
  const invalid = (logDenials: unknown, option: string, reason: RegExp): void => {
    t.throws(() => resolveOptions({ service: 'api', logDenials }), {
      code: 'FST_CONSUL_NATIVE_INVALID_OPTION',
      message: new RegExp(`^Invalid fastify-consul-native option ${option.replace('.', '\\.')}: ${reason.source}`)
    }, JSON.stringify(logDenials) ?? String(logDenials))
  }
  invalid(null, 'logDenials', /must be an object such as \{ sample: 1, perSecond: 10 \}, got null/)
  invalid(false, 'logDenials', /must be an object/)
  invalid([1, 10], 'logDenials', /must be an object/)
  invalid({ rate: 5 }, 'logDenials.rate', /is not an option \(known: sample, perSecond\)/)
  invalid({ sample: 0 }, 'logDenials.sample', /must be an integer of at least 1, got 0/)
  invalid({ sample: 1.5 }, 'logDenials.sample', /must be an integer of at least 1, got 1\.5/)
  invalid({ sample: '10' }, 'logDenials.sample', /must be an integer of at least 1, got "10"/)
  invalid({ perSecond: -1 }, 'logDenials.perSecond', /must be an integer of at least 0, got -1/)
  invalid({ perSecond: Infinity }, 'logDenials.perSecond', /must be an integer of at least 0, got Infinity/)
  invalid({ perSecond: NaN }, 'logDenials.perSecond', /must be an integer of at least 0, got NaN/)
})
