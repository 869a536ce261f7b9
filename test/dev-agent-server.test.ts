// The dev agent's HTTP server over real HTTP: routing, Consul's headers and errors, blocking
// queries, the CA (roots, leaves, rotation, configuration), authorize, ACL tokens and the catalog
// routes. Plus the pure helpers of blocking.ts and authorize.ts.
import t from 'tap'
import type { Test } from 'tap'
import { X509Certificate, generateKeyPairSync } from 'node:crypto'
import { Readable } from 'node:stream'
import { Agent, request } from 'undici'
import { DevAgentHttpError, DevCertificateAuthority, startDevAgent } from '../lib/dev-agent/index'
import type { DevAgent } from '../lib/dev-agent/index'
import { DevAgentServer } from '../lib/dev-agent/server'
import type { DevAgentServerConfig } from '../lib/dev-agent/server'
import {
  ChangeHub, DEFAULT_WAIT_MS, MAX_WAIT_MS, block, formatGoDuration, formatGoDurationNs, indexReady,
  parseBlockingParams, parseGoDuration, parseGoDurationNs, queryTimeout
} from '../lib/dev-agent/blocking'
import { authorize, intentionString, parseAuthorizeRequest, parseCertURI } from '../lib/dev-agent/authorize'
import type { Intention } from '../lib/agent/wire'

interface Res { status: number, text: string, json: any, headers: Record<string, string | string[] | undefined> }
interface Target { address: string }

async function call (target: Target, method: string, path: string, opts: { body?: unknown, raw?: string, headers?: Record<string, string> } = {}): Promise<Res> {
  const res = await request(`${target.address}${path}`, {
    method: method as 'GET',
    headers: opts.headers,
    body: opts.raw ?? (opts.body === undefined ? undefined : JSON.stringify(opts.body))
  })
  const text = await res.body.text()
  let json: unknown
  try { json = JSON.parse(text) } catch {}
  return { status: res.statusCode, text, json, headers: res.headers }
}

const sleep = async (ms: number): Promise<void> => await new Promise((resolve) => setTimeout(resolve, ms))

async function agentFor (t: Test, options: Parameters<typeof startDevAgent>[0] = {}): Promise<DevAgent> {
  const agent = await startDevAgent(options)
  t.teardown(async () => await agent.close())
  return agent
}

/** A server started directly, with deterministic randomness and a short rotation window. */
async function rawAgent (t: Test, overrides: Partial<DevAgentServerConfig> = {}): Promise<{ server: DevAgentServer, address: string }> {
  const server = await DevAgentServer.start({
    host: '127.0.0.1',
    port: 0,
    datacenter: 'dc1',
    nodeName: 'node1',
    leafTTLms: 72 * 3_600_000,
    leafTTLText: '72h',
    defaultIntentionPolicy: undefined,
    acl: { enabled: false, defaultPolicy: 'allow', tokens: {} },
    rotationJitterMs: 20,
    random: () => 0.5,
    ...overrides
  })
  t.teardown(async () => await server.close())
  return { server, address: `http://127.0.0.1:${server.port}` }
}

const newKey = (): string => generateKeyPairSync('ec', { namedCurve: 'prime256v1' }).privateKey.export({ type: 'sec1', format: 'pem' }) as string
const certsOf = (pem: string): string[] => pem.match(/-----BEGIN CERTIFICATE-----[^-]+-----END CERTIFICATE-----\n/g) ?? []
const svcURI = (td: string, svc: string, ns = 'default'): string => `spiffe://${td}/ns/${ns}/dc/dc1/svc/${svc}`

t.test('options and startup', async (t) => {
  await t.rejects(startDevAgent({ port: -1 }), { name: 'TypeError', message: 'Invalid dev agent option port: must be an integer from 0 to 65535' })
  await t.rejects(startDevAgent({ port: 1.5 }), TypeError)
  await t.rejects(startDevAgent({ host: '' }), { message: 'Invalid dev agent option host: must be a non-empty string' })
  await t.rejects(startDevAgent({ datacenter: 'dc 1' }), { message: /datacenter: may contain only/ })
  await t.rejects(startDevAgent({ nodeName: 7 as unknown as string }), { message: /nodeName: must be a non-empty string/ })
  await t.rejects(startDevAgent({ leafTTL: 0 }), { message: /leafTTL: must be a positive number/ })
  await t.rejects(startDevAgent({ leafTTL: Number.NaN }), { message: /leafTTL/ })
  await t.rejects(startDevAgent({ leafTTL: 'soon' }), { message: 'Invalid dev agent option leafTTL: must be a positive Go duration such as "72h", got "soon"' })
  await t.rejects(startDevAgent({ leafTTL: '-1h' }), { message: /leafTTL/ })
  // Backdated by a minute as Consul's are: a shorter lifetime would issue leaves already expired.
  await t.rejects(startDevAgent({ leafTTL: 4000 }), { message: 'Invalid dev agent option leafTTL: must be longer than 1m, got 4s: a leaf is valid from one minute before it is issued (as Consul\'s are), so it would be expired already' })
  await t.rejects(startDevAgent({ leafTTL: '1m' }), { message: /leafTTL: must be longer than 1m, got 1m/ })
  await t.rejects(startDevAgent({ leafTTL: true as unknown as string }), { message: /leafTTL/ })
  await t.rejects(startDevAgent({ defaultPolicy: 'maybe' as 'allow' }), { message: 'Invalid dev agent option defaultPolicy: must be "allow" or "deny"' })
  await t.rejects(startDevAgent({ acl: { defaultPolicy: 'x' as 'allow' } }), { message: /acl.defaultPolicy/ })
  await t.rejects(startDevAgent({ acl: { tokens: { secret: 'root' as 'read' } } }), { message: 'Invalid dev agent option acl.tokens["secret"]: must be "read", "write" or "manage"' })

  t.equal(new DevAgentHttpError(418, 'tea').statusCode, 418, 'the entry point re-exports the error class')
  t.equal(typeof DevCertificateAuthority.create, 'function', 'and the CA')
  const text = await agentFor(t, { leafTTL: '2h' })
  t.equal((await call(text, 'GET', '/v1/connect/ca/configuration')).json.Config.LeafCertTTL, '2h', 'a Go duration is kept as given')
  t.equal(text.ca.leafTTLms, 7_200_000)
  const agent = await agentFor(t, { datacenter: 'east', nodeName: 'n1', leafTTL: 90 * 60_000 })
  t.match(agent.address, /^http:\/\/127\.0\.0\.1:\d+$/)
  t.equal(agent.host, '127.0.0.1')
  t.ok(agent.port > 0)
  t.equal(agent.datacenter, 'east')
  t.match(agent.trustDomain, /^[0-9a-f-]{36}\.consul$/)
  t.equal(agent.trustDomain, agent.ca.trustDomain)
  t.equal((await call(agent, 'GET', '/v1/connect/ca/configuration')).json.Config.LeafCertTTL, '1h30m0s', 'a TTL in ms is shown as a Go duration')
  const leaf = (await call(agent, 'GET', '/v1/agent/connect/ca/leaf/web')).json
  t.match(leaf.ServiceURI, /\/dc\/east\/svc\/web$/)
  t.equal(Date.parse(leaf.ValidBefore) - Date.parse(leaf.ValidAfter), 90 * 60_000)

  // The port is taken: startup fails cleanly.
  await t.rejects(startDevAgent({ port: agent.port }), { code: 'EADDRINUSE' })

  const wildcard = await agentFor(t, { host: '0.0.0.0' })
  t.match(wildcard.address, /^http:\/\/127\.0\.0\.1:/)
  t.equal((await call(wildcard, 'GET', '/v1/agent/self')).status, 200)
  const v6 = await startDevAgent({ host: '::1' }).catch(() => null)
  if (v6 !== null) {
    t.match(v6.address, /^http:\/\/\[::1\]:/)
    await v6.close()
  }
  const any6 = await startDevAgent({ host: '::' }).catch(() => null)
  if (any6 !== null) {
    t.match(any6.address, /^http:\/\/\[::1\]:/)
    await any6.close()
  }
  await agent.close()
  await agent.close() // idempotent
})

t.test('routing, methods and common headers', async (t) => {
  const agent = await agentFor(t)
  // Unknown paths reach Consul's Index handler, outside the endpoint wrapper: its text, no Consul headers.
  const missing = await call(agent, 'GET', '/v1/nope')
  t.same([missing.status, missing.text], [404, 'Invalid URL path: not a recognized HTTP API endpoint\n'])
  t.equal(missing.headers['x-consul-default-acl-policy'], undefined)
  t.equal((await call(agent, 'GET', '/nope')).text, 'Invalid URL path: if attempting to use the HTTP API, ensure the path starts with \'/v1/\'\n')
  const known = await call(agent, 'GET', '/v1/agent/connect/ca/roots')
  t.equal(known.headers['x-consul-default-acl-policy'], 'allow', 'on every wrapped response')
  t.equal(known.headers.vary, 'Accept-Encoding')

  const wrong = await call(agent, 'POST', '/v1/agent/connect/ca/roots')
  t.same([wrong.status, wrong.text, wrong.headers.allow], [405, 'method POST not allowed', 'OPTIONS,GET'])
  t.equal(wrong.headers['content-type'], 'text/plain; charset=utf-8')
  const options = await call(agent, 'OPTIONS', '/v1/connect/ca/configuration')
  t.same([options.status, options.text, options.headers.allow], [200, '', 'OPTIONS,GET,PUT'])
  t.equal((await call(agent, 'GET', '/v1/agent/service/register')).headers.allow, 'OPTIONS,PUT', 'the exact pattern wins')
  t.equal((await call(agent, 'GET', '/v1/config')).headers.allow, 'OPTIONS,PUT')
  t.equal((await call(agent, 'PUT', '/v1/config/x/y')).headers.allow, 'OPTIONS,GET,DELETE')
  t.equal((await call(agent, 'POST', '/v1/agent/check/pass/x')).status, 405)
  t.same(await call(agent, 'GET', '/v1/agent/%zz').then((r) => [r.status, r.text]), [400, 'invalid URL escape'])
  t.equal((await call(agent, 'GET', '/v1/agent/sel%66')).status, 200, 'the path is unescaped before routing')

  const pretty = await call(agent, 'GET', '/v1/agent/self?pretty')
  t.match(pretty.text, /^\{\n {4}"Config": \{\n/)
  t.ok(pretty.text.endsWith('}\n'))
  t.notMatch((await call(agent, 'GET', '/v1/agent/self')).text, /\n/, 'compact by default')

  const self = (await call(agent, 'GET', '/v1/agent/self')).json
  t.same(Object.keys(self), ['Config', 'DebugConfig', 'Coord', 'Member', 'Stats', 'Meta', 'xDS'])
  t.same(Object.keys(self.Config), ['Datacenter', 'PrimaryDatacenter', 'NodeName', 'NodeID', 'Revision', 'Server', 'Version', 'BuildDate'])
  t.same([self.DebugConfig.DefaultIntentionPolicy, self.DebugConfig.ACLsEnabled, self.DebugConfig.ConnectEnabled, self.DebugConfig.HTTPUseCache, self.DebugConfig.ACLResolverSettings.ACLDefaultPolicy],
    ['', false, true, true, 'allow'])
  const deny = await agentFor(t, { defaultPolicy: 'deny', acl: { enabled: true, defaultPolicy: 'allow' } })
  const denySelf = await call(deny, 'GET', '/v1/agent/self')
  t.same([denySelf.json.DebugConfig.DefaultIntentionPolicy, denySelf.json.DebugConfig.ACLsEnabled], ['deny', true])
  t.equal(denySelf.headers['x-consul-default-acl-policy'], 'allow', 'the header shows the ACL policy, not default_intention_policy')

  // A body larger than the agent accepts.
  const big = await call(agent, 'PUT', '/v1/config', { raw: 'x'.repeat(33 * 1024 * 1024) })
  t.same([big.status, big.text], [413, 'Request body too large'])
  // Go's json escaping of <, > and &.
  await call(agent, 'PUT', '/v1/config', { body: { Kind: 'service-defaults', Name: 'a', Meta: { html: '<a&b>' } } })
  t.match((await call(agent, 'GET', '/v1/config/service-defaults/a')).text, '\\u003ca\\u0026b\\u003e')
})

t.test('enterprise parameters and consistency modes', async (t) => {
  const agent = await agentFor(t)
  const cases: Array<[string, Record<string, string>, string]> = [
    ['?ns=default', {}, 'Bad request: Invalid query parameter: "ns" - Namespaces are a Consul Enterprise feature'],
    ['?partition=default', {}, 'Bad request: Invalid query parameter: "partition" - Partitions are a Consul Enterprise feature'],
    ['', { 'X-Consul-Namespace': 'default' }, 'Bad request: Invalid header: "X-Consul-Namespace" - Namespaces are a Consul Enterprise feature'],
    ['', { 'X-Consul-Partition': 'default' }, 'Bad request: Invalid header: "X-Consul-Partition" - Partitions are a Consul Enterprise feature']
  ]
  for (const [query, headers, message] of cases) {
    for (const path of ['/v1/agent/connect/ca/leaf/web', '/v1/connect/intentions/match', '/v1/config/service-defaults/x', '/v1/health/connect/web', '/v1/agent/services', '/v1/agent/service/x']) {
      const res = await call(agent, 'GET', `${path}${query}`, { headers })
      t.same([res.status, res.text], [400, message], `${path}${query} ${JSON.stringify(headers)}`)
    }
  }
  t.equal((await call(agent, 'GET', '/v1/agent/connect/ca/roots?ns=x')).status, 200, 'roots ignore ns')
  t.equal((await call(agent, 'GET', '/v1/agent/services?ns=')).status, 200, 'an empty ns is no ns')

  t.same(await call(agent, 'GET', '/v1/connect/ca/roots?stale&consistent').then((r) => [r.status, r.text]), [400, 'Cannot specify ?stale with ?consistent, conflicting semantics.'])
  t.same(await call(agent, 'GET', '/v1/connect/ca/roots?cached&consistent').then((r) => [r.status, r.text]), [400, 'Cannot specify ?cached with ?consistent, conflicting semantics.'])
  t.same(await call(agent, 'GET', '/v1/connect/ca/roots?max_stale=soon').then((r) => [r.status, r.text]), [400, 'Invalid max_stale value "soon"'])
  t.equal((await call(agent, 'GET', '/v1/connect/ca/roots')).headers['x-consul-effective-consistency'], 'leader')
  t.equal((await call(agent, 'GET', '/v1/connect/ca/roots?stale')).headers['x-consul-effective-consistency'], 'stale')
  t.equal((await call(agent, 'GET', '/v1/connect/ca/roots?max_stale=5s')).headers['x-consul-effective-consistency'], 'stale')
  t.equal((await call(agent, 'GET', '/v1/connect/ca/roots?max_stale=0s')).headers['x-consul-effective-consistency'], 'leader')
  t.equal((await call(agent, 'GET', '/v1/connect/ca/roots?max_stale=')).headers['x-consul-effective-consistency'], 'leader')
  t.equal((await call(agent, 'GET', '/v1/connect/ca/roots?consistent')).headers['x-consul-effective-consistency'], 'consistent')
  t.same(await call(agent, 'GET', '/v1/agent/connect/ca/roots?wait=5').then((r) => [r.status, r.text]), [400, 'Invalid wait time'])
  t.same(await call(agent, 'GET', '/v1/agent/connect/ca/roots?index=-1').then((r) => [r.status, r.text]), [400, 'Invalid index'])
  t.same(await call(agent, 'GET', '/v1/agent/connect/ca/roots?index=18446744073709551616').then((r) => [r.status, r.text]), [400, 'Invalid index'])
  t.equal((await call(agent, 'GET', '/v1/agent/connect/ca/roots?index=&wait=')).status, 200, 'empty values are absent')
})

t.test('CA roots', async (t) => {
  const agent = await agentFor(t)
  const roots = await call(agent, 'GET', '/v1/agent/connect/ca/roots')
  t.equal(roots.status, 200)
  t.same(Object.keys(roots.json), ['ActiveRootID', 'TrustDomain', 'Roots'])
  t.equal(roots.json.TrustDomain, agent.trustDomain)
  t.equal(roots.json.Roots.length, 1)
  t.equal(roots.json.ActiveRootID, roots.json.Roots[0].ID)
  t.equal(roots.headers['x-cache'], 'MISS')
  t.equal(roots.headers.age, undefined, 'Age only on a hit')
  t.equal(roots.headers['x-consul-index'], String(roots.json.Roots[0].ModifyIndex))
  t.equal(roots.headers['x-consul-knownleader'], 'true')
  t.equal(roots.headers['x-consul-lastcontact'], '0')
  t.equal(roots.headers['x-consul-query-backend'], 'blocking-query')
  t.equal(roots.headers['x-consul-effective-consistency'], undefined, 'cache-served: no consistency header')
  const again = await call(agent, 'GET', '/v1/agent/connect/ca/roots')
  t.same([again.headers['x-cache'], again.headers.age], ['HIT', '0'])

  const server = await call(agent, 'GET', '/v1/connect/ca/roots')
  t.same(server.json, roots.json, 'same body on the server endpoint')
  t.equal(server.headers['x-cache'], undefined)
  t.equal(server.headers['x-consul-effective-consistency'], 'leader')
  const pem = await call(agent, 'GET', '/v1/connect/ca/roots?pem=true')
  t.equal(pem.headers['content-type'], 'application/pem-certificate-chain')
  t.equal(pem.text, roots.json.Roots[0].RootCert)

  // Blocking: at once without an index, waits with one, times out with the same index.
  const index = Number(roots.headers['x-consul-index'])
  const started = Date.now()
  const timedOut = await call(agent, 'GET', `/v1/agent/connect/ca/roots?index=${index}&wait=50ms`)
  t.ok(Date.now() - started >= 50, 'waited')
  t.ok(Date.now() - started < 1000, 'wait=50ms with at most wait/16 jitter')
  t.equal(Number(timedOut.headers['x-consul-index']), index, 'same index at the timeout')
  t.equal((await call(agent, 'GET', `/v1/agent/connect/ca/roots?index=${index - 1}&wait=5s`)).status, 200, 'an older index answers at once')
})

t.test('leaf certificates', async (t) => {
  const agent = await agentFor(t)
  const res = await call(agent, 'GET', '/v1/agent/connect/ca/leaf/web')
  t.equal(res.status, 200)
  const leaf = res.json
  t.same(Object.keys(leaf), ['SerialNumber', 'CertPEM', 'PrivateKeyPEM', 'Service', 'ServiceURI', 'ValidAfter', 'ValidBefore', 'CreateIndex', 'ModifyIndex'])
  t.equal(leaf.Service, 'web')
  t.equal(leaf.ServiceURI, svcURI(agent.trustDomain, 'web'))
  t.match(leaf.SerialNumber, /^[0-9a-f]{2}(:[0-9a-f]{2})*$/)
  t.match(leaf.PrivateKeyPEM, /^-----BEGIN EC PRIVATE KEY-----/)
  t.match(leaf.ValidAfter, /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$/)
  t.equal(certsOf(leaf.CertPEM).length, 1, 'no intermediates before a rotation')
  const cert = new X509Certificate(leaf.CertPEM)
  t.notOk(cert.subject, 'empty subject, as current Consul')
  t.equal(cert.subjectAltName, `URI:${leaf.ServiceURI}`)
  t.equal(res.headers['x-consul-index'], String(leaf.ModifyIndex))
  t.equal(res.headers['x-cache'], 'MISS')
  t.equal(res.headers['x-consul-knownleader'], undefined, 'no setMeta on the leaf endpoint')

  const cached = await call(agent, 'GET', '/v1/agent/connect/ca/leaf/web')
  t.equal(cached.json.SerialNumber, leaf.SerialNumber, 'cached')
  t.same([cached.headers['x-cache'], cached.headers.age], ['HIT', '0'])
  // Another datacenter is signed by its own servers, which a lone agent cannot reach.
  for (const path of ['/v1/agent/connect/ca/leaf/web?dc=dc2', '/v1/agent/connect/ca/roots?dc=dc2', '/v1/connect/intentions/match?by=destination&name=web&dc=dc2',
    '/v1/config/mesh/mesh?dc=dc2', '/v1/health/connect/web?dc=dc2', '/v1/health/service/web?dc=dc2']) {
    t.same(await call(agent, 'GET', path).then((r) => [r.status, r.text]), [500, 'No path to datacenter'], path)
  }
  t.equal((await call(agent, 'GET', '/v1/agent/connect/ca/leaf/web?dc=dc1')).json.SerialNumber, leaf.SerialNumber, 'its own datacenter by name')
  t.equal((await call(agent, 'GET', '/v1/agent/services?dc=dc2')).status, 200, 'the agent\'s own endpoints ignore dc')
  t.same(await call(agent, 'GET', '/v1/agent/connect/ca/leaf/').then((r) => [r.status, r.text]), [400, 'Missing service name'])

  // Concurrent first requests share one issuance.
  const [a, b] = await Promise.all([call(agent, 'GET', '/v1/agent/connect/ca/leaf/db'), call(agent, 'GET', '/v1/agent/connect/ca/leaf/db')])
  t.equal(a.json.SerialNumber, b.json.SerialNumber)

  const timedOut = await call(agent, 'GET', `/v1/agent/connect/ca/leaf/web?index=${leaf.ModifyIndex as number}&wait=50ms`)
  t.equal(timedOut.json.ModifyIndex, leaf.ModifyIndex, 'same cert at the timeout')
  const first = await call(agent, 'GET', '/v1/agent/connect/ca/leaf/fresh?index=5&wait=1s')
  t.equal(first.headers['x-cache'], 'MISS', 'a blocking query without a cached cert issues one')
})

t.test('CA rotation: roots, cross-signing, leaves and released queries', async (t) => {
  const { server, address } = await rawAgent(t)
  const agent = { address }
  const before = await call(agent, 'GET', '/v1/agent/connect/ca/roots')
  const oldRoot = before.json.Roots[0]
  const leaf = (await call(agent, 'GET', '/v1/agent/connect/ca/leaf/api')).json

  // Blocked queries on roots and on the leaf are both released by the rotation.
  const rootsWait = call(agent, 'GET', `/v1/agent/connect/ca/roots?index=${before.headers['x-consul-index'] as string}&wait=10s`)
  const leafWait = call(agent, 'GET', `/v1/agent/connect/ca/leaf/api?index=${leaf.ModifyIndex as number}`) // default wait: 10 minutes
  await sleep(20)
  const started = Date.now()
  const put = await call(agent, 'PUT', '/v1/connect/ca/configuration', { body: { Provider: 'consul', Config: { LeafCertTTL: '72h', PrivateKey: newKey() } } })
  t.same([put.status, put.text], [200, ''])
  const roots = await rootsWait
  const renewed = await leafWait
  t.ok(Date.now() - started < 2000, 'released promptly')

  t.equal(roots.json.Roots.length, 2, 'two roots')
  const [active, old] = roots.json.Roots
  t.same([active.Active, old.Active], [true, false], 'the new root first and active, the old one inactive')
  t.equal(roots.json.ActiveRootID, active.ID)
  t.equal(old.ID, oldRoot.ID)
  t.equal(old.ModifyIndex, active.CreateIndex, 'the old root is modified at the rotation index')
  t.equal(Number(roots.headers['x-consul-index']), active.ModifyIndex)
  t.equal(active.IntermediateCerts.length, 1)
  const cross = new X509Certificate(active.IntermediateCerts[0])
  const newRootCert = new X509Certificate(active.RootCert)
  t.ok(cross.verify(new X509Certificate(oldRoot.RootCert).publicKey), 'the intermediate is signed by the old root')
  t.equal(cross.subject, newRootCert.subject, 'and certifies the new root')
  t.ok(cross.publicKey.equals(newRootCert.publicKey))

  t.ok(renewed.json.ModifyIndex > leaf.ModifyIndex, 'a new leaf')
  const chain = certsOf(renewed.json.CertPEM)
  t.equal(chain.length, 2, 'leaf plus the cross-signed intermediate')
  t.equal(chain[1], active.IntermediateCerts[0])
  t.ok(new X509Certificate(chain[0] as string).verify(newRootCert.publicKey), 'signed by the new root')

  // The same key again is not a rotation; a config-only change is not either.
  const config = (await call(agent, 'GET', '/v1/connect/ca/configuration')).json
  t.equal(config.Config.PrivateKey.startsWith('-----BEGIN'), true, 'the configured key is shown back')
  await call(agent, 'PUT', '/v1/connect/ca/configuration', { body: { Provider: 'consul', Config: { PrivateKey: config.Config.PrivateKey, LeafCertTTL: '24h' } } })
  await call(agent, 'PUT', '/v1/connect/ca/configuration', { body: { Config: { LeafCertTTL: '2h' } } })
  t.equal((await call(agent, 'GET', '/v1/agent/connect/ca/roots')).json.Roots.length, 2, 'no rotation without a new key')
  t.equal(server.ca.leafTTLms, 2 * 3_600_000, 'the TTL applies to new leaves')
  const ttl = (await call(agent, 'GET', '/v1/agent/connect/ca/leaf/other')).json
  t.equal(Date.parse(ttl.ValidBefore) - Date.parse(ttl.ValidAfter), 2 * 3_600_000)
  const after = (await call(agent, 'GET', '/v1/connect/ca/configuration')).json
  t.same(Object.keys(after.Config), ['IntermediateCertTTL', 'LeafCertTTL', 'PrivateKeyBits', 'PrivateKeyType', 'RotationPeriod'], 'sorted keys; defaults restored')
  t.ok(after.ModifyIndex > config.ModifyIndex)
  t.equal(after.CreateIndex, config.CreateIndex)

  // agent.ca.rotate() also takes an index and wakes watchers.
  const index = Number((await call(agent, 'GET', '/v1/agent/connect/ca/roots')).headers['x-consul-index'])
  const waiting = call(agent, 'GET', `/v1/agent/connect/ca/roots?index=${index}&wait=10s`)
  await sleep(20)
  await server.ca.rotate()
  const third = await waiting
  t.equal(third.json.Roots.length, 3)
  t.ok(Number(third.headers['x-consul-index']) > index)
})

t.test('leaf re-issue after rotation: revalidation, timers and failures', async (t) => {
  // A rotation window long enough that a request re-issues the leaf before the timer does.
  const { server, address } = await rawAgent(t, { rotationJitterMs: 300, random: () => 0.5 })
  const agent = { address }
  const first = (await call(agent, 'GET', '/v1/agent/connect/ca/leaf/api')).json
  await server.ca.rotate()
  const revalidated = await call(agent, 'GET', '/v1/agent/connect/ca/leaf/api')
  t.equal(revalidated.headers['x-cache'], 'MISS', 'without an index the stale leaf is replaced at once')
  t.ok(revalidated.json.ModifyIndex > first.ModifyIndex)
  await sleep(250) // the revalidation replaced the pending rotation re-issue
  t.equal((await call(agent, 'GET', '/v1/agent/connect/ca/leaf/api')).json.ModifyIndex, revalidated.json.ModifyIndex, 'no second re-issue')

  // A failed background re-issue keeps the old leaf and is retried later.
  const sign = server.ca.signLeaf.bind(server.ca)
  let failures = 0
  server.ca.signLeaf = async () => {
    failures++
    throw new Error('signing failed')
  }
  await server.ca.rotate()
  await sleep(250)
  t.equal(failures, 1, 'the timer tried once')
  const failed = await call(agent, 'GET', '/v1/agent/connect/ca/leaf/api')
  t.same([failed.status, failed.text], [500, 'signing failed'], 'a request that must re-issue reports the error')
  server.ca.signLeaf = sign
})

t.test('leaf refresh at its soft expiry', async (t) => {
  // Leaves live 61 s from one minute ago: the soft expiry is already past, so the refresh runs
  // after the one-second floor.
  const { address } = await rawAgent(t, { leafTTLms: 61_000, leafTTLText: '61s', random: () => 0 })
  const agent = { address }
  const leaf = (await call(agent, 'GET', '/v1/agent/connect/ca/leaf/api')).json
  const started = Date.now()
  const renewed = await call(agent, 'GET', `/v1/agent/connect/ca/leaf/api?index=${leaf.ModifyIndex as number}&wait=5s`)
  t.ok(renewed.json.ModifyIndex > leaf.ModifyIndex, 'a blocking query is released by the refresh')
  t.ok(Date.now() - started >= 900, 'not before the floor')
  const again = await call(agent, 'GET', '/v1/agent/connect/ca/leaf/api')
  t.equal(again.headers['x-cache'], 'MISS', 'past its soft expiry, a plain read re-issues')
})

t.test('long timers are chained, and close stops pending refreshes', async (t) => {
  const real = globalThis.setTimeout
  const chained: Array<() => void> = []
  globalThis.setTimeout = ((fn: () => void, ms?: number) => {
    if (ms === 2 ** 31 - 1) chained.push(fn)
    return real(fn, ms === 2 ** 31 - 1 ? 3_600_000 : ms)
  }) as typeof setTimeout
  try {
    const { address, server } = await rawAgent(t, { leafTTLms: 8760 * 3_600_000, leafTTLText: '8760h' })
    await call({ address }, 'GET', '/v1/agent/connect/ca/leaf/api')
    t.equal(chained.length, 1, 'a soft expiry beyond setTimeout\'s range waits in steps')
    chained[0]?.()
    t.equal(chained.length, 2, 'the remaining delay is waited in further steps')
    await server.close()
  } finally {
    globalThis.setTimeout = real
  }

  // An issuance that completes after close() schedules nothing.
  const { server, address } = await rawAgent(t)
  const sign = server.ca.signLeaf.bind(server.ca)
  let release: () => void = () => {}
  const gate = new Promise<void>((resolve) => { release = resolve })
  server.ca.signLeaf = async (service, opts) => {
    await gate
    return await sign(service, opts)
  }
  const pending = call({ address }, 'GET', '/v1/agent/connect/ca/leaf/late').catch((err: Error) => err)
  await sleep(30)
  const closing = server.close()
  release()
  await closing
  t.ok(await pending, 'the request ended')

  // A request that never completes does not hold close() for long.
  const stuck = await rawAgent(t)
  const slow = request(`${stuck.address}/v1/config`, {
    method: 'PUT',
    body: Readable.from((async function * () { yield '{'; await sleep(1500) })())
  }).catch((err: Error) => err)
  await sleep(50)
  const started = Date.now()
  await stuck.server.close()
  t.ok(Date.now() - started < 2500, 'close() is bounded')
  t.ok(await slow, 'the stuck request was cut')
})

t.test('CA configuration validation', async (t) => {
  const agent = await agentFor(t)
  const put = async (body: unknown, raw?: string): Promise<[number, string]> => {
    const res = await call(agent, 'PUT', '/v1/connect/ca/configuration', raw === undefined ? { body } : { raw })
    return [res.status, res.text]
  }
  const initial = (await call(agent, 'GET', '/v1/connect/ca/configuration')).json
  t.same(initial, {
    Provider: 'consul',
    Config: { IntermediateCertTTL: '8760h', LeafCertTTL: '72h', PrivateKeyBits: 256, PrivateKeyType: 'ec', RotationPeriod: '2160h' },
    State: null,
    ForceWithoutCrossSigning: false,
    CreateIndex: initial.CreateIndex,
    ModifyIndex: initial.ModifyIndex
  })
  t.same(await put({ Provider: 'consul', Bogus: 1 }), [400, 'Request decode failed: json: unknown field "Bogus"'])
  t.same(await put({ ClusterID: 'x' }), [400, 'Request decode failed: json: unknown field "ClusterID"'])
  t.same(await put({ Provider: 1 }), [400, 'Request decode failed: json: cannot unmarshal number into Go struct field CAConfiguration.Provider of type string'])
  t.same(await put({ Config: [] }), [400, 'Request decode failed: json: cannot unmarshal array into Go struct field CAConfiguration.Config of type map[string]interface {}'])
  t.same(await put({ ForceWithoutCrossSigning: 'yes' }), [400, 'Request decode failed: json: cannot unmarshal string into Go struct field CAConfiguration.ForceWithoutCrossSigning of type bool'])
  t.same(await put({ CreateIndex: -1 }), [400, 'Request decode failed: json: cannot unmarshal number -1 into Go struct field CAConfiguration.CreateIndex of type uint64'])
  t.same(await put({ ModifyIndex: 'x' }), [400, 'Request decode failed: json: cannot unmarshal string into Go struct field CAConfiguration.ModifyIndex of type uint64'])
  t.same(await put({ State: { a: 1 } }), [400, 'Request decode failed: json: cannot unmarshal number into Go struct field CAConfiguration.State of type string'])
  t.same(await put([]), [400, 'Request decode failed: json: cannot unmarshal array into Go value of type structs.CAConfiguration'])
  t.same(await put(undefined, ''), [400, 'Request decode failed: EOF'])
  t.same(await put(undefined, '{'), [400, 'Request decode failed: unexpected EOF'])
  t.same(await put({ Provider: 'consul', State: { a: null } }), [400, 'Provider State is read-only. It must be omitted or identical to the current value'], 'a null map value decodes as ""')
  t.same(await put({ Provider: 'consul' }), [200, ''], 'no Config: the defaults')
  t.same(await put({ State: { a: 'b' } }), [400, 'Provider State is read-only. It must be omitted or identical to the current value'])
  t.same(await put({ Provider: 'vault' }), [500, 'unknown CA provider "vault"'])
  t.same(await put({ Config: { LeafCertTTL: 'soon' } }), [500, 'error decoding config: 1 error(s) decoding:\n\n* error decoding \'LeafCertTTL\': time: invalid duration "soon"'])
  t.same(await put({ Config: { LeafCertTTL: true, RotationPeriod: 'x' } }), [500, 'error decoding config: 2 error(s) decoding:\n\n* error decoding \'LeafCertTTL\': time: invalid duration "true"\n* error decoding \'RotationPeriod\': time: invalid duration "x"'])
  t.same(await put({ Config: { LeafCertTTL: '30m' } }), [500, 'leaf cert TTL must be greater or equal than 1h0m0s'])
  t.same(await put({ Config: { LeafCertTTL: '8761h' } }), [500, 'leaf cert TTL must be less than 8760h0m0s'])
  t.same(await put({ Config: { LeafCertTTL: '4000h' } }), [500, 'Intermediate Cert TTL must be greater or equal than 3 * LeafCertTTL (>=12000h0m0s).'])
  t.same(await put({ Config: { PrivateKeyType: 'ec', PrivateKeyBits: 255 } }), [500, 'EC key length must be one of (224, 256, 384, 521) bits'])
  t.same(await put({ Config: { PrivateKeyType: 'rsa', PrivateKeyBits: 1024 } }), [500, 'RSA key length must be 2048 or 4096 bits'])
  t.same(await put({ Config: { PrivateKeyType: 'dsa' } }), [500, 'private key type must be either \'ec\' or \'rsa\''])
  t.same(await put({ Config: { RootCert: 'x' } }), [500, 'must provide a private key when providing a root cert'])
  t.match(await put({ Config: { PrivateKeyType: 'rsa', PrivateKeyBits: 2048 } }), [500, /supports only EC P-256 keys/])
  t.match(await put({ Config: { PrivateKeyBits: 384 } }), [500, /supports only EC P-256 keys/])
  t.match(await put({ Config: { PrivateKey: newKey(), RootCert: 'x' } }), [500, /cannot import a RootCert/])
  const rsa = generateKeyPairSync('rsa', { modulusLength: 2048 }).privateKey.export({ type: 'pkcs1', format: 'pem' }) as string
  t.same(await put({ Config: { PrivateKey: rsa } }), [500, 'error configuring provider: CA private key must be an EC P-256 key'])
  t.match(await put({ Config: { PrivateKey: 'not a key' } }), [500, /^error configuring provider: /])
  t.match(await put({ Config: { SkipValidate: true, LeafCertTTL: '0s' } }), [500, 'leaf cert TTL must be positive'])
  t.same(await put({ Provider: null, Config: { SkipValidate: 'true', LeafCertTTL: 61e9, IntermediateCertTTL: 1 } }), [200, ''], 'SkipValidate, and durations in nanoseconds')
  t.equal(agent.ca.leafTTLms, 61_000)
  t.equal((await call(agent, 'GET', '/v1/agent/connect/ca/roots')).json.Roots.length, 1, 'no failed attempt rotated')
})

t.test('blocking helpers', async (t) => {
  const durations: Array<[string, number | null]> = [
    ['0', 0], ['+0', 0], ['-0', 0], ['1s', 1000], ['1.5s', 1500], ['.5s', 500], ['1.s', 1000], ['300ms', 300], ['1h30m', 5_400_000],
    ['2us', 0.002], ['2µs', 0.002], ['2μs', 0.002], ['1000000ns', 1], ['-1m', -60_000], ['', null], ['5', null], ['s', null],
    ['.s', null], ['1x', null], ['1.5.5s', null], ['-', null], ['3000000h', null]
  ]
  for (const [text, ms] of durations) t.equal(parseGoDuration(text), ms, JSON.stringify(text))
  t.equal(parseGoDurationNs('1h'), 3_600_000_000_000n)
  const formats: Array<[bigint, string]> = [
    [0n, '0s'], [1n, '1ns'], [1500n, '1.5µs'], [2_000_000n, '2ms'], [1_500_000_000n, '1.5s'], [90_000_000_000n, '1m30s'],
    [72n * 3_600_000_000_000n, '72h0m0s'], [-1_000_000_000n, '-1s'], [3_723_500_000_000n, '1h2m3.5s']
  ]
  for (const [ns, text] of formats) t.equal(formatGoDurationNs(ns), text)
  t.equal(formatGoDuration(250), '250ms')

  t.same(parseBlockingParams(new URLSearchParams('index=7&wait=2s')), { index: 7, waitMs: 2000 })
  t.same(parseBlockingParams(new URLSearchParams('')), { index: 0, waitMs: undefined })
  t.throws(() => parseBlockingParams(new URLSearchParams('wait=x')), { statusCode: 400, message: 'Invalid wait time' })
  t.throws(() => parseBlockingParams(new URLSearchParams('index=1.5')), { statusCode: 400, message: 'Invalid index' })

  t.equal(queryTimeout(undefined, () => 0), DEFAULT_WAIT_MS, 'default 5 minutes')
  t.equal(queryTimeout(0, () => 0), DEFAULT_WAIT_MS, 'non-positive waits take the default')
  t.equal(queryTimeout(-5, () => 0), DEFAULT_WAIT_MS)
  t.equal(queryTimeout(3_600_000, () => 0), MAX_WAIT_MS, 'clamped to 10 minutes')
  t.equal(queryTimeout(1600, () => 0.999999), 1699, 'jitter below wait/16')
  for (let i = 0; i < 100; i++) {
    const timeout = queryTimeout(16_000)
    t.ok(timeout >= 16_000 && timeout < 17_000, 'within [wait, wait + wait/16)')
  }
  t.ok(queryTimeout(undefined) >= DEFAULT_WAIT_MS)

  const hub = new ChangeHub(10)
  t.equal(hub.index, 10)
  t.equal(hub.nextIndex(), 11)
  const changed = hub.wait(['a'], 1000)
  hub.notify('b')
  t.equal(hub.waiting, 1, 'other topics do not wake it')
  hub.notify('a')
  t.equal(await changed, 'changed')
  t.equal(await hub.wait(['a'], 10), 'timeout')
  const aborted = new AbortController()
  const pending = hub.wait(['a'], 1000, aborted.signal)
  aborted.abort()
  t.equal(await pending, 'aborted')
  t.equal(await hub.wait(['a'], 1000, aborted.signal), 'aborted', 'an aborted signal returns at once')
  const open = hub.wait(['a'], 1000)
  hub.close()
  t.equal(await open, 'closed')
  t.equal(hub.closed, true)
  t.equal(await hub.wait(['a'], 1000), 'closed', 'a closed hub returns at once')
  t.equal(hub.waiting, 0)

  // block(): index readiness with hash suppression.
  const live = new ChangeHub()
  let state = { index: 5, hash: 'x' }
  const result = block({ hub: live, topics: ['t'], timeoutMs: 2000, run: () => state, ready: indexReady(5) })
  await sleep(10)
  state = { index: 6, hash: 'x' }
  live.notify('t')
  await sleep(10)
  t.equal(live.waiting, 1, 'same hash: keeps waiting')
  state = { index: 7, hash: 'y' }
  live.notify('t')
  t.same(await result, { index: 7, hash: 'y' })
  t.same(await block({ hub: live, topics: ['t'], timeoutMs: 1, run: () => ({ index: 3 }), ready: indexReady(0) }), { index: 3 }, 'no index: at once')
  let plain: { index: number } = { index: 9 }
  const unhashed = block({ hub: live, topics: ['t'], timeoutMs: 2000, run: () => plain, ready: indexReady<{ index: number }>(9) })
  await sleep(10)
  plain = { index: 10 }
  live.notify('t')
  t.same(await unhashed, { index: 10 }, 'without a hash any newer index is ready')
  // A change between computing the result and waiting is not lost.
  let racing = { index: 11 }
  const raced = block({
    hub: live,
    topics: ['t'],
    timeoutMs: 2000,
    run: async () => {
      const current = racing
      racing = { index: 12 }
      live.notify('t')
      return current
    },
    ready: indexReady<{ index: number }>(11)
  })
  t.same(await raced, { index: 12 }, 'woken by a change made while the query ran')
  live.close()
})

t.test('blocked queries are released by close', async (t) => {
  const agent = await startDevAgent()
  const roots = await call(agent, 'GET', '/v1/agent/connect/ca/roots')
  const started = Date.now()
  const keepAlive = new Agent({ keepAliveTimeout: 60_000 })
  t.teardown(async () => await keepAlive.close())
  const blocked = [
    call(agent, 'GET', `/v1/agent/connect/ca/roots?index=${roots.headers['x-consul-index'] as string}&wait=10m`),
    call(agent, 'GET', `/v1/connect/intentions/match?by=destination&name=api&index=${roots.headers['x-consul-index'] as string}&wait=10m`)
  ]
  // An idle keep-alive connection must not hold close() either.
  await request(`${agent.address}/v1/agent/self`, { dispatcher: keepAlive }).then(async (r) => await r.body.text())
  await sleep(30)
  await agent.close()
  const answers = await Promise.all(blocked)
  t.same(answers.map((a) => a.status), [200, 200], 'answered with the current state')
  t.ok(Date.now() - started < 2000)

  // A client that goes away releases its waiter.
  const { server, address } = await rawAgent(t)
  const index = (await call({ address }, 'GET', '/v1/agent/connect/ca/roots')).headers['x-consul-index'] as string
  const controller = new AbortController()
  const gone = request(`${address}/v1/agent/connect/ca/roots?index=${index}&wait=10m`, { signal: controller.signal }).catch(() => 'aborted')
  await sleep(30)
  t.equal(server.hub.waiting, 1)
  controller.abort()
  t.equal(await gone, 'aborted')
  await sleep(30)
  t.equal(server.hub.waiting, 0, 'the waiter is gone')
})

t.test('authorize', async (t) => {
  const agent = await agentFor(t)
  const td = agent.trustDomain
  await call(agent, 'PUT', '/v1/config', { body: { Kind: 'service-defaults', Name: 'api', Protocol: 'http' } })
  await call(agent, 'PUT', '/v1/config', {
    body: {
      Kind: 'service-intentions',
      Name: 'api',
      Sources: [
        { Name: 'web', Permissions: [{ Action: 'allow', HTTP: { PathPrefix: '/v1/' } }, { Action: 'deny', HTTP: { PathExact: '/admin' } }, { Action: 'allow', HTTP: { Methods: ['GET'] } }] },
        { Name: 'billing', Action: 'deny' },
        { Name: '*', Action: 'allow' },
        { Name: 'peered', Action: 'deny', Peer: 'other' }
      ]
    }
  })
  const authz = async (body: unknown, raw?: string): Promise<Res> => await call(agent, 'POST', '/v1/agent/connect/authorize', raw === undefined ? { body } : { raw })
  const web = await authz({ Target: 'api', ClientCertURI: svcURI(td, 'web') })
  t.same(web.json, { Authorized: false, Reason: 'Matched L7 intention: default/web => default/api (Precedence: 9, Permissions: 3)' })
  t.match(web.text, 'default/web =\\u003e default/api', 'Go escapes > as \\u003e')
  t.equal(web.headers['x-cache'], 'MISS')
  t.equal((await authz(undefined, `{"Target":"api","ClientCertURI":"${svcURI(td, 'web')}"} trailing`)).status, 200, 'text after the first value is ignored, as by Go')
  t.same((await authz({ Target: 'api', ClientCertURI: svcURI(td, 'billing') })).json,
    { Authorized: false, Reason: 'Matched L4 intention: default/billing => default/api (Precedence: 9, Action: DENY)' })
  const other = await authz({ target: 'api', clientCertUri: svcURI(td, 'other'), ClientCertSerial: '01' })
  t.same(other.json, { Authorized: true, Reason: 'Matched L4 intention: default/* => default/api (Precedence: 8, Action: ALLOW)' }, 'keys match case-insensitively')
  t.same([other.headers['x-cache'], other.headers.age], ['HIT', '0'])
  t.same((await authz({ Target: 'api', ClientCertURI: svcURI('other-td.consul', 'billing') })).json.Authorized, false, 'the trust domain is ignored')
  t.same((await authz({ Target: 'api', ClientCertURI: 'spiffe://x/ap/team/ns/default/dc/dc9/svc/billing' })).json.Authorized, false, 'partition and datacenter are ignored (CE)')
  t.same((await authz({ Target: 'api', ClientCertURI: svcURI(td, 'peered') })).json.Reason, 'Matched L4 intention: default/* => default/api (Precedence: 8, Action: ALLOW)', 'peered intentions never match')
  t.same((await authz({ Target: 'api', ClientCertURI: svcURI(td, 'billing', 'team') })).json.Authorized, true, 'the namespace counts')
  t.same((await authz({ Target: 'nothing', ClientCertURI: svcURI(td, 'web') })).json, { Authorized: true, Reason: 'ACLs disabled, access is allowed by default' })
  // A change of the destination's intentions is a background refresh of the cache: still a hit.
  await call(agent, 'PUT', '/v1/config', { body: { Kind: 'service-intentions', Name: 'api', Sources: [{ Name: 'web', Action: 'allow' }] } })
  const refreshed = await authz({ Target: 'api', ClientCertURI: svcURI(td, 'web') })
  t.same([refreshed.json.Reason, refreshed.headers['x-cache'], refreshed.headers.age], ['Matched L4 intention: default/web => default/api (Precedence: 9, Action: ALLOW)', 'HIT', '0'])
  const cachedMatch = await call(agent, 'GET', '/v1/connect/intentions/match?by=destination&name=api&cached')
  t.same([cachedMatch.status, cachedMatch.headers['x-cache']], [200, 'MISS'], '?cached adds the cache headers')
  t.equal((await call(agent, 'GET', '/v1/connect/intentions/match?by=destination&name=api&cached')).headers['x-cache'], 'HIT')

  const errors: Array<[unknown, string | undefined, string]> = [
    [{ Target: 'api', ClientCertURI: `spiffe://${td}/agent/client/dc/dc1/id/node1` }, undefined, 'Bad request: ClientCertURI not a valid Service identifier'],
    [{ Target: 'api', ClientCertURI: 'http://x/ns/default/dc/dc1/svc/web' }, undefined, 'Bad request: ClientCertURI not a valid Connect identifier'],
    [{ Target: 'api' }, undefined, 'Bad request: ClientCertURI not a valid Connect identifier'],
    [{ ClientCertURI: svcURI(td, 'web') }, undefined, 'Bad request: Target service must be specified'],
    [null, undefined, 'Bad request: Target service must be specified'],
    [{ Target: 'api', Namespace: 'default' }, undefined, 'Bad request: Request decode failed: json: unknown field "Namespace"'],
    [{ Target: 7 }, undefined, 'Bad request: Request decode failed: json: cannot unmarshal number into Go struct field ConnectAuthorizeRequest.Target of type string'],
    [{ Target: { a: 1 } }, undefined, 'Bad request: Request decode failed: json: cannot unmarshal object into Go struct field ConnectAuthorizeRequest.Target of type string'],
    [{ Target: true }, undefined, 'Bad request: Request decode failed: json: cannot unmarshal bool into Go struct field ConnectAuthorizeRequest.Target of type string'],
    ['x', undefined, 'Bad request: Request decode failed: json: cannot unmarshal string into Go value of type structs.ConnectAuthorizeRequest'],
    [undefined, '', 'Bad request: Request decode failed: EOF'],
    [undefined, '{"Target":', 'Bad request: Request decode failed: unexpected EOF'],
    [undefined, '{"Target": x}', 'Bad request: Request decode failed: invalid character \'x\' looking for beginning of value']
  ]
  for (const [body, raw, message] of errors) {
    const res = await authz(body, raw)
    t.same([res.status, res.text], [400, message], JSON.stringify(body ?? raw))
  }
  t.same((await authz({ Target: 'api', ClientCertURI: svcURI(td, 'web'), Target2: 1 })).status, 400)
  t.equal((await authz({ Target: null, ClientCertURI: svcURI(td, 'web') })).status, 400, 'null is no value')

  const policies = await agentFor(t, { defaultPolicy: 'deny' })
  t.same((await call(policies, 'POST', '/v1/agent/connect/authorize', { body: { Target: 'api', ClientCertURI: svcURI(td, 'web') } })).json,
    { Authorized: false, Reason: 'Default intention policy' })
  const allow = await agentFor(t, { defaultPolicy: 'allow', acl: { enabled: true, defaultPolicy: 'deny', tokens: { w: 'write' } } })
  t.same((await call(allow, 'POST', '/v1/agent/connect/authorize', { body: { Target: 'api', ClientCertURI: svcURI(td, 'web') }, headers: { 'X-Consul-Token': 'w' } })).json,
    { Authorized: true, Reason: 'Default intention policy' }, 'default_intention_policy wins over ACLs')
})

t.test('ACL tokens', async (t) => {
  const agent = await agentFor(t, { acl: { enabled: true, defaultPolicy: 'deny', tokens: { r: 'read', w: 'write', m: 'manage' } } })
  const td = agent.trustDomain
  const as = (token: string | undefined): Record<string, string> => token === undefined ? {} : { 'X-Consul-Token': token }
  const denied = await call(agent, 'GET', '/v1/agent/connect/ca/leaf/web')
  t.same([denied.status, denied.text], [403, 'Permission denied: token with AccessorID \'00000000-0000-0000-0000-000000000002\' lacks permission \'service:write\' on "web"'])
  t.equal(denied.headers['x-consul-default-acl-policy'], 'deny')
  t.same(await call(agent, 'GET', '/v1/agent/self', { headers: as('nope') }).then((r) => [r.status, r.text]), [403, 'ACL not found'])
  t.equal((await call(agent, 'GET', '/v1/agent/connect/ca/roots')).status, 200, 'roots need no token')
  const readLeaf = await call(agent, 'GET', '/v1/agent/connect/ca/leaf/web', { headers: as('r') })
  t.equal(readLeaf.status, 403)
  t.match(readLeaf.text, /^Permission denied: token with AccessorID '[0-9a-f-]{36}' lacks permission 'service:write' on "web"$/)
  t.notMatch(readLeaf.text, /'r'/, 'the secret is never shown')
  t.equal((await call(agent, 'GET', '/v1/agent/connect/ca/leaf/web', { headers: as('w') })).status, 200)
  t.equal((await call(agent, 'GET', '/v1/agent/connect/ca/leaf/web?token=w')).status, 200, '?token')
  t.equal((await call(agent, 'GET', '/v1/agent/connect/ca/leaf/web', { headers: { Authorization: 'bearer w' } })).status, 200, 'Authorization: Bearer, any case')
  t.equal((await call(agent, 'GET', '/v1/agent/connect/ca/leaf/web', { headers: { Authorization: 'Bearer  w extra' } })).status, 200, 'the first word after the scheme')
  t.equal((await call(agent, 'GET', '/v1/agent/connect/ca/leaf/web', { headers: { Authorization: 'Bearer\tw' } })).status, 403, 'the scheme ends at a space, as Consul splits it')
  t.equal((await call(agent, 'GET', '/v1/agent/connect/ca/leaf/web?token=r', { headers: as('w') })).status, 403, '?token comes first')
  t.equal((await call(agent, 'GET', '/v1/agent/self', { headers: as('r') })).status, 200)

  // Config entries: intentions and service-defaults per name, proxy-defaults and mesh operator.
  const sd = { Kind: 'service-defaults', Name: 'api', Protocol: 'http' }
  t.equal((await call(agent, 'PUT', '/v1/config', { body: sd, headers: as('r') })).text, 'Permission denied: token with AccessorID \'' +
    (await call(agent, 'PUT', '/v1/config', { body: sd, headers: as('r') })).text.split('\'')[1] + '\' lacks permission \'service:write\' on "api"')
  t.equal((await call(agent, 'PUT', '/v1/config', { body: { Kind: 'service-defaults', Name: '*' }, headers: as('r') })).status, 500, 'validation comes before the ACL check')
  t.equal((await call(agent, 'PUT', '/v1/config', { body: sd, headers: as('w') })).text, 'true')
  t.match((await call(agent, 'PUT', '/v1/config', { body: { Kind: 'service-intentions', Name: 'api', Sources: [{ Name: 'web', Action: 'allow' }] }, headers: as('r') })).text, 'lacks permission \'intention:write\' on "api"')
  t.equal((await call(agent, 'PUT', '/v1/config', { body: { Kind: 'service-intentions', Name: 'api', Sources: [{ Name: 'web', Action: 'allow' }] }, headers: as('w') })).text, 'true')
  t.match((await call(agent, 'PUT', '/v1/config', { body: { Kind: 'mesh' }, headers: as('w') })).text, /lacks permission 'operator:write'$/)
  t.equal((await call(agent, 'PUT', '/v1/config', { body: { Kind: 'mesh' }, headers: as('m') })).text, 'true')
  t.equal((await call(agent, 'PUT', '/v1/config', { body: { Kind: 'proxy-defaults', Config: {} }, headers: as('m') })).text, 'true')
  t.equal((await call(agent, 'GET', '/v1/config/mesh/mesh')).status, 200, 'mesh is readable without a token')
  t.equal((await call(agent, 'GET', '/v1/config/service-defaults/api')).status, 403)
  t.equal((await call(agent, 'GET', '/v1/config/service-intentions/api')).status, 403)
  t.equal((await call(agent, 'GET', '/v1/config/service-intentions/api', { headers: as('r') })).status, 200)
  t.same((await call(agent, 'GET', '/v1/config/')).json.map((e: { Kind: string }) => e.Kind), ['mesh', 'proxy-defaults'], 'lists are filtered')
  t.equal((await call(agent, 'GET', '/v1/config/', { headers: as('r') })).json.length, 4)
  t.equal((await call(agent, 'DELETE', '/v1/config/mesh/mesh', { headers: as('w') })).status, 403)
  t.equal((await call(agent, 'DELETE', '/v1/config/bogus/x', { headers: as('w') })).status, 400, 'an invalid kind before the ACL check')
  t.equal((await call(agent, 'GET', '/v1/connect/intentions/match?by=destination&name=api')).status, 403)
  t.equal((await call(agent, 'GET', '/v1/connect/intentions/match?by=destination&name=api', { headers: as('r') })).status, 200)
  t.equal((await call(agent, 'GET', '/v1/connect/intentions/match?by=nope&name=api')).status, 500, 'parameter errors before the ACL check')

  // CA configuration needs operator:write.
  t.match((await call(agent, 'GET', '/v1/connect/ca/configuration', { headers: as('w') })).text, /lacks permission 'operator:write'$/)
  t.equal((await call(agent, 'GET', '/v1/connect/ca/configuration', { headers: as('m') })).status, 200)
  t.equal((await call(agent, 'PUT', '/v1/connect/ca/configuration', { body: { Config: {} }, headers: as('w') })).status, 403)
  t.equal((await call(agent, 'PUT', '/v1/connect/ca/configuration', { body: { Config: {} }, headers: as('m') })).status, 200)

  // Authorize: service:write on the target, checked after the request is validated.
  const body = { Target: 'api', ClientCertURI: svcURI(td, 'ops') }
  t.equal((await call(agent, 'POST', '/v1/agent/connect/authorize', { body: { Target: '' } })).status, 400)
  t.equal((await call(agent, 'POST', '/v1/agent/connect/authorize', { body, headers: as('r') })).status, 403)
  t.same((await call(agent, 'POST', '/v1/agent/connect/authorize', { body, headers: as('w') })).json, { Authorized: false, Reason: 'Default behavior configured by ACLs' })
  t.same((await call(agent, 'POST', '/v1/agent/connect/authorize', { body, headers: as('m') })).json, { Authorized: true, Reason: 'Default behavior configured by ACLs' }, 'a management token allows by default')
  const open = await agentFor(t, { acl: { enabled: true } })
  t.same((await call(open, 'POST', '/v1/agent/connect/authorize', { body })).json, { Authorized: true, Reason: 'Default behavior configured by ACLs' }, 'ACL default allow')

  // Catalog routes.
  const svc = { ID: 'api-1', Name: 'api', Port: 8443, Connect: { Native: true } }
  t.match((await call(agent, 'PUT', '/v1/agent/service/register', { body: svc, headers: as('r') })).text, 'lacks permission \'service:write\' on "api"')
  t.match((await call(agent, 'PUT', '/v1/agent/service/register', { body: [1], headers: as('r') })).text, 'on ""', 'a body without a name')
  t.equal((await call(agent, 'PUT', '/v1/agent/service/register', { body: svc, headers: as('w') })).status, 200)
  t.equal((await call(agent, 'GET', '/v1/agent/service/api-1')).status, 403)
  t.equal((await call(agent, 'GET', '/v1/agent/services')).status, 403)
  t.equal((await call(agent, 'GET', '/v1/health/connect/api')).status, 403)
  t.equal((await call(agent, 'GET', '/v1/health/connect/api', { headers: as('r') })).status, 200)
  t.equal((await call(agent, 'PUT', '/v1/agent/check/pass/x', { headers: as('r') })).status, 403)
  t.equal((await call(agent, 'PUT', '/v1/agent/check/update/x', { body: { Status: 'passing' }, headers: as('r') })).status, 403)
  t.equal((await call(agent, 'PUT', '/v1/agent/service/deregister/api-1', { headers: as('r') })).status, 403)
  t.equal((await call(agent, 'PUT', '/v1/agent/service/deregister/api-1', { headers: as('w') })).status, 200)
})

t.test('catalog routes', async (t) => {
  const agent = await agentFor(t)
  const register = await call(agent, 'PUT', '/v1/agent/service/register', {
    body: { ID: 'api-1', Name: 'api', Address: '127.0.0.1', Port: 8443, Tags: ['v1'], Connect: { Native: true }, Check: { CheckID: 'api-ttl', Name: 'ttl', TTL: '30s' } }
  })
  t.same([register.status, register.text], [200, ''])
  t.equal(register.headers['content-type'], undefined, 'an empty answer has no content type')
  t.same(await call(agent, 'PUT', '/v1/agent/service/register', { raw: '' }).then((r) => [r.status, r.text]), [400, 'Request decode failed: EOF'])
  t.same(await call(agent, 'PUT', '/v1/agent/service/register', { raw: '{' }).then((r) => [r.status, r.text]), [400, 'Request decode failed: unexpected EOF'])
  t.same(await call(agent, 'PUT', '/v1/agent/service/register', { body: { Port: 1 } }).then((r) => [r.status, r.text]), [400, 'Missing service name'])

  const services = await call(agent, 'GET', '/v1/agent/services')
  t.same(Object.keys(services.json), ['api-1'])
  const service = await call(agent, 'GET', '/v1/agent/service/api-1')
  t.equal(service.status, 200)
  const hash = service.headers['x-consul-contenthash'] as string
  t.equal(service.json.ContentHash, hash)
  t.same(await call(agent, 'GET', '/v1/agent/service/nope').then((r) => [r.status, r.text]), [404, 'unknown service ID: nope'])
  t.equal((await call(agent, 'GET', '/v1/agent/service/api-1?hash=other&wait=5s')).status, 200, 'another hash answers at once')
  const started = Date.now()
  t.equal((await call(agent, 'GET', `/v1/agent/service/api-1?hash=${hash}&wait=50ms`)).headers['x-consul-contenthash'], hash, 'same hash at the timeout')
  t.ok(Date.now() - started >= 50)
  const changed = call(agent, 'GET', `/v1/agent/service/api-1?hash=${hash}&wait=5s`)
  await sleep(30)
  await call(agent, 'PUT', '/v1/agent/service/register', { body: { ID: 'api-1', Name: 'api', Address: '127.0.0.1', Port: 8444, Connect: { Native: true }, Check: { CheckID: 'api-ttl', Name: 'ttl', TTL: '30s' } } })
  const after = await changed
  t.not(after.headers['x-consul-contenthash'], hash, 'woken by the change')
  t.equal(after.json.Port, 8444)
  const gone = call(agent, 'GET', `/v1/agent/service/api-1?hash=${after.headers['x-consul-contenthash'] as string}&wait=5s`)
  await sleep(30)
  await call(agent, 'PUT', '/v1/agent/service/deregister/api-1')
  t.equal((await gone).status, 404, 'a deregistration answers 404')
  t.equal((await call(agent, 'PUT', '/v1/agent/service/deregister/api-1')).status, 404)

  await call(agent, 'PUT', '/v1/agent/service/register?replace-existing-checks', {
    body: { ID: 'api-1', Name: 'api', Address: '127.0.0.1', Port: 8443, Tags: ['v1'], Connect: { Native: true }, Check: { CheckID: 'api-ttl', Name: 'ttl', TTL: '30s' } }
  })
  const health = await call(agent, 'GET', '/v1/health/connect/api')
  t.equal(health.status, 200)
  t.equal(health.json.length, 1)
  t.equal(health.headers['x-consul-effective-consistency'], 'leader')
  t.equal(health.headers['x-consul-query-backend'], 'blocking-query')
  t.same((await call(agent, 'GET', '/v1/health/connect/api?passing')).json, [], 'the TTL check is critical')
  t.same((await call(agent, 'GET', '/v1/health/connect/api?passing=false')).json.length, 1)
  t.same(await call(agent, 'GET', '/v1/health/connect/api?passing=maybe').then((r) => [r.status, r.text]), [400, 'Invalid value for ?passing'])
  t.same(await call(agent, 'GET', '/v1/health/connect/api?filter=x').then((r) => r.status), 400)
  t.same(await call(agent, 'GET', '/v1/health/connect/').then((r) => [r.status, r.text]), [400, 'Missing service name'])
  t.equal((await call(agent, 'GET', '/v1/health/connect/api?tag=v1')).json.length, 1)
  t.equal((await call(agent, 'GET', '/v1/health/connect/api?tag=v1&tag=v2')).json.length, 0)

  const index = Number(health.headers['x-consul-index'])
  const passing = call(agent, 'GET', `/v1/health/connect/api?passing=1&index=${index}&wait=5s`)
  await sleep(30)
  t.same(await call(agent, 'PUT', '/v1/agent/check/pass/api-ttl?note=ok').then((r) => [r.status, r.text]), [200, ''])
  const now = await passing
  t.equal(now.json.length, 1, 'woken by the check update')
  t.ok(Number(now.headers['x-consul-index']) > index)
  t.equal(now.json[0].Checks.find((c: { CheckID: string }) => c.CheckID === 'api-ttl').Output, 'ok')
  t.equal((await call(agent, 'PUT', '/v1/agent/check/warn/api-ttl')).status, 200)
  t.equal((await call(agent, 'PUT', '/v1/agent/check/fail/api-ttl')).status, 200)
  t.same(await call(agent, 'PUT', '/v1/agent/check/update/api-ttl', { body: { Status: 'passing', Output: 'fine' } }).then((r) => r.status), 200)
  t.same(await call(agent, 'PUT', '/v1/agent/check/update/api-ttl', { body: { status: 'warning' } }).then((r) => r.status), 200)
  t.same(await call(agent, 'PUT', '/v1/agent/check/update/api-ttl', { body: { Status: 'bad' } }).then((r) => [r.status, r.text]), [400, 'Invalid check status: \'bad\''])
  t.same(await call(agent, 'PUT', '/v1/agent/check/update/api-ttl', { body: {} }).then((r) => [r.status, r.text]), [400, 'Invalid check status: \'\''])
  t.same(await call(agent, 'PUT', '/v1/agent/check/update/api-ttl', { body: { Status: 'passing', Foo: 1 } }).then((r) => [r.status, r.text]), [400, 'Request decode failed: json: unknown field "Foo"'])
  t.equal((await call(agent, 'PUT', '/v1/agent/check/pass/nope')).status, 404)
})

t.test('authorize and certificate URI helpers', async (t) => {
  const uris: Array<[string, ReturnType<typeof parseCertURI>]> = [
    ['spiffe://td.consul/ns/default/dc/dc1/svc/web', { kind: 'service', host: 'td.consul', partition: '', namespace: 'default', datacenter: 'dc1', service: 'web' }],
    ['SPIFFE://td.consul/ns/default/dc/dc1/svc/web?x=1#frag', { kind: 'service', host: 'td.consul', partition: '', namespace: 'default', datacenter: 'dc1', service: 'web' }],
    ['spiffe://td.consul/ap/team/ns/a/dc/dc1/svc/b', { kind: 'service', host: 'td.consul', partition: 'team', namespace: 'a', datacenter: 'dc1', service: 'b' }],
    ['spiffe://td.consul/ns/default/dc/dc1/svc/we%62%2Fx%ff', { kind: 'service', host: 'td.consul', partition: '', namespace: 'default', datacenter: 'dc1', service: 'web/x\ufffd' }],
    ['spiffe://user@td.consul/ns/default/dc/dc1/svc/web', { kind: 'service', host: 'td.consul', partition: '', namespace: 'default', datacenter: 'dc1', service: 'web' }],
    ['spiffe://td.consul/agent/client/dc/dc1/id/node', { kind: 'other' }],
    ['spiffe://td.consul/ap/x/agent/client/dc/dc1/id/node', { kind: 'other' }],
    ['spiffe://td.consul/agent/server/dc/dc1', { kind: 'other' }],
    ['spiffe://td.consul/gateway/mesh/dc/dc1', { kind: 'other' }],
    ['spiffe://td.consul', { kind: 'other' }],
    ['spiffe://nodot', null],
    ['spiffe://.x', null],
    ['spiffe://td.consul/ns/default/dc/dc1/svc/', null],
    ['spiffe://td.consul/ns/default/dc/dc1/svc/web/', null],
    ['spiffe://td.consul/ns/default/dc/dc1/svc/we%zb', null],
    ['spiffe://td.consul/ns/default/dc/dc1/svc/web#%z', null],
    ['spiffe://td consul/ns/default/dc/dc1/svc/web', null],
    ['spiffe://td.consul/ns/default/dc/dc1/svc/we\nb', null],
    ['spiffe:opaque', null],
    ['http://td.consul/ns/default/dc/dc1/svc/web', null],
    ['//td.consul/ns/default/dc/dc1/svc/web', null],
    ['', null]
  ]
  for (const [uri, parsed] of uris) t.same(parseCertURI(uri), parsed, JSON.stringify(uri))

  t.throws(() => parseAuthorizeRequest('', 'x'), { statusCode: 400, message: 'Bad request: Target service must be specified' })
  const base: Intention = { SourceNS: 'default', SourceName: 'web', DestinationNS: 'default', DestinationName: 'api', SourceType: 'consul', Precedence: 9, CreateIndex: 1, ModifyIndex: 1 }
  t.equal(intentionString({ ...base, Action: 'allow' }), 'default/web => default/api (Precedence: 9, Action: ALLOW)')
  t.equal(intentionString({ ...base, ID: 'abc', Action: 'deny', SourcePeer: 'p' }), 'peer(p)/default/web => default/api (ID: abc, Precedence: 9, Action: DENY)')
  t.equal(intentionString({ ...base, SourcePartition: 'ap1', DestinationPartition: 'ap2', Permissions: [{ Action: 'allow' }] }), 'ap1/default/web => ap2/default/api (Precedence: 9, Permissions: 1)')
  t.equal(intentionString({ ...base, Permissions: [] }), 'default/web => default/api (Precedence: 9, Action: )')
  const defaults = { defaultIntentionPolicy: undefined, aclsEnabled: false, tokenDefaultAllow: false }
  t.same(authorize({ namespace: 'default', service: 'web' }, [{ ...base, SourceSamenessGroup: 'g', Action: 'deny' }], defaults).Reason, 'ACLs disabled, access is allowed by default', 'sameness groups never match')
  t.same(authorize({ namespace: 'x', service: 'web' }, [{ ...base, SourceNS: '*', SourceName: '*', Action: 'deny' }], defaults).Authorized, false, 'wildcard namespace')
})

t.test('requests that fail unexpectedly answer 500 without stopping the agent', async (t) => {
  const { server, address } = await rawAgent(t)
  const roots = server.ca.roots.bind(server.ca)
  server.ca.roots = () => { throw new Error('boom') }
  t.same(await call({ address }, 'GET', '/v1/agent/connect/ca/roots').then((r) => [r.status, r.text]), [500, 'boom'])
  server.ca.roots = roots
  t.equal((await call({ address }, 'GET', '/v1/agent/connect/ca/roots')).status, 200, 'and the agent keeps serving')
})
