// Outbound calls, the finer points: a closed dispatcher leaves the cache, an instance that cannot
// prove the target's identity is skipped like an unreachable one (docs/semantics.md#outbound-skip-list),
// per-call timeouts (docs/semantics.md#outbound-timeouts), and the namespace and partition of a
// target in discovery and in the identity check (docs/semantics.md#outbound-scope). Real mTLS over
// real sockets, instances found through the dev agent.
import t from 'tap'
import { EventEmitter } from 'node:events'
import http from 'node:http'
import https from 'node:https'
import type { ServerResponse } from 'node:http'
import type { AddressInfo } from 'node:net'
import { createHook } from 'node:async_hooks'
import { readFileSync } from 'node:fs'
import { join } from 'node:path'
import type { FastifyBaseLogger } from 'fastify'
import { AgentClient } from '../lib/agent/client'
import { resolveAgentConfig } from '../lib/agent/config'
import type { DevAgent } from '../lib/dev-agent/index'
import { InvalidOptionError, OutboundTimeoutError } from '../lib/errors'
import { ServiceCaller } from '../lib/outbound'
import type { OutboundOptions, OutboundTimeouts } from '../lib/outbound'
import { DynamicTls } from '../lib/tls'
import { startProxy } from './helpers/agent-proxy'
import type { ProxiedCall } from './helpers/agent-proxy'
import { RecordingLogger } from './helpers/agent-fixtures'
import { agentCall, leafMaterial, startAgent } from './helpers/mesh'
import type { Tap } from './helpers/mesh'

const material = leafMaterial

/** A ServiceCaller for `web`, asking the agent at `address`, with the plugin's namespace and partition when given. */
async function startCaller (t: Tap, agent: DevAgent, opts: { address?: string, namespace?: string, partition?: string } = {}): Promise<{ caller: ServiceCaller, log: RecordingLogger }> {
  const client = new AgentClient(resolveAgentConfig({ address: opts.address ?? agent.address }, {}))
  const tls = new DynamicTls()
  tls.update(await material(agent, 'web'))
  const log = new RecordingLogger()
  const caller = new ServiceCaller({
    client, tls, tlsEvents: new EventEmitter(), log: log as unknown as FastifyBaseLogger, blockingWait: 5_000, namespace: opts.namespace, partition: opts.partition
  })
  t.teardown(async () => {
    await caller.close()
    await client.close()
  })
  return { caller, log }
}

interface Instance { port: number, connections: () => number, stalled: ServerResponse[] }

/**
 * An HTTPS instance presenting `cert`, registered in the agent as `name`. `/port` answers its port;
 * `/stall-headers` never answers; `/stall-body` sends the headers and one chunk, then nothing.
 */
async function startInstance (t: Tap, agent: DevAgent, id: string, cert: { certPem: string, keyPem: string }, name = 'api'): Promise<Instance> {
  const stalled: ServerResponse[] = []
  let connections = 0
  const server = https.createServer({ key: cert.keyPem, cert: cert.certPem }, (req, res) => {
    if (req.url === '/stall-headers') {
      stalled.push(res)
    } else if (req.url === '/redirect') {
      res.writeHead(302, { location: '/port' })
      res.end()
    } else if (req.url === '/stall-body') {
      stalled.push(res)
      res.writeHead(200, { 'content-type': 'text/plain' })
      res.write('first chunk')
    } else {
      res.setHeader('content-type', 'application/json')
      res.end(JSON.stringify({ id }))
    }
  })
  server.on('connection', () => { connections++ })
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve))
  t.teardown(async () => {
    server.closeAllConnections()
    await new Promise((resolve) => server.close(resolve))
  })
  const port = (server.address() as AddressInfo).port
  const res = await agentCall(agent, 'PUT', '/v1/agent/service/register', { ID: id, Name: name, Address: '127.0.0.1', Port: port, Connect: { Native: true } })
  if (res.status !== 200) throw new Error(`register: ${res.status} ${JSON.stringify(res.body)}`)
  return { port, connections: () => connections, stalled }
}

function certOf (m: { certPem: string, privateKeyPem: string }): { certPem: string, keyPem: string } {
  return { certPem: m.certPem, keyPem: m.privateKeyPem }
}

async function idOf (caller: ServiceCaller, init: Parameters<ServiceCaller['fetch']>[2] = {}, service = 'api'): Promise<string> {
  const res = await caller.fetch(service, '/port', init)
  return ((await res.json()) as { id: string }).id
}

t.test('a closed or destroyed dispatcher leaves the cache: the next call gets a new one', async (t) => {
  const agent = await startAgent(t, { defaultPolicy: 'allow' })
  await startInstance(t, agent, 'api-1', await material(agent, 'api'))
  const { caller } = await startCaller(t, agent)

  const first = caller.dispatcher('api')
  t.equal(caller.dispatcher('api'), first, 'cached while open')
  t.equal(await idOf(caller), 'api-1')
  await first.close()
  const second = caller.dispatcher('api')
  t.not(second, first, 'a closed dispatcher is not handed out again')
  t.equal(await idOf(caller), 'api-1', 'fetch works through the new one')
  await t.rejects(first.request({ origin: 'https://x', path: '/port', method: 'GET' }), { code: 'UND_ERR_CLOSED' }, 'the closed one stays closed')

  // Closing the old one again must not evict its successor.
  await first.destroy()
  t.equal(caller.dispatcher('api'), second, 'the successor stays cached')
  await second.destroy()
  const third = caller.dispatcher('api')
  t.not(third, second, 'destroy() evicts too')
  t.equal((await third.request({ origin: 'https://x', path: '/port', method: 'GET' })).statusCode, 200)
})

t.test('an instance with the wrong identity, or an untrusted chain, is skipped like an unreachable one', async (t) => {
  const agent = await startAgent(t, { defaultPolicy: 'allow' })
  const elsewhere = await startAgent(t, { defaultPolicy: 'allow' })
  const good = await startInstance(t, agent, 'api-good', await material(agent, 'api'))
  const impostor = await startInstance(t, agent, 'api-impostor', await material(agent, 'other'))
  const untrusted = await startInstance(t, agent, 'api-untrusted', await material(elsewhere, 'api'))
  const { caller, log } = await startCaller(t, agent)

  // Round robin meets each bad instance once; the request is then sent to another instance.
  const ids = []
  for (let i = 0; i < 6; i++) ids.push(await idOf(caller))
  t.same(ids, Array(6).fill('api-good'), 'every GET is answered by the instance that proves its identity')
  t.equal(impostor.connections(), 1, 'the impostor was dialled once, then skipped')
  t.equal(untrusted.connections(), 1, 'the instance with an untrusted chain too')
  t.ok(good.connections() >= 1)
  const res = await caller.dispatcher('api').request({ origin: 'https://x', path: '/port', method: 'POST' })
  t.equal(res.statusCode, 200, 'a request that is not retried avoids them as well')
  await res.body.dump()
  t.equal(impostor.connections() + untrusted.connections(), 2)

  const refused = log.at('warn').filter((c) => (c.obj.consulNative as { event?: string } | undefined)?.event === 'outbound-identity-refused')
  const warned = refused.map((c) => [(c.obj.consulNative as { instance: string }).instance, (c.obj as { err: { code?: string } }).err.code])
  t.same(warned.sort(), [['api-impostor', 'FST_CONSUL_NATIVE_PEER_MISMATCH'], ['api-untrusted', warned.find((w) => w[0] === 'api-untrusted')?.[1]]].sort(), 'each is logged at warn')
  t.match(warned.find((w) => w[0] === 'api-untrusted')?.[1], /^[A-Z_]+$/, 'with OpenSSL\'s verdict for the chain')

  // Alone, a bad instance is still tried (no other is left), and the call fails with why.
  await startInstance(t, agent, 'lonely-impostor', await material(agent, 'other'), 'lonely')
  for (let i = 0; i < 2; i++) {
    await t.rejects(caller.fetch('lonely', '/port'), { code: 'FST_CONSUL_NATIVE_PEER_MISMATCH' })
  }

  // A failure of another kind (an instance that does not speak TLS at all) is reported as it is.
  const plain = http.createServer((_req, res) => res.end('plain'))
  await new Promise<void>((resolve) => plain.listen(0, '127.0.0.1', resolve))
  t.teardown(() => plain.close())
  await agentCall(agent, 'PUT', '/v1/agent/service/register', { ID: 'plain-1', Name: 'plain', Address: '127.0.0.1', Port: (plain.address() as AddressInfo).port, Connect: { Native: true } })
  await t.rejects(caller.fetch('plain', '/'), { name: 'TypeError', cause: { code: /^(?!FST_)/ } })
})

t.test('per-call timeouts: headersTimeout, bodyTimeout and the overall timeout', async (t) => {
  const agent = await startAgent(t, { defaultPolicy: 'allow' })
  const slow = await startInstance(t, agent, 'api-slow', await material(agent, 'api'))
  const proxy = await startProxy(t, agent.address)
  const { caller } = await startCaller(t, agent, { address: proxy.address })
  t.equal(await idOf(caller), 'api-slow', 'discovery done')

  const headers = await caller.fetch('api', '/stall-headers', { headersTimeout: 50 }).catch((e: unknown) => e)
  t.type(headers, OutboundTimeoutError)
  t.match(headers, { code: 'FST_CONSUL_NATIVE_TIMEOUT', statusCode: 504, message: 'Outbound call to service api timed out: no response headers within 50 ms', cause: { code: 'UND_ERR_HEADERS_TIMEOUT' } })

  const body = await caller.fetch('api', '/stall-body', { bodyTimeout: 50 })
  t.equal(body.status, 200, 'headers came in time')
  await t.rejects(body.text(), { cause: { code: 'UND_ERR_BODY_TIMEOUT' } }, 'the body did not')

  await t.rejects(caller.fetch('api', '/stall-headers', { timeout: 50 }),
    { code: 'FST_CONSUL_NATIVE_TIMEOUT', message: 'Outbound call to service api timed out: not complete within 50 ms' })
  // Long enough for the headers to arrive first; the body never completes.
  const late = await caller.fetch('api', '/stall-body', { timeout: 2_000 })
  t.equal(late.status, 200)
  await t.rejects(late.text(), { code: 'FST_CONSUL_NATIVE_TIMEOUT', message: /not complete within 2000 ms/ }, 'the whole call, body included')
  t.ok(slow.stalled.length >= 3)

  // Discovery is part of the call: a target whose first discovery answer is held times out too.
  let release = (): void => {}
  proxy.holdAnswer = async (c: ProxiedCall) => {
    if (c.url.startsWith('/v1/health/connect/billing')) await new Promise<void>((resolve) => { release = resolve })
  }
  await t.rejects(caller.fetch('billing', '/', { timeout: 50 }), { code: 'FST_CONSUL_NATIVE_TIMEOUT' })
  release()

  // The caller's own signal still wins with its own reason; a call within its limits is untouched.
  const controller = new AbortController()
  const aborted = caller.fetch('api', '/stall-headers', { timeout: 60_000, signal: controller.signal })
  controller.abort(new Error('caller gave up'))
  await t.rejects(aborted, { message: 'caller gave up' })
  t.equal(await idOf(caller, { timeout: 60_000, headersTimeout: 60_000, bodyTimeout: 0 }), 'api-slow')
  await t.rejects(caller.fetch('api', '/nowhere', { signal: AbortSignal.abort(new Error('before')), timeout: 60_000 }), { message: 'before' })

  // A finished call leaves no timer behind, a redirect included (its next request gets what is left).
  const timers: Array<{ _destroyed?: boolean }> = []
  const hook = createHook({
    init (_id, type, _trigger, resource) {
      if (type === 'Timeout' && (resource as { _idleTimeout?: number })._idleTimeout !== undefined && (resource as { _idleTimeout: number })._idleTimeout > 500_000) timers.push(resource as { _destroyed?: boolean })
    }
  }).enable()
  t.teardown(() => hook.disable())
  t.equal(await idOf(caller, { timeout: 600_000 }), 'api-slow')
  const redirected = await caller.fetch('api', '/redirect', { timeout: 600_000 })
  t.same(await redirected.json(), { id: 'api-slow' }, 'the redirect was followed')
  hook.disable()
  t.equal(timers.length, 3, 'one timer per request: the call, the redirect and its target')
  t.same(timers.map((timer) => timer._destroyed), [true, true, true], 'each cleared once its response was complete')

  for (const [name, value] of [['headersTimeout', -1], ['bodyTimeout', 1.5], ['timeout', 0], ['timeout', '5']] as const) {
    await t.rejects(caller.fetch('api', '/port', { [name]: value }), InvalidOptionError, `${name}: ${String(value)}`)
  }
})

t.test('namespace and partition: sent in discovery and required in the peer identity, per target or the plugin\'s', async (t) => {
  const agent = await startAgent(t, { defaultPolicy: 'allow' })
  const proxy = await startProxy(t, agent.address)
  // A CE dev agent refuses ns and partition; the proxy records them and forwards without, as an Enterprise agent would accept them.
  proxy.rewrite = (url) => url.replace(/&?(ns|partition)=[^&]*/g, '').replace('?&', '?')
  const td = agent.trustDomain
  const id = (ns: string, ap: string | null, svc = 'api'): string => `spiffe://${td}${ap === null ? '' : `/ap/${ap}`}/ns/${ns}/dc/dc1/svc/${svc}`
  await startInstance(t, agent, 'api-team', certOf(await agent.ca.issueCertificate({ uris: [id('team', 'part')] })))
  await startInstance(t, agent, 'billing-default', certOf(await agent.ca.issueCertificate({ uris: [id('default', null, 'billing')] })), 'billing')
  await startInstance(t, agent, 'ledger-other', certOf(await agent.ca.issueCertificate({ uris: [id('other', 'part', 'ledger')] })), 'ledger')
  const discovery = (svc: string): string[] => proxy.calls.filter((c) => c.url.startsWith(`/v1/health/connect/${svc}?`) && !c.url.includes('index=')).map((c) => new URLSearchParams(c.url.split('?')[1]).toString())

  // The plugin's own namespace and partition are every target's default.
  const { caller } = await startCaller(t, agent, { address: proxy.address, namespace: 'team', partition: 'part' })
  t.equal(await idOf(caller), 'api-team', 'the peer proves api in team/part')
  t.same(discovery('api'), ['passing=&ns=team&partition=part'])
  await t.rejects(caller.fetch('billing', '/port'), { code: 'FST_CONSUL_NATIVE_PEER_MISMATCH', message: `Service billing answered with identity ${id('default', null, 'billing')}` },
    'an identity outside the namespace is refused')
  // Per target.
  t.equal(await idOf(caller, { namespace: 'default', partition: 'default' }, 'billing'), 'billing-default')
  t.same(discovery('billing'), ['passing=&ns=team&partition=part', 'passing=&ns=default&partition=default'])
  t.equal(await idOf(caller, { namespace: 'other' }, 'ledger'), 'ledger-other', 'a namespace alone keeps the plugin\'s partition')
  await t.rejects(caller.fetch('ledger', '/port', { namespace: 'other', partition: 'PART2' }), { code: 'FST_CONSUL_NATIVE_PEER_MISMATCH' }, 'another partition is refused')
  t.equal(await idOf(caller, { namespace: 'other', partition: 'PART' }, 'ledger'), 'ledger-other', 'partitions compare in lower case, as Consul writes them')

  // Without the plugin's or the target's, nothing is sent and the peer must be in default/default.
  const plain = await startCaller(t, agent, { address: proxy.address })
  await t.rejects(plain.caller.fetch('api', '/port'), { code: 'FST_CONSUL_NATIVE_PEER_MISMATCH' })
  t.equal(discovery('api').at(-1), 'passing=')
  t.equal(await idOf(plain.caller, {}, 'billing'), 'billing-default')
})

t.test('the README\'s table of outbound options matches the types', async (t) => {
  // The compiler rejects a key missing from, or not in, the two interfaces.
  const keys: Record<keyof OutboundOptions | keyof OutboundTimeouts, true> = {
    datacenter: true, passingOnly: true, passing: true, namespace: true, partition: true, headersTimeout: true, bodyTimeout: true, timeout: true
  }
  const readme = readFileSync(join(__dirname, '..', 'README.md'), 'utf8')
  const table = readme.slice(readme.indexOf('Options of `fetch(service, path, init)`')).split('\n\n')[1] as string
  const documented = [...table.matchAll(/^\| `(\w+)` \|/gm)].map((m) => m[1])
  t.same(documented.sort(), Object.keys(keys).sort())
})

t.test('passing (the issue\'s spelling of passingOnly): false reaches an instance whose check is critical', async (t) => {
  const agent = await startAgent(t, { defaultPolicy: 'allow' })
  const instance = await startInstance(t, agent, 'api-critical', await material(agent, 'api'))
  // A TTL check starts critical: the instance is not passing.
  const res = await agentCall(agent, 'PUT', '/v1/agent/service/register',
    { ID: 'api-critical', Name: 'api', Address: '127.0.0.1', Port: instance.port, Connect: { Native: true }, Check: { TTL: '30s' } })
  t.equal(res.status, 200)
  const { caller } = await startCaller(t, agent)
  await t.rejects(caller.fetch('api', '/port'), { code: 'FST_CONSUL_NATIVE_NO_INSTANCES' }, 'passing instances only by default')
  t.equal(await idOf(caller, { passing: false }), 'api-critical')
  t.equal(caller.dispatcher('api', { passing: false }), caller.dispatcher('api', { passingOnly: false }), 'one target, whichever spelling')
  t.equal(caller.dispatcher('api', { passing: true, passingOnly: true }), caller.dispatcher('api'))
  t.throws(() => caller.dispatcher('api', { passing: false, passingOnly: true }), InvalidOptionError, 'the two spellings disagree')
})
