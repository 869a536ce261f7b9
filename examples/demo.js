'use strict'
// `npm run demo`: a dev agent, an `api` service protected by the plugin, and three callers over
// real mTLS (web, billing, ops) plus one without a certificate; then a `web` service calling `api`
// through the plugin. Prints who got what, and why.
// `npm run demo -- --agentless`: the same, with no local agent: certificates from the Consul
// server's gRPC CA service (the dev agent's gRPC port), intentions from its HTTP API, and the
// instance registered the way consul-k8s would, by the platform rather than by the plugin.
const Fastify = require('fastify')
const { request, Agent } = require('undici')
const { consulNative, httpsOptions } = require('fastify-consul-native')
const { startDevAgent } = require('fastify-consul-native/dev-agent')
const { generateKeyPairSync } = require('node:crypto')
// jose is ESM; Node 20.19+ loads it with require().
const { SignJWT } = require('jose')

async function agentApi (agent, method, path, body) {
  const res = await request(`${agent.address}${path}`, { method, body: body === undefined ? undefined : JSON.stringify(body) })
  const text = await res.body.text()
  if (res.statusCode !== 200) throw new Error(`${method} ${path}: ${res.statusCode} ${text}`)
  return text === '' ? null : JSON.parse(text)
}

// Blocks on the agent (a blocking query) until `service` has a passing instance.
async function waitUntilPassing (agent, service) {
  let index = 0
  for (;;) {
    const res = await request(`${agent.address}/v1/health/connect/${service}?passing${index > 0 ? `&index=${index}&wait=10s` : ''}`)
    const instances = await res.body.json()
    if (instances.length > 0) return
    index = Number(res.headers['x-consul-index'])
  }
}

const agentless = process.argv.includes('--agentless')

async function main () {
  const agent = await startDevAgent({ defaultPolicy: 'deny', ...(agentless ? { grpcPort: 0 } : {}) })
  // Agentless: WatchRoots and Sign on the server's gRPC port; HTTP only for intentions and discovery.
  const pluginOptions = (service) => agentless
    ? { service, agent: { address: agent.address }, certificates: { source: 'consul-grpc', address: agent.grpcAddress, plaintext: true } }
    : { service, agent: { address: agent.address } }

  // A JWT provider (Consul 1.16+): tokens from "https://idp.demo", checked against a local key set.
  const idp = generateKeyPairSync('ec', { namedCurve: 'prime256v1' })
  const jwk = { ...idp.publicKey.export({ format: 'jwk' }), kid: 'demo-1', alg: 'ES256' }
  await agentApi(agent, 'PUT', '/v1/config', {
    Kind: 'jwt-provider',
    Name: 'idp',
    Issuer: 'https://idp.demo',
    JSONWebKeySet: { Local: { JWKS: Buffer.from(JSON.stringify({ keys: [jwk] })).toString('base64') } }
  })
  const token = (claims, key = idp.privateKey) => new SignJWT({ iss: 'https://idp.demo', sub: 'alice', ...claims })
    .setProtectedHeader({ alg: 'ES256', kid: 'demo-1' }).setExpirationTime('10m').sign(key)
  const auditor = await token({ role: 'auditor' })
  const guest = await token({ role: 'guest' })
  const forged = await token({ role: 'auditor' }, generateKeyPairSync('ec', { namedCurve: 'prime256v1' }).privateKey)

  // Intentions for `api`, in Consul's own form: web by L7 permissions, billing denied, ops may read
  // /reports only with an `auditor` token from idp.
  await agentApi(agent, 'PUT', '/v1/config', { Kind: 'service-defaults', Name: 'api', Protocol: 'http' })
  await agentApi(agent, 'PUT', '/v1/config', {
    Kind: 'service-intentions',
    Name: 'api',
    Sources: [
      {
        Name: 'web',
        Permissions: [
          { Action: 'deny', HTTP: { PathPrefix: '/admin' } },
          { Action: 'allow', HTTP: { PathPrefix: '/v1/', Methods: ['GET'] } },
          { Action: 'allow', HTTP: { PathExact: '/v1/orders', Methods: ['POST'], Header: [{ Name: 'x-env', Exact: 'prod' }] } }
        ]
      },
      { Name: 'billing', Action: 'deny' },
      {
        Name: 'ops',
        Permissions: [
          { Action: 'allow', HTTP: { PathPrefix: '/reports' }, JWT: { Providers: [{ Name: 'idp', VerifyClaims: [{ Path: ['role'], Value: 'auditor' }] }] } }
        ]
      }
    ]
  })

  const app = Fastify({ https: httpsOptions() })
  // register: the agent lists this instance (Connect native) for callers that discover it.
  await app.register(consulNative, agentless ? pluginOptions('api') : { ...pluginOptions('api'), register: { check: 'tcp' } })
  app.get('/v1/items', async (req) => ({ items: [], caller: req.consulSource.service }))
  app.post('/v1/orders', async () => ({ ordered: true }))
  app.get('/admin', async () => ({ admin: true }))
  // JWT-protected (by the intention above): the verified claims are on request.consulJwt.
  app.get('/reports', async (req) => ({ reader: req.consulJwt.idp.sub }))
  // A route-level override: only `ops` may call it, whatever the service intentions say.
  app.get('/ops/flags', { config: { consulNative: { sources: [{ name: 'ops', action: 'allow' }, { name: '*', action: 'deny' }] } } },
    async () => ({ flags: {} }))
  // For the demo only: echo the decision so the table can show it. A real service keeps reasons
  // in its logs; they describe the intentions in force.
  app.addHook('onSend', async (req, reply) => {
    reply.header('x-demo-reason', req.consulDecision === null ? 'no verified service certificate' : req.consulDecision.reason)
  })
  await app.listen({ port: 0, host: '127.0.0.1' })
  const origin = `https://127.0.0.1:${app.server.address().port}`
  if (agentless) {
    // On Kubernetes consul-k8s registers the pod; here the demo does it in its place.
    await agentApi(agent, 'PUT', '/v1/agent/service/register', { Name: 'api', Port: app.server.address().port, Address: '127.0.0.1', Connect: { Native: true } })
  }
  const pluginRequests = agent.requestLog.length

  const roots = (await agentApi(agent, 'GET', '/v1/agent/connect/ca/roots')).Roots.map((root) => root.RootCert)
  const clients = { none: new Agent({ connect: { ca: roots, checkServerIdentity: () => undefined } }) }
  for (const name of ['web', 'billing', 'ops']) {
    const leaf = await agentApi(agent, 'GET', `/v1/agent/connect/ca/leaf/${name}`)
    // Service leaves carry a SPIFFE ID, not a host name: the server is checked by its chain here.
    clients[name] = new Agent({ connect: { key: leaf.PrivateKeyPEM, cert: leaf.CertPEM, ca: roots, checkServerIdentity: () => undefined } })
  }

  const calls = [
    ['web', 'GET', '/v1/items'],
    ['web', 'POST', '/v1/orders', { 'x-env': 'prod' }],
    ['web', 'POST', '/v1/orders', { 'x-env': 'dev' }],
    ['web', 'DELETE', '/v1/items'],
    ['web', 'GET', '/admin'],
    ['web', 'GET', '/v1/../admin'],
    ['billing', 'GET', '/v1/items'],
    ['ops', 'GET', '/ops/flags'],
    ['ops', 'GET', '/reports', { authorization: `Bearer ${auditor}` }, 'Bearer <auditor token>'],
    ['ops', 'GET', '/reports', {}, '(no token)'],
    ['ops', 'GET', '/reports', { authorization: `Bearer ${guest}` }, 'Bearer <guest token>'],
    ['ops', 'GET', '/reports', { authorization: `Bearer ${forged}` }, 'Bearer <forged signature>'],
    ['web', 'GET', '/ops/flags'],
    ['none', 'GET', '/v1/items'],
    ['none', 'GET', '/health']
  ]
  const rows = [['caller', 'method', 'path', 'headers', 'status', 'why']]
  for (const [caller, method, path, headers = {}, shown] of calls) {
    // dispatcher.request sends the path exactly as written (`/v1/../admin` included).
    const res = await clients[caller].request({ origin, path, method, headers })
    await res.body.dump()
    const why = res.headers['x-demo-reason'] ?? ''
    rows.push([caller === 'none' ? '(no cert)' : caller, method, path, shown ?? Object.entries(headers).map(([k, v]) => `${k}: ${v}`).join(' '), String(res.statusCode), why])
  }
  const widths = rows[0].map((_, i) => Math.max(...rows.map((row) => row[i].length)))
  const line = (row) => row.map((cell, i) => cell.padEnd(widths[i])).join('  ')
  process.stdout.write(`\nfastify-consul-native demo${agentless ? ' (agentless)' : ''}: service "api", trust domain ${agent.trustDomain}\n\n`)
  process.stdout.write(line(rows[0]) + '\n' + widths.map((w) => '-'.repeat(w)).join('  ') + '\n')
  for (const row of rows.slice(1)) process.stdout.write(line(row) + '\n')
  process.stdout.write('\n')

  // Service to service: a `web` app calls `api` with fastify.consulNative.fetch(), which finds
  // api's instances through the agent and checks that the server really is `api`.
  await waitUntilPassing(agent, 'api')
  const web = Fastify({ https: httpsOptions() })
  await web.register(consulNative, pluginOptions('web'))
  await web.ready()
  const s2s = [['GET', '/v1/items'], ['GET', '/admin']]
  const s2sRows = [['from', 'to', 'method', 'path', 'status']]
  for (const [method, path] of s2s) {
    const res = await web.consulNative.fetch('api', path, { method })
    await res.arrayBuffer()
    s2sRows.push(['web', 'api', method, path, String(res.status)])
  }
  const w2 = s2sRows[0].map((_, i) => Math.max(...s2sRows.map((row) => row[i].length)))
  const line2 = (row) => row.map((cell, i) => cell.padEnd(w2[i])).join('  ')
  process.stdout.write('service to service (web -> api with fastify.consulNative.fetch):\n\n')
  process.stdout.write(line2(s2sRows[0]) + '\n' + w2.map((w) => '-'.repeat(w)).join('  ') + '\n')
  for (const row of s2sRows.slice(1)) process.stdout.write(line2(row) + '\n')
  process.stdout.write('\n')

  if (agentless) {
    // What the plugin asked for while starting: gRPC for certificates, HTTP for the rest.
    const used = [...new Set(agent.requestLog.slice(0, pluginRequests).map((entry) => `${entry.method} ${entry.path}`))]
    process.stdout.write(`requests the dev agent served until api was up (no /v1/agent/connect/* among them):\n  ${used.join('\n  ')}\n\n`)
  }

  for (const client of Object.values(clients)) await client.close()
  await web.close()
  await app.close()
  await agent.close()
}

main().catch((err) => {
  process.stderr.write(`demo failed: ${err.stack}\n`)
  process.exit(1)
})
