import t from 'tap'
import http from 'node:http'
import { request as undiciRequest } from 'undici'
import { once } from 'node:events'
import net from 'node:net'
import type { AddressInfo } from 'node:net'
import os from 'node:os'
import { AgentClient, agentStatusOf } from '../lib/agent/client'
import { resolveAgentConfig } from '../lib/agent/config'
import { startDevAgent } from '../lib/dev-agent/index'
import { AgentUnreachableError, InvalidOptionError, RegisterFailedError } from '../lib/errors'
import { buildRegistration, ServiceRegistration, validateRegisterOption } from '../lib/registration'
import type { RegisterOptions, RegistrationSystem, ResolvedRegistration } from '../lib/registration'
import { call, clientFor, healthServer, ids, Logs, startAgent, waitForConnect } from './helpers/registration'
import type { SpiedRequest } from './helpers/registration'
import { startProxy } from './helpers/agent-proxy'
import type { AgentProxy, Tap } from './helpers/agent-proxy'
import type { DevAgent } from '../lib/dev-agent/index'

// The registration's timers are unref()'d (an app's server keeps the process alive); the test must.
const keepAlive = setInterval(() => {}, 1000)
t.teardown(() => clearInterval(keepAlive))

const INVALID = 'FST_CONSUL_NATIVE_INVALID_OPTION'
const LISTENING = { address: '127.0.0.1', port: 8443 }

/** A machine with these interfaces, called `host1`. */
function system (interfaces: NodeJS.Dict<os.NetworkInterfaceInfo[]> = {}): RegistrationSystem {
  return { hostname: () => 'host1', networkInterfaces: () => interfaces }
}

function iface (address: string, family: 'IPv4' | 'IPv6', internal: boolean): os.NetworkInterfaceInfo {
  return { address, family, internal, netmask: '', mac: '', cidr: null, ...(family === 'IPv6' ? { scopeid: 0 } : {}) } as os.NetworkInterfaceInfo
}

const isBlocking = (q: SpiedRequest): boolean => q.method === 'GET' && q.opts.blocking !== undefined
const isPass = (q: SpiedRequest): boolean => q.path.startsWith('/v1/agent/check/pass/')

async function closedPort (): Promise<number> {
  const server = net.createServer().listen(0, '127.0.0.1')
  await once(server, 'listening')
  const { port } = server.address() as AddressInfo
  await new Promise((resolve) => server.close(resolve))
  return port
}

t.test('validateRegisterOption: absent, booleans and every option', async (t) => {
  t.equal(validateRegisterOption(undefined), null)
  t.equal(validateRegisterOption(false), null)
  t.same(validateRegisterOption(true), {})
  t.same(validateRegisterOption({}), {})
  t.same(validateRegisterOption({ tags: undefined }), {}, 'undefined values are left out')
  const full = {
    id: 'api-1',
    address: '[::1]',
    port: 8443,
    tags: ['v1', 'blue'],
    meta: { version: '1', 'zone_a-b': '' },
    check: 'ttl',
    checkInterval: '1m30s',
    checkTimeout: '1.5s',
    deregisterCriticalServiceAfter: '10m',
    tlsServerName: 'api.example'
  }
  const valid = validateRegisterOption(full) as RegisterOptions
  t.same(valid, { ...full, address: '::1' }, 'brackets around an IPv6 address are dropped')
  t.not(valid.tags, full.tags, 'arrays are copied')
  t.not(valid.meta, full.meta, 'meta is copied')
  for (const check of ['https', 'tcp', 'ttl', false]) t.equal(validateRegisterOption({ check })?.check, check)
  for (const d of ['10s', '250ms', '1h', '.5s', '1.s', '100us', '100µs', '100μs', '1500ns', '8760h']) {
    t.equal(validateRegisterOption({ checkInterval: d })?.checkInterval, d, `duration ${d}`)
  }
  t.equal(validateRegisterOption({ address: 'api.internal' })?.address, 'api.internal')
  t.equal(validateRegisterOption({ meta: Object.fromEntries(Array.from({ length: 64 }, (_, i) => [`k${i}`, 'v'])) }) === null, false)
})

t.test('validateRegisterOption: invalid values fail with the option named', async (t) => {
  const cases: Array<[unknown, RegExp]> = [
    ['yes', /option register: must be true, false or an object .* got "yes"/],
    [null, /option register: .* got null/],
    [[], /option register: .* got an array/],
    [1, /option register: .* got 1/],
    [{ nope: 1 }, /option register\.nope: is not an option \(known: id, address, port, tags, meta, check, /],
    [{ constructor: 1 }, /option register\.constructor: is not an option/],
    [{ id: '' }, /register\.id: must be a non-empty string without spaces or "\/", got ""/],
    [{ id: 'a b' }, /register\.id/],
    [{ id: 'a/b' }, /register\.id/],
    [{ id: 'a\u0007' }, /register\.id/],
    [{ id: 7 }, /register\.id: .* got 7/],
    [{ address: '' }, /register\.address: must be the IP address or host name/],
    [{ address: 'a b' }, /register\.address/],
    [{ address: 5 }, /register\.address: .* got 5/],
    [{ address: '0.0.0.0' }, /register\.address: Consul refuses the unspecified address "0\.0\.0\.0"/],
    [{ address: '::' }, /register\.address: Consul refuses the unspecified address/],
    [{ address: '[::]' }, /register\.address: Consul refuses the unspecified address "\[::\]"/],
    [{ port: 0 }, /register\.port: must be an integer from 1 to 65535, got 0/],
    [{ port: 65536 }, /register\.port/],
    [{ port: 1.5 }, /register\.port/],
    [{ port: '80' }, /register\.port: .* got "80"/],
    [{ tags: 'v1' }, /register\.tags: must be an array of strings, got "v1"/],
    [{ tags: ['v1', 2] }, /register\.tags/],
    [{ meta: [] }, /register\.meta: must be an object of string values, got an array/],
    [{ meta: 'x' }, /register\.meta/],
    [{ meta: null }, /register\.meta: .* got null/],
    [{ meta: { 'bad key': 'v' } }, /register\.meta\.bad key: keys must be 1 to 128 letters/],
    [{ meta: { ['k'.repeat(129)]: 'v' } }, /register\.meta\.k+: keys must be/],
    [{ meta: { 'consul-x': 'v' } }, /register\.meta\.consul-x: the "consul-" prefix is reserved/],
    [{ meta: { k: 1 } }, /register\.meta\.k: must be a string of at most 512 bytes \(UTF-8\), got 1/],
    [{ meta: { note: 'é'.repeat(257) } }, /register\.meta\.note: must be a string of at most 512 bytes/],
    [{ meta: { k: 'x'.repeat(513) } }, /register\.meta\.k: must be a string/],
    [{ meta: Object.fromEntries(Array.from({ length: 65 }, (_, i) => [`k${i}`, 'v'])) }, /register\.meta: may hold at most 64 pairs, got 65/],
    [{ check: true }, /register\.check: must be 'https', 'tcp', 'ttl' or false, got true/],
    [{ check: 'http' }, /register\.check: .* got "http"/],
    [{ check: {} }, /register\.check: .* got an object/],
    [{ checkInterval: '10' }, /register\.checkInterval: must be a positive Go duration .* got "10"/],
    [{ checkInterval: '-1s' }, /register\.checkInterval/],
    [{ checkInterval: '+1s' }, /register\.checkInterval/],
    [{ checkInterval: '0s' }, /register\.checkInterval/],
    [{ checkInterval: '0' }, /register\.checkInterval/],
    [{ checkInterval: '1x' }, /register\.checkInterval/],
    [{ checkInterval: '.s' }, /register\.checkInterval/],
    [{ checkInterval: '' }, /register\.checkInterval/],
    [{ checkInterval: '100ns' }, /register\.checkInterval/],
    [{ checkInterval: '8761h' }, /register\.checkInterval: .* at most 8760h/],
    [{ checkInterval: 10 }, /register\.checkInterval: .* got 10/],
    [{ checkTimeout: '2' }, /register\.checkTimeout/],
    [{ deregisterCriticalServiceAfter: false }, /register\.deregisterCriticalServiceAfter: .* got false/],
    [{ tlsServerName: '' }, /register\.tlsServerName: must be a host name, got ""/],
    [{ tlsServerName: 'a b' }, /register\.tlsServerName/],
    [{ tlsServerName: 1 }, /register\.tlsServerName/]
  ]
  for (const [value, message] of cases) {
    t.throws(() => validateRegisterOption(value), { code: INVALID, message }, JSON.stringify(value) ?? String(value))
  }
  t.throws(() => validateRegisterOption({ port: 0 }), InvalidOptionError)
})

t.test('buildRegistration: defaults', async (t) => {
  const reg = buildRegistration('api', {}, LISTENING, '/health', system())
  t.strictSame(reg, {
    body: {
      ID: 'api-host1-8443',
      Name: 'api',
      Address: '127.0.0.1',
      Port: 8443,
      Tags: [],
      Meta: {},
      Connect: { Native: true },
      Check: {
        CheckID: 'api-host1-8443-health',
        Name: 'api health',
        HTTP: 'https://127.0.0.1:8443/health',
        TLSSkipVerify: true,
        Interval: '10s',
        Timeout: '2s',
        DeregisterCriticalServiceAfter: '1m'
      }
    },
    id: 'api-host1-8443',
    checkId: 'api-host1-8443-health',
    ttlMs: null,
    service: 'api',
    intervalMs: 10_000
  })
  t.ok(Object.isFrozen(reg))
  t.equal(buildRegistration('api', {}, LISTENING, '/health').id, `api-${os.hostname()}-8443`, 'the machine\'s host name by default')
})

t.test('buildRegistration: every option', async (t) => {
  const opts: RegisterOptions = {
    id: 'api-blue',
    address: 'api.internal',
    port: 9443,
    tags: ['v1'],
    meta: { version: '1' },
    check: 'https',
    checkInterval: '5s',
    checkTimeout: '1s',
    deregisterCriticalServiceAfter: '90s',
    tlsServerName: 'localhost'
  }
  const reg = buildRegistration('api', opts, LISTENING, '/ready', system())
  t.strictSame(reg.body, {
    ID: 'api-blue',
    Name: 'api',
    Address: 'api.internal',
    Port: 9443,
    Tags: ['v1'],
    Meta: { version: '1' },
    Connect: { Native: true },
    Check: {
      CheckID: 'api-blue-health',
      Name: 'api health',
      HTTP: 'https://api.internal:9443/ready',
      TLSSkipVerify: true,
      TLSServerName: 'localhost',
      Interval: '5s',
      Timeout: '1s',
      DeregisterCriticalServiceAfter: '90s'
    }
  })
  t.equal(reg.intervalMs, 5000)

  const tcp = buildRegistration('api', { ...opts, check: 'tcp' }, LISTENING, null, system())
  t.strictSame(tcp.body.Check, {
    CheckID: 'api-blue-health', Name: 'api health', TCP: 'api.internal:9443', Interval: '5s', Timeout: '1s', DeregisterCriticalServiceAfter: '90s'
  }, 'tcp needs no health route')
  t.equal(tcp.ttlMs, null)

  const ttl = buildRegistration('api', { ...opts, check: 'ttl' }, LISTENING, '/health', system())
  t.strictSame(ttl.body.Check, { CheckID: 'api-blue-health', Name: 'api health', TTL: '15s', Status: 'passing', DeregisterCriticalServiceAfter: '90s' })
  t.equal(ttl.ttlMs, 15_000)
  t.equal(ttl.checkId, 'api-blue-health')

  const none = buildRegistration('api', { ...opts, check: false }, LISTENING, '/health', system())
  t.notOk('Check' in none.body)
  t.equal(none.checkId, null)
  t.equal(none.ttlMs, null)
  t.equal(none.intervalMs, 5000, 'the interval still paces anti-entropy')
})

t.test('buildRegistration: TTL is three intervals, in the shortest unit', async (t) => {
  for (const [interval, ttl, ms] of [['10s', '30s', 30_000], ['250ms', '750ms', 750], ['1.5ms', '4500us', 4.5], ['1m', '180s', 180_000], ['2us', '6us', 0.006]] as const) {
    const reg = buildRegistration('api', { check: 'ttl', checkInterval: interval }, LISTENING, null, system())
    t.equal((reg.body.Check as { TTL: string }).TTL, ttl, interval)
    t.equal(reg.ttlMs, ms)
  }
})

t.test('buildRegistration: the advertised address of a wildcard listener', async (t) => {
  const interfaces = {
    lo: [iface('127.0.0.1', 'IPv4', true), iface('::1', 'IPv6', true)],
    gone: undefined,
    eth0: [iface('fe80::1', 'IPv6', false)],
    eth1: [iface('10.0.0.5', 'IPv4', false)],
    eth2: [iface('10.0.0.6', 'IPv4', false)]
  }
  for (const wildcard of ['0.0.0.0', '::', '[::]', '0:0:0:0:0:0:0:0']) {
    const reg = buildRegistration('api', { check: 'tcp' }, { address: wildcard, port: 8443 }, null, system(interfaces))
    t.equal(reg.body.Address, '10.0.0.5', `${wildcard}: the first non-internal IPv4`)
    t.equal((reg.body.Check as { TCP: string }).TCP, '10.0.0.5:8443')
  }
  const lonely = buildRegistration('api', {}, { address: '::', port: 8443 }, '/health', system({ lo: interfaces.lo, eth0: interfaces.eth0 }))
  t.equal(lonely.body.Address, '127.0.0.1', 'no non-internal IPv4: loopback')
  t.equal(buildRegistration('api', {}, { address: '0.0.0.0', port: 1 }, '/health', system()).body.Address, '127.0.0.1')
  t.equal(buildRegistration('api', { address: '10.1.1.1' }, { address: '0.0.0.0', port: 1 }, '/health', system(interfaces)).body.Address, '10.1.1.1', 'an explicit address wins')
})

t.test('buildRegistration: IPv6 addresses are bracketed in check targets', async (t) => {
  const https = buildRegistration('api', {}, { address: '::1', port: 8443 }, '/health', system())
  t.equal(https.body.Address, '::1')
  t.equal((https.body.Check as { HTTP: string }).HTTP, 'https://[::1]:8443/health')
  const tcp = buildRegistration('api', validateRegisterOption({ check: 'tcp', address: '[fd00::5]' }) as RegisterOptions, LISTENING, null, system())
  t.equal(tcp.body.Address, 'fd00::5')
  t.equal((tcp.body.Check as { TCP: string }).TCP, '[fd00::5]:8443')
  t.equal(buildRegistration('api', { check: 'tcp' }, { address: '[::1]', port: 1 }, null, system()).body.Address, '::1')
})

t.test('buildRegistration: a listening address without a port', async (t) => {
  for (const port of [0, Number.NaN, 70_000]) {
    t.throws(() => buildRegistration('api', {}, { address: '127.0.0.1', port }, '/health', system()),
      { code: INVALID, message: /register\.port: the server listens on no TCP port .*: set register\.port/ }, `listening port ${port}`)
  }
  t.equal(buildRegistration('api', { port: 8080 }, { address: '127.0.0.1', port: 0 }, '/health', system()).body.Port, 8080)
})

t.test('register(): an https check against a real HTTPS server turns passing', async (t) => {
  const agent = await startAgent(t)
  const server = await healthServer(t, agent)
  const client = clientFor(t, agent.address)
  const logs = new Logs()
  const reg = buildRegistration('web', {
    address: '127.0.0.1', port: server.port, tags: ['v1'], meta: { version: '1' }, checkInterval: '1s', tlsServerName: 'localhost'
  }, { address: '0.0.0.0', port: 1 }, '/health')
  const registration = new ServiceRegistration(client, reg, logs.logger)
  t.equal(registration.id, reg.id)
  t.same(registration.state, { registered: false, lastRegistered: null, restored: 0, lastError: null })
  await registration.register()

  const service = await call(agent, 'GET', `/v1/agent/service/${reg.id}`)
  t.equal(service.status, 200)
  t.match(service.body, { ID: reg.id, Service: 'web', Address: '127.0.0.1', Port: server.port, Tags: ['v1'], Meta: { version: '1' }, Connect: { Native: true } })
  const nodes = await waitForConnect(agent, 'web', (n) => n.length === 1, { passing: true })
  const check = nodes[0].Checks.find((c: { CheckID: string }) => c.CheckID === reg.checkId)
  t.match(check, { Status: 'passing', Type: 'http', Interval: '1s', Output: `HTTP GET https://127.0.0.1:${server.port}/health: 200 OK Output: ok` })
  t.ok(server.hits() >= 1, 'the agent requested the health route')
  t.match(registration.state, { registered: true, lastRegistered: String, restored: 0, lastError: null })
  t.ok(Date.parse(registration.state.lastRegistered as string) <= Date.now())
  t.match(logs.events('registered', 'info'), [{ obj: { consulNative: { serviceId: reg.id, address: '127.0.0.1', port: server.port, checkId: reg.checkId } } }])
  await registration.deregister()
})

t.test('register(): tcp and ttl checks', async (t) => {
  const agent = await startAgent(t)
  const server = await healthServer(t, agent)
  const client = clientFor(t, agent.address)
  const logs = new Logs()
  const tcp = new ServiceRegistration(client, buildRegistration('tcp-svc', { check: 'tcp', checkInterval: '1s' }, { address: '127.0.0.1', port: server.port }, null), logs.logger)
  const ttlReg = buildRegistration('ttl-svc', { check: 'ttl', checkInterval: '200ms' }, { address: '127.0.0.1', port: 9 }, null)
  const ttl = new ServiceRegistration(client, ttlReg, logs.logger, { antiEntropyWaitMs: 60_000 })
  await Promise.all([tcp.register(), ttl.register()])

  const [tcpNodes, ttlNodes] = await Promise.all([
    waitForConnect(agent, 'tcp-svc', (n) => n.length === 1, { passing: true }),
    waitForConnect(agent, 'ttl-svc', (n) => n.length === 1, { passing: true })
  ])
  t.match(tcpNodes[0].Checks.find((c: { Type: string }) => c.Type === 'tcp'), { Status: 'passing', Output: `TCP connect 127.0.0.1:${server.port}: Success` })
  t.match(ttlNodes[0].Checks.find((c: { Type: string }) => c.Type === 'ttl'), { Status: 'passing', CheckID: ttlReg.checkId })

  // The TTL is renewed every interval once the loops run.
  const passed = client.next('answer', (a) => isPass(a) && a.status === 200)
  ttl.start()
  t.match(await passed, { method: 'PUT', path: `/v1/agent/check/pass/${encodeURIComponent(ttlReg.checkId as string)}` })
  t.equal(logs.events('ttl-update-failed').length, 0)
  await Promise.all([tcp.deregister(), ttl.deregister()])
  t.same(await waitForConnect(agent, 'ttl-svc', (n) => n.length === 0), [])
})

t.test('register(): the agent\'s refusal, with its message', async (t) => {
  const agent = await startAgent(t, { acl: { enabled: true, defaultPolicy: 'deny', tokens: { ro: 'read' } } })
  const logs = new Logs()
  const reg = buildRegistration('api', { check: 'tcp' }, LISTENING, null)
  const registration = new ServiceRegistration(clientFor(t, agent.address, 'ro'), reg, logs.logger)
  const err = await registration.register().then(() => null, (e: unknown) => e) as InstanceType<typeof RegisterFailedError>
  t.ok(err instanceof RegisterFailedError)
  t.match(err, {
    code: 'FST_CONSUL_NATIVE_REGISTER_FAILED',
    statusCode: 500,
    message: /^Consul agent refused to register service api: Permission denied: token with AccessorID '[^']+' lacks permission 'service:write' on "api"$/
  })
  t.equal(agentStatusOf(err.cause), 403)
  t.match(registration.state, { registered: false, lastRegistered: null, lastError: err.message })

  // A body the agent validates and rejects: its message comes through.
  const bad: ResolvedRegistration = { ...reg, body: { ...reg.body, Address: '0.0.0.0' } }
  const open = await startAgent(t)
  await t.rejects(new ServiceRegistration(clientFor(t, open.address), bad, logs.logger).register(),
    { code: 'FST_CONSUL_NATIVE_REGISTER_FAILED', message: 'Consul agent refused to register service api: Invalid service address' })
})

t.test('register(): an unreachable agent', async (t) => {
  const client = clientFor(t, `127.0.0.1:${await closedPort()}`)
  const registration = new ServiceRegistration(client, buildRegistration('api', { check: false }, LISTENING, null), new Logs().logger)
  const err = await registration.register().then(() => null, (e: unknown) => e) as Error
  t.ok(err instanceof RegisterFailedError)
  t.match(err.message, /^Consul agent refused to register service api: Consul agent unreachable at http:\/\/127\.0\.0\.1:\d+: connect ECONNREFUSED/)
  t.ok(err.cause instanceof AgentUnreachableError)
})

t.test('anti-entropy: a registration deregistered behind its back comes back', async (t) => {
  const agent = await startAgent(t)
  const client = clientFor(t, agent.address)
  const logs = new Logs()
  const reg = buildRegistration('api', { check: 'tcp', checkInterval: '1s' }, { address: '127.0.0.1', port: 9 }, null)
  const registration = new ServiceRegistration(client, reg, logs.logger, { antiEntropyWaitMs: 60_000 })
  await registration.register()
  const blocking = client.next('request', isBlocking)
  registration.start()
  registration.start()
  t.match((await blocking).opts.blocking, { hash: String, waitMs: 60_000 }, 'blocks on the content hash')

  const gone = await call(agent, 'PUT', `/v1/agent/service/deregister/${reg.id}`)
  t.equal(gone.status, 200)
  const [nodes, warn] = await Promise.all([
    waitForConnect(agent, 'api', (n) => ids(n).includes(reg.id)),
    logs.waitFor('registration-restored', 'warn')
  ])
  t.equal(nodes.length, 1)
  t.match(warn.obj, { consulNative: { serviceId: reg.id } })
  t.match(registration.state, { registered: true, restored: 1, lastError: null })
  t.equal(logs.at('warn').length, 1, 'one warning')
  const service = await call(agent, 'GET', `/v1/agent/service/${reg.id}`)
  t.match(service.body, { ID: reg.id, Connect: { Native: true } })
  await registration.deregister()
})

t.test('anti-entropy: an agent that keeps removing the instance (its reaper) is not fought every cycle', async (t) => {
  const agent = await startAgent(t)
  const client = clientFor(t, agent.address)
  const logs = new Logs()
  const reg = buildRegistration('api', { check: 'tcp', checkInterval: '1s' }, { address: '127.0.0.1', port: 9 }, null)
  const registration = new ServiceRegistration(client, reg, logs.logger, { antiEntropyWaitMs: 60_000, restoreBackoff: { initialMs: 150, maxMs: 300 } })
  await registration.register()
  const blocking = client.next('request', isBlocking)
  registration.start()
  await blocking
  const restoredAfter: number[] = []
  for (let i = 0; i < 4; i++) {
    const restored = logs.waitFor('registration-restored', i === 0 ? 'warn' : 'debug', () => logs.events('registration-restored').length === i + 1)
    const start = performance.now()
    await call(agent, 'PUT', `/v1/agent/service/deregister/${reg.id}`)
    await restored
    restoredAfter.push(performance.now() - start)
  }
  t.ok(restoredAfter[0] as number < 140, `the first loss is restored at once (${Math.round(restoredAfter[0] as number)} ms)`)
  for (const ms of restoredAfter.slice(1)) t.ok(ms >= 140, `the next ones wait (${Math.round(ms)} ms)`)
  t.equal(logs.events('registration-restored', 'warn').length, 1, 'said once at warn')
  t.equal(logs.events('registration-restored', 'debug').length, 3, 'then at debug')
  t.match(registration.state, { registered: true, restored: 4 })
  // Long after (twice the longest wait), a loss is a new streak: restored at once, said at warn.
  await new Promise((resolve) => setTimeout(resolve, 700))
  const fresh = logs.waitFor('registration-restored', 'warn', () => logs.events('registration-restored').length === 5)
  const start = performance.now()
  await call(agent, 'PUT', `/v1/agent/service/deregister/${reg.id}`)
  await fresh
  t.ok(performance.now() - start < 140, 'restored at once')
  // Lost again, and closed while waiting to restore: the wait ends, nothing is restored.
  await call(agent, 'PUT', `/v1/agent/service/deregister/${reg.id}`)
  await new Promise((resolve) => setTimeout(resolve, 50))
  t.equal(registration.state.registered, false, 'while waiting to restore, status says it is not registered')
  await registration.deregister()
  t.equal(logs.events('registration-restored').length, 5, 'no restore once closing')
})

/**
 * A registration behind a proxy, whose first loss was restored (at once, at warn): a restore
 * streak has begun, and the next one in it would wait a minute.
 */
async function restoredOnce (t: Tap): Promise<{ agent: DevAgent, proxy: AgentProxy, logs: Logs, reg: ResolvedRegistration, registration: ServiceRegistration }> {
  const agent = await startAgent(t)
  const proxy = await startProxy(t, agent.address)
  const client = clientFor(t, proxy.address)
  const logs = new Logs()
  const reg = buildRegistration('api', { check: 'tcp', checkInterval: '1s' }, { address: '127.0.0.1', port: 9 }, null)
  const registration = new ServiceRegistration(client, reg, logs.logger, { antiEntropyWaitMs: 200, restoreBackoff: { initialMs: 60_000, maxMs: 120_000 } })
  await registration.register()
  registration.start()
  const first = logs.waitFor('registration-restored', 'warn')
  await call(agent, 'PUT', `/v1/agent/service/deregister/${reg.id}`)
  await first
  return { agent, proxy, logs, reg, registration }
}

t.test('anti-entropy: a loss after the agent answered with an error keeps the streak (the agent was up)', async (t) => {
  const { agent, proxy, logs, reg, registration } = await restoredOnce(t)
  // An agent that answers with an error is up: a loss after that is still the reaper's streak.
  proxy.answer = (c) => c.method === 'GET' && c.url.startsWith('/v1/agent/service/') ? { status: 500, body: 'rpc error' } : null
  await logs.waitFor('registration-check-failed', 'warn')
  proxy.answer = null
  const lost = new Promise<void>((resolve) => {
    proxy.on('answered', (c: { method: string, url: string, status: number | null }) => { if (c.method === 'GET' && c.url.startsWith('/v1/agent/service/') && c.status === 404) resolve() })
  })
  await call(agent, 'PUT', `/v1/agent/service/deregister/${reg.id}`)
  await lost
  // Restored at once it would be within milliseconds; the streak waits a minute.
  await new Promise((resolve) => setTimeout(resolve, 300))
  t.equal(logs.events('registration-restored').length, 1, 'not restored at once: the streak waits')
  t.equal(registration.state.registered, false)
  await registration.deregister()
})

t.test('anti-entropy: a loss found once an unreachable agent answers again (a restart) is restored at once', async (t) => {
  const { agent, proxy, logs, reg, registration } = await restoredOnce(t)
  // The agent goes away (no answer at all), and comes back without the instance.
  proxy.answer = (c) => c.method === 'GET' && c.url.startsWith('/v1/agent/service/') ? 'drop' : null
  await logs.waitFor('registration-check-failed', 'warn')
  await call(agent, 'PUT', `/v1/agent/service/deregister/${reg.id}`)
  const again = logs.waitFor('registration-restored', 'warn', () => logs.events('registration-restored').length === 2)
  proxy.answer = null
  await again
  t.match(registration.state, { registered: true, restored: 2, lastError: null }, 'restored without the streak\'s minute of waiting')
  await registration.deregister()
})

t.test('close during a restore: the deregistration waits for the restore\'s answer, so it lands last', async (t) => {
  const agent = await startAgent(t)
  // A proxy that hands a re-registration to the agent late, whether or not the client still
  // waits: the agent acts on a request whose client went away.
  let registers = 0
  let restoreArrived!: () => void
  const arrived = new Promise<void>((resolve) => { restoreArrived = resolve })
  const proxy = http.createServer((req, res) => {
    const chunks: Buffer[] = []
    req.on('data', (c: Buffer) => chunks.push(c))
    req.on('end', () => {
      const late = req.method === 'PUT' && (req.url as string).startsWith('/v1/agent/service/register') && ++registers > 1
      if (late) restoreArrived()
      setTimeout(() => {
        undiciRequest(`${agent.address}${req.url as string}`, { method: req.method as 'PUT', body: chunks.length === 0 ? undefined : Buffer.concat(chunks) }).then(async (up) => {
          const body = Buffer.from(await up.body.arrayBuffer())
          const hash = up.headers['x-consul-contenthash']
          if (!res.destroyed) res.writeHead(up.statusCode, hash === undefined ? {} : { 'x-consul-contenthash': String(hash) }).end(body)
        }, () => res.destroy())
      }, late ? 300 : 0)
    })
  })
  await new Promise<void>((resolve) => proxy.listen(0, '127.0.0.1', resolve))
  t.teardown(() => { proxy.closeAllConnections(); proxy.close() })
  const reg = buildRegistration('api', { check: false }, { address: '127.0.0.1', port: 9 }, null)
  const registration = new ServiceRegistration(clientFor(t, `http://127.0.0.1:${(proxy.address() as AddressInfo).port}`), reg, new Logs().logger, { antiEntropyWaitMs: 1000 })
  await registration.register()
  registration.start()
  await new Promise((resolve) => setTimeout(resolve, 100))
  t.equal((await call(agent, 'PUT', `/v1/agent/service/deregister/${reg.id}`)).status, 200, 'the agent loses it')
  await arrived
  await registration.deregister()
  await new Promise((resolve) => setTimeout(resolve, 500))
  t.same(Object.keys((await call(agent, 'GET', '/v1/agent/services')).body as object), [], 'nothing registered after close')
})

t.test('anti-entropy: the agent restarts without its state', async (t) => {
  const first = await startDevAgent()
  t.teardown(async () => await first.close())
  const client = clientFor(t, first.address)
  const logs = new Logs()
  const reg = buildRegistration('api', { check: 'ttl', checkInterval: '200ms' }, { address: '127.0.0.1', port: 9 }, null)
  const registration = new ServiceRegistration(client, reg, logs.logger, { antiEntropyWaitMs: 60_000 })
  await registration.register()
  const blocking = client.next('request', isBlocking)
  registration.start()
  await blocking

  await first.close()
  const failed = await logs.waitFor('registration-check-failed', 'warn')
  t.match(failed.obj, { consulNative: { serviceId: reg.id, retryInMs: Number }, err: AgentUnreachableError })
  t.match(registration.state.lastError, /Consul agent unreachable/)

  const second = await startAgent(t, { port: first.port })
  await Promise.all([
    logs.waitFor('registration-restored', 'warn'),
    logs.waitFor('registration-recovered', 'info', (c) => (c.obj.consulNative as { loop: string }).loop === 'anti-entropy'),
    waitForConnect(second, 'api', (n) => ids(n).includes(reg.id), { passing: true })
  ])
  t.match(registration.state, { registered: true, restored: 1 })
  t.equal(logs.events('registration-check-failed', 'warn').length, 1, 'the outage is logged once')
  // The TTL check is kept passing on the new agent.
  await client.next('answer', (a) => isPass(a) && a.status === 200)
  await registration.deregister()
  t.same(await waitForConnect(second, 'api', (n) => n.length === 0), [])
})

t.test('anti-entropy and TTL renewal without the ACL privileges: logged once per cause at error', async (t) => {
  const agent = await startAgent(t, { acl: { enabled: true, defaultPolicy: 'deny', tokens: { ro: 'read', rw: 'write' } } })
  const ro = clientFor(t, agent.address, 'ro')
  const rw = clientFor(t, agent.address, 'rw')
  const reg = buildRegistration('api', { check: 'ttl', checkInterval: '200ms' }, { address: '127.0.0.1', port: 9 }, null)
  await new ServiceRegistration(rw, reg, new Logs().logger).register()

  const logs = new Logs()
  const watcher = new ServiceRegistration(ro, reg, logs.logger, { antiEntropyWaitMs: 100 })
  watcher.start()
  // Reading works (service:read); renewing the TTL needs node:write.
  const ttlFailed = await logs.waitFor('ttl-update-failed', 'error')
  t.match(ttlFailed.msg, /TTL/)
  t.equal(agentStatusOf(ttlFailed.obj.err), 403)
  // Anti-entropy keeps succeeding meanwhile, but the TTL problem stays the current one.
  await ro.next('answer', (a) => a.method === 'GET' && a.status === 200)
  await ro.next('request', (q) => q.method === 'GET')
  t.match(watcher.state.lastError, /Permission denied: .* lacks permission 'node:write'/)
  await logs.waitFor('ttl-update-failed', 'debug')

  // Deregistered behind its back: restoring needs service:write, which this token lacks.
  t.equal((await call(agent, 'PUT', `/v1/agent/service/deregister/${reg.id}`, 'rw')).status, 200)
  const restoreFailed = await logs.waitFor('registration-check-failed', 'error')
  t.ok(restoreFailed.obj.err instanceof RegisterFailedError)
  t.match(restoreFailed.msg, /cannot confirm the service registration/)
  await logs.waitFor('registration-check-failed', 'debug')
  t.equal(logs.events('registration-check-failed', 'error').length, 1, 'the same cause is logged once')
  t.equal(logs.events('ttl-update-failed', 'error').length, 1)
  t.match(watcher.state, { registered: false, restored: 0, lastRegistered: null })

  await watcher.deregister()
  t.notOk(ro.requests.some((q) => q.path.startsWith('/v1/agent/service/deregister/')), 'never registered: nothing to deregister')
})

t.test('start() before register() registers', async (t) => {
  const agent = await startAgent(t)
  const logs = new Logs()
  const reg = buildRegistration('api', { check: false }, { address: '127.0.0.1', port: 9 }, null)
  const registration = new ServiceRegistration(clientFor(t, agent.address), reg, logs.logger, { antiEntropyWaitMs: 60_000 })
  registration.start()
  await Promise.all([logs.waitFor('registered', 'info'), waitForConnect(agent, 'api', (n) => n.length === 1)])
  t.match(registration.state, { registered: true, restored: 0 })
  t.equal(logs.at('warn').length, 0, 'not a restoration')
  registration.stop()
  await registration.deregister()
  t.same(await waitForConnect(agent, 'api', (n) => n.length === 0), [])
})

t.test('anti-entropy waits one check interval (at least 1 s) unless told otherwise', async (t) => {
  const agent = await startAgent(t)
  for (const [interval, waitMs] of [['20s', 20_000], ['10ms', 1_000]] as const) {
    const client = clientFor(t, agent.address)
    const reg = buildRegistration('api', { check: false, checkInterval: interval, id: `api-${interval}` }, { address: '127.0.0.1', port: 9 }, null)
    const registration = new ServiceRegistration(client, reg, new Logs().logger)
    await registration.register()
    const blocking = client.next('request', isBlocking)
    registration.start()
    t.equal((await blocking).opts.blocking?.waitMs, waitMs, interval)
    await registration.deregister()
  }
  const reg = buildRegistration('api', {}, LISTENING, '/health')
  t.throws(() => new ServiceRegistration(clientFor(t, agent.address), reg, new Logs().logger, { antiEntropyWaitMs: 0 }), { code: INVALID, message: /waitMs/ })
})

t.test('anti-entropy without a content hash polls at the wait instead of spinning', async (t) => {
  const agent = await startAgent(t)
  const client = clientFor(t, agent.address)
  client.dropHash = true
  const reg = buildRegistration('api', { check: false }, { address: '127.0.0.1', port: 9 }, null)
  const registration = new ServiceRegistration(client, reg, new Logs().logger, { antiEntropyWaitMs: 50 })
  await registration.register()
  const gets: SpiedRequest[] = []
  const two = new Promise<void>((resolve) => {
    client.events.on('answer', (a: SpiedRequest & { status: number }) => {
      if (a.method === 'GET' && a.status === 200 && gets.push(a) === 2) resolve()
    })
  })
  registration.start()
  await two
  t.ok(gets.every((g) => g.opts.blocking === undefined), 'non-blocking reads')
  await registration.deregister()
})

t.test('deregister(): gone from the catalog; idempotent; a no-op for start() afterwards', async (t) => {
  const agent = await startAgent(t)
  const client = clientFor(t, agent.address)
  const logs = new Logs()
  const reg = buildRegistration('api', { check: 'tcp', checkInterval: '1s' }, { address: '127.0.0.1', port: 9 }, null)
  const registration = new ServiceRegistration(client, reg, logs.logger, { antiEntropyWaitMs: 60_000 })
  await registration.register()
  const blocking = client.next('request', isBlocking)
  registration.start()
  await Promise.all([blocking, waitForConnect(agent, 'api', (n) => ids(n).includes(reg.id))])

  const first = registration.deregister()
  t.equal(registration.deregister(), first, 'the same promise')
  await first
  t.same(await waitForConnect(agent, 'api', (n) => n.length === 0), [])
  t.equal(registration.state.registered, false)
  await registration.deregister()
  t.equal(client.requests.filter((q) => q.path.startsWith('/v1/agent/service/deregister/')).length, 1, 'one deregistration')
  t.match(logs.events('deregistered', 'info'), [{ obj: { consulNative: { serviceId: reg.id, alreadyGone: false } } }])
  t.equal(logs.events('registration-restored').length, 0, 'anti-entropy stopped before deregistering')

  const count = client.requests.length
  registration.start()
  t.equal(client.requests.length, count, 'start() after stop is a no-op')
})

t.test('deregister(): an instance the agent already lost', async (t) => {
  const agent = await startAgent(t)
  const logs = new Logs()
  const reg = buildRegistration('api', { check: false }, { address: '127.0.0.1', port: 9 }, null)
  const registration = new ServiceRegistration(clientFor(t, agent.address), reg, logs.logger)
  await registration.register()
  await call(agent, 'PUT', `/v1/agent/service/deregister/${reg.id}`)
  await registration.deregister()
  t.match(logs.events('deregistered', 'info'), [{ obj: { consulNative: { alreadyGone: true } } }])
})

t.test('deregister(): failures are logged, not thrown', async (t) => {
  const agent = await startDevAgent()
  const logs = new Logs()
  const reg = buildRegistration('api', { check: false }, { address: '127.0.0.1', port: 9 }, null)
  const registration = new ServiceRegistration(clientFor(t, agent.address), reg, logs.logger)
  await registration.register()
  await agent.close()
  await registration.deregister()
  const warn = await logs.waitFor('deregister-failed', 'warn')
  t.match(warn.obj, { consulNative: { serviceId: reg.id }, err: AgentUnreachableError })
  t.match(registration.state, { registered: true, lastError: /Consul agent unreachable/ })
})

t.test('stop() during a TTL renewal: the aborted request is not a failure', async (t) => {
  const agent = await startAgent(t)
  const client = clientFor(t, agent.address)
  const logs = new Logs()
  const reg = buildRegistration('api', { check: 'ttl', checkInterval: '30ms' }, { address: '127.0.0.1', port: 9 }, null)
  const registration = new ServiceRegistration(client, reg, logs.logger, { antiEntropyWaitMs: 60_000 })
  await registration.register()
  let release!: () => void
  const gate = new Promise<void>((resolve) => { release = resolve })
  client.hold = (q) => isPass(q) ? gate : undefined
  const held = client.next('request', isPass)
  const aborted = client.next('answer', isPass)
  registration.start()
  await held
  registration.stop()
  release()
  t.ok((await aborted).error, 'the renewal was aborted')
  await registration.deregister()
  t.equal(logs.events('ttl-update-failed').length, 0)
  t.equal(registration.state.lastError, null)
})

t.test('a throwing logger stops the loops instead of spinning', async (t) => {
  class BrokenLogs extends Logs {
    override warn (obj: object, msg: string): void {
      super.warn(obj, msg)
      throw new Error('logger broke')
    }
  }
  const logs = new BrokenLogs()
  const client = clientFor(t, `127.0.0.1:${await closedPort()}`)
  const reg = buildRegistration('api', { check: 'ttl', checkInterval: '1s' }, { address: '127.0.0.1', port: 9 }, null)
  const registration = new ServiceRegistration(client, reg, logs.logger, { antiEntropyWaitMs: 60_000 })
  registration.start()
  await logs.waitFor('registration-check-failed', 'warn')
  await registration.deregister()
  t.equal(registration.state.lastError, 'logger broke')
  t.equal(client.requests.filter((q) => q.path.startsWith('/v1/agent/service/deregister/')).length, 0)
})

t.test('a configured namespace and partition go to the agent endpoints (a CE agent refuses them)', async (t) => {
  const agent = await startAgent(t)
  const scoped = new AgentClient(resolveAgentConfig({ address: agent.address }, {}), { namespace: 'team', partition: 'eu' })
  t.teardown(async () => await scoped.close())
  const registration = new ServiceRegistration(scoped, buildRegistration('api', { check: false }, { address: '127.0.0.1', port: 9 }, null), new Logs().logger)
  const err = await registration.register().then(() => null, (e: unknown) => e as Error)
  t.match(err, { code: 'FST_CONSUL_NATIVE_REGISTER_FAILED' })
  t.match(err?.cause, { message: /400/ }, 'the agent saw ns/partition and refused them, as Consul CE does')
})
