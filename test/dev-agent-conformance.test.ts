// The dev agent against every response a real Consul agent gave (test/fixtures/consul/):
// the same key sets, types and nulls, recursively, and the same header names. Values that are
// per-cluster (certificates, IDs, indexes, dates) differ; values that follow from the same input
// (intentions, authorize reasons, config entries) must be equal.
//
// Deliberate differences, not visible in these shapes: the leaf subject is empty (current
// Consul; 1.10 wrote `CN = api.svc.default.<id>.consul`), and the agent claims version 1.20.1.
import t from 'tap'
import type { Test } from 'tap'
import { readFileSync } from 'node:fs'
import { join } from 'node:path'
import { X509Certificate, generateKeyPairSync } from 'node:crypto'
import { request } from 'undici'
import { startDevAgent } from '../lib/dev-agent/index'
import type { DevAgent } from '../lib/dev-agent/index'

const CAPTURED = join(__dirname, 'fixtures', 'consul')
// The captured heads have CRLF line ends.
const captured = (file: string): string => readFileSync(join(CAPTURED, file), 'utf8').replace(/\r\n/g, '\n')
const capturedJson = (file: string): any => JSON.parse(captured(file))
const CAPTURED_TD = '2a146f8e-f8b9-cb9e-7aa9-e941c8535d0d.consul'
// Hop-by-hop and framing headers differ with the body size and the client, not with the API.
const FRAMING = new Set(['date', 'content-length', 'transfer-encoding', 'connection', 'keep-alive'])

interface Res { status: number, text: string, json: any, headers: Record<string, string | string[] | undefined> }

async function call (agent: DevAgent, method: string, path: string, body?: unknown): Promise<Res> {
  const res = await request(`${agent.address}${path}`, { method: method as 'GET', body: body === undefined ? undefined : JSON.stringify(body) })
  const text = await res.body.text()
  let json: unknown
  try { json = JSON.parse(text) } catch {}
  return { status: res.statusCode, text, json, headers: res.headers }
}

/** Differences in keys, types and nulls between `actual` and the captured `expected`. */
function shapeDiff (actual: unknown, expected: unknown, path = '$'): string[] {
  if (expected === null) return actual === null ? [] : [`${path}: expected null, got ${JSON.stringify(actual)}`]
  if (Array.isArray(expected)) {
    if (!Array.isArray(actual)) return [`${path}: expected an array, got ${JSON.stringify(actual)}`]
    // Each element against the captured one at the same position, or the first.
    return actual.flatMap((item, i) => expected.length === 0 ? [] : shapeDiff(item, expected[i] ?? expected[0], `${path}[${i}]`))
  }
  if (typeof expected === 'object') {
    if (typeof actual !== 'object' || actual === null || Array.isArray(actual)) return [`${path}: expected an object, got ${JSON.stringify(actual)}`]
    const a = Object.keys(actual).sort()
    const e = Object.keys(expected as object).sort()
    const keys = a.join() === e.join() ? [] : [`${path}: keys ${JSON.stringify(a)} instead of ${JSON.stringify(e)}`]
    return [...keys, ...e.filter((k) => k in actual).flatMap((k) => shapeDiff((actual as Record<string, unknown>)[k], (expected as Record<string, unknown>)[k], `${path}.${k}`))]
  }
  return typeof actual === typeof expected ? [] : [`${path}: expected a ${typeof expected}, got ${JSON.stringify(actual)}`]
}

/** Header names of a captured `HTTP/1.1 ...` response head, lower-cased, without framing headers. */
function capturedHeaderNames (head: string): string[] {
  return head.split('\n').slice(1).map((line) => line.split(':')[0]?.trim().toLowerCase() ?? '').filter((name) => name !== '' && !FRAMING.has(name)).sort()
}

function headerNames (res: Res): string[] {
  return Object.keys(res.headers).map((name) => name.toLowerCase()).filter((name) => !FRAMING.has(name)).sort()
}

/** The same JSON with every CreateIndex/ModifyIndex replaced, for value comparisons. */
function withoutIndexes (value: unknown): unknown {
  return JSON.parse(JSON.stringify(value), (key, v) => key === 'CreateIndex' || key === 'ModifyIndex' ? 0 : v)
}

/** The capture's setup: service-defaults for api and web, and its service-intentions entry. */
async function capturedSetup (t: Test): Promise<DevAgent> {
  const agent = await startDevAgent()
  t.teardown(async () => await agent.close())
  for (const name of ['api', 'web']) {
    t.equal((await call(agent, 'PUT', '/v1/config', { Kind: 'service-defaults', Name: name, Protocol: 'http' })).text, 'true')
  }
  const entry = capturedJson('config-service-intentions-api.json')
  t.equal((await call(agent, 'PUT', '/v1/config', entry)).text, 'true', 'the captured entry (with its read-only fields) is accepted as written')
  return agent
}

t.test('config entry and intention match equal the captured ones', async (t) => {
  const agent = await capturedSetup(t)
  const entry = await call(agent, 'GET', '/v1/config/service-intentions/api')
  t.same(shapeDiff(entry.json, capturedJson('config-service-intentions-api.json')), [])
  t.same(withoutIndexes(entry.json), withoutIndexes(capturedJson('config-service-intentions-api.json')), 'same values')

  const match = await call(agent, 'GET', '/v1/connect/intentions/match?by=destination&name=api')
  t.same(shapeDiff(match.json, capturedJson('intentions-match.json')), [])
  t.same(withoutIndexes(match.json), withoutIndexes(capturedJson('intentions-match.json')), 'same intentions in the same order')
  t.same(headerNames(match), capturedHeaderNames(captured('intentions-match.headers.txt')), 'same header names')
  t.equal(match.headers['x-consul-index'], String(entry.json.ModifyIndex), 'the index is the config table index')
})

t.test('CA roots and leaves have the captured shapes, before and after a rotation', async (t) => {
  const agent = await startDevAgent()
  t.teardown(async () => await agent.close())
  const roots = await call(agent, 'GET', '/v1/agent/connect/ca/roots')
  t.same(shapeDiff(roots.json, capturedJson('ca-roots.json')), [])
  t.same(headerNames(roots), capturedHeaderNames(captured('ca-roots.headers.txt')))
  t.equal(roots.json.Roots[0].ExternalTrustDomain, agent.trustDomain.replace(/\.consul$/, ''), 'ExternalTrustDomain is the cluster ID, as captured')
  t.equal(capturedJson('ca-roots.json').Roots[0].ExternalTrustDomain, CAPTURED_TD.replace(/\.consul$/, ''))

  const leaf = await call(agent, 'GET', '/v1/agent/connect/ca/leaf/api')
  t.same(shapeDiff(leaf.json, capturedJson('ca-leaf-api.json')), [])
  t.same(headerNames(leaf), capturedHeaderNames(captured('ca-leaf-api.headers.txt')))
  t.equal(leaf.json.ServiceURI.replace(agent.trustDomain, CAPTURED_TD), capturedJson('ca-leaf-api.json').ServiceURI, 'the same URI but for the trust domain')
  const mine = new X509Certificate(leaf.json.CertPEM)
  const theirs = new X509Certificate(capturedJson('ca-leaf-api.json').CertPEM)
  t.equal(mine.subjectAltName, theirs.subjectAltName?.replace(CAPTURED_TD, agent.trustDomain), 'one URI SAN')
  t.same(mine.keyUsage, theirs.keyUsage, 'client and server auth')
  t.equal(mine.ca, theirs.ca)
  t.equal(Date.parse(leaf.json.ValidBefore) - Date.parse(leaf.json.ValidAfter), Date.parse(theirs.validTo) - Date.parse(theirs.validFrom), '72 h')
  t.equal(mine.publicKey.asymmetricKeyDetails?.namedCurve, theirs.publicKey.asymmetricKeyDetails?.namedCurve, 'P-256')

  const key = generateKeyPairSync('ec', { namedCurve: 'prime256v1' }).privateKey.export({ type: 'sec1', format: 'pem' })
  const waiting = call(agent, 'GET', `/v1/agent/connect/ca/leaf/api?index=${leaf.json.ModifyIndex as number}&wait=10s`)
  t.equal((await call(agent, 'PUT', '/v1/connect/ca/configuration', { Provider: 'consul', Config: { PrivateKey: key } })).status, 200)
  const after = await call(agent, 'GET', '/v1/agent/connect/ca/roots')
  t.same(shapeDiff(after.json, capturedJson('ca-roots-after-rotation.json')), [])
  const renewed = await waiting
  t.same(shapeDiff(renewed.json, capturedJson('ca-leaf-api-after-rotation.json')), [])
  const count = (pem: string): number => pem.split('-----BEGIN CERTIFICATE-----').length - 1
  t.equal(count(renewed.json.CertPEM), count(capturedJson('ca-leaf-api-after-rotation.json').CertPEM), 'two certificates, as captured')
})

t.test('health of a Connect-native instance has the captured shape', async (t) => {
  const agent = await startDevAgent()
  t.teardown(async () => await agent.close())
  const register = await call(agent, 'PUT', '/v1/agent/service/register', {
    ID: 'api-1',
    Name: 'api',
    Address: '127.0.0.1',
    Port: 8443,
    Connect: { Native: true },
    Check: { Name: 'api health', HTTP: 'http://127.0.0.1:1/health', Interval: '10s' }
  })
  t.equal(register.status, 200, register.text)
  const health = await call(agent, 'GET', '/v1/health/connect/api')
  t.same(shapeDiff(health.json, capturedJson('health-connect-api.json')), [])
  t.same(health.json[0].Checks.map((c: { CheckID: string }) => c.CheckID), ['serfHealth', 'service:api-1'])
})

t.test('authorize answers as captured, reason for reason', async (t) => {
  const agent = await capturedSetup(t)
  // The capture's cache was warm (X-Cache: HIT, Age: 0); the first call here warms ours.
  await call(agent, 'POST', '/v1/agent/connect/authorize', { Target: 'api', ClientCertURI: `spiffe://${agent.trustDomain}/ns/default/dc/dc1/svc/x` })
  const blocks = captured('agent-authorize.txt').split(/\n(?=POST )/).map((block) => block.trim())
  t.equal(blocks.length, 4)
  for (const block of blocks) {
    const [request, ...rest] = block.split('\n')
    const response = rest.join('\n')
    const [head, body] = response.split(/\n\n/) as [string, string]
    const status = Number(/^HTTP\/1\.1 (\d+)/.exec(head)?.[1])
    const uri = /ClientCertURI: (\S+)\}/.exec(request as string)?.[1]?.replace(CAPTURED_TD, agent.trustDomain) ??
      `spiffe://${agent.trustDomain}/agent/client/dc/dc1/id/node1`
    const res = await call(agent, 'POST', '/v1/agent/connect/authorize', { Target: 'api', ClientCertURI: uri })
    t.equal(res.status, status, `${request as string}: status`)
    t.same(headerNames(res), capturedHeaderNames(head), `${request as string}: header names`)
    if (status === 200) {
      t.same(res.json, JSON.parse(body), `${request as string}: body`)
      t.same(shapeDiff(res.json, JSON.parse(body)), [])
    } else {
      t.equal(res.text, body.trim(), `${request as string}: text`)
    }
  }
})

t.test('the shape comparison itself', async (t) => {
  t.same(shapeDiff({ a: 1, b: [{ c: null }] }, { a: 2, b: [{ c: null }] }), [])
  t.same(shapeDiff({ a: '1' }, { a: 2 }), ['$.a: expected a number, got "1"'])
  t.same(shapeDiff({ a: 1 }, { a: null }), ['$.a: expected null, got 1'])
  t.same(shapeDiff({ a: {} }, { a: [] }), ['$.a: expected an array, got {}'])
  t.same(shapeDiff({ a: [] }, { a: {} }), ['$.a: expected an object, got []'])
  t.same(shapeDiff({ a: null }, { a: {} }), ['$.a: expected an object, got null'])
  t.same(shapeDiff({ x: 1 }, { y: 1 }), ['$: keys ["x"] instead of ["y"]'])
  t.same(shapeDiff([1, 'a'], [1]), ['$[1]: expected a number, got "a"'], 'extra elements compare with the first')
  t.same(shapeDiff([1], []), [])
  t.same(capturedHeaderNames('HTTP/1.1 200 OK\nDate: x\nX-A: 1\n'), ['x-a'])
})
