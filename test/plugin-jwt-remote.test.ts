// Remote key sets (docs/semantics.md#jwt-key-sets) served by a local HTTPS server: readiness waits
// for the first fetch, keys rotate in and out without a restart, and a server that is down at
// start or later never crashes anything (no keys: requirements fail; later, the last good keys stay).
import { once } from 'node:events'
import https from 'node:https'
import type { AddressInfo } from 'node:net'
import t from 'tap'
import type { KeySetEvent } from '../lib/index'
import { get, leafFor, mtlsClient, rootPems, setIntentions, setProtocol, startAgent, startService } from './helpers/mesh'
import type { DevAgent } from '../lib/dev-agent/index'
import { jwks, newIssuer } from './helpers/jwt'
import type { Issuer } from './helpers/jwt'

interface JwksServer { port: number, hits: () => number, serve: (...issuers: Issuer[]) => void, start: () => Promise<void>, stop: () => Promise<void> }

async function jwksServer (t: { teardown: (fn: () => unknown) => void }, agent: DevAgent, port = 0): Promise<JwksServer> {
  const { certPem, privateKeyPem } = await agent.ca.issueCertificate({ dnsNames: ['localhost'] })
  let body = JSON.stringify({ keys: [] })
  let hits = 0
  let server: https.Server | null = null
  const self: JwksServer = {
    port,
    hits: () => hits,
    serve: (...issuers) => { body = JSON.stringify(jwks(...issuers)) },
    start: async () => {
      server = https.createServer({ key: privateKeyPem, cert: certPem }, (req, res) => {
        hits++
        res.setHeader('content-type', 'application/json')
        res.end(req.url === '/jwks' ? body : '{}')
      })
      server.listen(self.port, '127.0.0.1')
      await once(server, 'listening')
      self.port = (server.address() as AddressInfo).port
    },
    stop: async () => {
      const s = server
      server = null
      if (s === null) return
      s.closeAllConnections()
      await new Promise((resolve) => s.close(resolve))
    }
  }
  t.teardown(self.stop)
  return self
}

async function remoteProvider (agent: DevAgent, port: number, remote: Record<string, unknown>): Promise<void> {
  const ca = (await rootPems(agent)).join('\n')
  const res = await fetch(`${agent.address}/v1/config`, {
    method: 'PUT',
    body: JSON.stringify({
      Kind: 'jwt-provider',
      Name: 'okta',
      Issuer: 'https://idp.test',
      JSONWebKeySet: { Remote: { URI: `https://localhost:${port}/jwks`, JWKSCluster: { TLSCertificates: { TrustedCA: { InlineString: ca } } }, ...remote } }
    })
  })
  if (res.status !== 200) throw new Error(await res.text())
}

/** Resolves on the first `'jwks'` event satisfying `predicate`. */
async function jwksEvent (events: NodeJS.EventEmitter, predicate: (e: KeySetEvent) => boolean): Promise<KeySetEvent> {
  return await new Promise((resolve) => {
    const check = (e: KeySetEvent): void => {
      if (!predicate(e)) return
      events.off('jwks', check)
      resolve(e)
    }
    events.on('jwks', check)
  })
}

const bearer = (token: string): Record<string, string> => ({ authorization: `Bearer ${token}` })

async function setup (t: Parameters<typeof startAgent>[0]): Promise<DevAgent> {
  const agent = await startAgent(t, { defaultPolicy: 'deny' })
  await setProtocol(agent, 'api', 'http')
  return agent
}

t.test('readiness waits for the first fetch; keys rotate in and out', async (t) => {
  const a = await newIssuer('RS256')
  const b = await newIssuer('ES256')
  const agent = await setup(t)
  const server = await jwksServer(t, agent)
  server.serve(a)
  await server.start()
  await remoteProvider(agent, server.port, { CacheDuration: '200ms', RequestTimeoutMs: 2000 })
  await setIntentions(agent, 'api', [{ Name: 'web', Permissions: [{ Action: 'allow', HTTP: { PathPrefix: '/' }, JWT: { Providers: [{ Name: 'okta' }] } }] }])
  const svc = await startService(t, agent)
  t.ok(server.hits() >= 1, 'the key set was fetched before the plugin was ready (FetchAsynchronously false)')
  const web = mtlsClient(t, await leafFor(agent, 'web'))
  const tokenA = await a.sign()
  const tokenB = await b.sign()
  t.equal((await get(web, `${svc.origin}/`, { headers: bearer(tokenA) })).status, 200, 'key A')
  t.equal((await get(web, `${svc.origin}/`, { headers: bearer(tokenB) })).status, 403, 'key B is not in the set yet')

  const events = svc.app.consulNative.events
  let next = jwksEvent(events, (e) => e.keys === 2)
  server.serve(a, b)
  await next
  t.equal((await get(web, `${svc.origin}/`, { headers: bearer(tokenB) })).status, 200, 'key B after the set was fetched again')
  t.equal((await get(web, `${svc.origin}/`, { headers: bearer(tokenA) })).status, 200, 'key A still')

  next = jwksEvent(events, (e) => e.keys === 1)
  server.serve(b)
  await next
  t.equal((await get(web, `${svc.origin}/`, { headers: bearer(tokenA) })).status, 403,
    'key A removed: its token is refused even on the connection that had it verified')
  t.equal((await get(web, `${svc.origin}/`, { headers: bearer(tokenB) })).status, 200)
})

t.test('a key server down at start, up later, then down again', async (t) => {
  const a = await newIssuer('PS384')
  const agent = await setup(t)
  const server = await jwksServer(t, agent)
  await server.start()
  await server.stop() // the port is known, nothing listens on it
  await remoteProvider(agent, server.port, { CacheDuration: '100ms', RetryPolicy: { NumRetries: 1, RetryPolicyBackOff: { BaseInterval: '10ms', MaxInterval: '50ms' } } })
  await setIntentions(agent, 'api', [{ Name: 'web', Permissions: [{ Action: 'allow', HTTP: { PathPrefix: '/' }, JWT: { Providers: [{ Name: 'okta' }] } }] }])
  const svc = await startService(t, agent)
  t.equal(svc.app.consulNative.status().ready, true, 'a failed first fetch does not hold readiness forever')
  const web = mtlsClient(t, await leafFor(agent, 'web'))
  const token = await a.sign()
  t.equal((await get(web, `${svc.origin}/`, { headers: bearer(token) })).status, 403, 'no keys: the requirement fails')

  const events = svc.app.consulNative.events
  let next = jwksEvent(events, (e) => e.keys === 1)
  server.serve(a)
  await server.start()
  await next
  t.equal((await get(web, `${svc.origin}/`, { headers: bearer(token) })).status, 200, 'keys fetched once the server is up')

  next = jwksEvent(events, (e) => e.error !== null)
  await server.stop()
  const failed = await next
  t.match(failed.error, /GET https:\/\/localhost:\d+\/jwks/)
  const fresh = mtlsClient(t, await leafFor(agent, 'web'))
  t.equal((await get(fresh, `${svc.origin}/`, { headers: bearer(await a.sign({ sub: 'other' })) })).status, 200,
    'the last good keys stay in force while the server is down')
})
